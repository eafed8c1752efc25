"""Launchers of the Triton kernels and their ``torch.library.triton_op`` registration.

Importing this module imports Triton, builds the kernels (interpreted when
TRITON_INTERPRET is set) and registers ``fusedclr::triton_sgd_step_`` and
``fusedclr::triton_adam_step_``; ``fusedclr.triton`` imports it on first use.

[note: triton op dispatch]
The ops are ``triton_op``s whose bodies launch through ``wrap_triton``, so
``torch.compile`` traces into the kernels (and Inductor can schedule them with
the rest of the graph). Outside of compilation ``sgd_step_`` / ``adam_step_``
call the same body directly with plain tensors, which skips the dispatcher
round trip that a custom op costs on every eager call (the step's host time is
a target of its own, see DESIGN.md section 4).

Under TRITON_INTERPRET=1 ``wrap_triton`` hands back the interpreted kernel
itself, which cannot run on fake tensors, so the body returns early on fake
tensors (the ops return nothing, so there is nothing to fake). Graph capture
with ``torch.compile(backend="eager")`` works there; backends that
functionalize (``aot_eager``, ``inductor``) would have to trace the interpreted
kernel, and get a clear error instead of a silently empty graph.
"""

import operator
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import triton_op, wrap_triton

from fusedclr import reference
from fusedclr.triton import _common
from fusedclr.triton._adam import _adam_kernel
from fusedclr.triton._common import ADVANCE_BLOCK, _advance_steps_kernel
from fusedclr.triton._sgd import _sgd_kernel

__all__ = ["INTERPRETED", "adam_step_", "adam_step_for_bucket_", "sgd_step_", "sgd_step_for_bucket_"]


def _is_interpreted(kernel: object) -> bool:
    while hasattr(kernel, "configs") and hasattr(kernel, "fn"):  # unwrap triton.autotune
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


# Whether the kernels were built for Triton's interpreter: decided once, when
# @triton.jit ran at this module's import.
INTERPRETED = _is_interpreted(_sgd_kernel)
# Why the interpreter cannot run the kernels here ("" when it can): probed once, on real
# tensors even when the first use happens while tracing.
if INTERPRETED:
    with unset_fake_temporarily():
        INTERPRETER_PROBLEM = _common.interpreter_problem()
else:
    INTERPRETER_PROBLEM = ""

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------
# Argument checks (metadata only: no sync, no device reads)
# --------------------------------------------------------------------------


def _check_device(segments: Tensor) -> None:
    if segments.device.type == "cpu" and INTERPRETER_PROBLEM:
        raise RuntimeError(f"fusedclr.triton: backend='triton' on CPU tensors: {INTERPRETER_PROBLEM}.")
    if segments.device.type == "cpu" and not INTERPRETED:
        if _common.interpreting():
            when = "TRITON_INTERPRET=1 is set now, but was not when fusedclr.triton built its kernels"
        else:
            when = "TRITON_INTERPRET is not set"
        raise RuntimeError(
            "fusedclr.triton: backend='triton' got CPU tensors, but Triton compiles for GPUs and "
            f"{when}. To run the Triton kernels on CPU through Triton's interpreter, set "
            "TRITON_INTERPRET=1 in the environment before importing triton or fusedclr "
            "(e.g. `TRITON_INTERPRET=1 python train.py`); otherwise use backend='cpu' or "
            "backend='reference' for CPU tensors."
        )


def _check_flat(name: str, t: Tensor, segments: Tensor, numel: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"fusedclr.triton: {name} must be a contiguous 1-D flat buffer, got shape "
                         f"{tuple(t.shape)} with strides {t.stride()}")
    if t.numel() != numel:
        raise ValueError(f"fusedclr.triton: {name} has {t.numel()} elements, the bucket's other flat buffers "
                         f"{numel}; every flat buffer of a bucket has the same length")
    if t.device != segments.device:
        raise ValueError(f"fusedclr.triton: {name} is on {t.device} but segments is on {segments.device}; "
                         "keep a bucket's buffers on one device")
    if t.dtype not in dtypes:
        raise TypeError(f"fusedclr.triton: {name} has dtype {t.dtype}; expected one of {list(dtypes)}")


def _check_small(name: str, t: Optional[Tensor], segments: Tensor, dtypes: tuple[torch.dtype, ...],
                 numel: Optional[int] = None) -> None:
    if t is None:
        return
    if t.device != segments.device:
        raise ValueError(f"fusedclr.triton: {name} is on {t.device} but segments is on {segments.device}; "
                         f"move {name} to the parameters' device")
    if t.dtype not in dtypes:
        raise TypeError(f"fusedclr.triton: {name} has dtype {t.dtype}; expected one of {list(dtypes)}")
    if not t.is_contiguous():
        raise ValueError(f"fusedclr.triton: {name} must be contiguous")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"fusedclr.triton: {name} must have {numel} element(s), got shape {tuple(t.shape)}")


def _check_common(segments: Tensor, param_dtype: torch.dtype, seg_steps: Tensor, chunks: Tensor, hyper: Tensor,
                  schedule: Tensor, schedule_step: Tensor, grad_scale: Optional[Tensor],
                  found_inf: Optional[Tensor]) -> tuple[torch.dtype, ...]:
    """Checks what both ops share, as csrc/include/fusedclr/checks.h; returns the allowed state dtypes."""
    if param_dtype not in _PARAM_DTYPES:
        raise TypeError(f"fusedclr.triton: param_dtype is {param_dtype}; the Triton kernels update "
                        f"{list(_PARAM_DTYPES)} parameters")
    if segments.dim() != 2 or segments.shape[1] != 4:
        raise ValueError("fusedclr.triton: segments must be an int64 [n, 4] table (param address, grad address, "
                         f"state offset, numel), got shape {tuple(segments.shape)}")
    _check_small("segments", segments, segments, (torch.int64,))
    _check_device(segments)
    if seg_steps.dim() != 1 or seg_steps.numel() != segments.shape[0]:
        raise ValueError(f"fusedclr.triton: seg_steps must be 1-D with one step per segment ({segments.shape[0]}), "
                         f"got shape {tuple(seg_steps.shape)}")
    _check_small("seg_steps", seg_steps, segments, (torch.int64,))
    if chunks.dim() != 2 or chunks.shape[1] != 3:
        raise ValueError(f"fusedclr.triton: chunks must be an int64 [n, 3] table of (segment, begin, end), "
                         f"got shape {tuple(chunks.shape)}")
    _check_small("chunks", chunks, segments, (torch.int64,))
    _check_per_call(segments, grad_scale, found_inf)
    if hyper.numel() < 2:
        raise ValueError(f"fusedclr.triton: hyper must hold [lr, momentum-or-beta1], got shape {tuple(hyper.shape)}")
    _check_small("hyper", hyper, segments, (torch.float64,))
    _check_small("schedule", schedule, segments, (torch.float64,))
    _check_small("schedule_step", schedule_step, segments, (torch.int64,), 1)
    if param_dtype == torch.float64:
        return (torch.float64,)
    # bf16 parameters may keep bf16 states [note: precision opt-ins].
    return (torch.float32, torch.bfloat16) if param_dtype == torch.bfloat16 else (torch.float32,)


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_per_call(segments: Tensor, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """The checks of the arguments that change from step to step (both ``None`` in most steps)."""
    _check_small("grad_scale", grad_scale, segments, _FLOATS, 1)
    _check_small("found_inf", found_inf, segments, _FLOATS, 1)


def _check_states(segments: Tensor, dtypes: tuple[torch.dtype, ...], **states: Optional[Tensor]) -> int:
    """Every given state is a flat buffer of an allowed dtype, all of one dtype and length;
    returns the length (-1 without states)."""
    given = {name: t for name, t in states.items() if t is not None}
    if not given:
        return -1
    numel = next(iter(given.values())).numel()
    for name, t in given.items():
        _check_flat(name, t, segments, numel, dtypes)
    if len({t.dtype for t in given.values()}) > 1:
        raise TypeError("fusedclr.triton: the states have dtypes "
                        f"{ {name: t.dtype for name, t in given.items()} }; keep every state of a bucket in one dtype")
    return numel


def _check_precision(segments: Tensor, param_dtype: torch.dtype, numel: int, master_param: Optional[Tensor],
                     sr_seed: Optional[int]) -> None:
    """The reference's checks of the precision opt-ins."""
    if master_param is not None:
        _check_flat("master_param", master_param, segments, master_param.numel() if numel < 0 else numel,
                    (torch.float32,))
    reference.check_precision(torch.empty(0, dtype=param_dtype), None if master_param is None else
                              master_param[:0], sr_seed)


def _write_mode(master_param: Optional[Tensor], sr_seed: Optional[int]) -> int:
    """The kernels' WRITE constexpr."""
    if sr_seed is not None:
        return _common.WRITE_STOCHASTIC
    return _common.WRITE_ROUND if master_param is None else _common.WRITE_MASTER


# [note: triton checks per bucket]
# fusedclr's optimizers call the ops with the same bucket buffers every step, and
# checking them in Python costs microseconds of a step whose whole host budget
# is 30 us (docs/DESIGN.md). Their entry points (`*_step_for_bucket_`) check
# the buffers once and remember them, by identity, keyed by the bucket's chunk
# table; any buffer replaced (a new schedule descriptor, a master copy) is
# checked again. What changes from step to step (grad_scale, found_inf) is
# checked on every call. The public `sgd_step_` / `adam_step_` check everything
# on every call. The memo lives here, not on the chunk table (a tensor attribute
# would travel with the optimizer into torch.save): id(chunks) -> [weak
# reference to chunks, checked buffers], dropped when the chunk table is freed.
_MEMO: dict[int, list] = {}


def _memo(chunks: Tensor) -> Optional[list]:
    entry = _MEMO.get(id(chunks))
    return entry if entry is not None and entry[0]() is chunks else None


def _remember(chunks: Tensor, static: tuple) -> None:
    key = id(chunks)
    _MEMO[key] = [weakref.ref(chunks, lambda _ref, key=key: _MEMO.pop(key, None)), static]


def _checked_before(chunks: Tensor, static: tuple) -> bool:
    entry = _memo(chunks)
    return entry is not None and len(entry[1]) == len(static) and all(map(operator.is_, entry[1], static))


def _seed_bits(sr_seed: Optional[int]) -> int:
    """The seed modulo 2**32, as C++'s uint32_t cast takes it."""
    return 0 if sr_seed is None else int(sr_seed) & 0xFFFFFFFF


def _skip_launch(segments: Tensor) -> bool:
    """True when tracing under the interpreter, where only fake propagation can happen
    [note: triton op dispatch]."""
    if not INTERPRETED:
        return False
    if isinstance(segments, FunctionalTensor):
        raise RuntimeError(
            "fusedclr.triton: under TRITON_INTERPRET=1 the Triton kernels cannot be traced by a "
            "functionalizing torch.compile backend (aot_eager, inductor): torch's wrap_triton does not "
            "wrap interpreted kernels. Use torch.compile(backend='eager') on CPU, or run on a GPU."
        )
    return isinstance(segments, FakeTensor)


_TL_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {"fp32": tl.float32, "fp64": tl.float64, "fp16": tl.float16, "bf16": tl.bfloat16}[_TL_DTYPES[dtype]]


# --------------------------------------------------------------------------
# Op bodies (shared by the eager fast path and the triton_op)
# --------------------------------------------------------------------------


def _advance(launch, seg_steps: Tensor, segments: Tensor, found_inf: Optional[Tensor]) -> None:
    n = seg_steps.numel()
    if n == 0:
        return
    grid = ((n + ADVANCE_BLOCK - 1) // ADVANCE_BLOCK,)
    launch(_advance_steps_kernel)[grid](
        seg_steps, segments, found_inf, n, HAS_FOUND_INF=found_inf is not None, BLOCK=ADVANCE_BLOCK,
    )


# [note: triton absent buffers]
# A step may lack buffers the kernels' signatures name (no momentum buffer, no
# amsgrad maximum, no master copy: the kernel's constexprs then never touch
# them). No launch passes None for them: Inductor, which may autotune user
# kernels under torch.compile, clones tensor arguments and asserts each is a
# tensor. A launch on real tensors gets a cached one-element placeholder on the
# table's device; while torch.compile traces the op it gets a fresh one-element
# `torch.empty` (an allocation in the graph, no kernel).
_PLACEHOLDERS: dict[torch.device, Tensor] = {}


def _placeholder(t: Optional[Tensor], segments: Tensor) -> Tensor:
    """``t``, or for an absent buffer a one-element stand-in on the table's device."""
    if t is not None:
        return t
    if isinstance(segments, (FakeTensor, FunctionalTensor)):
        return torch.empty(1, dtype=torch.float32, device=segments.device)
    got = _PLACEHOLDERS.get(segments.device)
    if got is None:
        got = _PLACEHOLDERS[segments.device] = torch.zeros(1, dtype=torch.float32, device=segments.device)
    return got


def _launch_step(launch, kernel, buffers: tuple, consts: dict, segments: Tensor, param_dtype: torch.dtype,
                 seg_steps: Tensor, chunks: Tensor, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                 master_param: Optional[Tensor], sr_seed: Optional[int]) -> None:
    """What both ops do once their buffers are checked: one update launch over the chunk
    table (``buffers``: the kernel's arguments up to ``schedule_step_ptr``, absent written
    buffers already replaced by placeholders), then the step counters
    [note: triton step counters]."""
    if _skip_launch(segments):
        return
    if chunks.shape[0] > 0:
        args = (*buffers, grad_scale, found_inf, _placeholder(master_param, segments), _seed_bits(sr_seed))
        flags = {**consts, "HAS_GRAD_SCALE": grad_scale is not None, "HAS_FOUND_INF": found_inf is not None,
                 "PARAM_DTYPE": _tl_dtype(param_dtype), "MATH_F64": param_dtype == torch.float64,
                 "WRITE": _write_mode(master_param, sr_seed), **_common.update_launch()}
        launch(kernel)[(chunks.shape[0],)](*args, **flags)
    _advance(launch, seg_steps, segments, found_inf)


def _sgd_body(launch, segments: Tensor, param_dtype: torch.dtype, momentum_buffer: Optional[Tensor],
              seg_steps: Tensor, chunks: Tensor, hyper: Tensor, schedule: Tensor, schedule_step: Tensor,
              dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor], master_param: Optional[Tensor] = None,
              sr_seed: Optional[int] = None, remember: bool = False) -> None:
    static = (segments, param_dtype, momentum_buffer, seg_steps, hyper, schedule, schedule_step, master_param,
              sr_seed)
    if remember and _checked_before(chunks, static):
        _check_per_call(segments, grad_scale, found_inf)
    else:
        state_dtypes = _check_common(segments, param_dtype, seg_steps, chunks, hyper, schedule, schedule_step,
                                     grad_scale, found_inf)
        numel = _check_states(segments, state_dtypes, momentum_buffer=momentum_buffer)
        _check_precision(segments, param_dtype, numel, master_param, sr_seed)
        if remember:
            _remember(chunks, static)
    buffers = (segments, _placeholder(momentum_buffer, segments), seg_steps, chunks, hyper, schedule, schedule_step)
    consts = {"DAMPENING": float(dampening), "WEIGHT_DECAY": float(weight_decay), "NESTEROV": bool(nesterov),
              "MAXIMIZE": bool(maximize), "HAS_MOMENTUM_BUFFER": momentum_buffer is not None}
    _launch_step(launch, _sgd_kernel, buffers, consts, segments, param_dtype, seg_steps, chunks, grad_scale,
                 found_inf, master_param, sr_seed)


def _adam_body(launch, segments: Tensor, param_dtype: torch.dtype, exp_avg: Tensor, exp_avg_sq: Tensor,
               max_exp_avg_sq: Optional[Tensor], seg_steps: Tensor, chunks: Tensor, hyper: Tensor,
               schedule: Tensor, schedule_step: Tensor, beta2: float, eps: float, weight_decay: float,
               decoupled: bool, maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
               master_param: Optional[Tensor] = None, sr_seed: Optional[int] = None, remember: bool = False) -> None:
    static = (segments, param_dtype, exp_avg, exp_avg_sq, max_exp_avg_sq, seg_steps, hyper, schedule,
              schedule_step, master_param, sr_seed)
    if remember and _checked_before(chunks, static):
        _check_per_call(segments, grad_scale, found_inf)
    else:
        state_dtypes = _check_common(segments, param_dtype, seg_steps, chunks, hyper, schedule, schedule_step,
                                     grad_scale, found_inf)
        numel = _check_states(segments, state_dtypes, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                              max_exp_avg_sq=max_exp_avg_sq)
        _check_precision(segments, param_dtype, numel, master_param, sr_seed)
        if remember:
            _remember(chunks, static)
    buffers = (segments, exp_avg, exp_avg_sq, _placeholder(max_exp_avg_sq, segments), seg_steps, chunks, hyper,
               schedule, schedule_step)
    consts = {"BETA2": float(beta2), "EPS": float(eps), "WEIGHT_DECAY": float(weight_decay),
              "DECOUPLED": bool(decoupled), "AMSGRAD": max_exp_avg_sq is not None, "MAXIMIZE": bool(maximize)}
    _launch_step(launch, _adam_kernel, buffers, consts, segments, param_dtype, seg_steps, chunks, grad_scale,
                 found_inf, master_param, sr_seed)


# --------------------------------------------------------------------------
# Registration and entry points
# --------------------------------------------------------------------------


# The parameters are written through the table's addresses, which the schema
# cannot name; the states and counters it does name keep the ops in order.
@triton_op("fusedclr::triton_sgd_step_", mutates_args={"momentum_buffer", "seg_steps", "master_param"})
def _sgd_op(segments: Tensor, param_dtype: torch.dtype, momentum_buffer: Optional[Tensor], seg_steps: Tensor,
            chunks: Tensor, hyper: Tensor, schedule: Tensor, schedule_step: Tensor, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, grad_scale: Optional[Tensor],
            found_inf: Optional[Tensor], master_param: Optional[Tensor] = None, sr_seed: Optional[int] = None) -> None:
    _sgd_body(wrap_triton, segments, param_dtype, momentum_buffer, seg_steps, chunks, hyper, schedule, schedule_step,
              dampening, weight_decay, nesterov, maximize, grad_scale, found_inf, master_param, sr_seed)


@triton_op("fusedclr::triton_adam_step_",
           mutates_args={"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "seg_steps", "master_param"})
def _adam_op(segments: Tensor, param_dtype: torch.dtype, exp_avg: Tensor, exp_avg_sq: Tensor,
             max_exp_avg_sq: Optional[Tensor], seg_steps: Tensor, chunks: Tensor, hyper: Tensor, schedule: Tensor,
             schedule_step: Tensor, beta2: float, eps: float, weight_decay: float, decoupled: bool, maximize: bool,
             grad_scale: Optional[Tensor], found_inf: Optional[Tensor], master_param: Optional[Tensor] = None,
             sr_seed: Optional[int] = None) -> None:
    _adam_body(wrap_triton, segments, param_dtype, exp_avg, exp_avg_sq, max_exp_avg_sq, seg_steps, chunks, hyper,
               schedule, schedule_step, beta2, eps, weight_decay, decoupled, maximize, grad_scale, found_inf,
               master_param, sr_seed)


def _direct(kernel):
    return kernel


def _eager(segments: Tensor) -> bool:
    """Plain tensors outside of compilation take the direct path [note: triton op dispatch]."""
    return not torch.compiler.is_compiling() and type(segments) is Tensor


def _entry(body, op, remember: bool, doc: str):
    """An op's Python entry point: plain tensors outside of compilation call ``body``
    directly, everything else goes through the registered op [note: triton op dispatch]."""

    def entry(*args, **kwargs) -> None:
        if _eager(args[0] if args else kwargs["segments"]):
            body(_direct, *args, **kwargs, **({"remember": True} if remember else {}))
        else:
            op(*args, **kwargs)

    entry.__doc__ = doc
    return entry


sgd_step_ = _entry(_sgd_body, torch.ops.fusedclr.triton_sgd_step_, False, "Triton ``fusedclr::sgd_step_``.")
adam_step_ = _entry(_adam_body, torch.ops.fusedclr.triton_adam_step_, False, "Triton ``fusedclr::adam_step_``.")
sgd_step_for_bucket_ = _entry(_sgd_body, torch.ops.fusedclr.triton_sgd_step_, True,
                              "``sgd_step_`` for fusedclr's optimizers [note: triton checks per bucket].")
adam_step_for_bucket_ = _entry(_adam_body, torch.ops.fusedclr.triton_adam_step_, True,
                               "``adam_step_`` for fusedclr's optimizers [note: triton checks per bucket].")
