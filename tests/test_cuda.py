"""The CUDA kernels (csrc/cuda) against the reference oracle.

Every GPU test is marked ``gpu`` and skips without a CUDA device; the one
registration test runs everywhere (CI builds the CUDA kernels without a GPU).
Buckets are built the way the contract says (csrc/ops.cpp, [note: step
contract]): separate parameter and gradient tensors (ragged, some views at odd
offsets of a bigger tensor, one transposed) behind a segment table
[note: segment table], flat state buffers with each segment at an
``ALIGN``-aligned offset, and a chunk table of (segment, begin, end) rows no
longer than the chunk size covering each segment's elements.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import TOL

from fusedclr import ops, reference
from fusedclr.optim._flat import ALIGN
from fusedclr.reference import Kind, descriptor, stage

# Indirections so the same checks can drive another implementation of the ops.
OPS = torch.ops.fusedclr
DEVICE = "cuda"

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 7
BLOCK = 4096
# Ragged: not multiples of the chunk, the alignment or any vector width; a
# 1-element segment, a chunk-sized one and one long enough to be split.
RAGGED = [3 * BLOCK + 17, 1, 64, 1000, 5, BLOCK, 70001]
LOW_PRECISION = [torch.bfloat16, torch.float16]
# Low-precision buffers against the reference in the same dtype: the two may
# round the final store differently (fused multiply-adds, evaluation order),
# so allow two units in the last place of the parameter dtype. The fp32 states
# of such a bucket are held to the same bound: they inherit the parameters'
# rounding (weight decay reads the stored parameter).
TOL_LOWP = {dt: {"rtol": 2 * torch.finfo(dt).eps, "atol": 1e-5} for dt in LOW_PRECISION}

SCHEDULES = {
    "none": reference.no_schedule(),
    "onecycle": descriptor(
        [stage(Kind.ONE_CYCLE, [0.004, 0.1, 4e-6, 0.85, 0.95, 3, 3.0, 6.0, 10.0, 0], has_momentum=True)]
    ),
    "cyclic_triangular2": descriptor(
        [stage(Kind.CYCLIC, [0.001, 0.01, 4.0, 0.5, 1, 1.0, 0.8, 0.9], has_momentum=True)]
    ),
    "warmup_then_cosine": descriptor(
        [stage(Kind.LINEAR, [0.05, 0.1, 1.0, 3]), stage(Kind.COSINE, [0.05, 0.0, 6], t_begin=3)]
    ),
    "cosine_restarts": descriptor([stage(Kind.COSINE_RESTARTS, [0.05, 0.001, 2, 2, 0.5, 1, 0.0])]),
    "multistep": descriptor([stage(Kind.MULTISTEP, [0.05, 0.1, 0, 3])], tail=[2.0, 5.0, 5.0]),
    "polynomial": descriptor([stage(Kind.POLYNOMIAL, [0.05, 7, 1.5])]),
    "product": descriptor(
        [stage(Kind.LINEAR, [0.05, 0.2, 1.0, 4]), stage(Kind.MULTISTEP, [1.0, 0.5, 0, 2], t_begin=-1)],
        tail=[3.0, 6.0], product=True,
    ),
}


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _layout(sizes):
    """Each segment's offset into the flat state buffers (multiples of ALIGN) and their length."""
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off += -(-n // ALIGN) * ALIGN
    return offsets, off


def _placed(sizes, dtype, device, offset):
    """Separate tensors of ``sizes`` elements, laid out as a model's parameters may be:
    most stand alone, every third is a view at an odd element offset of one shared
    tensor (segment starts off any alignment), and a 1000-element one is a transposed
    2-D tensor (dense, not contiguous). ``offset`` > 0 puts each standalone tensor
    that many elements into its storage."""
    shared_n = sum(n + 2 for i, n in enumerate(sizes) if i % 3 == 1) + 2
    shared = torch.zeros(shared_n, dtype=dtype, device=device)
    out, pos = [], 1
    for i, n in enumerate(sizes):
        if i % 3 == 1:
            out.append(shared[pos : pos + n])
            pos += n + (2 if (pos + n) % 2 else 1)  # the next view starts at an odd offset too
        elif n == 1000:
            out.append(torch.zeros(offset + n, dtype=dtype, device=device)[offset:].view(40, 25).t())
        else:
            out.append(torch.zeros(offset + n, dtype=dtype, device=device)[offset:])
    return out


def _assign(tensors, offsets, flat):
    """Writes the state-layout values ``flat`` into the tensors' memory images."""
    for t, o in zip(tensors, offsets):
        n = t.numel()
        reference.memory_image(t).copy_(flat[o : o + n])


def _bucket(sizes, dtype, *, chunk=BLOCK, states=(), state_dtype=None, device=None, offset=0, seed=0):
    """A bucket as fusedclr.optim._flat builds it: separate parameter and gradient
    tensors (see _placed), the segment table of their addresses, flat state buffers
    with each segment at an ALIGN-aligned offset and a chunk table covering each
    segment's elements (not the padding). ``offset`` > 0 also shifts every state
    buffer by that many elements inside its storage (misaligned pointers)."""
    device = device or DEVICE
    offsets, total = _layout(sizes)
    rows = [(seg, b, min(b + chunk, o + n)) for seg, (o, n) in enumerate(zip(offsets, sizes))
            for b in range(o, o + n, chunk)]
    mask = torch.zeros(total, dtype=torch.bool)
    for o, n in zip(offsets, sizes):
        mask[o : o + n] = True
    gen = torch.Generator().manual_seed(seed)

    def buf(values, dt):
        storage = torch.zeros(total + offset, dtype=dt, device=device)
        out = storage[offset:]
        out.copy_(values)
        return out

    sdt = state_dtype or _state_dtype(dtype)
    params = _placed(sizes, dtype, device, offset)
    _assign(params, offsets, torch.randn(total, generator=gen, dtype=torch.float64))
    b = {
        "params": params,
        "grads": _placed(sizes, dtype, device, offset),
        "offsets": offsets,
        "total": total,
        "active": None,
        "seg_steps": torch.zeros(len(sizes), dtype=torch.int64, device=device),
        "chunks": torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(device),
        "hyper": torch.tensor([0.01, 0.9], dtype=torch.float64, device=device),
        "schedule": torch.tensor(SCHEDULES["none"], dtype=torch.float64, device=device),
        "schedule_step": torch.zeros((), dtype=torch.int64, device=device),
        "mask": mask.to(device),
    }
    for name in STATES:
        b[name] = buf(torch.zeros(total), sdt) if name in states else None
    _refresh(b)
    return b


def _refresh(b, active=None):
    """The bucket's Segments (for the reference) and segment table (for the ops, on the
    states' device); ``active[i]`` False gives segment i a None grad this step."""
    b["active"] = None if active is None else [bool(a) for a in active]
    flags = b["active"] or [True] * len(b["grads"])
    grads = [g if a else None for g, a in zip(b["grads"], flags)]
    b["segments"] = reference.Segments(b["params"], grads, b["offsets"], b["total"])
    b["table"] = b["segments"].table(b["seg_steps"].device)


def _param_dtype(b):
    return b["params"][0].dtype


def _value(b, key):
    """A buffer of the bucket; "param": the parameters gathered into the state layout
    (zero padding), which the states and the master copy share."""
    if key != "param":
        return b[key]
    flat = torch.zeros(b["total"], dtype=_param_dtype(b), device=b["seg_steps"].device)
    for p, o in zip(b["params"], b["offsets"]):
        flat[o : o + p.numel()] = reference.memory_image(p)
    return flat


def _set_grads(b, g):
    """Writes one step's gradients (state layout) into the gradient tensors in place."""
    _assign(b["grads"], b["offsets"], g)


def _grads(b, steps=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = b["mask"].cpu()
    return [torch.where(mask, torch.randn(b["total"], generator=gen, dtype=torch.float64), 0) for _ in range(steps)]


def _copy(t, dtype, device):
    """A copy with the same strides (a gradient keeps its parameter's)."""
    return t.detach().to(device=device, dtype=dtype or t.dtype).clone()


def _to(b, dtype=None, device=None):
    """A copy of the bucket (params/grads in ``dtype``, states in its math type), with its
    own parameter and gradient tensors and their segment table."""
    out = {}
    for k, v in b.items():
        if k in ("params", "grads"):
            out[k] = [_copy(t, dtype, device) for t in v]
        elif k in ("segments", "table"):
            continue
        elif not isinstance(v, torch.Tensor):
            out[k] = v
        elif dtype is not None and k in STATES:
            out[k] = v.to(device=device, dtype=_state_dtype(dtype)).clone()
        else:
            out[k] = v.to(device=device).clone()
    _refresh(out, b["active"])
    return out


def _snapshot(b):
    """Clones of everything a step may change: parameters, states, master, step counts."""
    keys = [*_buffers(b), "seg_steps"] + (["master_param"] if b.get("master_param") is not None else [])
    return {k: _value(b, k).clone() for k in keys}


def _seg(b, fused):
    return b["table"] if fused else b["segments"]


def _adam_args(b, o, fused=True, grad_scale=None, found_inf=None, param_dtype=None):
    return (_seg(b, fused), param_dtype or _param_dtype(b), b["exp_avg"], b["exp_avg_sq"], b["max_exp_avg_sq"],
            b["seg_steps"], b["chunks"], b["hyper"], b["schedule"], b["schedule_step"], o.get("beta2", 0.999),
            o.get("eps", 1e-8), o.get("weight_decay", 0.0), o.get("decoupled", False), o.get("maximize", False),
            grad_scale, found_inf)


def _sgd_args(b, o, fused=True, grad_scale=None, found_inf=None, param_dtype=None):
    return (_seg(b, fused), param_dtype or _param_dtype(b), b["momentum_buffer"], b["seg_steps"], b["chunks"],
            b["hyper"], b["schedule"], b["schedule_step"], o.get("dampening", 0.0), o.get("weight_decay", 0.0),
            o.get("nesterov", False), o.get("maximize", False), grad_scale, found_inf)


KINDS = {
    "adam": (lambda: OPS.adam_step_, reference.adam_step_, _adam_args),
    "sgd": (lambda: OPS.sgd_step_, reference.sgd_step_, _sgd_args),
}


def _run(kind, b, o, grads, *, fused: bool, extra=lambda step: {}):
    """Steps the bucket through ``grads`` with the op (fused) or the reference; ``extra(step)``
    may name the step's active segments ("active": the others get None grads)."""
    op, ref, make_args = KINDS[kind]
    fn = op() if fused else ref
    for step, g in enumerate(grads):
        _set_grads(b, g)
        kw = dict(extra(step))
        _refresh(b, kw.pop("active", None))
        fn(*make_args(b, o, fused, **kw))
        b["schedule_step"].add_(1)


def _buffers(b):
    return [k for k in ("param", *STATES) if k == "param" or b[k] is not None]


def _check(kind, b, o, grads, dtype, extra=lambda step: {}):
    """Runs the op on ``b`` and the reference on copies; compares every buffer
    and the step counters. fp32/fp64: against a float64 reference at the dtype's
    tolerance. bf16/fp16: against the reference in the same dtype, and no worse
    than twice that reference's error against float64."""
    ref64 = _to(b, torch.float64)
    same = _to(b) if dtype in LOW_PRECISION else None
    _run(kind, b, o, grads, fused=True, extra=extra)
    _run(kind, ref64, o, grads, fused=False, extra=extra)
    assert torch.equal(b["seg_steps"], ref64["seg_steps"])
    if dtype in LOW_PRECISION:
        _run(kind, same, o, grads, fused=False, extra=extra)
        assert torch.equal(b["seg_steps"], same["seg_steps"])
        for key in _buffers(b):
            torch.testing.assert_close(_value(b, key), _value(same, key), **TOL_LOWP[dtype],
                                       msg=lambda m: f"{key}: {m}")
        _assert_within_twice(b, same, ref64)
    else:
        for key in _buffers(b):
            ours = _value(b, key)
            want = _value(ref64, key).to(ours.dtype)
            torch.testing.assert_close(ours, want, **TOL[ours.dtype], msg=lambda m: f"{key}: {m}")


def _assert_within_twice(ours, same, ref64):
    """Every buffer of ``ours`` is no further from the float64 run than twice the
    reference's own distance in the same dtype (docs/DESIGN.md section 5)."""
    for key in _buffers(ours):
        err_ours = (_value(ours, key).double() - _value(ref64, key)).abs().max().item()
        err_ref = (_value(same, key).double() - _value(ref64, key)).abs().max().item()
        assert err_ours <= 2 * err_ref + 1e-12, (key, err_ours, err_ref)


SGD_MOMENTUM = {  # name: (hyper momentum, options, buffer)
    "plain": (0.0, {}, False),
    "buffer_momentum0": (0.0, {}, True),  # a buffer, but momentum 0 this step: torch leaves it alone
    "momentum": (0.9, {}, True),
    "dampening": (0.9, {"dampening": 0.3}, True),
    "nesterov": (0.9, {"nesterov": True}, True),
}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("mode", list(SGD_MOMENTUM))
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_sgd_matches_reference(dtype, mode, weight_decay, maximize):
    momentum, options, buffer = SGD_MOMENTUM[mode]
    b = _bucket(RAGGED, dtype, states=("momentum_buffer",) if buffer else ())
    b["hyper"][1] = momentum
    _check("sgd", b, dict(options, weight_decay=weight_decay, maximize=maximize), _grads(b), dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_adam_matches_reference(dtype, amsgrad, decoupled, maximize, weight_decay):
    states = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
    b = _bucket(RAGGED, dtype, states=states)
    o = {"weight_decay": weight_decay, "decoupled": decoupled, "maximize": maximize}
    _check("adam", b, o, _grads(b), dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_float64(kind):
    states = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    b = _bucket(RAGGED, torch.float64, states=states)
    _check(kind, b, {"weight_decay": 0.01, "nesterov": kind == "sgd"}, _grads(b), torch.float64)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_schedules(kind, schedule):
    """lr and momentum/beta1 come from the descriptor at the device counter,
    the rest from hyper; 12 steps cross every stage boundary above."""
    states = ("exp_avg", "exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    b = _bucket(RAGGED, torch.float32, states=states)
    b["schedule"] = torch.tensor(SCHEDULES[schedule], dtype=torch.float64, device=DEVICE)
    _check(kind, b, {"weight_decay": 0.01, "decoupled": True}, _grads(b, steps=12), torch.float32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_active_grad_scale_found_inf(kind):
    """Inactive segments and skipped steps change nothing, bit for bit; scaled
    grads with grad_scale match; the first step may be the skipped one (no
    first-step initialisation leaks out)."""
    states = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    dtype = torch.float32
    b = _bucket(RAGGED, dtype, states=states)
    b["schedule"] = torch.tensor(SCHEDULES["onecycle"], dtype=torch.float64, device=DEVICE)
    n_seg = len(RAGGED)
    skipped = {0, 3, 4}
    scale = 1024.0

    def extra(step):
        active = [(i + step) % 3 != 0 for i in range(n_seg)] if step % 2 else None
        dtype = torch.float64 if step % 3 == 2 else torch.float32  # both accepted
        return {
            "active": active,
            "grad_scale": torch.tensor([scale], dtype=dtype, device=DEVICE),
            "found_inf": torch.tensor([1.0 if step in skipped else 0.0], dtype=dtype, device=DEVICE),
        }

    grads = [g * scale for g in _grads(b, steps=9)]
    # Bitwise no-op on every skipped step, including the first.
    op, _, make_args = KINDS[kind]
    probe = _to(b)
    for step, g in enumerate(grads):
        _set_grads(probe, g)
        kw = extra(step)
        _refresh(probe, kw.pop("active"))
        before = _snapshot(probe)
        op()(*make_args(probe, {"weight_decay": 0.01}, **kw))
        after = _snapshot(probe)
        for key, value in before.items():
            if step in skipped:
                assert torch.equal(after[key], value), f"{key} changed on skipped step {step}"
            elif key != "seg_steps":  # inactive segments change nothing either
                for i, (o, p) in enumerate(zip(probe["offsets"], probe["params"])):
                    n = p.numel()
                    if not (probe["active"] or [True] * n_seg)[i]:
                        assert torch.equal(after[key][o : o + n], value[o : o + n]), (key, step, i)
        probe["schedule_step"].add_(1)
    assert probe["seg_steps"].tolist() == [
        sum(1 for s in range(9) if s not in skipped and (s % 2 == 0 or (i + s) % 3 != 0)) for i in range(n_seg)
    ]
    _check(kind, b, {"weight_decay": 0.01}, grads, dtype, extra=extra)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
def test_grad_sumsq_matches_reference(dtype):
    """The active gradients' sum of squares (float64) over the segment table: the op, the
    reference, and torch.linalg.vector_norm of the gradients themselves, squared;
    segments without a gradient do not count."""
    b = _bucket(RAGGED, dtype, chunk=1000)
    _set_grads(b, _grads(b, steps=1)[0])
    for active in (None, [i % 3 != 1 for i in range(len(RAGGED))]):
        _refresh(b, active)
        grads = [g for g in b["segments"].grads if g is not None]
        want = sum(torch.linalg.vector_norm(g.double()).item() ** 2 for g in grads)
        got = OPS.grad_sumsq(b["table"], dtype, b["chunks"])
        assert got.dtype == torch.float64 and got.dim() == 0 and got.device == b["table"].device
        ref = reference.grad_sumsq(b["segments"], dtype, b["chunks"])
        torch.testing.assert_close(got.item(), ref.item(), **TOL[torch.float64])
        torch.testing.assert_close(got.item(), want, **TOL[torch.float64])
    _refresh(b, [False] * len(RAGGED))
    assert OPS.grad_sumsq(b["table"], dtype, b["chunks"]).item() == 0.0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [BLOCK, 65536])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunking_and_alignment(dtype, offset, chunk):
    """Large and small chunks (the kernel splits long ones), 128-bit paths and,
    with buffers one element off alignment, the scalar path."""
    b = _bucket([300_000, *RAGGED], dtype, chunk=chunk, states=("exp_avg", "exp_avg_sq"), offset=offset)
    _check("adam", b, {"weight_decay": 0.01, "decoupled": True}, _grads(b), dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_many_small_segments(kind):
    sizes = [64, 1, 17, 200] * 750
    states = ("exp_avg", "exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    b = _bucket(sizes, torch.float32, states=states)
    _check(kind, b, {"weight_decay": 0.01}, _grads(b), torch.float32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_bf16_states(kind):
    """bf16 parameters may keep bf16 states (docs/DESIGN.md's 14 B/param row). The
    kernel rounds each state once per step where the reference (like torch's
    in-place bf16 ops) rounds intermediates too, so only the twice-the-error
    rule against float64 applies."""
    states = ("exp_avg", "exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    b = _bucket(RAGGED, torch.bfloat16, states=states, state_dtype=torch.bfloat16)
    same, ref64 = _to(b), _to(b, torch.float64)
    grads = _grads(b)
    o = {"weight_decay": 0.01}
    _run(kind, b, o, grads, fused=True)
    _run(kind, same, o, grads, fused=False)
    _run(kind, ref64, o, grads, fused=False)
    assert all(_value(b, key).dtype == torch.bfloat16 for key in _buffers(b))
    _assert_within_twice(b, same, ref64)


# -- precision opt-ins [note: precision opt-ins] -------------------------------


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing above |x| (float32 result): 2**(e - 8) for x = m * 2**e, 0.5 <= |m| < 1."""
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


def _run_precision(kind, dtype, *, master=False, sr_seed=None, rewrite_at=None, steps=STEPS):
    """The op and the reference in ``dtype`` on one bucket, with master weights or
    stochastic rounding; ``rewrite_at`` overwrites segment 1's parameters before
    that step, as a model.load_state_dict would."""
    states = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    b = _bucket(RAGGED, dtype, states=states)
    b["schedule"] = torch.tensor(SCHEDULES["onecycle"], dtype=torch.float64, device=DEVICE)
    b["master_param"] = _value(b, "param").float() if master else None
    same = _to(b)
    grads = _grads(b, steps=steps)
    op, ref, make_args = KINDS[kind]
    o = {"weight_decay": 0.01, "decoupled": True, "nesterov": True}
    seg1 = (-(-RAGGED[0] // ALIGN) * ALIGN, -(-RAGGED[0] // ALIGN) * ALIGN + RAGGED[1])
    for fn, bucket, fused in ((op(), b, True), (ref, same, False)):
        for step, g in enumerate(grads):
            if step == rewrite_at:
                bucket["params"][1].fill_(0.5)
            _set_grads(bucket, g)
            fn(*make_args(bucket, o, fused), bucket["master_param"], sr_seed)
            bucket["schedule_step"].add_(1)
    return b, same, seg1


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_master_weights_match_reference(kind, dtype):
    """fp32 masters follow the reference at fp32 tolerance, each parameter is its
    master rounded to nearest, and a parameter rewritten outside the optimizer
    restarts its master (the rewritten segment steps on from 0.5)."""
    b, same, seg1 = _run_precision(kind, dtype, master=True, rewrite_at=3)
    assert torch.equal(b["seg_steps"], same["seg_steps"])
    torch.testing.assert_close(b["master_param"], same["master_param"], **TOL[torch.float32])
    assert torch.equal(_value(b, "param"), b["master_param"].to(dtype))
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
        if b[key] is not None:
            torch.testing.assert_close(b[key], same[key], **TOL[torch.float32], msg=lambda m: f"{key}: {m}")
    # Without the restart the rewritten segment would end where an untouched run ends.
    untouched, _, _ = _run_precision(kind, dtype, master=True)
    end = slice(*seg1)
    assert (b["master_param"][end] - untouched["master_param"][end]).abs().min().item() > 1e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", [1234, 2**40 + 7, -5])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_stochastic_rounding_matches_reference(kind, seed):
    """The hashed rounding bits are the reference's: a parameter may differ by one
    bf16 ulp only where the two fp32 values straddle a rounding threshold (an fp32
    ulp apart), which a few elements in 10^3 at most do; a round-to-nearest
    kernel, or other bits, would differ on about half of them. An element that took
    the other side once keeps that one-ulp offset (at the magnitude it had then, ~1
    for these N(0, 1) parameters) even where it later moves towards zero."""
    b, same, _ = _run_precision(kind, torch.bfloat16, sr_seed=seed)
    ours, want = _value(b, "param").float(), _value(same, "param").float()
    diff = (ours - want).abs()
    one_ulp = torch.maximum(torch.maximum(_bf16_ulp(ours), _bf16_ulp(want)), torch.tensor(2.0**-7))
    assert (diff <= one_ulp).all()
    assert (diff > 0).float().mean().item() < 2e-3
    rne, _, _ = _run_precision(kind, torch.bfloat16)
    assert (_value(rne, "param") != _value(b, "param")).float().mean().item() > 0.2  # it did round differently


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_skipped_step_leaves_masters_and_rounding_alone(kind):
    """found_inf set: no parameter, state, master or step count moves, with master
    weights or with stochastic rounding; the next, unskipped step does move them."""
    states = ("exp_avg", "exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    op, _, make_args = KINDS[kind]
    for master, seed in ((True, None), (False, 11)):
        b = _bucket(RAGGED, torch.bfloat16, states=states)
        # A master finer than its parameter (its padding too: nothing may write there).
        b["master_param"] = _value(b, "param").float() + 1e-3 if master else None
        _set_grads(b, _grads(b, steps=1)[0])
        for found_inf, moves in ((1.0, False), (0.0, True)):
            before = _snapshot(b)
            skip = torch.tensor([found_inf], device=DEVICE)
            op()(*make_args(b, {"weight_decay": 0.01}, found_inf=skip), b["master_param"], seed)
            after = _snapshot(b)
            for key, value in before.items():
                if key in ("param", "master_param", "seg_steps"):
                    assert torch.equal(after[key], value) != moves, (key, master, seed, found_inf)


@gpu
@pytest.mark.gpu
def test_stochastic_rounding_is_unbiased():
    """An SGD update of 0.3 ulp below 1.0 rounds down on 30% of the elements (65536
    draws: the binomial spread is 0.0018), where rounding to nearest never moves."""
    n = 65536
    b = _bucket([n], torch.bfloat16)
    b["params"][0].fill_(1.0)
    b["grads"][0].fill_(1.0)
    ulp = 2.0**-8  # bf16 spacing just below 1.0
    b["hyper"][0] = 0.3 * ulp
    OPS.sgd_step_(*_sgd_args(b, {}), None, 99)
    moved = (b["params"][0].float() != 1.0).float().mean().item()
    assert abs(moved - 0.3) < 0.01
    assert set(b["params"][0].float().unique().tolist()) == {1.0 - ulp, 1.0}


@gpu
@pytest.mark.gpu
def test_precision_arguments_are_checked():
    b = _bucket([100, 7], torch.float32, states=("exp_avg", "exp_avg_sq"))
    low = _bucket([100, 7], torch.bfloat16, states=("exp_avg", "exp_avg_sq"))
    half = _bucket([100, 7], torch.float16, states=("exp_avg", "exp_avg_sq"))
    cases = [
        (b, _value(b, "param").clone(), None, None, "master_param is for BFloat16 or Half"),
        (low, _value(low, "param").clone(), None, None, "master_param must be Float"),
        (low, _value(low, "param").float()[:-1], None, None, "master_param has"),
        (half, None, 3, None, "sr_seed .stochastic rounding. is for BFloat16"),
        (low, _value(low, "param").float(), 3, None, "not both"),
        # A parameter dtype no kernel updates: refused before the step counters move.
        (b, None, None, torch.int32, "param_dtype is"),
    ]
    for bucket, master, seed, param_dtype, match in cases:
        before = _value(bucket, "param").clone()
        with pytest.raises(RuntimeError, match=match):
            OPS.adam_step_(*_adam_args(bucket, {}, param_dtype=param_dtype), master, seed)
        assert torch.equal(_value(bucket, "param"), before) and int(bucket["seg_steps"].sum()) == 0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_eval_matches_reference(schedule):
    d = torch.tensor(SCHEDULES[schedule], dtype=torch.float64, device=DEVICE)
    for t in [*range(20), 1000, 123_456_789]:
        out = OPS.schedule_eval(d, torch.tensor(t, device=DEVICE)).tolist()
        lr, mom = reference.schedule_value(SCHEDULES[schedule], t)
        assert (bool(out[2]), bool(out[3])) == (lr is not None, mom is not None)
        # CUDA's pow/cos may differ from the host's by an ulp or two; near a
        # cosine's zero that is large relative to the value, hence the abs term.
        if lr is not None:
            assert out[0] == pytest.approx(lr, rel=1e-12, abs=1e-15)
        if mom is not None:
            assert out[1] == pytest.approx(mom, rel=1e-12, abs=1e-15)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_cuda_graph_replay_matches_eager(kind):
    """The step, schedule counter included, captured once and replayed equals
    the eager run bit for bit: no host reads, no syncs, nothing baked in."""
    states = ("exp_avg", "exp_avg_sq") if kind == "adam" else ("momentum_buffer",)
    o = {"weight_decay": 0.01, "decoupled": True}
    b = _bucket(RAGGED, torch.float32, states=states)
    b["schedule"] = torch.tensor(SCHEDULES["onecycle"], dtype=torch.float64, device=DEVICE)
    eager = _to(b)
    grads = [g.to(DEVICE, torch.float32) for g in _grads(b, steps=STEPS + 1)]
    op, _, make_args = KINDS[kind]
    found_inf = torch.zeros(1, device=DEVICE)
    grad_scale = torch.ones(1, device=DEVICE)

    def step(bucket):
        op()(*make_args(bucket, o, grad_scale=grad_scale, found_inf=found_inf))
        bucket["schedule_step"].add_(1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graph asks
        _set_grads(b, grads[0])
        step(b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(b)
    for g in grads[1:]:
        _set_grads(b, g)
        graph.replay()
    for g in grads:
        _set_grads(eager, g)
        step(eager)
    for key in [*_buffers(b), "seg_steps", "schedule_step"]:
        torch.testing.assert_close(_value(b, key), _value(eager, key), rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


TRAIN_STEPS = 100
WARMUP_STEPS = 3


def _training(cls, backend, device):
    """A small model, a fusedclr optimizer with an in-kernel OneCycleLR (cyclical momentum
    / beta1) and the batches of TRAIN_STEPS + WARMUP_STEPS steps."""
    import fusedclr

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    kw = {"momentum": 0.9, "nesterov": True} if cls == "SGD" else {"weight_decay": 0.01}
    opt = getattr(fusedclr, cls)(model.parameters(), lr=0.01, backend=backend, **kw)
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=TRAIN_STEPS + WARMUP_STEPS + 1)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 32, generator=gen).to(device), torch.randn(16, 8, generator=gen).to(device))
            for _ in range(TRAIN_STEPS + WARMUP_STEPS)]
    return model, opt, sched, data


def _train_step(model, opt, sched, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    sched.step()
    return loss


def _applied(opt):
    """[lr, momentum] that the next step's kernels read (the schedule at the device counter)."""
    b = opt._buckets[0][0]
    return ops.schedule_eval(b.schedule, b.schedule_step)[:2].clone()


def _eager_training(cls, backend, device):
    model, opt, sched, data = _training(cls, backend, device)
    applied = []
    for x, y in data:
        applied.append(_applied(opt))
        _train_step(model, opt, sched, x, y)
    return model, torch.stack(applied)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_cuda_graph_of_a_whole_training_step_matches_eager(cls):
    """Forward, backward, opt.step() and scheduler.step() captured once in a CUDA graph
    and replayed TRAIN_STEPS times: the parameters and the lr / momentum the kernels
    read at every step equal the eager run's. Only the device counter advances on
    replay (the host-side scheduler does not run), and that is all the kernels need."""
    eager, eager_applied = _eager_training(cls, "cuda", DEVICE)
    model, opt, sched, data = _training(cls, "cuda", DEVICE)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    applied = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graph asks
        for x, y in data[:WARMUP_STEPS]:
            applied.append(_applied(opt))
            static_x.copy_(x)
            static_y.copy_(y)
            _train_step(model, opt, sched, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_step(model, opt, sched, static_x, static_y)
    for x, y in data[WARMUP_STEPS:]:
        applied.append(_applied(opt))
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    applied = torch.stack(applied)
    assert applied[:, 0].max() > 2 * applied[:, 0].min()  # the schedule moved
    torch.testing.assert_close(applied, eager_applied, rtol=0, atol=0)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compiled_training_step_never_recompiles_on_gpu(backend):
    """torch.compile (Inductor) of a whole training step on the GPU, with the schedule
    moving lr and beta1 in-kernel every step: no recompilation after the first step
    over TRAIN_STEPS steps, and the eager parameters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    torch._dynamo.reset()
    eager, _ = _eager_training("AdamW", backend, DEVICE)
    model, opt, sched, data = _training("AdamW", backend, DEVICE)

    def step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(step)
    for i, (x, y) in enumerate(data):
        compiled(x, y)
        sched.step()
        if i == 0:
            after_first = (counters["frames"]["total"], counters["stats"]["unique_graphs"])
            assert after_first[1] > 0, "nothing was compiled"
    assert (counters["frames"]["total"], counters["stats"]["unique_graphs"]) == after_first, dict(counters["frames"])
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n_params", [10, 3000])
def test_two_launches_per_step_and_no_sync(n_params):
    """One update launch plus the step-counter launch, whatever the number of
    parameters ([note: step counters on CUDA]); no host synchronization."""
    b = _bucket([100] * n_params, torch.float32, states=("exp_avg", "exp_avg_sq"))
    b["schedule"] = torch.tensor(SCHEDULES["onecycle"], dtype=torch.float64, device=DEVICE)
    args = _adam_args(b, {"weight_decay": 0.01}, grad_scale=torch.ones(1, device=DEVICE),
                      found_inf=torch.zeros(1, device=DEVICE))
    OPS.adam_step_(*args)  # warm-up: module load, occupancy query
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OPS.adam_step_(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.adam_step_(*args)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = sorted({e.name for e in kernels})
    assert len(kernels) == 2, names
    assert any("advance_steps_kernel" in n for n in names) and any("adam_kernel" in n for n in names), names


@gpu
@pytest.mark.gpu
def test_bad_arguments_are_named():
    b = _bucket([100, 7], torch.float32, states=("exp_avg", "exp_avg_sq"))
    o = {}
    cases = [
        ("exp_avg", torch.zeros(b["total"], dtype=torch.float16, device=DEVICE), "exp_avg must be"),
        ("exp_avg_sq", torch.zeros(b["total"], device="cpu"), "exp_avg_sq must be on"),
        ("exp_avg_sq", torch.zeros(b["total"] - 1, device=DEVICE), "exp_avg_sq has"),
        ("chunks", b["chunks"].int(), "chunks must be"),
        ("table", b["table"].int(), "segments must be"),
        ("table", b["table"][:, :3].contiguous(), "segments must be"),
        ("seg_steps", b["seg_steps"][:1], "seg_steps must be"),
        ("hyper", b["hyper"].float(), "hyper must be"),
        ("schedule_step", b["schedule_step"].double(), "schedule_step must be"),
    ]
    for key, value, match in cases:
        bad = dict(b, **{key: value})
        with pytest.raises(RuntimeError, match=match):
            OPS.adam_step_(*_adam_args(bad, o))
    with pytest.raises(RuntimeError, match="found_inf"):
        OPS.adam_step_(*_adam_args(b, o, found_inf=torch.zeros(1, dtype=torch.int64, device=DEVICE)))
    with pytest.raises(RuntimeError, match="grad_scale"):
        OPS.adam_step_(*_adam_args(b, o, grad_scale=torch.ones(2, device=DEVICE)))


@gpu
@pytest.mark.gpu
def test_opcheck_cuda():
    b = _bucket([40, 9], torch.float32, states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"))
    for g in _grads(b, steps=1):
        _set_grads(b, g)
    amp = {"grad_scale": torch.tensor([2.0], device=DEVICE), "found_inf": torch.zeros(1, device=DEVICE)}
    inactive = _to(b)
    _refresh(inactive, [True, False])  # segment 1 has no gradient
    torch.library.opcheck(OPS.adam_step_.default, _adam_args(inactive, {"decoupled": True}, **amp))
    torch.library.opcheck(OPS.sgd_step_.default, _sgd_args(_to(b), {"nesterov": True}, **amp))
    torch.library.opcheck(OPS.grad_sumsq.default, (b["table"], torch.float32, b["chunks"]))
    torch.library.opcheck(OPS.schedule_eval.default, (b["schedule"], b["schedule_step"]))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_optimizer_on_cuda_matches_torch(cls):
    """End to end: the optimizer class with backend='cuda' against torch.optim."""
    import fusedclr

    torch.manual_seed(0)
    shapes = [(3 * BLOCK + 17,), (33, 17), (1,), (256, 300)]
    ref_params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    options = {"lr": 0.01, "weight_decay": 0.01, **({"momentum": 0.9, "nesterov": True} if cls == "SGD" else {})}
    ref = getattr(torch.optim, cls)(ref_params, **options)
    ours = getattr(fusedclr, cls)(ours_params, backend="cuda", **options)
    for _ in range(STEPS):
        for p_ref, p_ours in zip(ref_params, ours_params):
            g = torch.randn_like(p_ref)
            p_ref.grad = g.clone()
            if p_ours.grad is None:
                p_ours.grad = g.clone()
            else:
                p_ours.grad.copy_(g)
        ref.step()
        ours.step()
    for p_ref, p_ours in zip(ref_params, ours_params):
        torch.testing.assert_close(p_ours.detach(), p_ref.detach(), **TOL[torch.float32])


def _library_path() -> str | None:
    spec = importlib.util.find_spec("fusedclr._C")
    return spec.origin if spec is not None else None


def _built_with_cuda(path: str) -> bool:
    """CUDAExtension links libtorch_cuda; the CPU-only build does not."""
    with open(path, "rb") as f:
        return b"libtorch_cuda.so" in f.read()


def test_cuda_kernels_registered_when_built_with_cuda():
    """Runs without a GPU: a CUDA build registers every op for the CUDA key."""
    path = _library_path()
    if path is None or not ops.extension_available():
        pytest.skip("fusedclr._C was not built")
    if not _built_with_cuda(path):
        pytest.skip("fusedclr._C was built without CUDA (no nvcc or FUSEDCLR_CUDA=0)")
    for op in ("sgd_step_", "adam_step_", "schedule_eval", "grad_sumsq"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedclr::{op}", "CPU"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedclr::{op}", "CUDA"), op
    assert ops.cuda_kernels_registered()
