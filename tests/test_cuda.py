"""The CUDA kernels (csrc/cuda): what only a GPU shows, and checks of the ops other than the updates.

The updates of every optimizer against the reference run on every backend, a
CUDA GPU included, from the optimizer table: tests/test_op_parity.py; bad calls:
tests/test_op_errors.py. Here: CUDA-graph capture and replay, torch.compile,
launch counts and host synchronisation, buffers on the wrong device, opcheck
on CUDA, the optimizer classes on CUDA, grad_sumsq, schedule_eval and the
statistics of stochastic rounding. Every GPU test is marked ``gpu`` and skips
without a CUDA device; the registration test runs everywhere (CI builds the
CUDA kernels without a GPU). grad_sumsq, schedule_eval and the rounding
statistics also run on the CUDA kernels' host emulation
(tests/test_cuda_emulated.py) and on the CPU op (tests/test_precision.py),
through the OPS / DEVICE indirection.
"""

from __future__ import annotations

import importlib.util
import types

import op_table
import pytest
import torch
from conftest import TOL
from op_table import NAMES, RAGGED, TABLE

from fusedclr import ops, reference
from fusedclr.reference import Kind, descriptor, stage

# Indirections so the same checks can drive another implementation of the ops.
# The ops these checks call (test_cuda_emulated.py swaps in the emulation): step_ with a states list.
OPS = types.SimpleNamespace(step_=ops.step_, grad_sumsq=torch.ops.fusedclr.grad_sumsq,
                            schedule_eval=torch.ops.fusedclr.schedule_eval)
DEVICE = "cuda"

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 7
BLOCK = op_table.BLOCK

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


def _bucket(name, sizes=RAGGED, dtype=torch.float32, **kw):
    """A bucket of the optimizer table (tests/op_table.py) on DEVICE, its optimizer and configuration."""
    opt = TABLE[name]
    cfg = opt.config(opt.full)
    return opt, cfg, op_table.bucket(opt, cfg, sizes, dtype, DEVICE, **kw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_grad_sumsq_matches_reference(dtype):
    """The active gradients' sum of squares (float64) over the segment table: the op, the
    reference, and torch.linalg.vector_norm of the gradients themselves, squared;
    segments without a gradient do not count."""
    _, _, b = _bucket("sgd", dtype=dtype, chunk=1000)
    b.set_grads(op_table.gradients(b, 1)[0])
    for active in (None, [i % 3 != 1 for i in range(len(RAGGED))]):
        segs = b.segments(active)
        table = b.table(active)
        grads = [g for g in segs.grads if g is not None]
        want = sum(torch.linalg.vector_norm(g.double()).item() ** 2 for g in grads)
        got = OPS.grad_sumsq(table, dtype, b.chunks)
        assert got.dtype == torch.float64 and got.dim() == 0 and got.device == table.device
        ref = reference.grad_sumsq(segs, dtype, b.chunks)
        torch.testing.assert_close(got.item(), ref.item(), **TOL[torch.float64])
        torch.testing.assert_close(got.item(), want, **TOL[torch.float64])
    assert OPS.grad_sumsq(b.table([False] * len(RAGGED)), dtype, b.chunks).item() == 0.0


@gpu
@pytest.mark.gpu
def test_stochastic_rounding_is_unbiased():
    """An SGD update of 0.3 ulp below 1.0 rounds down on 30% of the elements (65536
    draws: the binomial spread is 0.0018), where rounding to nearest never moves."""
    n = 65536
    opt = TABLE["sgd"]
    ulp = 2.0**-8  # bf16 spacing just below 1.0
    cfg = opt.config({"buffer": False, "momentum": 0.0, "lr": 0.3 * ulp})
    b = op_table.bucket(opt, cfg, [n], torch.bfloat16, DEVICE)
    b.params[0].fill_(1.0)
    b.grads[0].fill_(1.0)
    OPS.step_(*opt.args(b, cfg, b.table(), sr_seed=99))
    moved = (b.params[0].float() != 1.0).float().mean().item()
    assert abs(moved - 0.3) < 0.01
    assert set(b.params[0].float().unique().tolist()) == {1.0 - ulp, 1.0}


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
@pytest.mark.parametrize("name", NAMES)
def test_cuda_graph_replay_matches_eager(name):
    """The step, schedule counter included, captured once and replayed equals the eager run
    bit for bit: no host reads, no syncs, nothing baked in (NAdam's per-segment scalars and
    Lookahead's step-dependent synchronisation included)."""
    opt, cfg, b = _bucket(name, schedule=SCHEDULES["onecycle"])
    eager = b.clone()
    grads = op_table.gradients(b, STEPS + 1)
    found_inf = torch.zeros(1, device=DEVICE)
    grad_scale = torch.ones(1, device=DEVICE)
    table = b.table()
    eager_table = eager.table()

    def step(bucket, table):
        if not opt.advances:  # Lookahead reads the counts its inner step advanced
            bucket.seg_steps.add_(1)
        OPS.step_(*opt.args(bucket, cfg, table, grad_scale=grad_scale, found_inf=found_inf))
        bucket.schedule_step.add_(1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graph asks
        b.set_grads(grads[0])
        step(b, table)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(b, table)
    for g in grads[1:]:
        b.set_grads(g)
        graph.replay()
    for g in grads:
        eager.set_grads(g)
        step(eager, eager_table)
    ours, want = b.buffers(), eager.buffers()
    for key in [*want, "schedule_step"]:
        x, y = (b.schedule_step, eager.schedule_step) if key == "schedule_step" else (ours[key], want[key])
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


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
@pytest.mark.parametrize(("name", "n_params"), [("adam", 10), *[(n, 3000) for n in NAMES]])
def test_launches_per_step_and_no_sync(name, n_params):
    """One update launch, plus the step-counter launch where the optimizer advances them
    ([note: step counters on CUDA]), whatever the number of parameters; no host
    synchronization."""
    opt, cfg, b = _bucket(name, [100] * n_params, schedule=SCHEDULES["onecycle"])
    args = opt.args(b, cfg, b.table(), grad_scale=torch.ones(1, device=DEVICE),
                    found_inf=torch.zeros(1, device=DEVICE))
    OPS.step_(*args)  # warm-up: module load, occupancy query
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OPS.step_(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.step_(*args)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = sorted({e.name for e in kernels})
    assert len(kernels) == (2 if opt.advances else 1), names
    assert any("update_kernel" in n for n in names), names
    assert any("advance_steps_kernel" in n for n in names) == opt.advances, names


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_zero_grad_in_place_launches_once_per_bucket_without_sync(backend):
    """``zero_grad(set_to_none=False)`` on CUDA: one grad_zero kernel per bucket (an fp32 and a bf16
    one here), none of torch's per-tensor fills, and no host synchronisation once the table is
    on the device; the gradients end zero, as the same tensors."""
    import fusedclr

    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(DEVICE)
    model[2].to(torch.bfloat16)
    opt = fusedclr.AdamW(model.parameters(), lr=0.01, backend=backend)

    def backward():
        h = model[1](model[0](torch.randn(16, 32, device=DEVICE)))
        model[2](h.bfloat16()).float().square().mean().backward()

    backward()
    opt.zero_grad(set_to_none=False)  # warm-up: the table's upload, the kernels' first launch
    backward()  # accumulates into the same gradients: the table stays as it is
    grads = [p.grad for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.zero_grad(set_to_none=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(names) == 2 and all("grad_zero_kernel" in n for n in names), names
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("lr_kind", ["float", "cpu-tensor"])
def test_host_scheduler_steps_without_sync(lr_kind):
    """A host-side scheduler (torch's LambdaLR, as Hugging Face's schedules are) changes the lr
    every step: it reaches the kernel through a pinned asynchronous copy, with no host sync,
    gradients replaced every step (set_to_none) included."""
    import fusedclr

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(DEVICE)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(DEVICE)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(16, 64, device=DEVICE)
    runs = []
    for m, cls, kw in ((model, fusedclr.AdamW, {}), (ref, torch.optim.AdamW, {"foreach": False})):
        lr = 0.01 if lr_kind == "float" else torch.tensor(0.01)
        opt = cls(m.parameters(), lr=lr, **kw)  # torch's foreach takes no CPU tensor lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        runs.append((m, opt, sched))

    def iteration(m, opt, sched):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
        sched.step()

    for run in runs:
        iteration(*run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            iteration(*runs[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(4):
        iteration(*runs[1])
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@gpu
@pytest.mark.gpu
def test_buffers_on_another_device_are_named():
    """A buffer off the segment table's device is refused before anything moves (the other
    bad calls, shared by every backend: tests/test_op_errors.py)."""
    cases = [
        ("adam", "states", lambda a, b: [a["states"][0].cpu(), *a["states"][1:]], "states\\[0\\] must be on cuda"),
        ("nadam", "seg_scalars", lambda a, b: a["seg_scalars"].cpu(), "seg_scalars must be on"),
        ("sgd", "chunks", lambda a, b: a["chunks"].cpu(), "chunks must be on"),
        ("lion", "hyper", lambda a, b: a["hyper"].cpu(), "hyper must be on"),
        ("rmsprop", "seg_steps", lambda a, b: a["seg_steps"].cpu(), "seg_steps must be on"),
        ("radam", "schedule", lambda a, b: a["schedule"].cpu(), "schedule must be on"),
        ("adagrad", "found_inf", lambda a, b: torch.zeros(1), "found_inf must be on"),
        ("lookahead", "grad_scale", lambda a, b: torch.ones(1), "grad_scale must be on"),
        ("adam", "master_param", lambda a, b: b.flat_params().float().cpu(), "master_param must be on"),
    ]
    names = ("optimizer", "segments", "param_dtype", "states", "seg_steps", "seg_scalars", "chunks", "hyper",
             "schedule", "schedule_step", "options", "maximize", "grad_scale", "found_inf", "master_param",
             "sr_seed")
    for name, key, value, match in cases:
        dtype = torch.bfloat16 if key == "master_param" else torch.float32
        opt, cfg, b = _bucket(name, [100, 7], dtype)
        a = dict(zip(names, opt.args(b, cfg, b.table())))
        a[key] = value(a, b)
        before = b.snapshot()
        with pytest.raises(RuntimeError, match=match):
            OPS.step_(*a.values())
        after = b.buffers()
        assert all(torch.equal(after[k], v) for k, v in before.items()), key


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_cuda(name):
    opt, cfg, b = _bucket(name, [40, 9, 0])
    b.set_grads(op_table.gradients(b, 1)[0])
    amp = {"grad_scale": torch.tensor([2.0], device=DEVICE), "found_inf": torch.zeros(1, device=DEVICE)}
    c = b.clone()
    step = torch.ops.fusedclr.step_.default
    torch.library.opcheck(step, _op_args(opt.args(c, cfg, c.table([True, False, True]), **amp)))
    _, _, low = _bucket(name, [40, 9, 0], torch.bfloat16, master=True)
    torch.library.opcheck(step, _op_args(opt.args(low, cfg, low.table())))
    torch.library.opcheck(torch.ops.fusedclr.grad_sumsq.default, (b.table(), torch.float32, b.chunks))
    torch.library.opcheck(torch.ops.fusedclr.grad_zero_.default, (b.table([True, False, True]), torch.float32,
                                                                  b.chunks))
    torch.library.opcheck(torch.ops.fusedclr.schedule_eval.default, (b.schedule, b.schedule_step))


def _op_args(args: tuple) -> tuple:
    """``step_``'s arguments with the states list as the schema's state0..state3."""
    return (*args[:3], *ops.state_args(args[0], args[3]), *args[4:])


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
    for op in ("step_", "schedule_eval", "grad_sumsq", "grad_zero_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedclr::{op}", "CPU"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedclr::{op}", "CUDA"), op
    assert ops.cuda_kernels_registered()
