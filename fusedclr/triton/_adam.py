"""Adam / AdamW (amsgrad, maximize, L2 or decoupled weight decay) over a flat buffer in Triton.

The per-element formula is torch.optim's single-tensor one, in torch's order, as
in ``fusedclr::adam_update`` (csrc/include/fusedclr/update.h) and
``fusedclr.reference.adam_step_``; the launch layout is [note: triton launch layout].
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedclr.triton._common import (
    aligned_bounds,
    chunk_row,
    div,
    edge_lanes,
    load_param,
    sqrt,
    store,
    store_param,
    to_math,
    write_key,
)
from fusedclr.triton._schedule import _ipow, _lr_and_momentum


@triton.jit
def _adam_tile(
    idx,
    mask,
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    master_ptr,
    key,
    grad_scale,
    weight,
    weight_small,
    decay,
    step_size,
    bc2_sqrt,
    BETA2: tl.constexpr,
    EPS: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MATH_F64: tl.constexpr,
    WRITE: tl.constexpr,
):
    p = load_param(param_ptr, master_ptr, idx, mask, WRITE, MATH_F64)
    g = to_math(tl.load(grad_ptr + idx, mask=mask), MATH_F64)
    if HAS_GRAD_SCALE:
        g = div(g, grad_scale, MATH_F64)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY != 0.0:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + p * WEIGHT_DECAY
    m = to_math(tl.load(exp_avg_ptr + idx, mask=mask), MATH_F64)
    v = to_math(tl.load(exp_avg_sq_ptr + idx, mask=mask), MATH_F64)
    # exp_avg.lerp_(grad, 1 - beta1) with torch's two-sided lerp formula.
    m = tl.where(weight_small, m + (g - m) * weight, g - (g - m) * (1.0 - weight))
    v = v * BETA2 + g * (1.0 - BETA2) * g
    second = v
    if AMSGRAD:
        vmax = to_math(tl.load(max_exp_avg_sq_ptr + idx, mask=mask), MATH_F64)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        store(max_exp_avg_sq_ptr + idx, vmax, mask)
        second = vmax
    denom = div(sqrt(second, MATH_F64), bc2_sqrt, MATH_F64) + EPS
    p = p - div(m * step_size, denom, MATH_F64)
    store(exp_avg_ptr + idx, m, mask)
    store(exp_avg_sq_ptr + idx, v, mask)
    store_param(param_ptr, master_ptr, idx, mask, p, key, WRITE)


@triton.jit(do_not_specialize=["sr_seed"])
def _adam_kernel(
    segments_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    seg_steps_ptr,
    chunks_ptr,
    hyper_ptr,
    schedule_ptr,
    schedule_step_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    master_ptr,
    sr_seed,
    BETA2: tl.constexpr,
    EPS: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    MATH_F64: tl.constexpr,
    WRITE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per chunk of the chunk table; parameters and gradients through the segment table."""
    seg, begin, end, param_ptr, grad_ptr = chunk_row(chunks_ptr, segments_ptr, found_inf_ptr, PARAM_DTYPE,
                                                    HAS_FOUND_INF)
    lr, beta1 = _lr_and_momentum(hyper_ptr, schedule_ptr, schedule_step_ptr)
    step = tl.load(seg_steps_ptr + seg) + 1
    key = write_key(sr_seed, step, WRITE)
    # Per-segment scalars in float64, as torch computes them in Python floats,
    # then cast to the math type as torch casts a Python scalar.
    bias_correction1 = 1.0 - _ipow(beta1, step)
    bias_correction2 = 1.0 - _ipow(tl.full([], BETA2, tl.float64), step)
    step_size = to_math(lr / bias_correction1, MATH_F64)
    bc2_sqrt = to_math(tl.sqrt(bias_correction2), MATH_F64)
    decay = to_math(1.0 - lr * WEIGHT_DECAY, MATH_F64)
    one_minus_beta1 = 1.0 - beta1
    weight = to_math(one_minus_beta1, MATH_F64)
    weight_small = tl.abs(one_minus_beta1) < 0.5
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = to_math(tl.load(grad_scale_ptr), MATH_F64)
    lo, hi = aligned_bounds(begin, end)
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        _adam_tile(idx, idx < hi, param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
                   key, grad_scale, weight, weight_small, decay, step_size, bc2_sqrt, BETA2, EPS, WEIGHT_DECAY,
                   DECOUPLED, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, MATH_F64, WRITE)
    idx, mask = edge_lanes(begin, end, lo, hi)
    _adam_tile(idx, mask, param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, key,
               grad_scale, weight, weight_small, decay, step_size, bc2_sqrt, BETA2, EPS, WEIGHT_DECAY, DECOUPLED,
               AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, MATH_F64, WRITE)
