"""The schedule descriptor evaluator in Triton [note: schedule descriptor].

A re-expression of ``fusedclr::sched::evaluate`` (csrc/include/fusedclr/schedule.h)
and ``fusedclr.reference.schedule_value``; tests compare it with the latter at
every step of every schedule family, and with torch's own values
(tests/golden_schedules.json).

[note: triton schedule evaluation]
Each program of an update kernel evaluates the descriptor itself, in float64,
from the int64 device counter: a handful of scalar loads and flops per program,
uniform across the program (no divergence), so the schedule costs no launch and
no host sync. The stage kind is read from the descriptor at run time and
dispatched with scalar branches rather than specialised as ``tl.constexpr``:
the kinds live on the device, and reading them on the host would be a sync per
step (or a cache keyed on a tensor's address, which goes stale silently). A
SequentialLR chain is handled the same way, for any number of stages.

Powers are taken by binary powering: every exponent in the descriptor's
formulas but one is a non-negative integer (steps, cycle counts, milestones
passed), so ``pow`` (not in Triton's portable math, and not in the
interpreter's libdevice) is never needed. The result stays within a few ulp of
double ``pow`` for the exponents of ordinary runs, but not at huge ones: each
squaring doubles the rounding error of those before it, so the relative error
grows with the exponent (about ``t * 2**-53`` at worst; ExponentialLR's
``gamma ** t`` is 7.7e-9 off C's ``pow`` at t = 2**32 + 5, CyclicLR exp_range's
2.4e-11 at 2**31 - 1: tests/test_triton.py's golden-table cases marked xfail).
The exception, PolynomialLR's real ``power``, is taken as ``exp(power * log(x))``.
Cosine and floor use ``tl.cos`` / ``tl.floor``, which Triton lowers for fp64 on
NVIDIA and AMD GPUs and which the interpreter maps to numpy.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from fusedclr.reference import (
    ANNEAL,
    CYCLIC_MODES,
    H_COMBINE,
    HEADER_WORDS,
    PRODUCT,
    S_HAS_MOM,
    S_KIND,
    S_P0,
    S_T_BEGIN,
    STAGE_WORDS,
    Kind,
)

# Descriptor layout, kinds and modes, shared with reference.py so the two never drift
# (tests/test_golden_schedules.py checks reference.py's against schedule.h's).
_HEADER: tl.constexpr = tl.constexpr(HEADER_WORDS)
_STAGE: tl.constexpr = tl.constexpr(STAGE_WORDS)
_H_COMBINE: tl.constexpr = tl.constexpr(H_COMBINE)
_PRODUCT: tl.constexpr = tl.constexpr(PRODUCT)
_S_KIND: tl.constexpr = tl.constexpr(S_KIND)
_S_T_BEGIN: tl.constexpr = tl.constexpr(S_T_BEGIN)
_S_P0: tl.constexpr = tl.constexpr(S_P0)
_S_HAS_MOM: tl.constexpr = tl.constexpr(S_HAS_MOM)
_K_CONSTANT: tl.constexpr = tl.constexpr(Kind.CONSTANT)
_K_STEP: tl.constexpr = tl.constexpr(Kind.STEP)
_K_MULTISTEP: tl.constexpr = tl.constexpr(Kind.MULTISTEP)
_K_EXPONENTIAL: tl.constexpr = tl.constexpr(Kind.EXPONENTIAL)
_K_LINEAR: tl.constexpr = tl.constexpr(Kind.LINEAR)
_K_CONSTANT_FACTOR: tl.constexpr = tl.constexpr(Kind.CONSTANT_FACTOR)
_K_COSINE: tl.constexpr = tl.constexpr(Kind.COSINE)
_K_COSINE_RESTARTS: tl.constexpr = tl.constexpr(Kind.COSINE_RESTARTS)
_K_CYCLIC: tl.constexpr = tl.constexpr(Kind.CYCLIC)
_K_ONE_CYCLE: tl.constexpr = tl.constexpr(Kind.ONE_CYCLE)
_K_POLYNOMIAL: tl.constexpr = tl.constexpr(Kind.POLYNOMIAL)
_MODE_TRIANGULAR2: tl.constexpr = tl.constexpr(CYCLIC_MODES["triangular2"])
_MODE_EXP_RANGE: tl.constexpr = tl.constexpr(CYCLIC_MODES["exp_range"])
_ANNEAL_LINEAR: tl.constexpr = tl.constexpr(ANNEAL["linear"])
_PI: tl.constexpr = tl.constexpr(math.pi)


@triton.jit
def _ipow(base, n):
    """``base ** n`` for a float64 ``base`` and an int64 ``n >= 0`` (``0 ** 0 == 1``)."""
    result = tl.full([], 1.0, tl.float64)
    b = base
    e = n
    while e > 0:
        if (e % 2) == 1:
            result = result * b
        b = b * b
        e = e // 2
    return result


@triton.jit
def _anneal(how, start, end, pct):
    if how == _ANNEAL_LINEAR:
        out = (end - start) * pct + start
    else:
        out = end + (start - end) / 2.0 * (tl.cos(pct * _PI) + 1.0)
    return out


@triton.jit
def _stage_value(d_ptr, st, t):
    """(lr, momentum, has_momentum) of the stage record at ``d_ptr + st`` at local step ``t``."""
    p_ptr = d_ptr + st + _S_P0
    kind = tl.load(d_ptr + st + _S_KIND).to(tl.int32)
    td = t.to(tl.float64)
    lr = tl.full([], 0.0, tl.float64)
    mom = tl.full([], 0.0, tl.float64)
    if kind == _K_CONSTANT:
        lr = tl.load(p_ptr)
    elif kind == _K_STEP:
        period = tl.load(p_ptr + 2).to(tl.int64)
        lr = tl.load(p_ptr) * _ipow(tl.load(p_ptr + 1), t // period)
    elif kind == _K_MULTISTEP:
        start = tl.load(p_ptr + 2).to(tl.int64)
        count = tl.load(p_ptr + 3).to(tl.int64)
        passed = tl.full([], 0, tl.int64)
        for i in range(0, count):
            passed += (tl.load(d_ptr + start + i) <= td).to(tl.int64)
        lr = tl.load(p_ptr) * _ipow(tl.load(p_ptr + 1), passed)
    elif kind == _K_EXPONENTIAL:
        lr = tl.load(p_ptr) * _ipow(tl.load(p_ptr + 1), t)
    elif kind == _K_LINEAR:
        lo = tl.load(p_ptr + 1)
        total = tl.load(p_ptr + 3)
        done = tl.minimum(td, total)
        lr = tl.load(p_ptr) * (lo + (tl.load(p_ptr + 2) - lo) * done / total)
    elif kind == _K_CONSTANT_FACTOR:
        factor = tl.where(td < tl.load(p_ptr + 2), tl.load(p_ptr + 1), 1.0)
        lr = tl.load(p_ptr) * factor
    elif kind == _K_COSINE:
        base = tl.load(p_ptr)
        eta_min = tl.load(p_ptr + 1)
        lr = eta_min + (base - eta_min) * (1.0 + tl.cos(td * _PI / tl.load(p_ptr + 2))) / 2.0
    elif kind == _K_POLYNOMIAL:
        # The one real (non-integer) power: x ** p as exp(p * log(x)), with 0 ** p
        # (the end of the decay) taken as Python's 0.0 ** p (1 for p == 0, else 0).
        total = tl.load(p_ptr + 1)
        power = tl.load(p_ptr + 2)
        x = 1.0 - tl.minimum(td, total) / total
        safe = tl.where(x > 0.0, x, 1.0)
        lr = tl.load(p_ptr) * tl.where(x > 0.0, tl.exp(power * tl.log(safe)), tl.where(power == 0.0, 1.0, 0.0))
    elif kind == _K_COSINE_RESTARTS:
        base = tl.load(p_ptr)
        warm = tl.load(p_ptr + 5).to(tl.int64)
        if t < warm:
            warm_from = tl.load(p_ptr + 6)
            lr = warm_from + (base - warm_from) * td / warm.to(tl.float64)
        else:
            eta_min = tl.load(p_ptr + 1)
            tc = t - warm
            ti = tl.load(p_ptr + 2).to(tl.int64)
            mult = tl.load(p_ptr + 3).to(tl.int64)
            cycle = tl.full([], 0, tl.int64)
            if mult == 1:
                # Non-negative operands: C's truncating // and % are Python's.
                cycle = tc // ti
                tc = tc % ti
            else:
                # At most ~63 rounds before ti overflows int64, as in schedule.h.
                while tc >= ti:
                    tc -= ti
                    ti *= mult
                    cycle += 1
            peak = base * _ipow(tl.load(p_ptr + 4), cycle)
            lr = eta_min + (peak - eta_min) * (1.0 + tl.cos(tc.to(tl.float64) * _PI / ti.to(tl.float64))) / 2.0
    elif kind == _K_CYCLIC:
        total = tl.load(p_ptr + 2)
        ratio = tl.load(p_ptr + 3)
        mode = tl.load(p_ptr + 4).to(tl.int32)
        cycle = tl.floor(1.0 + td / total)
        x = 1.0 + td / total - cycle
        if x <= ratio:
            factor = x / ratio
        else:
            factor = (x - 1.0) / (ratio - 1.0)
        scale = tl.full([], 1.0, tl.float64)
        if mode == _MODE_TRIANGULAR2:
            # 2^-(cycle - 1), exact down to the subnormals and then 0, as the reference's ldexp.
            scale = _ipow(tl.full([], 0.5, tl.float64), (cycle - 1.0).to(tl.int64))
        elif mode == _MODE_EXP_RANGE:
            scale = _ipow(tl.load(p_ptr + 5), t)
        base_lr = tl.load(p_ptr)
        max_mom = tl.load(p_ptr + 7)
        lr = base_lr + (tl.load(p_ptr + 1) - base_lr) * factor * scale
        mom = max_mom - (max_mom - tl.load(p_ptr + 6)) * factor * scale
    elif kind == _K_ONE_CYCLE:
        init = tl.load(p_ptr)
        peak = tl.load(p_ptr + 1)
        low = tl.load(p_ptr + 2)
        m_base = tl.load(p_ptr + 3)
        m_max = tl.load(p_ptr + 4)
        phases = tl.load(p_ptr + 5).to(tl.int32)
        how = tl.load(p_ptr + 9).to(tl.int32)
        end0 = tl.load(p_ptr + 6)
        end1 = tl.load(p_ptr + 7)
        # torch's phase table: a step belongs to the first phase whose end it
        # does not pass, and the last phase takes everything beyond.
        if td <= end0:
            pct = td / end0
            lr = _anneal(how, init, peak, pct)
            mom = _anneal(how, m_max, m_base, pct)
        elif (td <= end1) or (phases == 2):
            pct = (td - end0) / (end1 - end0)
            if phases == 2:
                lr = _anneal(how, peak, low, pct)
            else:
                lr = _anneal(how, peak, init, pct)
            mom = _anneal(how, m_base, m_max, pct)
        else:
            pct = (td - end1) / (tl.load(p_ptr + 8) - end1)
            lr = _anneal(how, init, low, pct)
            mom = m_max
    # As the reference: only the kinds that compute a momentum can schedule it.
    # (tl.where rather than `&`: the interpreter gives float comparisons float data.)
    has_mom = tl.where((kind == _K_CYCLIC) | (kind == _K_ONE_CYCLE), tl.load(d_ptr + st + _S_HAS_MOM) != 0.0, False)
    return lr, mom, has_mom


@triton.jit
def _schedule_value(d_ptr, t):
    """(lr, momentum, has_lr, has_momentum) of the descriptor at global step ``t`` (int64).

    ``has_lr`` is false with no stages (the param group's values are used) or
    an unknown stage kind, where the reference raises but a kernel cannot.
    """
    n = tl.load(d_ptr).to(tl.int32)
    lr = tl.full([], 0.0, tl.float64)
    mom = tl.full([], 0.0, tl.float64)
    has_lr = n > 0
    has_mom = n < 0
    if tl.load(d_ptr + _H_COMBINE).to(tl.int32) == _PRODUCT:
        # Schedulers composed by torch's multiplication: every stage at its own local step.
        lr = tl.full([], 1.0, tl.float64)
        for i in range(0, n):
            st_i = i * _STAGE + _HEADER
            kind_i = tl.load(d_ptr + st_i + _S_KIND).to(tl.int32)
            has_lr = has_lr & (kind_i >= _K_CONSTANT) & (kind_i <= _K_POLYNOMIAL)
            lr_i, mom_i, has_mom_i = _stage_value(d_ptr, st_i, t - tl.load(d_ptr + st_i + _S_T_BEGIN).to(tl.int64))
            lr = lr * lr_i
    else:
        idx = tl.full([], 0, tl.int32)
        for i in range(1, n):
            if t.to(tl.float64) >= tl.load(d_ptr + _HEADER + i * _STAGE + _S_T_BEGIN):
                idx = i
        st = idx * _STAGE + _HEADER
        if n > 0:
            kind = tl.load(d_ptr + st + _S_KIND).to(tl.int32)
            has_lr = (kind >= _K_CONSTANT) & (kind <= _K_POLYNOMIAL)
            lr, mom, has_mom = _stage_value(d_ptr, st, t - tl.load(d_ptr + st + _S_T_BEGIN).to(tl.int64))
    return lr, mom, has_lr, has_mom


@triton.jit
def _lr_and_momentum(hyper_ptr, schedule_ptr, schedule_step_ptr):
    """The step's lr and momentum / beta1: the schedule's where it has them, else ``hyper``."""
    lr, mom, has_lr, has_mom = _schedule_value(schedule_ptr, tl.load(schedule_step_ptr))
    lr = tl.where(has_lr, lr, tl.load(hyper_ptr))
    mom = tl.where(has_mom, mom, tl.load(hyper_ptr + 1))
    return lr, mom


@triton.jit
def _schedule_eval_kernel(schedule_ptr, steps_ptr, out_ptr):
    """One program per step: ``out[i] = [lr, momentum, has_lr, has_momentum]`` at ``steps[i]``.

    The layout of the ``fusedclr::schedule_eval`` op, for tests that compare
    this evaluator with the reference at many steps in one launch.
    """
    i = tl.program_id(0).to(tl.int64)
    lr, mom, has_lr, has_mom = _schedule_value(schedule_ptr, tl.load(steps_ptr + i))
    tl.store(out_ptr + 4 * i, lr)
    tl.store(out_ptr + 4 * i + 1, mom)
    tl.store(out_ptr + 4 * i + 2, has_lr.to(tl.float64))
    tl.store(out_ptr + 4 * i + 3, has_mom.to(tl.float64))
