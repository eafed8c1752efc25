"""fusedclr::step_ (and grad_zero_) against the reference, for every optimizer of the table, on every op backend.

Each row builds one bucket (tests/op_table.py: ragged separate tensors, views at
odd offsets, a transposed one, an empty one, segments without a gradient on
some steps), steps it with a backend's op (the compiled CPU op, the CUDA
kernels under host emulation, the CUDA op on a GPU: conftest.OP_BACKENDS) and a
copy of it with ``fusedclr.reference.step_`` on the same Segments, and compares
the parameters, every state, the masters, the step counts and the per-segment
scalars. The rows:

* every option set of every optimizer that selects a kernel variant (fp32);
* per optimizer (its fullest option set): maximize, GradScaler's scale and
  found_inf (a power of two, and a scale that is not one), schedules that drive
  lr and momentum / beta1 (one takes the momentum to 0 and back);
* parameter and state dtypes: fp64, fp16, bf16 with fp32 states, bf16 with
  bf16 states;
* the precision opt-ins: fp32 master weights (bf16, fp16) and stochastic
  rounding, whose bits are checked exactly;
* chunk splitting and alignment (long and short chunks, buffers off any
  alignment: the CUDA kernels' vector and scalar paths), many small segments.

Last, ``grad_zero_`` zeroes the active gradients of a bucket and nothing else, in every
parameter dtype, at and off 16-byte alignment, as the reference does.

Tolerances: conftest.TOL for fp32 and fp64, two units in the last place for fp16
and bf16 buckets against the reference in the same dtype (conftest.tol_lowp).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TOL, TOL_LOWP, tol_lowp
from op_table import (NAMES, RAGGED, TABLE, VARIANTS, Bucket, bucket, check_grad_zero, gradients, inner_step,
                      padding, run, segment_ids)

from fusedclr import reference
from fusedclr.reference import Kind, descriptor, stage

STEPS = 8  # RAdam's rectification starts at step 6


def _active(step: int) -> list[bool] | None:
    """Every third step, a third of the segments (a different third each time) have no gradient."""
    return [(i + step) % 3 != 0 for i in range(len(RAGGED))] if step % 3 == 2 else None


def _default_plan(step: int) -> dict:
    return {"active": _active(step)}


def _unchanged_where_inactive(step, kw, before, b: Bucket) -> None:
    """Bit for bit: a skipped step (found_inf) changes nothing; a segment without a gradient
    keeps its parameter, states, master, step count and scalar; padding is never written."""
    after = b.buffers()
    assert set(after) == set(before)
    found_inf = kw.get("found_inf")
    if found_inf is not None and float(found_inf.reshape(())) != 0:
        for key, value in before.items():
            assert torch.equal(after[key], value), f"{key} changed on skipped step {step}"
        return
    pad = padding(b).to(b.device)
    for key, value in before.items():
        if key not in ("seg_steps", "seg_scalars"):
            assert torch.equal(after[key][pad], value[pad]), f"{key}: padding written at step {step}"
    if kw["active"] is None:
        return
    for i, (on, o, p) in enumerate(zip(kw["active"], b.offsets, b.params)):
        if on:
            continue
        for key, value in before.items():
            part = slice(i, i + 1) if key in ("seg_steps", "seg_scalars") else slice(o, o + p.numel())
            assert torch.equal(after[key][part], value[part]), f"{key} of inactive segment {i} at step {step}"


def _tolerances(b: Bucket) -> tuple[torch.dtype | None, torch.dtype | None]:
    """The low-precision dtypes whose rounding the (parameters, states) of this bucket carry;
    None: the dtype's own TOL."""
    dtype = b.dtype
    if dtype not in TOL_LOWP:
        return None, None
    states = [s for s in b.states.values() if s is not None]
    if b.master is not None:
        return dtype, None
    if states and states[0].dtype == torch.bfloat16:
        return dtype, torch.bfloat16
    return dtype, dtype


def assert_matches_reference(ours: Bucket, ref: Bucket) -> None:
    """Every buffer of the op's bucket against the reference's: step counts exactly, per-segment
    scalars at float64 tolerance, masters at float32's, parameters and states at their dtype's
    (conftest.TOL, or conftest.tol_lowp for the buffers of a bf16 or fp16 bucket)."""
    o, r = ours.clone("cpu").buffers(), ref.buffers()
    assert set(o) == set(r)
    for p, q in zip(ours.params, ref.params):
        assert p.stride() == q.stride()
    lowp = dict(zip(("param", "state"), _tolerances(ours)))
    for key, value in o.items():
        want = r[key]
        assert value.dtype == want.dtype, key
        if key == "seg_steps":
            assert torch.equal(value, want), (value, want)
            continue
        kind = {"master": "master", "seg_scalars": "seg_scalars", "param": "param"}.get(key, "state")
        if kind == "master":
            tol = TOL[torch.float32]
        elif kind == "seg_scalars":
            tol = TOL[torch.float64]
        elif lowp[kind] is not None:
            tol = tol_lowp(lowp[kind], want)
        else:
            tol = TOL[value.dtype]
        torch.testing.assert_close(value, want, **tol, msg=lambda m, key=key: f"{key}: {m}")


# The default intra-op thread count; the tests run on one thread (below) except where the
# CPU op's parallel walk is the point (test_chunking_and_alignment).
THREADS = torch.get_num_threads()


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    """The buckets are small (~40k elements, one task of the CPU op's parallel walk) and the
    reference and the checks are many small ops, which intra-op threads only slow down; on a
    busy machine, where the threads wait on each other, by an order of magnitude."""
    with _threads(1):
        yield


def run_reference(name, cfg, ref: Bucket, grads, *, plan=_default_plan, **kw) -> None:
    run(reference.step_, TABLE[name], cfg, ref, grads, fused=False, plan=lambda step: _on(plan(step), "cpu"), **kw)


def _parity(backend, name, cfg, b: Bucket, grads, *, plan=_default_plan, before=None, op_threads=1, **kw) -> Bucket:
    """Runs the backend on ``b`` (on ``op_threads`` intra-op threads) and the reference on a CPU
    copy; checks every step's skipped parts and the end result. Returns the reference's bucket."""
    ref = b.clone("cpu")
    step_fn = backend.step_
    if op_threads != 1:
        def step_fn(*args):
            with _threads(op_threads):
                backend.step_(*args)
    run(step_fn, TABLE[name], cfg, b, grads, fused=True, plan=plan, before=before, each=_unchanged_where_inactive,
        **kw)
    run_reference(name, cfg, ref, grads, plan=plan, before=before, **kw)
    assert_matches_reference(b, ref)
    return ref


def _on(kw: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


# -- every kernel variant ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "option_set"), VARIANTS, ids=[f"{n}-{s}" for n, s in VARIANTS])
def test_variant_matches_reference(op_backend, name, option_set):
    opt = TABLE[name]
    cfg = opt.config(option_set)
    b = bucket(opt, cfg, device=op_backend.device)
    _parity(op_backend, name, cfg, b, gradients(b, STEPS))
    if opt.advances:
        assert b.seg_steps.tolist() == [STEPS - sum(1 for s in range(STEPS) if _active(s) and not _active(s)[i])
                                        for i in range(len(RAGGED))]


# -- maximize, GradScaler, schedules ------------------------------------------------------

SCHEDULES = {
    # lr and momentum / beta1 from a three-phase OneCycleLR.
    "onecycle": descriptor([stage(Kind.ONE_CYCLE, [0.004, 0.1, 4e-6, 0.85, 0.95, 3, 3.0, 6.0, 10.0, 0],
                                  has_momentum=True)]),
    # CyclicLR whose momentum reaches 0 at steps 2 and 6: SGD's and RMSprop's buffer-free variant
    # mid-run (their buffer sits still), beta1 = 0 for the Adam family and Lion.
    "cyclic_momentum0": descriptor([stage(Kind.CYCLIC, [0.001, 0.01, 4.0, 0.5, 0, 1.0, 0.0, 0.9],
                                          has_momentum=True)]),
}
FEATURES = ["maximize", "amp", "grad_scale_non_pow2", *SCHEDULES]
SKIPPED = {0, 3, 4}  # found_inf steps of the "amp" rows, the first one included


def _amp_plan(scale: float, device):
    def plan(step):
        dtype = torch.float64 if step % 3 == 2 else torch.float32  # GradScaler's float32, or a float64 scale
        return {
            "active": _active(step + 1),
            "grad_scale": torch.tensor([scale], dtype=dtype, device=device),
            "found_inf": torch.tensor([1.0 if step in SKIPPED else 0.0], dtype=dtype, device=device),
        }
    return plan


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("name", NAMES)
def test_feature_matches_reference(op_backend, name, feature):
    opt = TABLE[name]
    cfg = opt.config(opt.full)
    b = bucket(opt, cfg, device=op_backend.device, schedule=SCHEDULES.get(feature))
    kw = {}
    if feature == "maximize":
        kw["maximize"] = True
        grads = gradients(b, STEPS)
    elif feature in ("amp", "grad_scale_non_pow2"):
        scale = 1024.0 if feature == "amp" else 3.7
        kw["plan"] = _amp_plan(scale, op_backend.device)
        grads = gradients(b, STEPS, scale=scale)
    else:
        grads = gradients(b, STEPS)
    _parity(op_backend, name, cfg, b, grads, **kw)
    if feature == "amp" and opt.advances:
        want = [sum(1 for s in range(STEPS) if s not in SKIPPED and (_active(s + 1) or [True] * len(RAGGED))[i])
                for i in range(len(RAGGED))]
        assert b.seg_steps.tolist() == want


# -- dtypes ----------------------------------------------------------------------------------

DTYPES = {  # parameter dtype, state dtype (None: the math type)
    "float64": (torch.float64, None),
    "float16": (torch.float16, None),
    "bfloat16": (torch.bfloat16, None),
    "bfloat16_bf16_states": (torch.bfloat16, torch.bfloat16),
}


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("name", NAMES)
def test_dtype_matches_reference(op_backend, name, dtypes):
    opt = TABLE[name]
    cfg = opt.config(opt.full)
    dtype, state_dtype = DTYPES[dtypes]
    b = bucket(opt, cfg, dtype=dtype, device=op_backend.device, state_dtype=state_dtype)
    _parity(op_backend, name, cfg, b, gradients(b, STEPS))
    assert all(p.dtype == dtype for p in b.params)
    want = state_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(s.dtype == want for s in b.states.values() if s is not None)


# -- precision opt-ins [note: precision opt-ins] ------------------------------------------------


def _rewrite_segment_1(step: int, b: Bucket) -> None:
    """Before step 4, segment 1's parameter is written from outside the optimizer (as
    model.load_state_dict does): its master restarts from the new value."""
    if step == 4:
        b.params[1].fill_(0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_master_weights_match_reference(op_backend, name, dtype):
    """fp32 masters follow the reference at fp32 tolerance (skipped steps and inactive segments
    included), and each parameter is its master rounded to nearest."""
    opt = TABLE[name]
    cfg = opt.config(opt.full)
    b = bucket(opt, cfg, dtype=dtype, device=op_backend.device, master=True, schedule=SCHEDULES["onecycle"])
    plan = _amp_plan(1.0, op_backend.device)
    _parity(op_backend, name, cfg, b, gradients(b, STEPS), plan=plan, before=_rewrite_segment_1)
    assert torch.equal(b.flat_params(), b.master.to(dtype))


SR_ROWS = [("sgd", 1234), ("sgd", -5), ("adam", 2**40 + 7), *[(n, 2**40 + 7) for n in NAMES if n not in ("sgd", "adam")]]


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing above |x| (float32 result): 2**(e - 8) for x = m * 2**e, 0.5 <= |m| < 1."""
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


@pytest.mark.parametrize(("name", "seed"), SR_ROWS, ids=[f"{n}-{s}" for n, s in SR_ROWS])
def test_stochastic_rounding_matches_reference(op_backend, name, seed):
    """Each step's bf16 parameters are, bit for bit, reference.round_stochastic of the op's own
    float32 results (the same step on a float32 copy of the bucket) with the reference's
    rounding key (seed, step count) and element index; states, step counts and scalars equal
    that copy's exactly. Against the reference run over all steps, a parameter may then be one
    bf16 ulp off only where the two float32 results straddled a rounding threshold (an fp32
    ulp apart: a few elements in 10^4), where other bits would differ on about half."""
    opt = TABLE[name]
    cfg = opt.config(opt.full)
    b = bucket(opt, cfg, dtype=torch.bfloat16, device=op_backend.device, schedule=SCHEDULES["onecycle"])
    ref = b.clone("cpu")
    grads = gradients(b, STEPS)
    ids = segment_ids(b)
    index = torch.arange(b.total)
    plan = _amp_plan(1.0, op_backend.device)

    for step, g in enumerate(grads):
        b.set_grads(g)
        kw = plan(step)
        active = kw.pop("active")
        if name == "lookahead":
            inner_step(b, active, kw["found_inf"], step)
        # The float32 twin of this step: the same inputs, exactly, rounded to nearest.
        f32 = b.clone(dtype=torch.float32)
        before = b.flat_params().cpu()
        op_backend.step_(*opt.args(f32, cfg, f32.table(active), **kw))
        op_backend.step_(*opt.args(b, cfg, b.table(active), sr_seed=seed, **kw))
        key = reference.rounding_key(seed, b.seg_steps.cpu()[ids])
        want = reference.round_stochastic(f32.flat_params().cpu(), key, index)
        got = b.flat_params().cpu()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (
            f"step {step}: {int((got.view(torch.int16) != want.view(torch.int16)).sum())} of {b.total} "
            f"parameters are not the reference's rounding")
        for k, v in f32.buffers().items():
            if k != "param":
                assert torch.equal(b.buffers()[k], v), f"{k} at step {step}"
        if float(kw["found_inf"].reshape(())) != 0:
            assert torch.equal(got, before)
        b.schedule_step.add_(1)

    run_reference(name, cfg, ref, grads, plan=plan, sr_seed=seed)
    ours, want = b.flat_params().cpu().float(), ref.flat_params().float()
    diff = (ours - want).abs()
    one_ulp = torch.maximum(torch.maximum(_bf16_ulp(ours), _bf16_ulp(want)), torch.tensor(2.0**-7))
    assert (diff <= one_ulp).all()
    assert (diff > 0).float().mean().item() < 1e-3
    assert_matches_reference(b, ref)


# -- chunking and alignment ---------------------------------------------------------------------

CHUNKING = {  # parameter dtype, offset of every tensor and buffer in its storage, chunk size
    "float32-aligned-long": (torch.float32, 0, 65536),
    "float32-misaligned-short": (torch.float32, 1, 4096),
    "bfloat16-aligned-short": (torch.bfloat16, 0, 4096),
    "bfloat16-misaligned-long": (torch.bfloat16, 1, 65536),
}


@pytest.mark.parametrize("layout", list(CHUNKING))
@pytest.mark.parametrize("name", NAMES)
def test_chunking_and_alignment(op_backend, name, layout):
    """Long chunks (a 100003-element segment spans two of 65536; the CUDA launch splits each
    into work items) and short ones; buffers at their storage's start (128-bit paths where the
    segment start allows) and one element off (scalar paths everywhere). The CPU op walks the
    chunks on every intra-op thread (several tasks, each with its own cache of scalars)."""
    opt = TABLE[name]
    cfg = opt.config(opt.full)
    dtype, offset, chunk = CHUNKING[layout]
    b = bucket(opt, cfg, [100_003, *RAGGED[1:]], dtype=dtype, device=op_backend.device, chunk=chunk, offset=offset)
    _parity(op_backend, name, cfg, b, gradients(b, 4), plan=lambda step: {}, op_threads=max(THREADS, 2))


@pytest.mark.parametrize("name", ["sgd", "nadam"])
def test_many_small_segments(op_backend, name):
    """3000 segments: far more chunks than work items of the grid; NAdam's per-segment scalars."""
    opt = TABLE[name]
    cfg = opt.config(opt.full)
    b = bucket(opt, cfg, [64, 1, 17, 200] * 750, device=op_backend.device)
    _parity(op_backend, name, cfg, b, gradients(b, 3), plan=lambda step: {})


# -- grad_zero_ --------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_grad_zero_matches_reference(op_backend, dtype, offset):
    """fusedclr::grad_zero_ (csrc/ops.cpp [note: zeroing through the table]): the active segments'
    gradients zero, the others and everything around them in their storages untouched, bit for bit
    as the reference leaves them (op_table.check_grad_zero). Gradients at their storage's start
    (128-bit stores on CUDA where the segment start allows) and one element off (scalar stores),
    chunks of 1000 elements (the CUDA launch splits the longer segments into work items) walked
    by two intra-op threads on the CPU."""
    with _threads(2):
        check_grad_zero(op_backend.grad_zero_, op_backend.device, dtype, offset=offset)
