"""The generic walk of every optimizer in Triton [note: math policies].

One update kernel, :func:`_step_kernel`, for all optimizers, and one
step-counter kernel, :func:`_advance_kernel`: the Triton twins of
csrc/cuda/optim_kernels.cuh's ``update_kernel`` and ``advance_steps_kernel``.
The kernel does what every optimizer shares (the launch layout of [note:
triton launch layout]: read its chunk row, evaluate the schedule, compute its
segment's scalars once, walk the chunk in tiles; load the parameter through
the master, the unscaled and sign-adjusted gradient and the states; store
them back with the precision opt-ins' rounding) and hands the registers to
the optimizer's policy (fusedclr/triton/_policies.py). ``OPTIMIZER`` is a
constexpr, so the dispatch below happens when the kernel is compiled: a
compiled kernel holds one policy's code and nothing else, and the policies'
own variants are the option constexprs ``OPT0`` to ``OPT4`` (the op's
``options`` in the policy's order, zero-padded) and ``HAS_STATE0`` to
``HAS_STATE3`` (which of the op's ``states`` are given; the absent ones are
placeholders [note: triton absent buffers] that are never read or written).

[note: triton step counters]
A step first increments every active segment's count and then uses the new
value [note: step contract]. Several programs share a segment, so the update
kernel must not write the count another program may still read: a first,
tiny launch (:func:`_advance_kernel`, one lane per segment) adds one to the
count of every segment that has a gradient, and advances the policy's
per-segment scalar with it (NAdam's mu_product, which needs the step's beta1
from the schedule), and the update launch that follows on the same stream
reads the settled values, as on CUDA ([note: step counters on CUDA]). That
is two launches per op call; Lookahead, which advances nothing, makes one.
With ``found_inf`` non-zero both kernels change nothing.

:func:`_grad_zero_kernel` is ``fusedclr::grad_zero_`` (csrc/ops.cpp [note:
zeroing through the table]): the same layout, one program per chunk, storing
zeros over the chunk's range of an active segment's gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedclr.triton._common import (
    ALIGN,
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
from fusedclr.triton._policies import (
    ADAGRAD,
    ADAM,
    LION,
    LOOKAHEAD,
    NADAM,
    RADAM,
    RMSPROP,
    SGD,
    adagrad_scalars,
    adagrad_update,
    adam_scalars,
    adam_update,
    lion_scalars,
    lion_update,
    lookahead_scalars,
    lookahead_sync,
    lookahead_update,
    nadam_advance,
    nadam_scalars,
    nadam_update,
    radam_scalars,
    radam_update,
    rmsprop_scalars,
    rmsprop_update,
    sgd_scalars,
    sgd_update,
)
from fusedclr.triton._schedule import _lr_and_momentum

# --------------------------------------------------------------------------
# Compile-time dispatch to the policies
# --------------------------------------------------------------------------


@triton.jit
def _scalars(lr, momentum, step, seg_scalar, OPTIMIZER: tl.constexpr, OPT0: tl.constexpr, OPT1: tl.constexpr,
             OPT2: tl.constexpr, OPT3: tl.constexpr, OPT4: tl.constexpr, MATH_F64: tl.constexpr):
    """The policy's per-segment scalars (``Policy::scalars<T>``)."""
    if OPTIMIZER == SGD:
        k = sgd_scalars(lr, momentum, step, OPT0, OPT1, MATH_F64)
    elif OPTIMIZER == ADAM:
        k = adam_scalars(lr, momentum, step, OPT0, OPT1, OPT2, MATH_F64)
    elif OPTIMIZER == RMSPROP:
        k = rmsprop_scalars(lr, momentum, OPT0, OPT1, OPT2, MATH_F64)
    elif OPTIMIZER == ADAGRAD:
        k = adagrad_scalars(lr, step, OPT0, OPT1, OPT2, MATH_F64)
    elif OPTIMIZER == RADAM:
        k = radam_scalars(lr, momentum, step, OPT0, OPT1, OPT2, MATH_F64)
    elif OPTIMIZER == NADAM:
        k = nadam_scalars(lr, momentum, step, seg_scalar, OPT0, OPT1, OPT2, OPT4, MATH_F64)
    elif OPTIMIZER == LION:
        k = lion_scalars(lr, momentum, OPT0, OPT1, MATH_F64)
    else:
        tl.static_assert(OPTIMIZER == LOOKAHEAD, "fusedclr.triton: unknown OPTIMIZER id")
        k = lookahead_scalars(step, OPT0, OPT1, MATH_F64)
    return k


@triton.jit
def _active_end(k, begin, end, OPTIMIZER: tl.constexpr):
    """``end``, or ``begin`` where the policy skips the segment this step (``Policy::skip``)."""
    if OPTIMIZER == LOOKAHEAD:
        end = tl.where(lookahead_sync(k), end, begin)
    return end


@triton.jit
def _update(p, g, s0, s1, s2, s3, k, OPTIMIZER: tl.constexpr, HAS_STATE0: tl.constexpr,
            HAS_STATE1: tl.constexpr, HAS_STATE2: tl.constexpr, OPT0: tl.constexpr, OPT1: tl.constexpr,
            OPT2: tl.constexpr, OPT3: tl.constexpr, OPT4: tl.constexpr, MATH_F64: tl.constexpr):
    """The policy's per-element update of one tile (``Policy::update<V>``); the constexprs pick the variant."""
    if OPTIMIZER == SGD:
        p, s0, s1, s2, s3 = sgd_update(p, g, s0, s1, s2, s3, k, OPT1, OPT2, HAS_STATE0)
    elif OPTIMIZER == ADAM:
        p, s0, s1, s2, s3 = adam_update(p, g, s0, s1, s2, s3, k, OPT2, OPT3, HAS_STATE2, MATH_F64)
    elif OPTIMIZER == RMSPROP:
        p, s0, s1, s2, s3 = rmsprop_update(p, g, s0, s1, s2, s3, k, OPT2, HAS_STATE1, HAS_STATE2, MATH_F64)
    elif OPTIMIZER == ADAGRAD:
        p, s0, s1, s2, s3 = adagrad_update(p, g, s0, s1, s2, s3, k, OPT1, MATH_F64)
    elif OPTIMIZER == RADAM:
        p, s0, s1, s2, s3 = radam_update(p, g, s0, s1, s2, s3, k, OPT2, OPT3, MATH_F64)
    elif OPTIMIZER == NADAM:
        p, s0, s1, s2, s3 = nadam_update(p, g, s0, s1, s2, s3, k, OPT2, OPT3, MATH_F64)
    elif OPTIMIZER == LION:
        p, s0, s1, s2, s3 = lion_update(p, g, s0, s1, s2, s3, k, OPT1)
    else:
        p, s0, s1, s2, s3 = lookahead_update(p, g, s0, s1, s2, s3, k)
    return p, s0, s1, s2, s3


@triton.jit
def _advance_scalar(scalar, step, momentum, OPTIMIZER: tl.constexpr, OPT4: tl.constexpr):
    """The per-segment scalar after its segment's step advanced to ``step`` (``Policy::advance``)."""
    tl.static_assert(OPTIMIZER == NADAM, "fusedclr.triton: only NAdam keeps a per-segment scalar")
    return nadam_advance(scalar, step, momentum, OPT4)


# --------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------


@triton.jit
def _tile(idx, mask, param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, state3_ptr, master_ptr, key,
          grad_scale, k, OPTIMIZER: tl.constexpr, HAS_STATE0: tl.constexpr, HAS_STATE1: tl.constexpr,
          HAS_STATE2: tl.constexpr, HAS_STATE3: tl.constexpr, OPT0: tl.constexpr, OPT1: tl.constexpr,
          OPT2: tl.constexpr, OPT3: tl.constexpr, OPT4: tl.constexpr, USES_GRAD: tl.constexpr,
          MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MATH_F64: tl.constexpr, WRITE: tl.constexpr):
    """One tile: load, the policy's update, store (``PolicyLoop::run`` for a tile of lanes)."""
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    p = load_param(param_ptr, master_ptr, idx, mask, WRITE, MATH_F64)
    if USES_GRAD:
        g = tl.load(grad_ptr + idx, mask=mask).to(T)
        if HAS_GRAD_SCALE:
            g = div(g, grad_scale, MATH_F64)
        if MAXIMIZE:
            g = -g
    else:
        g = p  # never read (Lookahead)
    # Absent states are zeros that the policy's variant never reads and the walk never stores.
    s0 = tl.zeros_like(p)
    s1 = s0
    s2 = s0
    s3 = s0
    if HAS_STATE0:
        s0 = tl.load(state0_ptr + idx, mask=mask).to(T)
    if HAS_STATE1:
        s1 = tl.load(state1_ptr + idx, mask=mask).to(T)
    if HAS_STATE2:
        s2 = tl.load(state2_ptr + idx, mask=mask).to(T)
    if HAS_STATE3:
        s3 = tl.load(state3_ptr + idx, mask=mask).to(T)
    p, s0, s1, s2, s3 = _update(p, g, s0, s1, s2, s3, k, OPTIMIZER, HAS_STATE0, HAS_STATE1, HAS_STATE2, OPT0,
                                OPT1, OPT2, OPT3, OPT4, MATH_F64)
    store_param(param_ptr, master_ptr, idx, mask, p, key, WRITE)
    if HAS_STATE0:
        store(state0_ptr + idx, s0, mask)
    if HAS_STATE1:
        store(state1_ptr + idx, s1, mask)
    if HAS_STATE2:
        store(state2_ptr + idx, s2, mask)
    if HAS_STATE3:
        store(state3_ptr + idx, s3, mask)


@triton.jit(do_not_specialize=["sr_seed"])
def _step_kernel(
    segments_ptr,
    state0_ptr,
    state1_ptr,
    state2_ptr,
    state3_ptr,
    seg_steps_ptr,
    seg_scalars_ptr,
    chunks_ptr,
    hyper_ptr,
    schedule_ptr,
    schedule_step_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    master_ptr,
    sr_seed,
    OPTIMIZER: tl.constexpr,
    HAS_STATE0: tl.constexpr,
    HAS_STATE1: tl.constexpr,
    HAS_STATE2: tl.constexpr,
    HAS_STATE3: tl.constexpr,
    OPT0: tl.constexpr,
    OPT1: tl.constexpr,
    OPT2: tl.constexpr,
    OPT3: tl.constexpr,
    OPT4: tl.constexpr,
    USES_GRAD: tl.constexpr,
    SEG_SCALAR: tl.constexpr,
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
    lr, momentum = _lr_and_momentum(hyper_ptr, schedule_ptr, schedule_step_ptr)
    # The counts (and scalars) were advanced by _advance_kernel [note: triton step counters]. A program with
    # nothing to do (no gradient, a skipped step) computes its unused scalars at step 1 from a zero scalar,
    # so that they stay finite (a count of 0 would divide by 1 - beta1^0).
    work = end > begin
    step = tl.where(work, tl.load(seg_steps_ptr + seg), 1)
    seg_scalar = tl.full([], 0.0, tl.float64)
    if SEG_SCALAR:
        seg_scalar = tl.where(work, tl.load(seg_scalars_ptr + seg), 0.0)
    k = _scalars(lr, momentum, step, seg_scalar, OPTIMIZER, OPT0, OPT1, OPT2, OPT3, OPT4, MATH_F64)
    end = _active_end(k, begin, end, OPTIMIZER)
    key = write_key(sr_seed, step, WRITE)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = to_math(tl.load(grad_scale_ptr), MATH_F64)
    lo, hi = aligned_bounds(begin, end)
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        _tile(idx, idx < hi, param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, state3_ptr, master_ptr, key,
              grad_scale, k, OPTIMIZER, HAS_STATE0, HAS_STATE1, HAS_STATE2, HAS_STATE3, OPT0, OPT1, OPT2, OPT3, OPT4,
              USES_GRAD, MAXIMIZE, HAS_GRAD_SCALE, MATH_F64, WRITE)
    idx, mask = edge_lanes(begin, end, lo, hi)
    _tile(idx, mask, param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, state3_ptr, master_ptr, key,
          grad_scale, k, OPTIMIZER, HAS_STATE0, HAS_STATE1, HAS_STATE2, HAS_STATE3, OPT0, OPT1, OPT2, OPT3, OPT4,
          USES_GRAD, MAXIMIZE, HAS_GRAD_SCALE, MATH_F64, WRITE)


@triton.jit
def _advance_kernel(
    seg_steps_ptr,
    segments_ptr,
    found_inf_ptr,
    seg_scalars_ptr,
    hyper_ptr,
    schedule_ptr,
    schedule_step_ptr,
    n_segments,
    OPTIMIZER: tl.constexpr,
    OPT4: tl.constexpr,
    SEG_SCALAR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``seg_steps += has_grad & !found_inf``, and the per-segment scalars of the segments that stepped
    [note: triton step counters]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_segments
    inc = (tl.load(segments_ptr + offs * 4 + 1, mask=mask, other=0) != 0).to(tl.int64)
    if HAS_FOUND_INF:
        inc = tl.where(tl.load(found_inf_ptr) == 0, inc, 0)
    steps = tl.load(seg_steps_ptr + offs, mask=mask, other=0) + inc
    tl.store(seg_steps_ptr + offs, steps, mask=mask)
    if SEG_SCALAR:
        lr, momentum = _lr_and_momentum(hyper_ptr, schedule_ptr, schedule_step_ptr)
        moved = tl.where(inc != 0, mask, False)
        scalar = tl.load(seg_scalars_ptr + offs, mask=moved, other=0.0)
        tl.store(seg_scalars_ptr + offs, _advance_scalar(scalar, steps, momentum, OPTIMIZER, OPT4),
                 mask=moved)


@triton.jit
def _grad_zero_kernel(segments_ptr, chunks_ptr, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per chunk of the chunk table: zeros over its range of the segment's gradient, nothing for a
    segment without one (``chunk_row`` empties its range)."""
    _, begin, end, _, grad_ptr = chunk_row(chunks_ptr, segments_ptr, segments_ptr, PARAM_DTYPE, False)
    lo, hi = aligned_bounds(begin, end)
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        tl.store(grad_ptr + idx, tl.zeros([BLOCK], PARAM_DTYPE), mask=idx < hi)
    idx, mask = edge_lanes(begin, end, lo, hi)
    tl.store(grad_ptr + idx, tl.zeros([2 * ALIGN], PARAM_DTYPE), mask=mask)
