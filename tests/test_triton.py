"""The Triton backend against the reference: every option, every schedule family, AMP, dtypes;
its schedule evaluator also against torch's values (tests/golden_schedules.json).

Triton picks its interpreter when ``@triton.jit`` runs, so TRITON_INTERPRET must
be set before triton or fusedclr is imported; this module sets it (unless the
environment already says otherwise) and is meant to run in a pytest process of
its own::

    TRITON_INTERPRET=1 pytest tests/test_triton.py     # CPU, through the interpreter (CI)
    TRITON_INTERPRET=0 pytest tests/test_triton.py     # compiled kernels on a CUDA GPU

If another module built fusedclr's Triton kernels first without the
interpreter, the kernel tests skip and say so.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import test_golden_schedules as golden  # noqa: E402
import torch  # noqa: E402
from conftest import TOL  # noqa: E402

import fusedclr.triton as ft  # noqa: E402
from fusedclr import reference as ref  # noqa: E402
from fusedclr.reference import Kind, descriptor, stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _kernel_device() -> tuple[str | None, str]:
    if not ft.available():
        return None, f"Triton backend unavailable: {ft.why_unavailable()}"
    if ft._load().INTERPRETED:
        return "cpu", ""
    if torch.cuda.is_available():
        return "cuda", ""
    return None, (
        "Triton's interpreter is not active (fusedclr.triton built its kernels before TRITON_INTERPRET=1 "
        "was set, e.g. by another test module): run `TRITON_INTERPRET=1 pytest tests/test_triton.py` "
        "on its own; and there is no CUDA GPU for the compiled kernels"
    )


DEVICE, WHY_SKIP = _kernel_device()
needs_kernels = pytest.mark.skipif(DEVICE is None, reason=WHY_SKIP)
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="exercises Triton's interpreter on CPU tensors")

# Tile size of the kernels here: the single interpreter config, or the smallest GPU one.
BLOCK = 256 if DEVICE != "cuda" else 1024
STEPS = 7

# Low-precision parameters: a flipped bf16/fp16 rounding of the fp32 result is one ulp of
# that dtype, which assert_close's defaults for the dtype accept (rtol 1.6e-2 / 1e-3).
LOW_TOL = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5}, torch.float16: {"rtol": 1e-3, "atol": 1e-5}}


def _tol(dtype: torch.dtype) -> dict:
    return TOL.get(dtype) or LOW_TOL[dtype]


# --------------------------------------------------------------------------
# Buckets: flat buffers, chunk tables and steps driven through both backends
# --------------------------------------------------------------------------

# Segment sizes: ragged around BLOCK, a tiny one, and an empty parameter.
SIZES = [3 * BLOCK + 17, 40, 5, 0, 2 * BLOCK + 1]
ALIGN = 16


def chunk_table(sizes: list[int], chunk: int, align: int = ALIGN) -> tuple[torch.Tensor, list[int], int]:
    """(segment, begin, end) rows as fusedclr.optim's buckets build them, covering each
    segment's elements (not the padding): the chunk table, the segments' state offsets
    (multiples of ``align``) and the states' length. A chunk size that is not a multiple
    of ALIGN leaves chunk boundaries unaligned, which the kernels' edge tiles cover."""
    rows, offsets, off = [], [], 0
    for seg, n in enumerate(sizes):
        offsets.append(off)
        rows += [(seg, b, min(b + chunk, off + n)) for b in range(off, off + n, chunk)]
        off += -(-n // align) * align
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3), offsets, off


LAYOUTS = {
    # The largest segment spans two chunks (two programs share its step count); chunk boundaries
    # are unaligned, and the parameters are views at odd offsets of one tensor (unaligned starts).
    "ragged": lambda: (*chunk_table(SIZES, 2 * BLOCK + 50), True),
    # A bucket's own layout: chunks of 2 * BLOCK, each parameter a tensor of its own.
    "bucket": lambda: (*chunk_table(SIZES, 2 * BLOCK), False),
}


def _tensors(sizes: list[int], dtype: torch.dtype, device, shared: bool) -> list[torch.Tensor]:
    """Separate tensors of ``sizes`` elements: views at odd element offsets of one tensor
    (``shared``), or tensors of their own."""
    if not shared:
        return [torch.zeros(n, dtype=dtype, device=device) for n in sizes]
    base = torch.zeros(sum(sizes) + 2 * len(sizes) + 1, dtype=dtype, device=device)
    out, pos = [], 1
    for n in sizes:
        out.append(base[pos : pos + n])
        pos += n + (2 if (pos + n) % 2 else 1)  # the next one starts at an odd offset too
    return out


def _assign(tensors: list[torch.Tensor], offsets: list[int], flat: torch.Tensor) -> None:
    """Writes state-layout values into the tensors' memory images."""
    for t, o in zip(tensors, offsets):
        ref.memory_image(t).copy_(flat[o : o + t.numel()])


class Bucket:
    """One bucket's tensors, built identically for every backend from a seed: the parameters
    and their gradient tensors (one step's values copied in before each step) behind a segment
    table, flat states, chunk table. ``active[i]`` False: segment i's grad is None."""

    def __init__(self, op: str, *, dtype=torch.float32, layout="ragged", momentum=0.0, amsgrad=False,
                 schedule=None, hyper=None, active=None, seed=0, device=None):
        device = device or DEVICE
        self.op = op
        self.device = device
        self.param_dtype = dtype
        self.chunks, self.offsets, n, shared = LAYOUTS[layout]()
        self.total = n
        self.chunks = self.chunks.to(device)
        gen = torch.Generator().manual_seed(seed)
        mask = torch.zeros(n, dtype=torch.bool)
        for o, k in zip(self.offsets, SIZES):
            mask[o : o + k] = True

        def values():
            return torch.where(mask, torch.randn(n, generator=gen, dtype=torch.float64), 0).to(dtype).to(device)

        self.params = _tensors(SIZES, dtype, device, shared)
        _assign(self.params, self.offsets, values())
        self.grads = [values() for _ in range(STEPS)]  # each step's gradients, in the state layout
        self.grad_tensors = _tensors(SIZES, dtype, device, shared)
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        zeros = lambda: torch.zeros(n, dtype=state_dtype, device=device)  # noqa: E731
        n_seg = len(SIZES)
        self.seg_steps = torch.zeros(n_seg, dtype=torch.int64, device=device)
        if op == "sgd":
            self.states = {"momentum_buffer": zeros()} if momentum else {"momentum_buffer": None}
        else:
            self.states = {"exp_avg": zeros(), "exp_avg_sq": zeros(), "max_exp_avg_sq": zeros() if amsgrad else None}
        lr = 0.05 if op == "sgd" else 1e-2
        self.hyper = torch.tensor(hyper or [lr, momentum if op == "sgd" else 0.9], dtype=torch.float64, device=device)
        self.schedule = torch.tensor(schedule or ref.no_schedule(), dtype=torch.float64, device=device)
        self.schedule_step = torch.zeros((), dtype=torch.int64, device=device)
        self.active = active
        grads = [g if active is None or active[i] else None for i, g in enumerate(self.grad_tensors)]
        self.segments = ref.Segments(self.params, grads, self.offsets, n)
        self.table = self.segments.table(device)

    @property
    def param(self) -> torch.Tensor:
        """The parameters gathered into the state layout (zero padding)."""
        flat = torch.zeros(self.total, dtype=self.params[0].dtype, device=self.device)
        for p, o in zip(self.params, self.offsets):
            flat[o : o + p.numel()] = ref.memory_image(p)
        return flat

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"param": self.param, "seg_steps": self.seg_steps}
        out.update({k: v for k, v in self.states.items() if v is not None})
        return out

    def step(self, impl, k: int, opts: dict, *, grad_scale=None, found_inf=None) -> None:
        self.apply(impl, self.grads[k % STEPS], opts, grad_scale=grad_scale, found_inf=found_inf)

    def apply(self, impl, grad: torch.Tensor, opts: dict, *, grad_scale=None, found_inf=None) -> None:
        """One step with the gradients ``grad`` (state layout); the reference gets the Segments,
        every other implementation the segment table."""
        _assign(self.grad_tensors, self.offsets, grad)
        seg = self.segments if impl is ref else self.table
        common = (self.seg_steps, self.chunks, self.hyper, self.schedule, self.schedule_step)
        if self.op == "sgd":
            impl.sgd_step_(seg, self.param_dtype, self.states["momentum_buffer"], *common,
                           opts.get("dampening", 0.0), opts.get("weight_decay", 0.0), opts.get("nesterov", False),
                           opts.get("maximize", False), grad_scale, found_inf)
        else:
            impl.adam_step_(seg, self.param_dtype, self.states["exp_avg"], self.states["exp_avg_sq"],
                            self.states["max_exp_avg_sq"], *common, opts.get("beta2", 0.999), opts.get("eps", 1e-8),
                            opts.get("weight_decay", 0.0), opts.get("decoupled", False), opts.get("maximize", False),
                            grad_scale, found_inf)
        self.schedule_step.add_(1)  # what scheduler.step() does between optimizer steps


def _amp(bucket: Bucket, k: int, grad_scale: float | None, found_inf_at) -> dict:
    dev = bucket.device
    gs = None if grad_scale is None else torch.tensor([grad_scale], device=dev)
    fi = None if found_inf_at is None else torch.tensor([1.0 if k in found_inf_at else 0.0], device=dev)
    return {"grad_scale": gs, "found_inf": fi}


def run_both(op: str, opts: dict, *, steps=STEPS, grad_scale=None, found_inf_at=None, **bucket_kw):
    """Drives the same bucket through the reference and the Triton backend."""
    expected, actual = Bucket(op, **bucket_kw), Bucket(op, **bucket_kw)
    if grad_scale is not None:
        for b in (expected, actual):
            b.grads = [g * grad_scale for g in b.grads]
    for k in range(steps):
        expected.step(ref, k, opts, **_amp(expected, k, grad_scale, found_inf_at))
        actual.step(ft, k, opts, **_amp(actual, k, grad_scale, found_inf_at))
    return expected, actual


def assert_buckets_close(expected: Bucket, actual: Bucket) -> None:
    tol = _tol(expected.param.dtype)
    exp, act = expected.tensors(), actual.tensors()
    assert exp.keys() == act.keys()
    torch.testing.assert_close(act.pop("seg_steps"), exp.pop("seg_steps"), rtol=0, atol=0)
    for name in exp:
        torch.testing.assert_close(act[name], exp[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------
# Schedules: one descriptor per family, sized so a few steps cross its phases
# --------------------------------------------------------------------------

SCHEDULES = {
    "none": ref.no_schedule(),
    "constant": descriptor([stage(Kind.CONSTANT, [0.03])]),
    "step": descriptor([stage(Kind.STEP, [0.05, 0.5, 3])]),
    "multistep": descriptor([stage(Kind.MULTISTEP, [0.05, 0.3, 0, 3])], tail=[2, 5, 5]),
    "exponential": descriptor([stage(Kind.EXPONENTIAL, [0.05, 0.8])]),
    "linear": descriptor([stage(Kind.LINEAR, [0.05, 0.25, 1.0, 4])]),
    "constant_factor": descriptor([stage(Kind.CONSTANT_FACTOR, [0.05, 0.3, 4])]),
    "cosine": descriptor([stage(Kind.COSINE, [0.05, 0.001, 6])]),
    "polynomial": descriptor([stage(Kind.POLYNOMIAL, [0.05, 5, 1.7])]),
    "polynomial_power0": descriptor([stage(Kind.POLYNOMIAL, [0.05, 3, 0.0])]),
    "warm_restarts": descriptor([stage(Kind.COSINE_RESTARTS, [0.05, 0.001, 3, 1, 1.0, 0, 0.0])]),
    "warm_restarts_mult_decay_warmup": descriptor([stage(Kind.COSINE_RESTARTS, [0.05, 0.001, 2, 2, 0.5, 2, 0.01])]),
    "cyclic_triangular_momentum": descriptor(
        [stage(Kind.CYCLIC, [0.01, 0.1, 4, 0.5, 0, 1.0, 0.8, 0.9], has_momentum=True)]),
    "cyclic_triangular2": descriptor([stage(Kind.CYCLIC, [0.01, 0.1, 3, 1 / 3, 1, 1.0, 0.8, 0.9], has_momentum=True)]),
    "cyclic_exp_range": descriptor([stage(Kind.CYCLIC, [0.01, 0.1, 4, 0.5, 2, 0.9, 0.8, 0.9])]),
    "one_cycle_cos_3phase": descriptor(
        [stage(Kind.ONE_CYCLE, [0.004, 0.1, 4e-7, 0.85, 0.95, 3, 2, 5, 7, 0], has_momentum=True)]),
    "one_cycle_linear_2phase": descriptor(
        [stage(Kind.ONE_CYCLE, [0.004, 0.1, 4e-7, 0.85, 0.95, 2, 3, 7, 0, 1], has_momentum=True)]),
    # SequentialLR: linear warmup, then cosine.
    "sequential_2stage": descriptor(
        [stage(Kind.LINEAR, [0.05, 0.1, 1.0, 3]), stage(Kind.COSINE, [0.05, 0.0, 5], t_begin=3)]),
    # Schedulers composed by multiplication: a base, factors with a tail and a later start.
    "product": descriptor(
        [stage(Kind.EXPONENTIAL, [0.05, 0.9]),
         stage(Kind.MULTISTEP, [1.0, 0.5, 0, 2], t_begin=1),
         stage(Kind.POLYNOMIAL, [1.0, 9, 1.5], t_begin=2)],
        tail=[3, 5], product=True),
    # SequentialLR of three, the middle one with a milestone tail, the last with momentum.
    "sequential_3stage": descriptor(
        [stage(Kind.CONSTANT_FACTOR, [0.05, 0.5, 2]),
         stage(Kind.MULTISTEP, [0.05, 0.5, 0, 2], t_begin=2),
         stage(Kind.CYCLIC, [0.01, 0.05, 2, 0.5, 0, 1.0, 0.85, 0.95], t_begin=5, has_momentum=True)],
        tail=[1, 2]),
}


@needs_kernels
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_evaluator_matches_reference(name):
    """The in-kernel evaluator at every step 0..63 (one program per step)."""
    from fusedclr.triton._schedule import _schedule_eval_kernel

    d = SCHEDULES[name]
    steps = torch.arange(64, dtype=torch.int64)
    out = torch.zeros(64, 4, dtype=torch.float64, device=DEVICE)
    _schedule_eval_kernel[(64,)](torch.tensor(d, dtype=torch.float64, device=DEVICE), steps.to(DEVICE), out)
    out = out.cpu()
    for t in steps.tolist():
        lr, mom = ref.schedule_value(d, t)
        assert out[t, 2].item() == (lr is not None) and out[t, 3].item() == (mom is not None), t
        # Powers by binary powering: a few ulp of double from ``**``.
        if lr is not None:
            torch.testing.assert_close(out[t, 0].item(), lr, rtol=1e-13, atol=0, msg=f"lr at step {t}")
        if mom is not None:
            torch.testing.assert_close(out[t, 1].item(), mom, rtol=1e-13, atol=0, msg=f"momentum at step {t}")


@needs_kernels
def test_triangular2_scale_underflows_like_the_reference():
    """Far beyond 1024 cycles the 2^-(cycle-1) scale goes through the subnormals to 0."""
    from fusedclr.triton._schedule import _schedule_eval_kernel

    d = descriptor([stage(Kind.CYCLIC, [0.0, 1e300, 2, 0.5, 1, 1.0, 0.8, 0.9])])
    steps = torch.tensor([2 * 1023 + 1, 2 * 1050 + 1, 2 * 1100 + 1, 2**40 + 1], dtype=torch.int64)
    out = torch.zeros(len(steps), 4, dtype=torch.float64, device=DEVICE)
    _schedule_eval_kernel[(len(steps),)](torch.tensor(d, dtype=torch.float64, device=DEVICE), steps.to(DEVICE), out)
    assert out[:, 0].cpu().tolist() == [ref.schedule_value(d, t)[0] for t in steps.tolist()]


if DEVICE is not None:
    import triton
    import triton.language as tl

    from fusedclr.triton._common import store

    @triton.jit
    def _store_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        store(dst_ptr + idx, tl.load(src_ptr + idx, mask=idx < n), idx < n)


# --------------------------------------------------------------------------
# The evaluator against torch's values (tests/golden_schedules.json)
# --------------------------------------------------------------------------

if DEVICE is not None:
    from fusedclr.triton._schedule import _lr_and_momentum

    @triton.jit
    def _lr_and_momentum_kernel(hyper_ptr, schedule_ptr, steps_ptr, out_ptr):
        """Program i: the (lr, momentum) an update kernel uses at ``steps[i]``, the group's being ``hyper[i]``."""
        i = tl.program_id(0).to(tl.int64)
        lr, mom = _lr_and_momentum(hyper_ptr + 2 * i, schedule_ptr, steps_ptr + i)
        tl.store(out_ptr + 2 * i, lr)
        tl.store(out_ptr + 2 * i + 1, mom)


# Binary powering loses ~log2(t) bits at huge t (the error of the first squaring doubles
# with every one after it): gamma ** (2**32 + 5) is 7.7e-9 off torch's (C's pow).
_POWERING_AT_HUGE_STEPS = {"exponential_huge", "cyclic_exp_range_huge"}


@needs_kernels
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason="_ipow's error at huge steps"))
    if c["id"] in _POWERING_AT_HUGE_STEPS else c
    for c in golden.CASES
], ids=golden.IDS)
def test_schedule_evaluator_matches_golden_table(case):
    """``_lr_and_momentum``, as the update kernels call it, gives torch's lr and momentum at every
    step of every case of the golden table (see tests/test_golden_schedules.py)."""
    steps = torch.tensor(case["steps"], dtype=torch.int64, device=DEVICE)
    for gi, group in enumerate(case["groups"]):
        hyper = torch.tensor(list(zip(*golden.group_values(case, group))), dtype=torch.float64, device=DEVICE)
        out = torch.zeros(len(steps), 2, dtype=torch.float64, device=DEVICE)
        schedule = torch.tensor(group["descriptor"], dtype=torch.float64, device=DEVICE)
        _lr_and_momentum_kernel[(len(steps),)](hyper, schedule, steps, out)
        out = out.cpu()
        golden.check("Triton _lr_and_momentum", case, gi, "lr", out[:, 0].tolist())
        golden.check("Triton _lr_and_momentum", case, gi, "momentum", out[:, 1].tolist())


# --------------------------------------------------------------------------
# Parity: options, schedule families, dtypes, AMP
# --------------------------------------------------------------------------

SGD_OPTIONS = {
    "plain": ({}, {"momentum": 0.0}),
    "momentum": ({}, {"momentum": 0.9}),
    "dampening_weight_decay": ({"dampening": 0.3, "weight_decay": 1e-2}, {"momentum": 0.9}),
    "nesterov_weight_decay": ({"nesterov": True, "weight_decay": 1e-2}, {"momentum": 0.9}),
    "maximize_momentum": ({"maximize": True}, {"momentum": 0.5}),
    # A zero momentum with a buffer present (a schedule can get there): torch skips the buffer.
    "zero_momentum_with_buffer": ({}, {"momentum": 0.9, "hyper": [0.05, 0.0]}),
}
ADAM_OPTIONS = {
    "adam": ({}, {}),
    "adam_l2": ({"weight_decay": 1e-2}, {}),
    "adamw": ({"weight_decay": 1e-2, "decoupled": True}, {}),
    "adamw_amsgrad": ({"weight_decay": 1e-2, "decoupled": True}, {"amsgrad": True}),
    "adam_amsgrad_maximize": ({"maximize": True, "beta2": 0.99, "eps": 1e-6}, {"amsgrad": True}),
    # 1 - beta1 >= 0.5 takes the other side of torch's two-sided lerp.
    "adam_small_beta1": ({"weight_decay": 1e-3}, {"hyper": [1e-2, 0.3]}),
}


@needs_kernels
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(SGD_OPTIONS))
def test_sgd_options(name, layout):
    opts, bucket_kw = SGD_OPTIONS[name]
    assert_buckets_close(*run_both("sgd", opts, layout=layout, **bucket_kw))


@needs_kernels
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(ADAM_OPTIONS))
def test_adam_options(name, layout):
    opts, bucket_kw = ADAM_OPTIONS[name]
    assert_buckets_close(*run_both("adam", opts, layout=layout, **bucket_kw))


@needs_kernels
@pytest.mark.parametrize("op", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_families(op, name):
    """Every family drives lr (and, where it has one, momentum / beta1) in-kernel."""
    opts = {"nesterov": True} if op == "sgd" else {"weight_decay": 1e-2, "decoupled": True}
    bucket_kw = {"momentum": 0.9} if op == "sgd" else {}
    assert_buckets_close(*run_both(op, opts, schedule=SCHEDULES[name], **bucket_kw))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_dtypes(op, dtype):
    """bf16/fp16 parameters with fp32 math and states; fp64 parameters with fp64 math and states."""
    opts = {"weight_decay": 1e-2} if op == "sgd" else {"weight_decay": 1e-2, "decoupled": True}
    bucket_kw = {"momentum": 0.9} if op == "sgd" else {"amsgrad": True}
    expected, actual = run_both(op, opts, dtype=dtype, schedule=SCHEDULES["cyclic_triangular_momentum"], **bucket_kw)
    assert actual.param.dtype == dtype
    assert_buckets_close(expected, actual)


@needs_kernels
@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_grad_scale_and_inactive_segments(op):
    """GradScaler's scale divides the grads in-kernel; inactive segments neither move nor count a step."""
    opts = {"weight_decay": 1e-2} if op == "sgd" else {}
    bucket_kw = {"momentum": 0.9} if op == "sgd" else {"amsgrad": True}
    active = [True, False, True, True, False]
    before = Bucket(op, active=active, **bucket_kw)
    expected, actual = run_both(op, opts, grad_scale=1024.0, active=active, **bucket_kw)
    assert_buckets_close(expected, actual)
    assert actual.seg_steps.tolist() == [STEPS, 0, STEPS, STEPS, 0]
    for i, moves in enumerate(active):
        if SIZES[i]:
            assert torch.equal(actual.params[i], before.params[i]) != moves, i


@needs_kernels
@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_found_inf_changes_nothing(op):
    """A step with found_inf set leaves params, every state and seg_steps bitwise unchanged,
    also on the very first step (no first-step buffer initialisation)."""
    opts = {"nesterov": True, "weight_decay": 1e-2} if op == "sgd" else {"weight_decay": 1e-2, "decoupled": True}
    bucket_kw = {"momentum": 0.9} if op == "sgd" else {"amsgrad": True}
    bucket = Bucket(op, schedule=SCHEDULES["one_cycle_cos_3phase"], active=[True, True, False, True, True],
                    **bucket_kw)
    skipped = {0, 3}
    for k in range(6):
        before = {name: t.clone() for name, t in bucket.tensors().items()}
        bucket.step(ft, k, opts, **_amp(bucket, k, 8.0, skipped))
        for name, t in bucket.tensors().items():
            assert torch.equal(t, before[name]) == (k in skipped), (k, name)
    # ... and the steps around the skipped ones match the reference.
    assert_buckets_close(*run_both(op, opts, steps=6, grad_scale=8.0, found_inf_at=skipped,
                                   schedule=SCHEDULES["one_cycle_cos_3phase"],
                                   active=[True, True, False, True, True], **bucket_kw))


@needs_kernels
def test_several_buckets():
    """Param groups are separate buckets with their own options, hyper and schedules."""
    groups = [
        ("sgd", {"nesterov": True}, {"momentum": 0.9, "schedule": SCHEDULES["sequential_2stage"]}),
        ("sgd", {"weight_decay": 1e-3}, {"momentum": 0.0, "layout": "bucket", "seed": 1}),
        ("adam", {"weight_decay": 1e-2, "decoupled": True},
         {"schedule": SCHEDULES["one_cycle_cos_3phase"], "dtype": torch.bfloat16, "seed": 2}),
        ("adam", {}, {"amsgrad": True, "schedule": SCHEDULES["warm_restarts"], "seed": 3}),
    ]
    pairs = [(Bucket(op, **kw), Bucket(op, **kw), opts) for op, opts, kw in groups]
    for k in range(STEPS):
        for expected, actual, opts in pairs:
            expected.step(ref, k, opts)
            actual.step(ft, k, opts)
    for expected, actual, _ in pairs:
        assert_buckets_close(expected, actual)


@needs_kernels
def test_bf16_stores_round_to_nearest_even_like_torch():
    """Ties, carries into the exponent, overflow to inf, subnormals, NaN and signed zeros."""
    bits = [0x3F808000, 0x3F818000, 0x3F80C000, 0x3F7FFFFF, 0x7F7FFFFF, 0x00008000, 0x00018000, 0x7FC00001,
            0xFF800000, 0x80000000, 0x00000000, 0xBF80FFFF]
    special = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    src = torch.cat([special, torch.randn(500, dtype=torch.float32) * 1e3]).to(DEVICE)
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    _store_kernel[(1,)](src, dst, src.numel(), BLOCK=1024)
    expected = src.to(torch.bfloat16)
    assert torch.equal(dst.view(torch.int16)[~src.isnan()], expected.view(torch.int16)[~src.isnan()])
    assert dst[src.isnan()].isnan().all()


# --------------------------------------------------------------------------
# Launches, torch.compile, opcheck
# --------------------------------------------------------------------------


@interpreter_only
@pytest.mark.parametrize("n_params", [1, 300])
def test_two_launches_per_step_whatever_the_tensor_count(monkeypatch, n_params):
    """One update launch over the buffer plus one step-counter launch, for 1 or 300 tensors."""
    from fusedclr.triton import _ops

    launched = []

    def counting(kernel):
        launched.append(getattr(kernel, "fn", kernel).__name__)
        return kernel

    monkeypatch.setattr(_ops, "_direct", counting)
    chunks, offsets, n = chunk_table([7] * n_params, 64)
    params, grads = [torch.randn(7) for _ in range(n_params)], [torch.randn(7) for _ in range(n_params)]
    before = [p.clone() for p in params]
    table = ref.Segments(params, grads, offsets, n).table()
    m, v = torch.zeros(n), torch.zeros(n)
    seg_steps = torch.zeros(n_params, dtype=torch.int64)
    ft.adam_step_(table, torch.float32, m, v, None, seg_steps, chunks, torch.tensor([1e-3, 0.9], dtype=torch.float64),
                  torch.tensor(ref.no_schedule(), dtype=torch.float64), torch.zeros((), dtype=torch.int64),
                  0.999, 1e-8, 0.0, False, False, None, None)
    assert launched == ["_adam_kernel", "_advance_steps_kernel"]
    assert seg_steps.tolist() == [1] * n_params
    assert not any(torch.equal(p, q) for p, q in zip(params, before))  # every parameter moved


@needs_kernels
@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_bucket_entry_checks_buffers_once_and_again_when_one_is_replaced(monkeypatch, op):
    """fusedclr's optimizers call ``for_buckets(op)``: the same steps as the public op (against
    the reference; step counts exactly), its buffers checked on the first call and again
    only when one is replaced; grad_scale / found_inf are checked on every call
    [note: triton checks per bucket]."""
    from types import SimpleNamespace

    ops = ft._load()
    checked = []
    real = ops._check_common
    monkeypatch.setattr(ops, "_check_common", lambda *a: checked.append(1) or real(*a))
    impl = SimpleNamespace(**{f"{op}_step_": ft.for_buckets(f"{op}_step_")})
    opts = {"weight_decay": 0.01, "beta2": 0.99} if op == "adam" else {"weight_decay": 0.01}
    kw = {"momentum": 0.9} if op == "sgd" else {}
    ours, expected = Bucket(op, **kw), Bucket(op, **kw)
    grad = ours.grads[0]
    for _ in range(3):
        ours.apply(impl, grad, opts)
        expected.apply(ref, expected.grads[0], opts)
    assert len(checked) == 1  # checked once
    ours.hyper = ours.hyper.clone()  # a replaced buffer: checked again
    ours.apply(impl, grad, opts)
    expected.apply(ref, expected.grads[0], opts)
    assert len(checked) == 2
    for name, t in expected.tensors().items():
        tol = _tol(t.dtype) if t.is_floating_point() else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(ours.tensors()[name], t, **tol, msg=name)

    with pytest.raises(ValueError, match="grad_scale must have 1 element"):
        ours.apply(impl, grad, opts, grad_scale=torch.ones(2, device=DEVICE))
    assert len(checked) == 2  # the per-step arguments are checked without the buffers
    ours.schedule = torch.tensor(ref.no_schedule(), dtype=torch.float32, device=DEVICE)
    with pytest.raises(TypeError, match="schedule has dtype torch.float32"):
        ours.apply(impl, grad, opts)
    assert len(checked) == 3
    ours.schedule = expected.schedule.clone()
    ours.param_dtype = torch.int32  # another argument than the memo's: checked again
    with pytest.raises(TypeError, match="param_dtype is torch.int32"):
        ours.apply(impl, grad, opts)
    assert len(checked) == 4


@needs_kernels
@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_compiled_step_does_not_recompile_as_the_schedule_advances(op):
    """torch.compile captures the Triton op once; the device counter moving through a
    SequentialLR's stages (and cyclic momentum) never triggers a recompile.

    Under the interpreter, torch's wrap_triton cannot trace interpreted kernels, so
    the graph is captured with backend="eager" (Dynamo's guards, which decide
    recompiles, are the same); on a GPU the step goes through Inductor."""
    import torch._dynamo

    ft.load()
    torch._dynamo.reset()
    backend = "eager" if DEVICE == "cpu" else "inductor"
    opts = {"nesterov": True} if op == "sgd" else {"weight_decay": 1e-2, "decoupled": True}
    kw = {"momentum": 0.9} if op == "sgd" else {}
    expected, actual = (Bucket(op, schedule=SCHEDULES["sequential_3stage"], **kw) for _ in range(2))
    compiled = torch.compile(lambda grad: actual.apply(ft, grad, opts), backend=backend, fullgraph=True)
    compiled(actual.grads[0])
    expected.step(ref, 0, opts)
    with torch.compiler.set_stance("fail_on_recompile"):
        for k in range(1, STEPS):
            compiled(actual.grads[k])
            expected.step(ref, k, opts)
    assert actual.schedule_step.item() == STEPS
    assert_buckets_close(expected, actual)


@interpreter_only
def test_functionalizing_backends_get_a_clear_error_under_the_interpreter():
    import torch._dynamo

    ft.load()
    torch._dynamo.reset()
    bucket = Bucket("sgd", momentum=0.9)
    compiled = torch.compile(lambda: bucket.step(ft, 0, {}), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="backend='eager'"):
        compiled()


@needs_kernels
@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_opcheck(op):
    """Schema (declared mutations match the real ones), autograd registration and fake tensors;
    on a GPU also AOT dispatch, which the interpreter cannot trace."""
    ft.load()
    bucket = Bucket(op, momentum=0.9, amsgrad=True, schedule=SCHEDULES["cosine"])
    found_inf = torch.zeros(1, device=DEVICE)
    common = (bucket.seg_steps, bucket.chunks, bucket.hyper, bucket.schedule, bucket.schedule_step)
    _assign(bucket.grad_tensors, bucket.offsets, bucket.grads[0])
    if op == "sgd":
        target = torch.ops.fusedclr.triton_sgd_step_.default
        args = (bucket.table, torch.float32, bucket.states["momentum_buffer"], *common, 0.0, 1e-2, True, False,
                None, found_inf)
    else:
        target = torch.ops.fusedclr.triton_adam_step_.default
        s = bucket.states
        args = (bucket.table, torch.float32, s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"], *common, 0.999,
                1e-8, 1e-2, True, False, None, found_inf)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(target, args, test_utils=utils)


# --------------------------------------------------------------------------
# Errors and environments (subprocesses: the interpreter is a per-process choice)
# --------------------------------------------------------------------------


def _python(code: str, env_update: dict, drop=("TRITON_INTERPRET",)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


_SMALL_SGD_STEP = """
    import torch
    import fusedclr.triton as ft
    from fusedclr import reference
    def step():
        p, g = torch.zeros(8), torch.ones(8)
        table = reference.Segments([p], [g], [0], 8).table()
        ft.sgd_step_(table, torch.float32, None, torch.zeros(1, dtype=torch.int64), torch.tensor([[0, 0, 8]]),
                     torch.tensor([0.1, 0.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                     torch.zeros((), dtype=torch.int64), 0.0, 0.0, False, False, None, None)
"""


def test_package_imports_and_explains_without_triton():
    block_triton = """
    import sys
    sys.modules["triton"] = None  # what `import triton` sees when Triton is not installed
    """
    result = _python(block_triton + _SMALL_SGD_STEP + """
    import fusedclr
    assert not ft.available()
    print("why:", ft.why_unavailable())
    try:
        step()
    except RuntimeError as exc:
        print("error:", exc)
    """, {})
    assert result.returncode == 0, result.stderr
    assert "why: Triton is not importable" in result.stdout
    assert "error: fusedclr: backend='triton' was requested but the Triton backend is unavailable" in result.stdout


@pytest.mark.skipif(not ft.available(), reason=f"Triton backend unavailable: {ft.why_unavailable()}")
def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    result = _python(_SMALL_SGD_STEP + """
    for late in (False, True):
        if late:
            import os
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            step()
        except RuntimeError as exc:
            print("error:", exc)
    """, {})
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stdout
    for line in errors:
        assert "got CPU tensors" in line and "set TRITON_INTERPRET=1 in the environment before importing" in line
    assert "TRITON_INTERPRET is not set" in errors[0]
    assert "is set now, but was not when fusedclr.triton built its kernels" in errors[1]


@interpreter_only
def test_interpreter_runs_loops_over_loaded_bounds():
    """The probe behind the interpreter check finds nothing wrong with the Triton that CI runs."""
    from fusedclr.triton import _common

    assert _common.interpreter_problem() == ""
    assert ft._load().INTERPRETER_PROBLEM == ""


@interpreter_only
def test_a_broken_interpreter_is_named_before_any_buffer_changes(monkeypatch):
    """Where the probe fails (Triton 3.6's interpreter with NumPy >= 2.4), a CPU step raises an
    error that says why, and the buffers are as they were."""
    from fusedclr.triton import _common

    def broken(*args, **kwargs):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(_common._loop_bound_probe_kernel, "run", broken)
    problem = _common.interpreter_problem()
    assert "triton-lang/triton#9171" in problem and "TypeError: only 0-dimensional" in problem
    monkeypatch.setattr(ft._load(), "INTERPRETER_PROBLEM", problem)
    bucket = Bucket("sgd")
    before = bucket.param.clone(), bucket.seg_steps.clone()
    with pytest.raises(RuntimeError, match=r"backend='triton' on CPU tensors: Triton .*triton#9171"):
        ft.sgd_step_(bucket.table, torch.float32, None, bucket.seg_steps, bucket.chunks, bucket.hyper,
                     bucket.schedule, bucket.schedule_step, 0.0, 0.0, False, False, None, None)
    assert torch.equal(bucket.param, before[0]) and torch.equal(bucket.seg_steps, before[1])


def _nvidia_backend() -> str:
    try:
        import triton.backends

        nvidia = triton.backends.backends.get("nvidia")
    except Exception as exc:  # noqa: BLE001
        return f"Triton unavailable ({exc})"
    if nvidia is None:
        return "Triton has no NVIDIA backend"
    ptxas = Path(triton.backends.__file__).parent / "nvidia" / "bin" / "ptxas"
    return "" if ptxas.exists() else "Triton's NVIDIA backend ships no ptxas"


@pytest.mark.skipif(not ft.available() or bool(_nvidia_backend()), reason="needs Triton with its NVIDIA backend")
def test_kernels_compile_for_sm90():
    """Compiles the update kernels for sm_90 on this machine (no GPU needed) and checks that
    the aligned main loop uses 128-bit loads and stores [note: triton launch layout]."""
    result = _python("""
    import re
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedclr.triton._adam import _adam_kernel
    from fusedclr.triton._sgd import _sgd_kernel
    from fusedclr.triton._common import _advance_steps_kernel

    ptrs = {"segments_ptr": "*i64", "seg_steps_ptr": "*i64", "chunks_ptr": "*i64", "hyper_ptr": "*fp64",
            "schedule_ptr": "*fp64", "schedule_step_ptr": "*i64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    flags = {"HAS_GRAD_SCALE": True, "HAS_FOUND_INF": True, "MATH_F64": False, "BLOCK": 1024}
    adam = {"BETA2": 0.999, "EPS": 1e-8, "WEIGHT_DECAY": 1e-2, "DECOUPLED": True, "AMSGRAD": True, "MAXIMIZE": False}
    sgd = {"DAMPENING": 0.1, "WEIGHT_DECAY": 1e-2, "NESTEROV": True, "MAXIMIZE": True, "HAS_MOMENTUM_BUFFER": True}
    kernels = [
        (_adam_kernel, {"exp_avg_ptr": "*fp32", "exp_avg_sq_ptr": "*fp32", "max_exp_avg_sq_ptr": "*fp32"},
         {**adam, "WRITE": 0, "PARAM_DTYPE": tl.bfloat16}),
        (_sgd_kernel, {"momentum_buffer_ptr": "*fp32"}, {**sgd, "WRITE": 0, "PARAM_DTYPE": tl.float32}),
        # The precision opt-ins: bf16 states with stochastic rounding; fp16 with an fp32 master.
        (_adam_kernel, {"exp_avg_ptr": "*bf16", "exp_avg_sq_ptr": "*bf16", "max_exp_avg_sq_ptr": "*bf16"},
         {**adam, "WRITE": 2, "PARAM_DTYPE": tl.bfloat16}),
        (_sgd_kernel, {"momentum_buffer_ptr": "*fp32", "master_ptr": "*fp32"},
         {**sgd, "WRITE": 1, "PARAM_DTYPE": tl.float16}),
    ]
    for fn, bufs, opts in kernels:
        consts = {**opts, **flags}
        sig = {}
        for name in fn.arg_names:
            sig[name] = "constexpr" if name in consts else bufs.get(name) or ptrs.get(name) or "i64"
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32))
        ptx = k.asm["ptx"]
        assert re.search(r"ld\\.global(\\.nc)?\\.v4\\.b32", ptx) and "st.global.v4.b32" in ptx, fn.fn.__name__
        assert "div.full" not in ptx and "sqrt.approx" not in ptx, fn.fn.__name__
        print("compiled", fn.fn.__name__)
    triton.compile(ASTSource(fn=_advance_steps_kernel,
                             signature={"seg_steps_ptr": "*i64", "segments_ptr": "*i64", "found_inf_ptr": "*fp32",
                                        "n_segments": "i32", "HAS_FOUND_INF": "constexpr", "BLOCK": "constexpr"},
                             constexprs={"HAS_FOUND_INF": True, "BLOCK": 256}),
                   target=GPUTarget("cuda", 90, 32))
    print("compiled _advance_steps_kernel")
    """, {})
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 5, result.stdout


@needs_kernels
def test_argument_errors_name_the_argument():
    bucket = Bucket("adam")
    s = bucket.states
    table = bucket.table
    common = (bucket.seg_steps, bucket.chunks, bucket.hyper, bucket.schedule, bucket.schedule_step,
              0.999, 1e-8, 0.0, False, False, None, None)
    with pytest.raises(TypeError, match="exp_avg has dtype torch.bfloat16"):
        ft.adam_step_(table, torch.float32, s["exp_avg"].bfloat16(), s["exp_avg_sq"], None, *common)
    with pytest.raises(ValueError, match="exp_avg_sq has 3 elements"):
        ft.adam_step_(table, torch.float32, s["exp_avg"], s["exp_avg_sq"][:3], None, *common)
    with pytest.raises(ValueError, match=r"chunks must be an int64 \[n, 3\] table"):
        ft.adam_step_(table, torch.float32, s["exp_avg"], s["exp_avg_sq"], None, bucket.seg_steps,
                      bucket.chunks[:, :2], *common[2:])
    with pytest.raises(ValueError, match=r"segments must be an int64 \[n, 4\] table"):
        ft.adam_step_(table[:, :3], torch.float32, s["exp_avg"], s["exp_avg_sq"], None, *common)
    with pytest.raises(ValueError, match="seg_steps must be 1-D with one step per segment"):
        ft.adam_step_(table, torch.float32, s["exp_avg"], s["exp_avg_sq"], None, bucket.seg_steps[:2],
                      *common[1:])
    with pytest.raises(TypeError, match="param_dtype is torch.int32"):
        ft.adam_step_(table, torch.int32, s["exp_avg"], s["exp_avg_sq"], None, *common)


def test_kernels_are_built_on_first_use_only():
    """Importing the package builds no kernel and registers no op (torch itself may import
    Triton; that fusedclr.triton does not need it is test_package_imports_and_explains_without_triton)."""
    result = _python("""
    import sys
    import torch
    import fusedclr.triton as ft
    print(sorted(m for m in sys.modules if m.startswith("fusedclr.triton.")))
    print(hasattr(torch.ops.fusedclr, "triton_sgd_step_"))
    ft.load()
    print(sorted(m for m in sys.modules if m.startswith("fusedclr.triton.")))
    print(hasattr(torch.ops.fusedclr, "triton_sgd_step_"))
    """, {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["[]", "False"], result.stdout
    assert "fusedclr.triton._ops" in lines[2] and lines[3] == "True", result.stdout



@needs_kernels
@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_optimizer_with_triton_backend_and_in_kernel_one_cycle_matches_torch(cls):
    """End to end: fusedclr.<cls>(backend="triton") + fusedclr OneCycleLR against torch's pair."""
    import fusedclr

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(37, device=DEVICE)), torch.nn.Parameter(torch.randn(5, 3, device=DEVICE))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = {"momentum": 0.9} if cls == "SGD" else {}
    ours = getattr(fusedclr, cls)(ps, lr=0.01, backend="triton", **kw)
    ref = getattr(torch.optim, cls)(qs, lr=0.01, **kw)
    s_ours = fusedclr.lr_scheduler.OneCycleLR(ours, max_lr=0.1, total_steps=10)
    s_ref = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.1, total_steps=10)
    for _ in range(8):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, device=DEVICE)
            p.grad = g.clone()
            q.grad = g.clone()
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach())


# --------------------------------------------------------------------------
# Precision opt-ins [note: precision opt-ins]: the CUDA suite's checks, on Triton
# --------------------------------------------------------------------------


@pytest.fixture
def on_triton(monkeypatch):
    import test_cuda as checks

    monkeypatch.setattr(checks, "OPS", ft)
    monkeypatch.setattr(checks, "DEVICE", DEVICE)
    # Ragged around this module's BLOCK, small enough for the interpreter.
    monkeypatch.setattr(checks, "RAGGED", [3 * BLOCK + 17, 1, 64, 1000, 5, 2 * BLOCK + 1])
    return checks


@needs_kernels
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_bf16_states(on_triton, kind):
    on_triton.test_bf16_states(kind)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_master_weights(on_triton, kind, dtype):
    on_triton.test_master_weights_match_reference(kind, dtype)


@needs_kernels
@pytest.mark.parametrize("seed", [1234, 2**40 + 7])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_stochastic_rounding(on_triton, kind, seed):
    on_triton.test_stochastic_rounding_matches_reference(kind, seed)


@needs_kernels
def test_stochastic_rounding_is_unbiased(on_triton):
    on_triton.test_stochastic_rounding_is_unbiased()


@needs_kernels
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_skipped_step_leaves_masters_and_rounding_alone(on_triton, kind):
    on_triton.test_skipped_step_leaves_masters_and_rounding_alone(kind)


@needs_kernels
@pytest.mark.parametrize("option", [{"master_weights": True}, {"stochastic_rounding": True},
                                    {"state_dtype": torch.bfloat16}], ids=lambda o: next(iter(o)))
def test_optimizer_precision_options_match_the_reference_backend(option):
    """fusedclr.AdamW(backend="triton") on bf16 parameters with each opt-in against backend="reference"."""
    import fusedclr

    runs = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)  # the stochastic-rounding seed derives from it
        ps = [torch.nn.Parameter(torch.randn(s, device=DEVICE).bfloat16()) for s in [(37,), (5, 3), (300,)]]
        opt = fusedclr.AdamW(ps, lr=0.01, backend=backend, **option)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype)
            opt.step()
        runs.append((ps, opt))
    (ours, opt), (want, ref_opt) = runs
    for p, q in zip(ours, want):
        torch.testing.assert_close(p.detach(), q.detach(), **LOW_TOL[torch.bfloat16])
        for key, value in ref_opt.state[q].items():
            got = opt.state[p][key]
            assert got.dtype == value.dtype, key
            if key != "step":
                torch.testing.assert_close(got, value, **LOW_TOL[torch.bfloat16], msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.timing
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: the host cost of compiled Triton launches")
@pytest.mark.parametrize("n_params", [10, 2000])
def test_host_time_of_a_step_is_under_30us_whatever_the_tensor_count(n_params):
    """The Triton issue's target: fusedclr.AdamW(backend="triton").step() with an in-kernel
    OneCycleLR costs the host under 30 us (median of 200 steps, no synchronization)."""
    import time

    import fusedclr

    ps = [torch.nn.Parameter(torch.randn(64, device=DEVICE)) for _ in range(n_params)]
    opt = fusedclr.AdamW(ps, lr=1e-3, backend="triton")
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10_000)  # noqa: F841 (held weakly)
    for p in ps:
        p.grad = torch.randn_like(p)
    for _ in range(20):  # compilation
        opt.step()
    torch.cuda.synchronize()

    def median_us(fn) -> float:
        times = []
        for _ in range(200):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        return sorted(times)[len(times) // 2] * 1e6

    step = median_us(opt.step)
    # Where the time goes, for the failure message: the host-side preparation (the grads
    # check, hyper-parameter sync) and the argument checks of the op without its launches.
    prepare = median_us(opt._prepare_step)
    fn, bucket, args = opt._prepare_step()[0]
    ops = ft._load()
    launch_step = ops._launch_step
    ops._launch_step = lambda *a: None
    try:
        checks = median_us(lambda: fn(*args, None, None, None, None))
    finally:
        ops._launch_step = launch_step
    assert step < 30, (f"host time per step {step:.1f} us with {n_params} tensors: preparation {prepare:.1f} us, "
                       f"op checks {checks:.1f} us, the rest (two launches, torch.optim's step wrapper) "
                       f"{step - prepare - checks:.1f} us")


@needs_kernels
def test_optimizer_with_triton_backend_pickles_and_copies_after_steps():
    """The per-bucket memo of checks [note: triton checks per bucket]
    stays out of the optimizer: torch.save and deepcopy work after steps, and the copies
    step on exactly as the original does."""
    import copy
    import io

    import fusedclr

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (40, 3 * BLOCK + 17)]
    opt = fusedclr.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(opt)
    for other in (loaded, copied):  # parameters travel without their .grad, as torch's do
        for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
            assert q.grad is None
            q.grad = p.grad.clone()
    for o in (opt, loaded, copied):
        o.step()
    want = [p.detach() for p in opt.param_groups[0]["params"]]
    for other in (loaded, copied):
        got = [p.detach() for p in other.param_groups[0]["params"]]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(got, want))
