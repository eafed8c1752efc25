"""Launchers of the Triton kernels and their ``torch.library.triton_op`` registration.

Importing this module imports Triton, builds the kernels (interpreted when
TRITON_INTERPRET is set) and registers ``fusedclr::triton_step_``, the Triton
twin of ``fusedclr::step_`` (csrc/ops.cpp [note: step contract]) with the same
schema, and ``fusedclr::triton_grad_zero_``, the twin of ``fusedclr::grad_zero_``;
``fusedclr.triton`` imports it on first use.

[note: triton op dispatch]
The op is a ``triton_op`` whose body launches through ``wrap_triton``, so
``torch.compile`` traces into the kernels (and Inductor can schedule them with
the rest of the graph). Outside of compilation :data:`step_` calls the same
body directly with plain tensors, which skips the dispatcher round trip that a
custom op costs on every eager call (the step's host time is a target of its
own, see DESIGN.md section 4).

Under TRITON_INTERPRET=1 ``wrap_triton`` hands back the interpreted kernel
itself, which cannot run on fake tensors, so the body returns early on fake
tensors (the op returns nothing, so there is nothing to fake). Graph capture
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

from fusedclr.ops import MAX_STATES, state_args
from fusedclr.triton import _common
from fusedclr.triton._common import ADVANCE_BLOCK
from fusedclr.triton._policies import MAX_OPTIONS, POLICIES, PolicyInfo
from fusedclr.triton._walk import _advance_kernel, _grad_zero_kernel, _step_kernel

__all__ = ["INTERPRETED", "grad_zero_", "step_", "step_for_bucket_"]


def _is_interpreted(kernel: object) -> bool:
    while hasattr(kernel, "configs") and hasattr(kernel, "fn"):  # unwrap triton.autotune
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


# Whether the kernels were built for Triton's interpreter: decided once, when
# @triton.jit ran at this module's import.
INTERPRETED = _is_interpreted(_step_kernel)
# Why the interpreter cannot run the kernels here ("" when it can): probed once, on real
# tensors even when the first use happens while tracing.
if INTERPRETED:
    with unset_fake_temporarily():
        INTERPRETER_PROBLEM = _common.interpreter_problem()
else:
    INTERPRETER_PROBLEM = ""


# --------------------------------------------------------------------------
# Argument checks: csrc/include/fusedclr/checks.h's check_step_call, condition
# for condition and with its messages (metadata only: no sync, no device reads)
# --------------------------------------------------------------------------

_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SEGMENT_WORDS = 4
_SCHEDULE_HEADER_WORDS = 4
# How c10 prints a ScalarType, so that the messages read as the C++ ops' do.
_SCALAR_TYPE = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _st(dtype) -> str:
    return _SCALAR_TYPE.get(dtype, str(dtype))


def _sizes(t: Tensor) -> str:
    return str(list(t.shape))


def _fail(*parts) -> None:
    raise RuntimeError("fusedclr: " + "".join(str(p) for p in parts))


def _check_device(segments: Tensor) -> None:
    """CPU tensors need the interpreter (Triton-only: the C++ ops dispatch by device)."""
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


def _policy(optimizer: str) -> PolicyInfo:
    info = POLICIES.get(optimizer)
    if info is None:
        _fail(f"unknown optimizer '{optimizer}'; the kernels know: {' '.join(POLICIES)}")
    return info


def _check_on(t: Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        _fail(name, " must be on ", device, " with the bucket's segment table, got ", t.device, "; move it with .to(",
              device, ")")


def _check_segments(segments: Tensor, param_dtype: torch.dtype, chunks: Tensor) -> None:
    """``check_segments``; the parameter dtype first, as there."""
    if param_dtype not in _PARAM_DTYPES:
        _fail("param_dtype is ", _st(param_dtype), "; the kernels update Float, Double, Half and BFloat16 parameters "
              "(complex ones as their real view)")
    if not (segments.dtype == torch.int64 and segments.dim() == 2 and segments.shape[1] == _SEGMENT_WORDS
            and segments.is_contiguous()):
        _fail("segments must be a contiguous int64 [n, ", _SEGMENT_WORDS, "] table (param address, grad address, "
              "state offset, numel), got ", _st(segments.dtype), " of shape ", _sizes(segments))
    _check_device(segments)
    _check_on(chunks, "chunks", segments.device)
    if not (chunks.dtype == torch.int64 and chunks.dim() == 2 and chunks.shape[1] == 3 and chunks.is_contiguous()):
        _fail("chunks must be a contiguous int64 [n, 3] table (segment, begin, end), got ", _st(chunks.dtype),
              " of shape ", _sizes(chunks))


def _check_amp(segments: Tensor, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """The per-step arguments (both ``None`` in most steps): checked on every call."""
    for t, name in ((grad_scale, "grad_scale"), (found_inf, "found_inf")):
        if t is not None:
            _check_on(t, name, segments.device)
            if t.dtype not in (torch.float32, torch.float64) or t.numel() != 1:
                _fail(name, " must be a float32 or float64 tensor with one element (GradScaler's), got ",
                      _st(t.dtype), " of shape ", _sizes(t))


def _check_step(segments: Tensor, seg_steps: Tensor, hyper: Tensor, schedule: Tensor, schedule_step: Tensor,
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """``check_step``."""
    dev = segments.device
    _check_on(seg_steps, "seg_steps", dev)
    if not (seg_steps.dtype == torch.int64 and seg_steps.dim() == 1 and seg_steps.is_contiguous()
            and seg_steps.numel() == segments.shape[0]):
        _fail("seg_steps must be a contiguous int64 1-D tensor with one step per segment (", segments.shape[0],
              "), got ", _st(seg_steps.dtype), " of shape ", _sizes(seg_steps))
    _check_on(hyper, "hyper", dev)
    if not (hyper.dtype == torch.float64 and hyper.numel() == 2 and hyper.is_contiguous()):
        _fail("hyper must be a contiguous float64 [2] tensor (lr, momentum-or-beta1), got ", _st(hyper.dtype),
              " of shape ", _sizes(hyper))
    _check_on(schedule, "schedule", dev)
    if not (schedule.dtype == torch.float64 and schedule.is_contiguous()
            and schedule.numel() >= _SCHEDULE_HEADER_WORDS):
        _fail("schedule must be a contiguous float64 descriptor of at least ", _SCHEDULE_HEADER_WORDS,
              " words, got ", _st(schedule.dtype), " of shape ", _sizes(schedule))
    _check_on(schedule_step, "schedule_step", dev)
    if not (schedule_step.dtype == torch.int64 and schedule_step.numel() == 1):
        _fail("schedule_step must be an int64 scalar tensor, got ", _st(schedule_step.dtype), " of shape ",
              _sizes(schedule_step))
    _check_amp(segments, grad_scale, found_inf)


def _check_flat(t: Tensor, name: str, device: torch.device, numel: int) -> None:
    """``check_flat``: a flat buffer of the bucket."""
    _check_on(t, name, device)
    if not (t.dim() == 1 and t.is_contiguous()):
        _fail(name, " must be a contiguous 1-D flat buffer, got shape ", _sizes(t), " with strides ", list(t.stride()))
    if t.numel() != numel:
        _fail(name, " has ", t.numel(), " elements, the bucket's other flat buffers ", numel)


def _check_precision(param_dtype: torch.dtype, device: torch.device, numel: int, master_param: Optional[Tensor],
                     sr_seed: Optional[int]) -> None:
    """``check_precision`` [note: precision opt-ins]."""
    if master_param is not None:
        if param_dtype not in (torch.bfloat16, torch.float16):
            _fail("master_param is for BFloat16 or Half parameters, got ", _st(param_dtype),
                  " parameters; pass master_param=None")
        _check_flat(master_param, "master_param", device, master_param.numel() if numel < 0 else numel)
        if master_param.dtype != torch.float32:
            _fail("master_param must be Float, got ", _st(master_param.dtype))
    if sr_seed is not None:
        if param_dtype != torch.bfloat16:
            _fail("sr_seed (stochastic rounding) is for BFloat16 parameters, got ", _st(param_dtype),
                  " parameters; pass sr_seed=None")
        if master_param is not None:
            _fail("pass master_param or sr_seed, not both: with master weights the parameter is the master rounded "
                  "to nearest")


def _padded(states: list[Optional[Tensor]], n: int) -> list[Optional[Tensor]]:
    """A states list of a policy with ``n`` states: shorter ones end with absent (None) states."""
    return list(states[:n]) + [None] * (n - len(states))


def _check_call(optimizer: str, info: PolicyInfo, segments: Tensor, param_dtype: torch.dtype,
                states: list[Optional[Tensor]], seg_steps: Tensor, seg_scalars: Optional[Tensor], chunks: Tensor,
                hyper: Tensor, schedule: Tensor, schedule_step: Tensor, options: list[float],
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor], master_param: Optional[Tensor],
                sr_seed: Optional[int]) -> None:
    """``check_step_call``, and what only the Triton kernels need: the policy's required states given, and on
    CPU tensors the chunk rows (``check_chunk_rows``, which a GPU tensor could only be read for with a sync)."""
    _check_segments(segments, param_dtype, chunks)
    _check_step(segments, seg_steps, hyper, schedule, schedule_step, grad_scale, found_inf)
    dev = segments.device
    if len(states) > MAX_STATES:
        _fail(optimizer, " passes ", len(states), " state buffers; the op takes at most ", MAX_STATES)
    for i in range(info.n_states, len(states)):
        if states[i] is not None:
            _fail(optimizer, " takes ", info.n_states, " state buffers, got state", i)
    states = _padded(states, info.n_states)
    if len(options) != info.n_options:
        _fail(optimizer, " takes ", info.n_options, " options, got ", len(options))
    if optimizer == "lookahead" and not (options[0] >= 1 and float(options[0]).is_integer()):
        _fail("lookahead synchronises every k >= 1 steps (an integer), got k=", options[0])
    if optimizer == "lookahead" and not 0 <= options[1] <= 1:
        _fail("lookahead's alpha must be in [0, 1], got ", options[1])
    math = torch.float64 if param_dtype == torch.float64 else torch.float32
    state_dtype, numel, first_name = param_dtype, -1, ""
    for i, t in enumerate(states):
        if t is None:
            continue
        name = f"state{i}"
        _check_flat(t, name, dev, t.numel() if numel < 0 else numel)
        if not (t.dtype == math or (t.dtype == torch.bfloat16 and param_dtype == torch.bfloat16)):
            _fail(name, " must be ", _st(math), " or BFloat16" if param_dtype == torch.bfloat16 else "", " for ",
                  _st(param_dtype), " parameters, got ", _st(t.dtype))
        if numel < 0:
            state_dtype, numel, first_name = t.dtype, t.numel(), name
        if t.dtype != state_dtype:
            _fail(name, " is ", _st(t.dtype), " but ", first_name, " is ", _st(state_dtype),
                  "; keep every state of a bucket in one dtype")
    for i in info.required:
        if states[i] is None:
            _fail(optimizer, " needs state", i, " with these options; pass its flat buffer")
    if numel < 0 and master_param is not None:
        numel = master_param.numel()
    _check_precision(param_dtype, dev, numel, master_param, sr_seed)
    if info.seg_scalar:
        if seg_scalars is None:
            _fail(optimizer, " keeps a per-segment scalar: pass seg_scalars")
        _check_on(seg_scalars, "seg_scalars", dev)
        if not (seg_scalars.dtype == torch.float64 and seg_scalars.dim() == 1 and seg_scalars.is_contiguous()
                and seg_scalars.numel() == segments.shape[0]):
            _fail("seg_scalars must be a contiguous float64 1-D tensor with one value per segment (",
                  segments.shape[0], "), got ", _st(seg_scalars.dtype), " of shape ", _sizes(seg_scalars))
    elif seg_scalars is not None:
        _fail(optimizer, " keeps no per-segment scalar: pass seg_scalars=None")
    if dev.type == "cpu" and type(chunks) is Tensor and type(segments) is Tensor:
        _check_chunk_rows(segments, chunks, numel)


def _check_chunk_rows(segments: Tensor, chunks: Tensor, state_numel: int) -> None:
    """``check_chunk_rows`` (csrc/cpu/optim_cpu.cpp): every row inside its segment and the state buffers."""
    if chunks.shape[0] == 0:
        return
    seg, begin, end = chunks.unbind(1)
    n_segments = segments.shape[0]
    bad = (seg < 0) | (seg >= n_segments)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        _fail("chunk ", i, " names segment ", int(seg[i]), " of ", n_segments)
    offset, count = segments[seg, 2], segments[seg, 3]
    bad = (begin < offset) | (begin > end) | (end > offset + count)
    if state_numel >= 0:
        bad |= end > state_numel
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        s = int(seg[i])
        _fail("chunk ", i, " [", int(begin[i]), ", ", int(end[i]), ") lies outside segment ", s, " [",
              int(segments[s, 2]), ", ", int(segments[s, 2] + segments[s, 3]), ") or the state buffers (",
              state_numel, " elements)")


# [note: triton checks per bucket]
# fusedclr's optimizers call the op with the same bucket buffers every step, and
# checking them in Python costs microseconds of a step whose whole host budget
# is 30 us (docs/DESIGN.md). Their entry point (`step_for_bucket_`) checks the
# buffers once and remembers them, by identity, keyed by the bucket's chunk
# table; any buffer replaced (a new schedule descriptor, a master copy) is
# checked again. What changes from step to step (grad_scale, found_inf, the
# number of options, which a new list carries every step) is checked on every
# call. The public `step_` checks everything on every call. The memo lives
# here, not on the chunk table (a tensor attribute would travel with the
# optimizer into torch.save): id(chunks) -> [weak reference to chunks, checked
# buffers], dropped when the chunk table is freed.
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


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def _write_mode(master_param: Optional[Tensor], sr_seed: Optional[int]) -> int:
    """The kernels' WRITE constexpr."""
    if sr_seed is not None:
        return _common.WRITE_STOCHASTIC
    return _common.WRITE_ROUND if master_param is None else _common.WRITE_MASTER


# [note: triton absent buffers]
# A step may lack buffers the kernels' signatures name (an optimizer's optional
# states, the per-segment scalars, the master copy: the kernel's constexprs then
# never touch them). No launch passes None for them: Inductor, which may
# autotune user kernels under torch.compile, clones tensor arguments and asserts
# each is a tensor. A launch on real tensors gets a cached one-element
# placeholder on the table's device; while torch.compile traces the op it gets a
# fresh one-element `torch.empty` (an allocation in the graph, no kernel).
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


# --------------------------------------------------------------------------
# The op body (shared by the eager fast path and the triton_op)
# --------------------------------------------------------------------------


# BLOCK and num_warps of the update launch, fixed when the kernels were built (interpreted or compiled).
_UPDATE_LAUNCH = _common.update_launch()
# The constexprs of both launches by what decides them (the policy, its options, the given states, the
# flags): a step's host time is a target of its own (DESIGN.md section 4), and rebuilding these two
# dicts of ~25 entries every step cost more than the argument checks the memo saves.
_FLAGS: dict[tuple, tuple[dict, dict]] = {}


def _flags(info: PolicyInfo, options: list[float], has: tuple[bool, ...], maximize: bool, grad_scale: bool,
           found_inf: bool, param_dtype: torch.dtype, write: int) -> tuple[dict, dict]:
    """The constexprs of the step-counter launch and of the update launch."""
    key = (info.id, *options, *has, maximize, grad_scale, found_inf, param_dtype, write)
    got = _FLAGS.get(key)
    if got is None:
        opts = {f"OPT{i}": float(options[i]) if i < len(options) else 0.0 for i in range(MAX_OPTIONS)}
        advance = {"OPTIMIZER": info.id, "OPT4": opts["OPT4"], "SEG_SCALAR": info.seg_scalar,
                   "HAS_FOUND_INF": found_inf, "BLOCK": ADVANCE_BLOCK}
        update = {"OPTIMIZER": info.id, **{f"HAS_STATE{i}": i < len(has) and has[i] for i in range(4)}, **opts,
                  "USES_GRAD": info.uses_grad, "SEG_SCALAR": info.seg_scalar, "MAXIMIZE": bool(maximize),
                  "HAS_GRAD_SCALE": grad_scale, "HAS_FOUND_INF": found_inf, "PARAM_DTYPE": _tl_dtype(param_dtype),
                  "MATH_F64": param_dtype == torch.float64, "WRITE": write, **_UPDATE_LAUNCH}
        got = _FLAGS[key] = (advance, update)
    return got


def _launch_step(launch, info: PolicyInfo, segments: Tensor, param_dtype: torch.dtype,
                 states: list[Optional[Tensor]], seg_steps: Tensor, seg_scalars: Optional[Tensor], chunks: Tensor,
                 hyper: Tensor, schedule: Tensor, schedule_step: Tensor, options: list[float], maximize: bool,
                 grad_scale: Optional[Tensor], found_inf: Optional[Tensor], master_param: Optional[Tensor],
                 sr_seed: Optional[int]) -> None:
    """What the op does once its arguments are checked: the step counters' launch, then one update launch over
    the chunk table [note: triton step counters]."""
    if _skip_launch(segments):
        return
    has = tuple(t is not None for t in states)
    advance, update = _flags(info, options, has, maximize, grad_scale is not None, found_inf is not None,
                             param_dtype, _write_mode(master_param, sr_seed))
    stand_in = _placeholder(None, segments)
    scalars = stand_in if seg_scalars is None else seg_scalars
    n = seg_steps.numel()
    if info.advances and n > 0:
        launch(_advance_kernel)[((n + ADVANCE_BLOCK - 1) // ADVANCE_BLOCK,)](
            seg_steps, segments, found_inf, scalars, hyper, schedule, schedule_step, n, **advance)
    if chunks.shape[0] > 0:
        s = [t if t is not None else stand_in for t in states] + [stand_in] * (4 - len(states))
        launch(_step_kernel)[(chunks.shape[0],)](
            segments, s[0], s[1], s[2], s[3], seg_steps, scalars, chunks, hyper, schedule, schedule_step, grad_scale,
            found_inf, stand_in if master_param is None else master_param, _seed_bits(sr_seed), **update)


def _body(launch, optimizer: str, segments: Tensor, param_dtype: torch.dtype, states: list[Optional[Tensor]],
          seg_steps: Tensor, seg_scalars: Optional[Tensor], chunks: Tensor, hyper: Tensor, schedule: Tensor,
          schedule_step: Tensor, options: list[float], maximize: bool = False, grad_scale: Optional[Tensor] = None,
          found_inf: Optional[Tensor] = None, master_param: Optional[Tensor] = None, sr_seed: Optional[int] = None,
          remember: bool = False) -> None:
    info = _policy(optimizer)
    static = (optimizer, segments, param_dtype, seg_steps, seg_scalars, hyper, schedule, schedule_step, master_param,
              sr_seed, *states)
    if remember and _checked_before(chunks, static):
        _check_amp(segments, grad_scale, found_inf)
        if len(options) != info.n_options:
            _fail(optimizer, " takes ", info.n_options, " options, got ", len(options))
    else:
        _check_call(optimizer, info, segments, param_dtype, states, seg_steps, seg_scalars, chunks, hyper, schedule,
                    schedule_step, options, grad_scale, found_inf, master_param, sr_seed)
        if remember:
            _remember(chunks, static)
    _launch_step(launch, info, segments, param_dtype, states, seg_steps, seg_scalars, chunks, hyper, schedule,
                 schedule_step, options, maximize, grad_scale, found_inf, master_param, sr_seed)


# --------------------------------------------------------------------------
# Registration and entry points
# --------------------------------------------------------------------------


# The parameters are written through the table's addresses, which the schema
# cannot name; the states and counters it does name keep the ops in order.
# The states are four optional arguments, not a list: torch's functionalization cannot handle a None in a
# mutable tensor list (csrc/ops.cpp [note: step contract]).
@triton_op("fusedclr::triton_step_",
           mutates_args={"state0", "state1", "state2", "state3", "seg_steps", "seg_scalars", "master_param"})
def _step_op(optimizer: str, segments: Tensor, param_dtype: torch.dtype, state0: Optional[Tensor],
             state1: Optional[Tensor], state2: Optional[Tensor], state3: Optional[Tensor], seg_steps: Tensor, seg_scalars: Optional[Tensor], chunks: Tensor, hyper: Tensor, schedule: Tensor,
             schedule_step: Tensor, options: list[float], maximize: bool = False, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None, master_param: Optional[Tensor] = None,
             sr_seed: Optional[int] = None) -> None:
    _body(wrap_triton, optimizer, segments, param_dtype, [state0, state1, state2, state3], seg_steps, seg_scalars,
          chunks, hyper, schedule, schedule_step, options, maximize, grad_scale, found_inf, master_param, sr_seed)


def _direct(kernel):
    return kernel


def _eager(segments: Tensor) -> bool:
    """Plain tensors outside of compilation take the direct path [note: triton op dispatch]."""
    return not torch.compiler.is_compiling() and type(segments) is Tensor


def _entry(remember: bool, doc: str):
    """The op's Python entry point: plain tensors outside of compilation call the body directly,
    everything else goes through the registered op [note: triton op dispatch]."""
    op = torch.ops.fusedclr.triton_step_

    def entry(optimizer: str, segments: Tensor, param_dtype: torch.dtype, states: list[Optional[Tensor]],
              *args, **kwargs) -> None:
        if _eager(segments):
            _body(_direct, optimizer, segments, param_dtype, states, *args, **kwargs, remember=remember)
        else:
            op(optimizer, segments, param_dtype, *state_args(optimizer, states), *args, **kwargs)

    entry.__doc__ = doc
    return entry


step_ = _entry(False, "Triton ``fusedclr::step_`` (csrc/ops.cpp [note: step contract]).")
step_for_bucket_ = _entry(True, "``step_`` for fusedclr's optimizers [note: triton checks per bucket].")


# --------------------------------------------------------------------------
# grad_zero_ (csrc/ops.cpp [note: zeroing through the table])
# --------------------------------------------------------------------------


def _grad_zero_body(launch, segments: Tensor, param_dtype: torch.dtype, chunks: Tensor) -> None:
    """The checks of the C++ op (``check_segments``, and on CPU tensors ``check_chunk_rows``), then one launch
    over the chunk table."""
    _check_segments(segments, param_dtype, chunks)
    if segments.device.type == "cpu" and type(chunks) is Tensor and type(segments) is Tensor:
        _check_chunk_rows(segments, chunks, -1)
    if _skip_launch(segments) or chunks.shape[0] == 0:
        return
    launch(_grad_zero_kernel)[(chunks.shape[0],)](segments, chunks, PARAM_DTYPE=_tl_dtype(param_dtype),
                                                  **_UPDATE_LAUNCH)


# The gradients are written through the table's addresses, which the schema cannot name.
@triton_op("fusedclr::triton_grad_zero_", mutates_args=())
def _grad_zero_op(segments: Tensor, param_dtype: torch.dtype, chunks: Tensor) -> None:
    _grad_zero_body(wrap_triton, segments, param_dtype, chunks)


def grad_zero_(segments: Tensor, param_dtype: torch.dtype, chunks: Tensor) -> None:
    """Triton ``fusedclr::grad_zero_``: plain tensors outside of compilation call the body directly, everything
    else goes through the registered op [note: triton op dispatch]."""
    if _eager(segments):
        _grad_zero_body(_direct, segments, param_dtype, chunks)
    else:
        torch.ops.fusedclr.triton_grad_zero_(segments, param_dtype, chunks)
