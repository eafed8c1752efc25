"""The optimizers' math policies in Triton [note: math policies].

The twins of csrc/include/fusedclr/optimizers/*.h (and of ``POLICIES`` in
fusedclr/reference.py): per optimizer a ``<name>_scalars`` function, which
computes what one segment's update needs once per program (in float64, from
the schedule's lr and momentum / beta1, the segment's step count and the
options, then cast to the math type, as the C++ ``scalars<T>`` does), and a
``<name>_update`` function, which updates one tile of registers::

    p, s0, s1, s2, s3 = <name>_update(p, g, s0, s1, s2, s3, k, <options>, ...)

``p`` is the parameter (read through the master under master weights), ``g``
the gradient already divided by grad_scale and negated under maximize, ``s0``
to ``s3`` the states in the policy's order (absent ones hold zeros and are
neither read nor stored by the walk), ``k`` the tuple ``<name>_scalars``
returned. The walk (fusedclr/triton/_walk.py) loads and stores; a policy only
computes. The options arrive as ``tl.constexpr`` [note: triton host scalars],
so each C++ compile-time variant (weight decay on or off, decoupled, amsgrad,
Nesterov, centered) is a constexpr branch here; the values only the schedule
knows (SGD's and RMSprop's momentum reaching 0, RAdam's rectification) are
per-program scalars selected with ``tl.where``.

The shared arithmetic is torch's order with the fused steps explicit [note:
rounding as torch]: ``tl.fma`` where the C++ calls ``mul_add`` (fused on GPUs,
as the CUDA kernels' ``FMA = true``; the interpreter rounds its product and
sum separately, as the C++ loops without FMA instructions do), and
:func:`lerp` and :func:`decay_add_square` as in update.h.

Adding an optimizer: its row in :data:`POLICIES` (the id is the ``OPTIMIZER``
constexpr), its two functions here and a branch for each in _walk.py's
``_scalars`` / ``_update`` (and ``_advance_scalar`` if it keeps a
per-segment scalar).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from fusedclr.triton._common import div, sqrt
from fusedclr.triton._schedule import _ipow


class PolicyInfo(NamedTuple):
    """What the launchers need to know of a policy (the C++ policy's constants)."""

    id: int  # the OPTIMIZER constexpr
    n_states: int  # kStates
    n_options: int  # kOptions
    required: tuple[int, ...]  # states the update always reads (the others may be None)
    uses_grad: bool = True  # kUsesGrad
    advances: bool = True  # kAdvancesSteps
    seg_scalar: bool = False  # kSegmentScalar


# Ids of the OPTIMIZER constexpr, in csrc/include/fusedclr/optimizers.h's order.
SGD: tl.constexpr = tl.constexpr(0)
ADAM: tl.constexpr = tl.constexpr(1)
RMSPROP: tl.constexpr = tl.constexpr(2)
ADAGRAD: tl.constexpr = tl.constexpr(3)
RADAM: tl.constexpr = tl.constexpr(4)
NADAM: tl.constexpr = tl.constexpr(5)
LION: tl.constexpr = tl.constexpr(6)
LOOKAHEAD: tl.constexpr = tl.constexpr(7)

POLICIES: dict[str, PolicyInfo] = {
    "sgd": PolicyInfo(SGD.value, 1, 3, ()),
    "adam": PolicyInfo(ADAM.value, 3, 4, (0, 1)),
    "rmsprop": PolicyInfo(RMSPROP.value, 3, 3, (0,)),
    "adagrad": PolicyInfo(ADAGRAD.value, 1, 3, (0,)),
    "radam": PolicyInfo(RADAM.value, 2, 4, (0, 1)),
    "nadam": PolicyInfo(NADAM.value, 2, 5, (0, 1), seg_scalar=True),
    "lion": PolicyInfo(LION.value, 1, 2, (0,)),
    "lookahead": PolicyInfo(LOOKAHEAD.value, 1, 2, (0,), uses_grad=False, advances=False),
}
# The most options any policy takes: the walk's OPT0..OPT4 constexprs.
MAX_OPTIONS = 5

# --------------------------------------------------------------------------
# Update math (csrc/include/fusedclr/update.h [note: update math])
# --------------------------------------------------------------------------


@triton.jit
def lerp_weight(weight, T: tl.constexpr):
    """``fusedclr::lerp_weight``: the float64 ``weight`` in the math type ``T``, as (coeff, small)."""
    t = weight.to(T)
    small = tl.abs(t) < 0.5
    return (tl.where(small, t, t - 1.0), small)


@triton.jit
def lerp(start, end, w):
    """torch's two-sided ``start.lerp(end, weight)`` (``fusedclr::lerp``)."""
    return tl.fma(w[0], end - start, tl.where(w[1], start, end))


@triton.jit
def decay_add_square(x, a, b, y):
    """``x.mul_(a).addcmul_(y, y, value=b)``: ``fma(b * y, y, x * a)``."""
    return tl.fma(b * y, y, x * a)


@triton.jit
def sign(x):
    """torch.sign: -1, 0 or 1; NaN stays NaN."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x)).to(x.dtype)


@triton.jit
def _fpow(base, exponent):
    """``base ** exponent`` in float64 for ``base > 0`` and a real exponent, as ``exp(exponent * log(base))``
    (no ``pow`` in Triton's portable math or in the interpreter; within a few ulp of double pow for the
    small exponents it gets here)."""
    return tl.exp(exponent * tl.log(base))


# --------------------------------------------------------------------------
# SGD (optimizers/sgd.h). Options: dampening, weight_decay, nesterov. State: momentum_buffer.
# --------------------------------------------------------------------------


@triton.jit
def sgd_scalars(lr, momentum, step, DAMPENING: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    return (
        lr.to(T),
        momentum.to(T),
        tl.full([], 1.0 - DAMPENING, T),  # 1 - dampening in double, as torch computes it
        tl.full([], WEIGHT_DECAY, T),
        step <= 1,  # the first step with momentum: buffer = grad
        momentum != 0.0,  # torch takes the momentum path only when momentum != 0 (a schedule may reach 0)
    )


@triton.jit
def sgd_update(p, g, s0, s1, s2, s3, k, WEIGHT_DECAY: tl.constexpr, NESTEROV: tl.constexpr,
               HAS_BUFFER: tl.constexpr):
    lr, momentum, one_minus_dampening, weight_decay, first, use_momentum = k
    if WEIGHT_DECAY != 0.0:
        g = tl.fma(p, weight_decay, g)  # grad.add(param, alpha=weight_decay)
    if HAS_BUFFER:
        # buf.mul_(momentum).add_(grad, alpha=1 - dampening); grad.add(buf, alpha=momentum)
        buf = tl.where(first, g, tl.fma(g, one_minus_dampening, s0 * momentum))
        if NESTEROV != 0.0:
            stepped = tl.fma(buf, momentum, g)
        else:
            stepped = buf
        # A zero momentum runs without the buffer (the C++ refine()), leaving it as it was.
        g = tl.where(use_momentum, stepped, g)
        s0 = tl.where(use_momentum, buf, s0)
    p = tl.fma(g, -lr, p)  # param.add_(grad, alpha=-lr)
    return p, s0, s1, s2, s3


# --------------------------------------------------------------------------
# Adam / AdamW (optimizers/adam.h). Options: beta2, eps, weight_decay, decoupled.
# States: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad only). beta1 is the group momentum.
# --------------------------------------------------------------------------


@triton.jit
def adam_scalars(lr, beta1, step, BETA2: tl.constexpr, EPS: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                 MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    return (
        lerp_weight(1.0 - beta1, T),
        tl.full([], BETA2, T),
        tl.full([], 1.0 - BETA2, T),
        tl.full([], EPS, T),
        tl.full([], WEIGHT_DECAY, T),
        (1.0 - lr * WEIGHT_DECAY).to(T),  # decay (decoupled only)
        (lr / (1.0 - _ipow(beta1, step))).to(T),  # step_size
        tl.sqrt(1.0 - _ipow(tl.full([], BETA2, tl.float64), step)).to(T),  # sqrt(bias_correction2)
    )


@triton.jit
def _weight_decay(p, g, weight_decay, decay, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr):
    """L2 (grad.add(param, alpha=weight_decay)) or decoupled (param.mul_(1 - lr * weight_decay))."""
    if WEIGHT_DECAY != 0.0:
        if DECOUPLED != 0.0:
            p = p * decay
        else:
            g = tl.fma(p, weight_decay, g)
    return p, g


@triton.jit
def adam_update(p, g, s0, s1, s2, s3, k, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                AMSGRAD: tl.constexpr, MATH_F64: tl.constexpr):
    beta1_weight, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_sqrt = k
    p, g = _weight_decay(p, g, weight_decay, decay, WEIGHT_DECAY, DECOUPLED)
    s0 = lerp(s0, g, beta1_weight)  # exp_avg.lerp_(grad, 1 - beta1)
    s1 = decay_add_square(s1, beta2, one_minus_beta2, g)  # exp_avg_sq
    second = s1
    if AMSGRAD:
        s2 = tl.where(s2 > s1, s2, s1)
        second = s2
    denom = div(sqrt(second, MATH_F64), bc2_sqrt, MATH_F64) + eps
    p = p - div(step_size * s0, denom, MATH_F64)  # param.addcdiv_(exp_avg, denom, value=-step_size)
    return p, s0, s1, s2, s3


# --------------------------------------------------------------------------
# RMSprop (optimizers/rmsprop.h). Options: alpha, eps, weight_decay.
# States: square_avg, grad_avg (centered only), momentum_buffer (momentum only).
# --------------------------------------------------------------------------


@triton.jit
def rmsprop_scalars(lr, momentum, ALPHA: tl.constexpr, EPS: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                    MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    return (
        lr.to(T),
        tl.full([], ALPHA, T),
        tl.full([], 1.0 - ALPHA, T),
        lerp_weight(tl.full([], 1.0 - ALPHA, tl.float64), T),  # grad_avg.lerp_(grad, 1 - alpha)
        tl.full([], EPS, T),
        tl.full([], WEIGHT_DECAY, T),
        momentum.to(T),
        momentum > 0.0,  # torch's `if momentum > 0`
    )


@triton.jit
def rmsprop_update(p, g, s0, s1, s2, s3, k, WEIGHT_DECAY: tl.constexpr, CENTERED: tl.constexpr,
                   HAS_BUFFER: tl.constexpr, MATH_F64: tl.constexpr):
    lr, alpha, one_minus_alpha, alpha_weight, eps, weight_decay, momentum, use_momentum = k
    if WEIGHT_DECAY != 0.0:
        g = tl.fma(p, weight_decay, g)
    s0 = decay_add_square(s0, alpha, one_minus_alpha, g)  # square_avg
    if CENTERED:
        s1 = lerp(s1, g, alpha_weight)
        avg = sqrt(tl.fma(-s1, s1, s0), MATH_F64)  # square_avg.addcmul(grad_avg, grad_avg, value=-1)
    else:
        avg = sqrt(s0, MATH_F64)
    avg = avg + eps
    plain = p + div(-lr * g, avg, MATH_F64)  # param.addcdiv_(grad, avg, value=-lr)
    if HAS_BUFFER:
        buf = s2 * momentum + div(g, avg, MATH_F64)  # buf.mul_(momentum).addcdiv_(grad, avg)
        # A momentum that is not positive runs without the buffer (the C++ refine()).
        p = tl.where(use_momentum, tl.fma(buf, -lr, p), plain)  # param.add_(buf, alpha=-lr)
        s2 = tl.where(use_momentum, buf, s2)
    else:
        p = plain
    return p, s0, s1, s2, s3


# --------------------------------------------------------------------------
# Adagrad (optimizers/adagrad.h). Options: lr_decay, weight_decay, eps. State: sum.
# --------------------------------------------------------------------------


@triton.jit
def adagrad_scalars(lr, step, LR_DECAY: tl.constexpr, WEIGHT_DECAY: tl.constexpr, EPS: tl.constexpr,
                    MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    return (
        (lr / (1.0 + (step - 1).to(tl.float64) * LR_DECAY)).to(T),  # clr
        tl.full([], WEIGHT_DECAY, T),
        tl.full([], EPS, T),
    )


@triton.jit
def adagrad_update(p, g, s0, s1, s2, s3, k, WEIGHT_DECAY: tl.constexpr, MATH_F64: tl.constexpr):
    clr, weight_decay, eps = k
    if WEIGHT_DECAY != 0.0:
        g = tl.fma(p, weight_decay, g)
    s0 = tl.fma(g, g, s0)  # state_sum.addcmul_(grad, grad, value=1)
    std = sqrt(s0, MATH_F64) + eps
    p = p + div(-clr * g, std, MATH_F64)  # param.addcdiv_(grad, std, value=-clr)
    return p, s0, s1, s2, s3


# --------------------------------------------------------------------------
# RAdam (optimizers/radam.h). Options: beta2, eps, weight_decay, decoupled. States: exp_avg, exp_avg_sq.
# --------------------------------------------------------------------------


@triton.jit
def radam_scalars(lr, beta1, step, BETA2: tl.constexpr, EPS: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                  MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    beta2 = tl.full([], BETA2, tl.float64)
    s = step.to(tl.float64)
    beta2_t = _ipow(beta2, step)
    bc2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * s * beta2_t / bc2
    rectified = rho_t > 5.0
    # The rectification term where rho_t > 5, else 0 (its square root is not taken there).
    rect2 = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
    rect = tl.where(rectified, tl.sqrt(tl.where(rectified, rect2, 0.0)), 0.0)
    return (
        lerp_weight(1.0 - beta1, T),
        tl.full([], BETA2, T),
        tl.full([], 1.0 - BETA2, T),
        tl.full([], EPS, T),
        tl.full([], WEIGHT_DECAY, T),
        (1.0 - lr * WEIGHT_DECAY).to(T),  # decay (decoupled only)
        (1.0 - _ipow(beta1, step)).to(T),  # bias_correction1
        lr.to(T),
        tl.sqrt(bc2).to(T),
        rect.to(T),
        rectified,
    )


@triton.jit
def radam_update(p, g, s0, s1, s2, s3, k, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                 MATH_F64: tl.constexpr):
    beta1_weight, beta2, one_minus_beta2, eps, weight_decay, decay, bias_correction1, lr, bc2_sqrt, rect, \
        rectified = k
    p, g = _weight_decay(p, g, weight_decay, decay, WEIGHT_DECAY, DECOUPLED)
    s0 = lerp(s0, g, beta1_weight)
    s1 = decay_add_square(s1, beta2, one_minus_beta2, g)
    step = div(s0, bias_correction1, MATH_F64) * lr  # bias_corrected_exp_avg * lr
    # * (sqrt(bc2) / (exp_avg_sq.sqrt() + eps)) * rect where rectified
    adaptive = div(bc2_sqrt, sqrt(s1, MATH_F64) + eps, MATH_F64)
    p = tl.where(rectified, p - step * adaptive * rect, p - step)
    return p, s0, s1, s2, s3


# --------------------------------------------------------------------------
# NAdam (optimizers/nadam.h). Options: beta2, eps, weight_decay, decoupled, momentum_decay.
# States: exp_avg, exp_avg_sq; per segment mu_product (seg_scalars).
# --------------------------------------------------------------------------


@triton.jit
def nadam_mu(beta1, step, MOMENTUM_DECAY: tl.constexpr):
    """mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay)), float64."""
    return beta1 * (1.0 - 0.5 * _fpow(tl.full([], 0.96, tl.float64), step.to(tl.float64) * MOMENTUM_DECAY))


@triton.jit
def nadam_advance(mu_product, step, beta1, MOMENTUM_DECAY: tl.constexpr):
    """mu_product *= mu_step, in float32 as torch's state tensor holds it (``Nadam::advance``)."""
    mu = nadam_mu(beta1, step, MOMENTUM_DECAY)
    return (mu_product.to(tl.float32) * mu.to(tl.float32)).to(tl.float64)


@triton.jit
def nadam_scalars(lr, beta1, step, mu_product, BETA2: tl.constexpr, EPS: tl.constexpr,
                  WEIGHT_DECAY: tl.constexpr, MOMENTUM_DECAY: tl.constexpr, MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    mu_t = nadam_mu(beta1, step, MOMENTUM_DECAY)
    mu_next = nadam_mu(beta1, step + 1, MOMENTUM_DECAY)
    return (
        lerp_weight(1.0 - beta1, T),
        tl.full([], BETA2, T),
        tl.full([], 1.0 - BETA2, T),
        tl.full([], EPS, T),
        tl.full([], WEIGHT_DECAY, T),
        (1.0 - lr * WEIGHT_DECAY).to(T),  # decay (decoupled only)
        (1.0 - _ipow(tl.full([], BETA2, tl.float64), step)).to(T),  # bias_correction2
        (-lr * (1.0 - mu_t) / (1.0 - mu_product)).to(T),  # grad_coeff
        (-lr * mu_next / (1.0 - mu_product * mu_next)).to(T),  # exp_avg_coeff
    )


@triton.jit
def nadam_update(p, g, s0, s1, s2, s3, k, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                 MATH_F64: tl.constexpr):
    beta1_weight, beta2, one_minus_beta2, eps, weight_decay, decay, bias_correction2, grad_coeff, \
        exp_avg_coeff = k
    p, g = _weight_decay(p, g, weight_decay, decay, WEIGHT_DECAY, DECOUPLED)
    s0 = lerp(s0, g, beta1_weight)
    s1 = decay_add_square(s1, beta2, one_minus_beta2, g)
    denom = sqrt(div(s1, bias_correction2, MATH_F64), MATH_F64) + eps
    p = p + div(grad_coeff * g, denom, MATH_F64)  # param.addcdiv_(grad, denom, value=grad_coeff)
    p = p + div(exp_avg_coeff * s0, denom, MATH_F64)  # param.addcdiv_(exp_avg, denom, value=exp_avg_coeff)
    return p, s0, s1, s2, s3


# --------------------------------------------------------------------------
# Lion (optimizers/lion.h). Options: beta2, weight_decay. State: exp_avg. beta1 is the group momentum.
# --------------------------------------------------------------------------


@triton.jit
def lion_scalars(lr, beta1, BETA2: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    return (
        lerp_weight(1.0 - beta1, T),
        lerp_weight(tl.full([], 1.0 - BETA2, tl.float64), T),
        lr.to(T),
        (1.0 - lr * WEIGHT_DECAY).to(T),  # decay
    )


@triton.jit
def lion_update(p, g, s0, s1, s2, s3, k, WEIGHT_DECAY: tl.constexpr):
    beta1_weight, beta2_weight, lr, decay = k
    c = lerp(s0, g, beta1_weight)
    if WEIGHT_DECAY != 0.0:
        p = p * decay
    p = tl.fma(sign(c), -lr, p)
    s0 = lerp(s0, g, beta2_weight)
    return p, s0, s1, s2, s3


# --------------------------------------------------------------------------
# Lookahead (optimizers/lookahead.h). Options: k, alpha. State: slow. Reads no gradient, advances no step
# count, and skips the segments whose step is not a positive multiple of k.
# --------------------------------------------------------------------------


@triton.jit
def lookahead_scalars(step, K: tl.constexpr, ALPHA: tl.constexpr, MATH_F64: tl.constexpr):
    T: tl.constexpr = tl.float64 if MATH_F64 else tl.float32
    period = tl.full([], K, tl.float64).to(tl.int64)  # static_cast<int64_t>: truncation
    # k < 1 is rejected on the host; never divide by 0.
    sync = tl.where(period > 0, tl.where(step > 0, step % tl.maximum(period, 1) == 0, False), False)
    return (tl.full([], ALPHA, T), sync)


@triton.jit
def lookahead_sync(k):
    """Whether the segment synchronises this step (``!Lookahead::skip``)."""
    return k[1]


@triton.jit
def lookahead_update(p, g, s0, s1, s2, s3, k):
    alpha = k[0]
    s0 = tl.fma(alpha, p - s0, s0)  # slow += alpha * (fast - slow)
    p = s0  # fast = slow
    return p, s0, s1, s2, s3
