"""Bad calls of fusedclr::step_ (and of the ops that only walk the gradients, grad_sumsq and
grad_zero_): every op backend refuses the same ones with the same message, before anything
changes.

The compiled CPU op, the CUDA op and the CUDA kernels' host emulation share one
argument check (check_step_call, csrc/include/fusedclr/checks.h). Each case
below is one bad call, built from the optimizer table (tests/op_table.py) on
each backend's device; every backend this machine runs must raise a
RuntimeError with the same message (matching the case's pattern) and leave
parameters, states, masters, step counts and per-segment scalars as they were.
The reference backend (fusedclr.reference.step_) makes some of the checks
itself: where it does, it must refuse too, before anything changes (its own
wording: ``ref``).

Checks that need a second device (a buffer on the wrong one) are in
tests/test_cuda.py; the chunk table's row checks, made on the host by the CPU
op only (the CUDA kernels assert on the device), in tests/test_ops.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from conftest import available_op_backends
from op_table import GRAD_OP_BAD_CALLS, NAMES, TABLE, bucket, gradients

from fusedclr import reference

SIZES = [100, 7, 0, 33]
# The op's arguments by name, in the schema's order (csrc/ops.cpp).
ARGS = ("optimizer", "segments", "param_dtype", "states", "seg_steps", "seg_scalars", "chunks", "hyper", "schedule",
        "schedule_step", "options", "maximize", "grad_scale", "found_inf", "master_param", "sr_seed")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    optimizer: str
    bad: Callable[[dict, object], None]  # edits the call's arguments (by name) in place; gets the bucket too
    match: str
    dtype: torch.dtype = torch.float32
    master: bool = False
    option_set: str | None = None  # None: the optimizer's fullest
    ref: str | None = None  # the reference's refusal, where it checks this itself
    known_bug: str | None = None  # an open bug in the checks: the row is expected to fail until it is fixed


def _state(a: dict, i: int, value) -> None:
    a["states"] = [value if j == i else s for j, s in enumerate(a["states"])]


def _flat(b, dtype=torch.float32, n=None):
    return torch.zeros(b.total if n is None else n, dtype=dtype, device=b.device)


def _bf16_states_but(a, b):
    """bf16 states, except states[1] (fp32)."""
    a["states"] = [None if s is None else s.bfloat16() for s in a["states"]]
    _state(a, 1, _flat(b))


def _per_optimizer() -> list[Case]:
    out = []
    for name in NAMES:
        opt = TABLE[name]
        k, m = len(opt.states), len(opt.options)
        out += [
            # A states list may be shorter (the rest are absent) but names no state the policy lacks.
            Case(f"{name}-extra_state", name, lambda a, b: a.update(states=[*a["states"], _flat(b)]),
                 rf"^fusedclr: {name} takes {k} state buffers, got state{k}$",
                 ref=rf"^fusedclr: {name} takes {k} state buffers, got state{k}$"),
            Case(f"{name}-missing_option", name, lambda a, b: a.update(options=a["options"][:-1]),
                 rf"^fusedclr: {name} takes {m} options, got {m - 1}$",
                 ref=rf"^fusedclr: {name} takes {m} options, got {m - 1}$"),
            Case(f"{name}-extra_option", name, lambda a, b: a.update(options=[*a["options"], 0.0]),
                 rf"^fusedclr: {name} takes {m} options, got {m + 1}$",
                 ref=rf"^fusedclr: {name} takes {m} options, got {m + 1}$"),
            Case(f"{name}-state_dtype", name, lambda a, b: _state(a, 0, _flat(b, torch.float64)),
                 r"^fusedclr: state0 must be Float for Float parameters, got Double$"),
            Case(f"{name}-bf16_state_for_fp32", name, lambda a, b: _state(a, 0, _flat(b, torch.bfloat16)),
                 r"^fusedclr: state0 must be Float for Float parameters, got BFloat16$"),
            # A flat buffer of another length than the others (state1, or the master beside a single state).
            Case(f"{name}-state_length", name, lambda a, b: _state(a, 0, _flat(b, n=b.total + 16)),
                 r"^fusedclr: (state1|master_param) has \d+ elements, the bucket's other flat buffers \d+$",
                 dtype=torch.bfloat16, master=True),
            Case(f"{name}-state_strided", name, lambda a, b: _state(a, 0, _flat(b, n=2 * b.total)[::2]),
                 r"^fusedclr: state0 must be a contiguous 1-D flat buffer"),
        ]
        if name != "sgd":  # every other policy reads its first state whatever the options
            out.append(Case(f"{name}-missing_state", name, lambda a, b: _state(a, 0, None),
                            rf"^fusedclr: {name} needs state0 with these options; pass its flat buffer$",
                            ref=rf"^fusedclr: {name} needs state0 with these options; pass its flat buffer$"))
        if name == "nadam":
            out += [
                Case("nadam-no_seg_scalars", name, lambda a, b: a.update(seg_scalars=None),
                     r"^fusedclr: nadam keeps a per-segment scalar: pass seg_scalars$",
                     ref=r"^fusedclr: nadam keeps a per-segment scalar: pass seg_scalars$"),
                Case("nadam-seg_scalars_float32", name, lambda a, b: a.update(seg_scalars=a["seg_scalars"].float()),
                     r"^fusedclr: seg_scalars must be a contiguous float64 1-D tensor with one value per segment "
                     r"\(4\), got Float of shape \[4\]$"),
                Case("nadam-seg_scalars_short", name, lambda a, b: a.update(seg_scalars=a["seg_scalars"][:3]),
                     r"^fusedclr: seg_scalars must be a contiguous float64 1-D tensor with one value per segment"),
            ]
        else:
            out.append(Case(f"{name}-seg_scalars", name,
                            lambda a, b: a.update(seg_scalars=torch.ones(len(SIZES), dtype=torch.float64,
                                                                         device=b.device)),
                            rf"^fusedclr: {name} keeps no per-segment scalar: pass seg_scalars=None$",
                            ref=rf"^fusedclr: {name} keeps no per-segment scalar: pass seg_scalars=None$"))
    # States of one call share one dtype and one length.
    for name in (n for n in NAMES if len(TABLE[n].states) > 1):
        out += [
            Case(f"{name}-states_of_two_dtypes", name, _bf16_states_but,
                 r"^fusedclr: state1 is Float but state0 is BFloat16; keep every state of a bucket in one "
                 r"dtype$", dtype=torch.bfloat16),
            Case(f"{name}-states_of_two_lengths", name, lambda a, b: _state(a, 1, _flat(b, n=b.total - 1)),
                 rf"^fusedclr: state1 has \d+ elements, the bucket's other flat buffers \d+$"),
        ]
    return out


CASES: list[Case] = [
    Case("unknown_optimizer", "adam", lambda a, b: a.update(optimizer="adamw"),
         r"^fusedclr: unknown optimizer 'adamw'; the kernels know: sgd adam rmsprop adagrad radam nadam lion "
         r"lookahead$", ref=r"^fusedclr: unknown optimizer 'adamw'; the kernels know: sgd adam rmsprop adagrad "
         r"radam nadam lion lookahead$"),
    *_per_optimizer(),
    # States live in the math type; only bf16 parameters may keep bf16 ones.
    Case("bf16_state_for_fp16", "sgd", lambda a, b: _state(a, 0, _flat(b, torch.bfloat16)),
         r"^fusedclr: state0 must be Float for Half parameters, got BFloat16$", dtype=torch.float16),
    Case("fp32_state_for_fp64", "adagrad", lambda a, b: _state(a, 0, _flat(b)),
         r"^fusedclr: state0 must be Double for Double parameters, got Float$", dtype=torch.float64),
    Case("fp16_state_for_bf16", "lion", lambda a, b: _state(a, 0, _flat(b, torch.float16)),
         r"^fusedclr: state0 must be Float or BFloat16 for BFloat16 parameters, got Half$",
         dtype=torch.bfloat16),
    # The precision opt-ins [note: precision opt-ins].
    Case("master_for_fp32", "adam", lambda a, b: a.update(master_param=_flat(b)),
         r"^fusedclr: master_param is for BFloat16 or Half parameters, got Float parameters; pass master_param=None$",
         ref=r"master_param is for BFloat16 or Half parameters"),
    Case("master_float64", "adam", lambda a, b: a.update(master_param=a["master_param"].double()),
         r"^fusedclr: master_param must be Float, got Double$", dtype=torch.bfloat16, master=True,
         ref="master_param must be a float32 buffer"),
    Case("master_short", "sgd", lambda a, b: a.update(master_param=a["master_param"][:-1]),
         r"^fusedclr: master_param has \d+ elements, the bucket's other flat buffers \d+$", dtype=torch.float16,
         master=True, ref="master_param must be a float32 buffer"),
    Case("sr_for_fp16", "adam", lambda a, b: a.update(sr_seed=3),
         r"^fusedclr: sr_seed \(stochastic rounding\) is for BFloat16 parameters, got Half parameters; pass "
         r"sr_seed=None$", dtype=torch.float16, ref=r"sr_seed \(stochastic rounding\) is for BFloat16 parameters"),
    Case("master_and_sr", "lion", lambda a, b: a.update(sr_seed=3),
         r"^fusedclr: pass master_param or sr_seed, not both", dtype=torch.bfloat16, master=True,
         ref="pass master_param or sr_seed, not both"),
    # The bucket's tables and per-step tensors.
    Case("param_dtype_int", "adam", lambda a, b: a.update(param_dtype=torch.int32),
         r"^fusedclr: param_dtype is Int; the kernels update Float, Double, Half and BFloat16 parameters"),
    Case("segments_int32", "sgd", lambda a, b: a.update(segments=a["segments"].int()),
         r"^fusedclr: segments must be a contiguous int64 \[n, 4\] table"),
    Case("segments_3_columns", "sgd", lambda a, b: a.update(segments=a["segments"][:, :3].contiguous()),
         r"^fusedclr: segments must be a contiguous int64 \[n, 4\] table"),
    Case("chunks_int32", "rmsprop", lambda a, b: a.update(chunks=a["chunks"].int()),
         r"^fusedclr: chunks must be a contiguous int64 \[n, 3\] table"),
    Case("seg_steps_short", "nadam", lambda a, b: a.update(seg_steps=a["seg_steps"][:1]),
         r"^fusedclr: seg_steps must be a contiguous int64 1-D tensor with one step per segment \(4\)"),
    Case("hyper_float32", "lion", lambda a, b: a.update(hyper=a["hyper"].float()),
         r"^fusedclr: hyper must be a contiguous float64 \[2\] tensor"),
    Case("schedule_short", "adagrad", lambda a, b: a.update(schedule=a["schedule"][:3]),
         r"^fusedclr: schedule must be a contiguous float64 descriptor of at least 4 words"),
    Case("schedule_step_float", "radam", lambda a, b: a.update(schedule_step=a["schedule_step"].double()),
         r"^fusedclr: schedule_step must be an int64 scalar tensor"),
    Case("found_inf_int", "lookahead",
         lambda a, b: a.update(found_inf=torch.zeros(1, dtype=torch.int64, device=b.device)),
         r"^fusedclr: found_inf must be a float32 or float64 tensor with one element"),
    Case("grad_scale_two", "adam", lambda a, b: a.update(grad_scale=torch.ones(2, device=b.device)),
         r"^fusedclr: grad_scale must be a float32 or float64 tensor with one element"),
]


def _call(case: Case, device) -> tuple:
    """A bucket on ``device`` and the case's bad call of step_ on it."""
    opt = TABLE[case.optimizer]
    cfg = opt.config(case.option_set or opt.full)
    b = bucket(opt, cfg, SIZES, dtype=case.dtype, device=device, master=case.master, chunk=64)
    a = dict(zip(ARGS, opt.args(b, cfg, b.table())))
    case.bad(a, b)
    return b, a


def _refuses(step_fn, b, a: dict, match: str, segments=None) -> str:
    before = b.snapshot()
    args = dict(a, segments=segments) if segments is not None else a
    with pytest.raises(RuntimeError, match=match) as err:
        step_fn(*args.values())
    after = b.buffers()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a refused call"
    return str(err.value)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.known_bug)] if c.known_bug else [])
    for c in CASES])
def test_every_backend_refuses_alike(request, case):
    messages = {}
    for backend in available_op_backends(request):
        b, a = _call(case, backend.device)
        messages[backend.name] = _refuses(backend.step_, b, a, case.match)
    assert len(set(messages.values())) == 1, messages
    if case.ref is not None:
        b, a = _call(case, "cpu")
        _refuses(reference.step_, b, a, case.ref, segments=b.segments())


@pytest.mark.parametrize("op", ["grad_sumsq", "grad_zero_"])
@pytest.mark.parametrize(("edit", "match"), [pytest.param(e, m, id=i) for i, e, m in GRAD_OP_BAD_CALLS])
def test_every_backend_refuses_gradient_op_calls_alike(request, op, edit, match):
    """grad_sumsq and grad_zero_ share check_segments: every backend refuses the same bad
    table, chunk table or dtype with the same message, and grad_zero_ zeroes nothing first."""
    messages = {}
    for backend in available_op_backends(request):
        b = bucket(TABLE["sgd"], TABLE["sgd"].config("plain"), SIZES, device=backend.device, chunk=64)
        b.set_grads(gradients(b, 1)[0])
        before = [g.clone() for g in b.grads]
        a = {"segments": b.table(), "param_dtype": b.dtype, "chunks": b.chunks}
        edit(a)
        with pytest.raises(RuntimeError, match=match) as err:
            getattr(backend, op)(a["segments"], a["param_dtype"], a["chunks"])
        assert all(torch.equal(g, h) for g, h in zip(b.grads, before)), f"{backend.name} changed a gradient"
        messages[backend.name] = str(err.value)
    assert len(set(messages.values())) == 1, messages
