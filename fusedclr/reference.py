"""The oracle: pure-PyTorch optimizer updates and schedules.

Every backend (the C++ CPU kernel, CUDA, Triton) is tested against this module,
and the host side of the schedulers (``get_last_lr()``) evaluates schedules with
it. It favours clarity over speed, follows ``torch.optim``'s single-tensor
formulas in torch's order, and works in float64.

Two layers:

* single-tensor updates (:func:`sgd_update_`, :func:`adam_update_`) on one
  parameter and its state, written like ``torch.optim``'s for-loop code;
* the bucket step :func:`step_`, with the signature of the ``fusedclr::step_``
  op, except that the segment table is replaced by the tensors behind it
  (:class:`Segments`): the parameters and gradients are gathered into the
  flat state layout, updated there in one vectorised pass by the optimizer's
  math policy (:data:`POLICIES`) and written back. This is the
  ``backend="reference"`` path.

:func:`schedule_value` evaluates the schedule descriptor described in
``csrc/include/fusedclr/schedule.h`` [note: schedule descriptor];
:func:`round_stochastic` and the master-weight handling of the flat steps are
the twins of ``csrc/include/fusedclr/precision.h`` [note: precision opt-ins].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "HEADER_WORDS",
    "STAGE_WORDS",
    "Kind",
    "POLICIES",
    "Segments",
    "adam_update_",
    "check_precision",
    "grad_address",
    "grad_sumsq",
    "grad_zero_",
    "memory_image",
    "mix32",
    "round_stochastic",
    "rounding_key",
    "schedule_value",
    "sgd_update_",
    "step_",
]

# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------

HEADER_WORDS = 4
STAGE_WORDS = 16
S_KIND, S_T_BEGIN, S_P0, S_HAS_MOM = 0, 1, 2, 14
STAGE_PARAMS = S_HAS_MOM - S_P0  # P0..P11: a kind's parameters
H_COMBINE = 1  # header word: how stages combine
SEQUENCE, PRODUCT = 0, 1


class Kind:
    """Stage kinds of the schedule descriptor (mirror of ``fusedclr::sched::Kind``)."""

    CONSTANT = 0
    STEP = 1
    MULTISTEP = 2
    EXPONENTIAL = 3
    LINEAR = 4
    CONSTANT_FACTOR = 5
    COSINE = 6
    COSINE_RESTARTS = 7
    CYCLIC = 8
    ONE_CYCLE = 9
    POLYNOMIAL = 10


CYCLIC_MODES = {"triangular": 0, "triangular2": 1, "exp_range": 2}
ANNEAL = {"cos": 0, "linear": 1}


def _anneal(how: int, start: float, end: float, pct: float) -> float:
    if how == ANNEAL["linear"]:
        return (end - start) * pct + start
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def _stage_value(st: Sequence[float], d: Sequence[float], t: int) -> tuple[float | None, float | None]:
    kind = int(st[S_KIND])
    p = st[S_P0 : S_P0 + STAGE_PARAMS]
    mom: float | None = None
    if kind == Kind.CONSTANT:
        lr = p[0]
    elif kind == Kind.STEP:
        lr = p[0] * p[1] ** (t // int(p[2]))
    elif kind == Kind.MULTISTEP:
        start, count = int(p[2]), int(p[3])
        passed = sum(1 for m in d[start : start + count] if m <= t)
        lr = p[0] * p[1] ** passed
    elif kind == Kind.EXPONENTIAL:
        lr = p[0] * p[1] ** t
    elif kind == Kind.LINEAR:
        total = p[3]
        lr = p[0] * (p[1] + (p[2] - p[1]) * min(t, total) / total)
    elif kind == Kind.CONSTANT_FACTOR:
        lr = p[0] * (p[1] if t < p[2] else 1.0)
    elif kind == Kind.COSINE:
        lr = p[1] + (p[0] - p[1]) * (1.0 + math.cos(math.pi * t / p[2])) / 2.0
    elif kind == Kind.POLYNOMIAL:
        lr = p[0] * (1.0 - min(t, p[1]) / p[1]) ** p[2]
    elif kind == Kind.COSINE_RESTARTS:
        warm = int(p[5])
        if t < warm:
            lr = p[6] + (p[0] - p[6]) * t / warm
        else:
            tc, ti, mult, cycle = t - warm, int(p[2]), int(p[3]), 0
            if mult == 1:
                cycle, tc = divmod(tc, ti)
            else:
                while tc >= ti:
                    tc -= ti
                    ti *= mult
                    cycle += 1
            peak = p[0] * p[4] ** cycle
            lr = p[1] + (peak - p[1]) * (1.0 + math.cos(math.pi * tc / ti)) / 2.0
    elif kind == Kind.CYCLIC:
        total, ratio = p[2], p[3]
        cycle = math.floor(1.0 + t / total)
        x = 1.0 + t / total - cycle
        factor = x / ratio if x <= ratio else (x - 1.0) / (ratio - 1.0)
        mode = int(p[4])
        if mode == CYCLIC_MODES["triangular2"]:
            # 2^-(cycle - 1) without torch's OverflowError beyond ~1024 cycles (see schedule.h).
            halvings = cycle - 1
            scale = 0.0 if halvings > 2000 else math.ldexp(1.0, -halvings)
        elif mode == CYCLIC_MODES["exp_range"]:
            scale = p[5] ** t
        else:
            scale = 1.0
        lr = p[0] + (p[1] - p[0]) * factor * scale
        mom = p[7] - (p[7] - p[6]) * factor * scale
    elif kind == Kind.ONE_CYCLE:
        init, peak, low, mbase, mmax = p[0], p[1], p[2], p[3], p[4]
        phases, how = int(p[5]), int(p[9])
        if phases == 3:
            table = [(init, peak, mmax, mbase), (peak, init, mbase, mmax), (init, low, mmax, mmax)]
        else:
            table = [(init, peak, mmax, mbase), (peak, low, mbase, mmax)]
        start = 0.0
        for i, (lr0, lr1, m0, m1) in enumerate(table):
            end = p[6 + i]
            if t <= end or i == phases - 1:
                pct = (t - start) / (end - start)
                lr = _anneal(how, lr0, lr1, pct)
                mom = _anneal(how, m0, m1, pct)
                break
            start = end
    else:
        raise ValueError(f"schedule descriptor: unknown stage kind {kind}")
    return lr, (mom if st[S_HAS_MOM] else None)


def schedule_value(descriptor: Sequence[float] | Tensor, t: int) -> tuple[float | None, float | None]:
    """Evaluates a schedule descriptor at global step ``t``.

    Returns ``(lr, momentum)``; either is ``None`` where the descriptor leaves
    the value to the param group (no stages, or a stage without momentum).
    """
    d = descriptor.tolist() if isinstance(descriptor, Tensor) else list(descriptor)
    n = int(d[0])
    if n <= 0:
        return None, None
    if int(d[H_COMBINE]) == PRODUCT:
        lr = 1.0
        for i in range(n):
            st = d[HEADER_WORDS + i * STAGE_WORDS : HEADER_WORDS + (i + 1) * STAGE_WORDS]
            lr *= _stage_value(st, d, t - int(st[S_T_BEGIN]))[0]
        return lr, None
    idx = 0
    for i in range(1, n):
        if t >= d[HEADER_WORDS + i * STAGE_WORDS + S_T_BEGIN]:
            idx = i
    base = HEADER_WORDS + idx * STAGE_WORDS
    st = d[base : base + STAGE_WORDS]
    return _stage_value(st, d, t - int(st[S_T_BEGIN]))


def no_schedule() -> list[float]:
    """The descriptor of "no schedule": every value comes from the param group."""
    return [0.0] * HEADER_WORDS


def stage(kind: int, params: Sequence[float], *, t_begin: int = 0, has_momentum: bool = False) -> list[float]:
    """One STAGE_WORDS record; ``params`` are P0.. of the kind (at most STAGE_PARAMS, 12)."""
    if len(params) > STAGE_PARAMS:
        raise ValueError(f"a schedule stage takes at most {STAGE_PARAMS} parameters, got {len(params)}")
    rec = [0.0] * STAGE_WORDS
    rec[S_KIND] = float(kind)
    rec[S_T_BEGIN] = float(t_begin)
    rec[S_P0 : S_P0 + len(params)] = [float(x) for x in params]
    rec[S_HAS_MOM] = 1.0 if has_momentum else 0.0
    return rec


def descriptor(stages: Sequence[Sequence[float]], tail: Sequence[float] = (), *, product: bool = False) -> list[float]:
    """Assembles stage records (and their tail data) into one descriptor.

    Tail indices inside stage parameters (MULTISTEP's P2) are relative to the
    start of ``tail``; this function rebases them to absolute indices. With
    ``product`` the stages multiply instead of following one another.
    """
    head = [float(len(stages)), float(PRODUCT if product else SEQUENCE), 0.0, 0.0]
    tail_start = HEADER_WORDS + STAGE_WORDS * len(stages)
    out = list(head)
    for rec in stages:
        rec = list(rec)
        if int(rec[S_KIND]) == Kind.MULTISTEP:
            rec[S_P0 + 2] += tail_start
        out.extend(rec)
    out.extend(float(x) for x in tail)
    return out


# --------------------------------------------------------------------------
# Single-tensor updates (torch.optim's for-loop formulas)
# --------------------------------------------------------------------------


def sgd_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first: bool,
) -> None:
    """One SGD step on one parameter, in place. ``first`` initialises the buffer to the grad."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)
    if momentum != 0 and momentum_buffer is not None:
        if first:
            momentum_buffer.copy_(g)
        else:
            momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(g, alpha=-lr)


def adam_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
) -> None:
    """One Adam (``decoupled=False``) or AdamW step on one parameter, in place.

    ``step`` is the parameter's step count after incrementing (1 on the first
    step). ``max_exp_avg_sq`` given means amsgrad.
    """
    g = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# --------------------------------------------------------------------------
# Flat-buffer steps: the ops' signatures, vectorised over the buffer
# --------------------------------------------------------------------------


class Segments:
    """What the reference steps walk: a bucket's parameters and gradients as tensors.

    The compiled and Triton ops take the bucket's segment table, an int64
    ``[n, 4]`` tensor of addresses (csrc/include/fusedclr/segments.h [note:
    segment table]); pure PyTorch cannot follow an address, so the reference
    takes the tensors behind it. ``params[i]`` is segment ``i``'s parameter
    (dense, any strides; a complex one counts as its real view), ``grads[i]``
    its gradient with the same strides, or ``None`` (inactive this step), and
    ``offsets[i]`` where it starts in the flat state buffers of ``total``
    elements. :meth:`table` builds the segment table of the same tensors, so a
    test can hand one bucket to every backend.
    """

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], offsets: Sequence[int],
                 total: int) -> None:
        if not (len(params) == len(grads) == len(offsets)):
            raise ValueError(f"Segments: {len(params)} params, {len(grads)} grads and {len(offsets)} offsets")
        self.params = list(params)
        self.grads = list(grads)
        self.offsets = [int(o) for o in offsets]
        self.numels = [memory_image(p).numel() for p in self.params]
        self.total = int(total)

    def table(self, device: torch.device | str | None = None) -> Tensor:
        """The segment table of these tensors (addresses, offsets, numels)."""
        rows = [(memory_image(p).data_ptr(), grad_address(g), o, n)
                for p, g, o, n in zip(self.params, self.grads, self.offsets, self.numels)]
        t = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        return t if device is None else t.to(device)


def grad_address(g: Tensor | None) -> int:
    """A gradient's segment-table entry: 0 for none, its address, or 1 for an empty one
    (whose null address would read as none) [note: segment table]."""
    if g is None:
        return 0
    return g.data_ptr() or 1


def memory_image(t: Tensor) -> Tensor:
    """A dense tensor's elements as a 1-D real view in memory order (what the kernels walk)."""
    real = torch.view_as_real(t) if t.is_complex() else t
    return real.as_strided((real.numel(),), (1,))


def _segment_ids(segments: Segments) -> Tensor:
    """Per-element segment index of the flat state layout (padding belongs to the segment before it)."""
    ends = segments.offsets[1:] + [segments.total]
    lengths = torch.tensor([e - o for o, e in zip(segments.offsets, ends)], dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(segments.offsets)), lengths)


def _gather(tensors: Sequence[Tensor | None], segments: Segments, dtype: torch.dtype) -> Tensor:
    """The tensors' elements at their state offsets in one flat buffer (zeros elsewhere)."""
    flat = torch.zeros(segments.total, dtype=dtype)
    for t, o, n in zip(tensors, segments.offsets, segments.numels):
        if t is not None:
            flat[o : o + n] = memory_image(t).cpu()
    return flat


def _advance(seg_steps: Tensor, segments: Segments, found_inf: Tensor | None,
             advance: bool = True) -> tuple[Tensor, Tensor]:
    """Increments the active segments' steps unless found_inf (and ``advance``); returns (go mask per
    segment, steps)."""
    go = torch.tensor([g is not None for g in segments.grads], dtype=torch.bool, device=seg_steps.device)
    if found_inf is not None:
        go = go & (found_inf.reshape(()).to(seg_steps.device) == 0)
    if advance:
        seg_steps.add_(go.to(seg_steps.dtype))
    return go, seg_steps


def _schedule_scalars(hyper: Tensor, schedule: Tensor, schedule_step: Tensor) -> tuple[float, float]:
    lr, mom = schedule_value(schedule, int(schedule_step))
    h = hyper.tolist()
    return (h[0] if lr is None else lr), (h[1] if mom is None else mom)


def _begin(segments: Segments, param_dtype: torch.dtype, seg_steps: Tensor, grad_scale: Tensor | None,
           found_inf: Tensor | None, maximize: bool, master_param: Tensor | None, sr_seed: int | None,
           advance: bool = True):
    """The steps' common start: check the precision opt-ins, advance the step counts, then
    per-element (go mask, step count, parameter and unscaled, sign-adjusted gradient in the
    math dtype, the parameters' flat buffer), all on the CPU in the state layout. Under
    master weights the parameter is the master, unless the parameter was written outside
    the optimizer [note: precision opt-ins]."""
    param = _gather(segments.params, segments, param_dtype)
    check_precision(param, None if master_param is None else master_param.cpu(), sr_seed)
    go_seg, steps = _advance(seg_steps, segments, found_inf, advance)
    ids = _segment_ids(segments)
    math_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    p = param.to(math_dtype)
    if master_param is not None:
        master = master_param.cpu()
        p = torch.where(master.to(param_dtype) == param, master, p)
    g = _gather(segments.grads, segments, param_dtype).to(math_dtype)
    if grad_scale is not None:
        g = g / grad_scale.cpu().to(math_dtype)
    if maximize:
        g = -g
    return go_seg.cpu()[ids], steps.cpu()[ids], p, g, param


def _scatter(param: Tensor, segments: Segments) -> None:
    """Writes the updated flat parameter buffer back into the active parameters."""
    for t, g, o, n in zip(segments.params, segments.grads, segments.offsets, segments.numels):
        if g is not None:
            memory_image(t).copy_(param[o : o + n])


# --------------------------------------------------------------------------
# Precision opt-ins: master weights and stochastic rounding
# --------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def check_precision(param: Tensor, master_param: Tensor | None, sr_seed: int | None) -> None:
    """The precision opt-ins' argument checks, as ``fusedclr::check_precision``
    (csrc/include/fusedclr/checks.h) makes them; the Triton ops use them too."""
    if master_param is not None:
        if param.dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError(f"fusedclr: master_param is for BFloat16 or Half parameters, got {param.dtype} "
                               "parameters; pass master_param=None")
        if master_param.dtype != torch.float32 or master_param.shape != param.shape:
            raise RuntimeError(f"fusedclr: master_param must be a float32 buffer of {param.numel()} elements, got "
                               f"{master_param.dtype} of shape {tuple(master_param.shape)}")
    if sr_seed is not None:
        if param.dtype != torch.bfloat16:
            raise RuntimeError(f"fusedclr: sr_seed (stochastic rounding) is for BFloat16 parameters, got "
                               f"{param.dtype} parameters; pass sr_seed=None")
        if master_param is not None:
            raise RuntimeError("fusedclr: pass master_param or sr_seed, not both: with master weights the "
                               "parameter is the master rounded to nearest")


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 tensors of uint32 values, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor) -> Tensor:
    """``fusedclr::mix32`` (csrc/include/fusedclr/precision.h) on int64 tensors of uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_key(seed: int, steps: Tensor) -> Tensor:
    """``fusedclr::rounding_key`` for every element's step count."""
    return mix32((seed & _M32) ^ mix32(_mul32(steps & _M32, 0x9E3779B9)))


def round_stochastic(x: Tensor, key: Tensor, index: Tensor) -> Tensor:
    """float32 -> bfloat16 rounded stochastically, bit for bit ``fusedclr::round_stochastic``."""
    bits = x.view(torch.int32).to(torch.int64) & _M32
    noise = mix32(key ^ (index & _M32)) >> 16
    up = ((bits + noise) >> 16) & 0xFFFF
    out = (up - ((up >> 15) << 16)).to(torch.int16).view(torch.bfloat16)  # uint16 bits -> int16 -> bf16
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)


def _write_param(param: Tensor, new_p: Tensor, go: Tensor, steps: Tensor, master_param: Tensor | None,
                 sr_seed: int | None) -> None:
    """Stores the updated math values where ``go``: rounded to nearest, via the master, or stochastically."""
    if master_param is not None:
        master_param.copy_(torch.where(go, new_p, master_param.cpu()))
    if sr_seed is not None:
        index = torch.arange(param.numel(), device=param.device)
        rounded = round_stochastic(new_p, rounding_key(sr_seed, steps), index)
    else:
        rounded = new_p.to(param.dtype)
    param.copy_(torch.where(go, rounded, param))


# --------------------------------------------------------------------------
# Math policies [note: math policies]: each optimizer's per-element update
# --------------------------------------------------------------------------
#
# The twins of csrc/include/fusedclr/optimizers/*.h, vectorised over the flat
# state layout. A policy gets the parameter and the unscaled, sign-adjusted
# gradient in the math dtype, its states (math dtype, None where absent) and a
# Step: the group's lr and momentum/beta1 (after the schedule), the options,
# each element's step count (float64) and per-segment scalar. It returns the
# new parameter, the new states and a mask of the elements it changed (None:
# every active one).


class Step:
    """What a reference policy reads besides the tensors (see above)."""

    def __init__(self, lr: float, momentum: float, options: Sequence[float], steps: Tensor,
                 seg_scalar: Tensor | None) -> None:
        self.lr, self.momentum, self.options = lr, momentum, [float(o) for o in options]
        self.steps = steps.to(torch.float64)
        self.seg_scalar = seg_scalar


def _pow(base: float, steps: Tensor) -> Tensor:
    """``base ** step`` per element, in float64 as torch computes it in Python floats."""
    return torch.pow(torch.tensor(base, dtype=torch.float64), steps)


def _sgd(p, g, s, k):
    dampening, weight_decay, _nesterov = k.options
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    (buf,) = s
    if buf is not None and k.momentum != 0:
        buf = torch.where(k.steps <= 1, g, buf * k.momentum + (1 - dampening) * g)
        g = g + k.momentum * buf if _nesterov else buf
    return p.add(g, alpha=-k.lr), [buf], None


def _weight_decay(p, g, weight_decay, decoupled, lr):
    if weight_decay != 0:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    return p, g


def _adam(p, g, s, k):
    beta2, eps, weight_decay, decoupled = k.options
    beta1 = k.momentum
    p, g = _weight_decay(p, g, weight_decay, decoupled, k.lr)
    m, v, vmax = s
    m = m.lerp(g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    second = v
    if vmax is not None:
        vmax = torch.maximum(vmax, v)
        second = vmax
    bc1 = 1 - _pow(beta1, k.steps.clamp_min(1))
    bc2_sqrt = torch.sqrt(1 - _pow(beta2, k.steps.clamp_min(1)))
    step_size = (k.lr / bc1).to(p.dtype)
    denom = second.sqrt() / bc2_sqrt.to(p.dtype) + eps
    return p - step_size * m / denom, [m, v, vmax], None


def _rmsprop(p, g, s, k):
    alpha, eps, weight_decay = k.options
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    sq, gavg, buf = s
    sq = sq * alpha + (1 - alpha) * g * g
    if gavg is not None:
        gavg = gavg.lerp(g, 1 - alpha)
        avg = (sq - gavg * gavg).sqrt()
    else:
        avg = sq.sqrt()
    avg = avg + eps
    if buf is not None and k.momentum > 0:
        buf = buf * k.momentum + g / avg
        p = p - k.lr * buf
    else:
        p = p - k.lr * g / avg
    return p, [sq, gavg, buf], None


def _adagrad(p, g, s, k):
    lr_decay, weight_decay, eps = k.options
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    clr = (k.lr / (1 + (k.steps.clamp_min(1) - 1) * lr_decay)).to(p.dtype)
    total = s[0] + g * g
    return p - clr * g / (total.sqrt() + eps), [total], None


def _radam(p, g, s, k):
    beta2, eps, weight_decay, decoupled = k.options
    beta1 = k.momentum
    p, g = _weight_decay(p, g, weight_decay, decoupled, k.lr)
    m, v = s
    m = m.lerp(g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    t = k.steps.clamp_min(1)
    bc1 = 1 - _pow(beta1, t)
    bc2 = 1 - _pow(beta2, t)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * _pow(beta2, t) / bc2
    rect = torch.sqrt(((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp_min(0))
    step = m / bc1.to(p.dtype) * k.lr
    adaptive = bc2.sqrt().to(p.dtype) / (v.sqrt() + eps)
    update = torch.where(rho_t > 5, step * adaptive * rect.to(p.dtype), step)
    return p - update, [m, v], None


def nadam_mu(beta1: float, steps: Tensor, momentum_decay: float) -> Tensor:
    """NAdam's momentum coefficient ``beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))``, float64."""
    return beta1 * (1.0 - 0.5 * torch.pow(torch.tensor(0.96, dtype=torch.float64), steps * momentum_decay))


def _nadam_advance(mu_product: Tensor, steps: Tensor, options: Sequence[float], momentum: float) -> Tensor:
    """mu_product *= mu_step, rounded to float32 as torch's state tensor holds it."""
    mu = nadam_mu(momentum, steps.to(torch.float64), float(options[4]))
    return (mu_product.to(torch.float32) * mu.to(torch.float32)).to(torch.float64)


def _nadam(p, g, s, k):
    beta2, eps, weight_decay, decoupled, momentum_decay = k.options
    beta1 = k.momentum
    p, g = _weight_decay(p, g, weight_decay, decoupled, k.lr)
    m, v = s
    t = k.steps.clamp_min(1)
    mu = nadam_mu(beta1, t, momentum_decay)
    mu_next = nadam_mu(beta1, t + 1, momentum_decay)
    mu_product = k.seg_scalar
    m = m.lerp(g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    denom = (v / (1 - _pow(beta2, t)).to(p.dtype)).sqrt() + eps
    c_grad = (-k.lr * (1 - mu) / (1 - mu_product)).to(p.dtype)
    c_avg = (-k.lr * mu_next / (1 - mu_product * mu_next)).to(p.dtype)
    p = p + c_grad * g / denom
    p = p + c_avg * m / denom
    return p, [m, v], None


def _lion(p, g, s, k):
    beta2, weight_decay = k.options
    (m,) = s
    c = m.lerp(g, 1 - k.momentum)
    if weight_decay != 0:
        p = p * (1 - k.lr * weight_decay)
    p = p - k.lr * torch.sign(c)
    return p, [m.lerp(g, 1 - beta2)], None


def _lookahead(p, g, s, k):
    period, alpha = k.options
    (slow,) = s
    sync = (k.steps > 0) & (torch.remainder(k.steps, int(period)) == 0)
    slow = torch.where(sync, slow + alpha * (p - slow), slow)
    return torch.where(sync, slow, p), [slow], sync


class Policy:
    """A reference policy and its shape: states, options, whether it advances the step counts and keeps a
    per-segment scalar (``advance_scalar``: how that scalar moves when a segment steps)."""

    def __init__(self, update, n_states: int, n_options: int, advances: bool = True, advance_scalar=None,
                 optional: tuple[int, ...] = ()) -> None:
        self.update, self.n_states, self.n_options = update, n_states, n_options
        self.required = tuple(i for i in range(n_states) if i not in optional)  # the others may be None
        self.advances, self.advance_scalar = advances, advance_scalar


POLICIES = {
    "sgd": Policy(_sgd, 1, 3, optional=(0,)),
    "adam": Policy(_adam, 3, 4, optional=(2,)),
    "rmsprop": Policy(_rmsprop, 3, 3, optional=(1, 2)),
    "adagrad": Policy(_adagrad, 1, 3),
    "radam": Policy(_radam, 2, 4),
    "nadam": Policy(_nadam, 2, 5, advance_scalar=_nadam_advance),
    "lion": Policy(_lion, 1, 2),
    "lookahead": Policy(_lookahead, 1, 2, advances=False),
}


def step_(
    optimizer: str,
    segments: Segments,
    param_dtype: torch.dtype,
    states: Sequence[Tensor | None],
    seg_steps: Tensor,
    seg_scalars: Tensor | None,
    chunks: Tensor,
    hyper: Tensor,
    schedule: Tensor,
    schedule_step: Tensor,
    options: Sequence[float],
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_param: Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """Reference of ``fusedclr::step_`` (csrc/ops.cpp [note: step contract]), on :class:`Segments`."""
    policy = POLICIES.get(optimizer)
    if policy is None:
        raise RuntimeError(f"fusedclr: unknown optimizer '{optimizer}'; the kernels know: {' '.join(POLICIES)}")
    # The checks of check_step_call (csrc/include/fusedclr/checks.h), with its messages.
    for i in range(policy.n_states, len(states)):
        if states[i] is not None:
            raise RuntimeError(f"fusedclr: {optimizer} takes {policy.n_states} state buffers, got state{i}")
    if len(options) != policy.n_options:
        raise RuntimeError(f"fusedclr: {optimizer} takes {policy.n_options} options, got {len(options)}")
    if optimizer == "lookahead" and not (options[0] >= 1 and float(options[0]).is_integer()):
        raise RuntimeError(f"fusedclr: lookahead synchronises every k >= 1 steps (an integer), got k={options[0]}")
    if optimizer == "lookahead" and not 0 <= options[1] <= 1:
        raise RuntimeError(f"fusedclr: lookahead's alpha must be in [0, 1], got {options[1]}")
    states = list(states[: policy.n_states]) + [None] * (policy.n_states - len(states))
    for i in policy.required:
        if states[i] is None:
            raise RuntimeError(f"fusedclr: {optimizer} needs state{i} with these options; pass its flat buffer")
    if (seg_scalars is not None) != (policy.advance_scalar is not None):
        raise RuntimeError(f"fusedclr: {optimizer} " + ("keeps a per-segment scalar: pass seg_scalars"
                                                        if seg_scalars is None else
                                                        "keeps no per-segment scalar: pass seg_scalars=None"))
    lr, momentum = _schedule_scalars(hyper, schedule, schedule_step)
    go, steps, p, g, param = _begin(segments, param_dtype, seg_steps, grad_scale, found_inf, maximize, master_param,
                                    sr_seed, advance=policy.advances)
    ids = _segment_ids(segments)
    scalar = None
    if seg_scalars is not None:
        go_seg = torch.tensor([g is not None for g in segments.grads], dtype=torch.bool)
        if found_inf is not None:
            go_seg = go_seg & (found_inf.reshape(()).cpu() == 0)
        moved = policy.advance_scalar(seg_scalars.cpu(), seg_steps.cpu(), options, momentum)
        seg_scalars.copy_(torch.where(go_seg.to(seg_scalars.device), moved.to(seg_scalars.device), seg_scalars))
        scalar = seg_scalars.cpu()[ids]
    loaded = [None if t is None else t.cpu().to(p.dtype) for t in states]
    new_p, new_states, changed = policy.update(p, g, loaded, Step(lr, momentum, options, steps, scalar))
    if changed is not None:
        go = go & changed
    for state, value in zip(states, new_states):
        if state is not None:
            _store(state, value, go)
    _write_param(param, new_p, go, steps, master_param, sr_seed)
    _scatter(param, segments)


def grad_sumsq(segments: Segments, param_dtype: torch.dtype, chunks: Tensor) -> Tensor:
    """Reference of ``fusedclr::grad_sumsq``: the active gradients' sum of squares, float64."""
    g = _gather(segments.grads, segments, param_dtype).to(torch.float64)
    return g.square().sum()


def grad_zero_(segments: Segments, param_dtype: torch.dtype, chunks: Tensor) -> None:
    """Reference of ``fusedclr::grad_zero_``: zeroes every active gradient in place (csrc/ops.cpp
    [note: zeroing through the table])."""
    active = [memory_image(g) for g in segments.grads if g is not None]
    if active:
        torch._foreach_zero_(active)


def _store(state: Tensor, value: Tensor, go: Tensor) -> None:
    """Writes a state's new math-dtype values where ``go``, rounding to its dtype."""
    state.copy_(torch.where(go, value.to(state.dtype), state.cpu()))
