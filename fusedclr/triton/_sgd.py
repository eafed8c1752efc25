"""SGD (momentum, Nesterov, dampening, weight decay, maximize) over a flat buffer in Triton.

The per-element formula is torch.optim's, in torch's order, as in
``fusedclr::sgd_update`` (csrc/include/fusedclr/update.h) and
``fusedclr.reference.sgd_step_``; the launch layout is [note: triton launch layout].
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
    store,
    store_param,
    to_math,
    write_key,
)
from fusedclr.triton._schedule import _lr_and_momentum


@triton.jit
def _sgd_tile(
    idx,
    mask,
    param_ptr,
    grad_ptr,
    momentum_buffer_ptr,
    master_ptr,
    key,
    grad_scale,
    neg_lr,
    momentum,
    use_momentum,
    first,
    DAMPENING: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_MOMENTUM_BUFFER: tl.constexpr,
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
        g = g + p * WEIGHT_DECAY
    if HAS_MOMENTUM_BUFFER:
        buf = to_math(tl.load(momentum_buffer_ptr + idx, mask=mask), MATH_F64)
        # torch: buf = grad on the first step, else buf * momentum + (1 - dampening) * grad.
        buf = tl.where(first, g, buf * momentum + g * (1.0 - DAMPENING))
        if NESTEROV:
            stepped = g + buf * momentum
        else:
            stepped = buf
        # A zero momentum (a schedule may reach it) leaves the buffer alone, as in
        # torch. tl.where rather than `mask & use_momentum`: the interpreter gives a
        # float comparison float data, which `&` rejects.
        g = tl.where(use_momentum, stepped, g)
        store(momentum_buffer_ptr + idx, buf, tl.where(use_momentum, mask, False))
    p = p + g * neg_lr
    store_param(param_ptr, master_ptr, idx, mask, p, key, WRITE)


@triton.jit(do_not_specialize=["sr_seed"])
def _sgd_kernel(
    segments_ptr,
    momentum_buffer_ptr,
    seg_steps_ptr,
    chunks_ptr,
    hyper_ptr,
    schedule_ptr,
    schedule_step_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    master_ptr,
    sr_seed,
    DAMPENING: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_MOMENTUM_BUFFER: tl.constexpr,
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
    lr, momentum = _lr_and_momentum(hyper_ptr, schedule_ptr, schedule_step_ptr)
    step = tl.load(seg_steps_ptr + seg) + 1
    first = step <= 1
    key = write_key(sr_seed, step, WRITE)
    use_momentum = momentum != 0.0
    # torch casts the Python-float scalars to the math type: p.add(g, alpha=-lr), buf.mul_(momentum).
    neg_lr = to_math(-lr, MATH_F64)
    momentum = to_math(momentum, MATH_F64)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = to_math(tl.load(grad_scale_ptr), MATH_F64)
    lo, hi = aligned_bounds(begin, end)
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        _sgd_tile(idx, idx < hi, param_ptr, grad_ptr, momentum_buffer_ptr, master_ptr, key, grad_scale, neg_lr,
                  momentum, use_momentum, first, DAMPENING, WEIGHT_DECAY, NESTEROV, MAXIMIZE, HAS_MOMENTUM_BUFFER,
                  HAS_GRAD_SCALE, MATH_F64, WRITE)
    idx, mask = edge_lanes(begin, end, lo, hi)
    _sgd_tile(idx, mask, param_ptr, grad_ptr, momentum_buffer_ptr, master_ptr, key, grad_scale, neg_lr, momentum,
              use_momentum, first, DAMPENING, WEIGHT_DECAY, NESTEROV, MAXIMIZE, HAS_MOMENTUM_BUFFER, HAS_GRAD_SCALE,
              MATH_F64, WRITE)
