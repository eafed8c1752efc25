"""Reliability: AMP, fused clipping, NaN/Inf, exact resume, torch.compile, long runs.

Every comparison is against stock torch (torch.optim, GradScaler,
clip_grad_norm_, torch.optim.lr_scheduler) or against the reference oracle in
float64; bad inputs live in tests/test_errors.py, multi-process training in
tests/test_distributed.py and randomized parity in tests/test_properties.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CPU_BACKENDS, TOL

import fusedclr
from fusedclr import ops, reference
from fusedclr.reference import Kind, descriptor, stage

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CLASSES = ["SGD", "Adam", "AdamW"]
OPTIONS = {  # options that exercise every state buffer of each class
    "SGD": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
    "Adam": {"lr": 0.02, "weight_decay": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.02, "weight_decay": 0.1},
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _model(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)


def _batches(n: int, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(12, 6, generator=gen).to(device), torch.randn(12, 3, generator=gen).to(device))
            for _ in range(n)]


def _pair(cls: str, backend: str = "auto", options: dict | None = None, device: str = "cpu", **fc_kw):
    """A torch.optim optimizer and a fusedclr one over two identical models."""
    options = dict(OPTIONS[cls] if options is None else options)
    ref_model, fc_model = _model(device=device), _model(device=device)
    ref = getattr(torch.optim, cls)(ref_model.parameters(), **options)
    ours = getattr(fusedclr, cls)(fc_model.parameters(), **options, backend=backend, **fc_kw)
    return ref_model, ref, fc_model, ours


def _assert_opt_close(ref, ours, equal_nan: bool = False, **tol) -> None:
    """Parameters and every state tensor (and step) of two optimizers agree."""
    tol = tol or TOL[torch.float32]
    for g_ref, g_fc in zip(ref.param_groups, ours.param_groups, strict=True):
        for p_ref, p_fc in zip(g_ref["params"], g_fc["params"], strict=True):
            torch.testing.assert_close(p_fc.detach(), p_ref.detach(), equal_nan=equal_nan, **tol)
    ref_sd, fc_sd = ref.state_dict()["state"], ours.state_dict()["state"]
    assert set(ref_sd) == set(fc_sd), "the same parameters must have state"
    for pid, st in ref_sd.items():
        assert set(st) == set(fc_sd[pid]), f"state keys of parameter {pid}"
        for key, value in st.items():
            mine = fc_sd[pid][key]
            if key == "step":
                assert float(mine) == float(value), f"step of parameter {pid}"
            else:
                torch.testing.assert_close(mine.to(value.dtype), value, equal_nan=equal_nan, **tol)


def _snapshot(opt) -> dict[str, list[torch.Tensor]]:
    """Everything a step could change: parameters, grads' flat buffers, states, step counts."""
    buckets = [b for bs in opt._buckets for b in bs]
    return {
        "params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
        "states": [t.clone() for b in buckets for t in b.states.values()],
        "steps": [b.seg_steps.clone() for b in buckets],
        # None until the first step attaches the "no schedule" counter (which stays 0).
        "counters": [torch.zeros((), dtype=torch.int64) if b.schedule_step is None else b.schedule_step.clone()
                     for b in buckets],
    }


def _assert_unchanged(before: dict[str, list[torch.Tensor]], after: dict[str, list[torch.Tensor]]) -> None:
    for key in before:
        assert len(before[key]) == len(after[key]), key
        for a, b in zip(before[key], after[key]):
            assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan())), f"{key} changed"


def _train_step(model, opt, batch, scaler=None, autocast_dtype=None, poison: float | None = None):
    x, y = batch
    opt.zero_grad()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(x)
    loss = torch.nn.functional.mse_loss(out.float(), y)
    if poison is not None:
        loss = loss * poison
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


# --------------------------------------------------------------------------
# AMP
# --------------------------------------------------------------------------

AMP_STEPS = 8
INF_STEPS = {2, 3}  # two skipped steps in a row: the scale halves twice


@pytest.mark.parametrize("cls", CLASSES)
def test_grad_scaler_bf16_autocast_cpu_matches_torch(cls):
    """GradScaler("cpu") + bf16 autocast + a one-cycle schedule: fusedclr (the fused
    grad_scale/found_inf protocol) follows torch.optim (unscale, then step or skip)
    step by step, and a skipped step changes nothing, not even the schedule counter."""
    ref_model, ref, fc_model, ours = _pair(cls)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.05, total_steps=AMP_STEPS)
    fc_sched = fusedclr.lr_scheduler.OneCycleLR(ours, max_lr=0.05, total_steps=AMP_STEPS)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    assert ours._step_supports_amp_scaling
    scales = []
    for step, batch in enumerate(_batches(AMP_STEPS)):
        poison = math.inf if step in INF_STEPS else None
        _train_step(ref_model, ref, batch, scalers[0], torch.bfloat16, poison)
        before = _snapshot(ours)
        _train_step(fc_model, ours, batch, scalers[1], torch.bfloat16, poison)
        if poison is not None:
            _assert_unchanged(before, _snapshot(ours))
        scales.append(scalers[1].get_scale())
        assert scales[-1] == scalers[0].get_scale()
        _assert_opt_close(ref, ours)
        ref_sched.step()
        fc_sched.step()
    assert scales[3] == scales[1] / 4 and scales[-1] > scales[3], "the scale must have shrunk and grown"


@pytest.mark.parametrize("cls", CLASSES)
def test_grad_scaler_unscale_then_clip_then_step(cls):
    """The common pattern scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt):
    the grads are already unscaled, so the fused step must not divide them again."""
    ref_model, ref, fc_model, ours = _pair(cls)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for batch in _batches(5):
        for model, opt, scaler in ((ref_model, ref, scalers[0]), (fc_model, ours, scalers[1])):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(batch[0]).float(), batch[1])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
    _assert_opt_close(ref, ours)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_found_inf_changes_nothing_even_on_the_first_step(backend, cls):
    """found_inf != 0: no parameter, state, step count or schedule counter moves, and no
    first-step initialisation happens; found_inf == 0 divides the grads by grad_scale."""
    model = _model()
    ours = getattr(fusedclr, cls)(model.parameters(), **OPTIONS[cls], backend=backend)
    sched = fusedclr.lr_scheduler.CosineAnnealingLR(ours, T_max=10)
    twin_model = _model()
    twin = getattr(fusedclr, cls)(twin_model.parameters(), **OPTIONS[cls], backend=backend)
    twin_sched = fusedclr.lr_scheduler.CosineAnnealingLR(twin, T_max=10)
    scale = torch.tensor(8.0)
    start = [p.detach().clone() for p in model.parameters()]
    for step, batch in enumerate(_batches(4)):
        for m, o in ((model, ours), (twin_model, twin)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(batch[0]), batch[1])
            (loss * (scale if o is ours else 1.0)).backward()
        if step in (0, 2):
            before = _snapshot(ours)
            ours.step(grad_scale=scale, found_inf=torch.tensor([1.0]))
            _assert_unchanged(before, _snapshot(ours))
            if step == 0:
                assert ours.state_dict()["state"] == {}, "a skipped first step must not initialise state"
        ours.step(grad_scale=scale, found_inf=torch.tensor([0.0]))
        twin.step()
        sched.step()
        twin_sched.step()
        _assert_opt_close(twin, ours)
    assert all(not torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start)), "nothing trained"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_grad_scaler_fp16_autocast_cuda_matches_torch(cls):
    ref_model, ref, fc_model, ours = _pair(cls, device="cuda")
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**16, growth_interval=2) for _ in range(2)]
    for step, batch in enumerate(_batches(AMP_STEPS, "cuda")):
        poison = math.inf if step in INF_STEPS else None
        _train_step(ref_model, ref, batch, scalers[0], torch.float16, poison)
        before = _snapshot(ours)
        _train_step(fc_model, ours, batch, scalers[1], torch.float16, poison)
        if poison is not None:
            _assert_unchanged(before, _snapshot(ours))
        assert scalers[1].get_scale() == scalers[0].get_scale()
        _assert_opt_close(ref, ours)


# --------------------------------------------------------------------------
# Fused clipping
# --------------------------------------------------------------------------

CLIP_STEPS = 7
# Per-step gradient magnitudes: some steps clip, some do not (max_norm 1).
GRAD_SCALES = [0.01, 3.0, 0.05, 10.0, 1.0, 0.02, 5.0]


def _clip_params():
    """Two groups, ragged shapes, a float64 parameter in the first group (a second
    bucket), a zero-size one and a frozen one."""
    torch.manual_seed(1)
    g0 = [torch.nn.Parameter(torch.randn(53)), torch.nn.Parameter(torch.randn(7, 9, dtype=torch.float64)),
          torch.nn.Parameter(torch.randn(0))]
    frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)
    g1 = [torch.nn.Parameter(torch.randn(33, 17)), frozen, torch.nn.Parameter(torch.randn(1))]
    return [g0, g1]


def _clip_grads(groups, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [[None if not p.requires_grad else GRAD_SCALES[step] * torch.randn(p.shape, generator=gen,
                                                                            dtype=torch.float64).to(p.dtype)
             for p in ps] for ps in groups]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_max_grad_norm_matches_clip_grad_norm(backend, cls):
    """max_grad_norm == torch.nn.utils.clip_grad_norm_ over every parameter, then torch's
    step: across groups and dtype buckets, with a parameter whose grad is sometimes None
    (its stale gradient must not count) and a frozen one."""
    max_norm = 1.0
    ref_groups = _clip_params()
    fc_groups = [[torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in ps]
                 for ps in ref_groups]
    options = dict(OPTIONS[cls])
    ref = getattr(torch.optim, cls)([{"params": ref_groups[0]}, {"params": ref_groups[1], "lr": 0.01}], **options)
    ours = getattr(fusedclr, cls)([{"params": fc_groups[0]}, {"params": fc_groups[1], "lr": 0.01}], **options,
                                  backend=backend, max_grad_norm=max_norm)
    clipped = 0
    for step in range(CLIP_STEPS):
        grads = _clip_grads(ref_groups, step)
        if step in (2, 5):
            grads[0][0] = None  # skipped this step; its flat segment still holds an older grad
        ours.zero_grad(set_to_none=step in (2, 5))
        for groups, flat in ((ref_groups, False), (fc_groups, True)):
            for ps, gs in zip(groups, grads):
                for p, g in zip(ps, gs):
                    if g is None:
                        p.grad = None
                    elif flat and p.grad is not None:
                        p.grad.copy_(g)
                    else:
                        p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_([p for ps in ref_groups for p in ps], max_norm)
        clipped += bool(total > max_norm)
        ref.step()
        ours.step()
        assert isinstance(ours.last_grad_norm, torch.Tensor) and ours.last_grad_norm.dim() == 0
        torch.testing.assert_close(ours.last_grad_norm.to(total.dtype), total)
        _assert_opt_close(ref, ours)
    assert 0 < clipped < CLIP_STEPS, "the test must see clipped and unclipped steps"


def test_clipping_leaves_the_gradients_untouched():
    """The coefficient goes into the kernel's grad_scale: the grads are read, never rewritten
    (clip_grad_norm_ scales them in place), and max_grad_norm changes the update."""
    model, twin = _model(), _model()
    opt = fusedclr.AdamW(model.parameters(), lr=0.1, max_grad_norm=1e-3)
    unclipped = fusedclr.AdamW(twin.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    for m in (model, twin):
        torch.nn.functional.mse_loss(m(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    unclipped.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    torch.testing.assert_close(opt.last_grad_norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    # Adam is scale invariant on the first step, so compare the second moment instead.
    for p, q in zip(model.parameters(), twin.parameters()):
        ratio = opt.state[p]["exp_avg_sq"] / unclipped.state[q]["exp_avg_sq"].clamp_min(1e-30)
        nonzero = unclipped.state[q]["exp_avg_sq"] > 0
        coef = 1e-3 / float(opt.last_grad_norm)
        torch.testing.assert_close(ratio[nonzero], torch.full_like(ratio[nonzero], coef**2), rtol=1e-4, atol=0)


@pytest.mark.parametrize("cls", CLASSES)
def test_clipping_under_grad_scaler_uses_the_unscaled_norm(cls):
    """GradScaler + max_grad_norm (one fused step) == torch's unscale_, clip_grad_norm_, step."""
    ref_model, ref, fc_model, ours = _pair(cls, max_grad_norm=0.3)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3) for _ in range(2)]
    for step, batch in enumerate(_batches(AMP_STEPS)):
        poison = math.inf if step == 4 else None
        for model, opt, scaler in ((ref_model, ref, scalers[0]), (fc_model, ours, scalers[1])):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(batch[0]).float(), batch[1])
            scaler.scale(loss * (poison or 1.0)).backward()
            if opt is ref:
                scaler.unscale_(opt)
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            scaler.step(opt)
            scaler.update()
        if poison is None:
            torch.testing.assert_close(ours.last_grad_norm, total)
        _assert_opt_close(ref, ours)


# --------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------


def _poisoned_grads(step: int, shapes) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    if step == 2:
        grads[0][1] = math.nan
        grads[1][0, 2] = math.inf
    if step == 4:
        grads[2][3] = -math.inf
    return grads


SHAPES = [(10,), (4, 5), (37,)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_nonfinite_grads_propagate_like_torch(backend, cls):
    """Without a scaler or skip_nonfinite, NaN and inf reach the parameters exactly as in torch."""
    torch.manual_seed(2)
    ref_ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    fc_ps = [torch.nn.Parameter(p.detach().clone()) for p in ref_ps]
    ref = getattr(torch.optim, cls)(ref_ps, **OPTIONS[cls])
    ours = getattr(fusedclr, cls)(fc_ps, **OPTIONS[cls], backend=backend)
    for step in range(6):
        for ps in (ref_ps, fc_ps):
            for p, g in zip(ps, _poisoned_grads(step, SHAPES)):
                p.grad = g
        ref.step()
        ours.step()
        _assert_opt_close(ref, ours, equal_nan=True)
    assert not torch.isfinite(fc_ps[0]).all() and torch.isfinite(fc_ps[0]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("clip", [None, 100.0])
@pytest.mark.parametrize("cls", CLASSES)
def test_skip_nonfinite_skips_the_step_on_device(backend, clip, cls):
    """skip_nonfinite=True: a step with any non-finite grad changes nothing (parameters,
    states, step counts); the other steps equal torch's, which simply does not step then."""
    torch.manual_seed(2)
    ref_ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    fc_ps = [torch.nn.Parameter(p.detach().clone()) for p in ref_ps]
    ref = getattr(torch.optim, cls)(ref_ps, **OPTIONS[cls])
    ours = getattr(fusedclr, cls)(fc_ps, **OPTIONS[cls], backend=backend, max_grad_norm=clip, skip_nonfinite=True)
    for step in range(6):
        grads = _poisoned_grads(step, SHAPES)
        for p, g in zip(fc_ps, grads):
            p.grad = g.clone()
        before = _snapshot(ours)
        ours.step()
        if step in (2, 4):
            _assert_unchanged(before, _snapshot(ours))
            assert not torch.isfinite(ours.last_grad_norm)
            continue
        for p, g in zip(ref_ps, grads):
            p.grad = g.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref_ps, clip)
        ref.step()
        _assert_opt_close(ref, ours)


@pytest.mark.parametrize("cls", CLASSES)
def test_skip_nonfinite_is_or_ed_with_a_scalers_found_inf(cls):
    p = torch.nn.Parameter(torch.ones(5))
    opt = getattr(fusedclr, cls)([p], **OPTIONS[cls], skip_nonfinite=True)
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    p.grad = torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0])
    before = _snapshot(opt)
    opt.step(grad_scale=one, found_inf=zero)  # the scaler saw nothing, the guard does
    _assert_unchanged(before, _snapshot(opt))
    p.grad.fill_(1.0)
    opt.step(grad_scale=one, found_inf=one)  # finite grads, the scaler says skip
    _assert_unchanged(before, _snapshot(opt))
    opt.step(grad_scale=one, found_inf=zero)
    assert not torch.equal(p.detach(), torch.ones(5))


# --------------------------------------------------------------------------
# Exact resume in a new process
# --------------------------------------------------------------------------

# Runs in a fresh interpreter: `train.py MODE CKPT OUT ROOT`. MODE "full"
# trains STEPS steps without interruption and, after STOP of them, saves a
# checkpoint with torch.save (which changes nothing); "resume" loads it and
# trains the remaining steps. OUT gets the parameters after every step and the
# final optimizer states.
RESUME_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[4])
    import torch
    import fusedclr
    from fusedclr import lr_scheduler as S

    torch.set_num_threads(1)
    mode, ckpt, out = sys.argv[1:4]
    STEPS, STOP = 12, 5

    def build(kind):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))
        if kind == "sgd":
            opt = fusedclr.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}],
                               lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, max_grad_norm=2.0)
            sched = S.CyclicLR(opt, base_lr=[0.01, 0.005], max_lr=[0.1, 0.05], step_size_up=3, mode="triangular2")
        else:
            opt = fusedclr.AdamW(model.parameters(), lr=0.01, amsgrad=True, weight_decay=0.05, max_grad_norm=0.5)
            sched = S.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS, three_phase=True)
        return model, opt, sched

    def batch(step):
        gen = torch.Generator().manual_seed(1000 + step)
        return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)

    runs = {kind: build(kind) for kind in ("sgd", "adamw")}
    start = STOP if mode == "resume" else 0
    if mode == "resume":
        state = torch.load(ckpt, map_location="cpu")
        for kind, (model, opt, sched) in runs.items():
            model.load_state_dict(state[kind]["model"])
            opt.load_state_dict(state[kind]["opt"])
            sched.load_state_dict(state[kind]["sched"])
    trajectory = {kind: [] for kind in runs}
    for step in range(start, STEPS):
        if mode == "full" and step == STOP:
            torch.save({kind: {"model": m.state_dict(), "opt": o.state_dict(), "sched": s.state_dict()}
                        for kind, (m, o, s) in runs.items()}, ckpt)
        x, y = batch(step)
        for kind, (model, opt, sched) in runs.items():
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            trajectory[kind].append([p.detach().clone() for p in model.parameters()])
    final = {kind: o.state_dict() for kind, (m, o, s) in runs.items()}
    torch.save({"trajectory": trajectory, "final": final}, out)
''')


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    """Stop mid-cycle (CyclicLR triangular2 with cyclical momentum; three-phase OneCycleLR),
    torch.save, load in a new interpreter and continue: every later step, and the final
    optimizer state, is bitwise the uninterrupted run's."""
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    ckpt = tmp_path / "ckpt.pt"

    for mode in ("full", "resume"):
        proc = subprocess.run([sys.executable, str(script), mode, str(ckpt), str(tmp_path / f"{mode}.pt"), str(ROOT)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    full = torch.load(tmp_path / "full.pt")
    resumed = torch.load(tmp_path / "resume.pt")
    for kind in ("sgd", "adamw"):
        tail = full["trajectory"][kind][-len(resumed["trajectory"][kind]):]
        assert len(tail) == 7
        # Every parameter moves (a run that trains nothing would compare equal too), and has state.
        first, last = full["trajectory"][kind][0], full["trajectory"][kind][-1]
        assert all(not torch.equal(a, b) for a, b in zip(first, last)), f"{kind}: a parameter never moved"
        assert len(full["final"][kind]["state"]) == len(first), f"{kind}: a parameter has no optimizer state"
        for step, (want, got) in enumerate(zip(tail, resumed["trajectory"][kind])):
            for a, b in zip(want, got):
                assert torch.equal(a, b), f"{kind}: step {5 + step} differs after the resume"
        want_state, got_state = full["final"][kind]["state"], resumed["final"][kind]["state"]
        assert want_state.keys() == got_state.keys()
        for pid in want_state:
            for key, value in want_state[pid].items():
                assert torch.equal(got_state[pid][key], value), f"{kind}: state {key} of parameter {pid}"


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------

COMPILE_STEPS = 100


def _dynamo_work() -> tuple[int, int]:
    """(frames Dynamo converted, graphs it produced): a recompilation or a new frame moves either."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("what", ["train_step", "opt_step"])
def test_compiled_training_with_a_schedule_never_recompiles(what):
    """torch.compile of a whole training step (forward, backward, opt.step()) or of
    opt.step alone, with a one-cycle schedule moving lr and beta1 every step and fused
    clipping: 100 steps, no recompilation after the first, and the eager numbers."""
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    batches = _batches(4)
    runs = {}
    for compiled in (False, True):
        model = _model()
        start = [p.detach().clone() for p in model.parameters()]
        opt = fusedclr.AdamW(model.parameters(), lr=0.01, max_grad_norm=0.5)
        sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=COMPILE_STEPS)

        def train_step(x, y, model=model, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        def eager_step(x, y, model=model, opt=opt, step=None):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()

        if compiled and what == "train_step":
            step_fn = torch.compile(train_step, backend="aot_eager")
        elif compiled:
            compiled_opt_step = torch.compile(opt.step, backend="aot_eager")

            def step_fn(x, y):
                return eager_step(x, y, step=compiled_opt_step)
        else:
            step_fn = train_step
        after_first = None
        for i in range(COMPILE_STEPS):
            step_fn(*batches[i % len(batches)])
            sched.step()
            if i == 0 and compiled:
                after_first = _dynamo_work()
                assert after_first[1] > 0, "nothing was compiled"
        if compiled:
            assert _dynamo_work() == after_first, f"recompiled after the first step: {dict(counters['frames'])}"
        runs[compiled] = (model, opt)
        assert all(not torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start)), "nothing trained"
    for p, q in zip(runs[False][0].parameters(), runs[True][0].parameters()):
        torch.testing.assert_close(q.detach(), p.detach())
    torch.testing.assert_close(runs[True][1].last_grad_norm, runs[False][1].last_grad_norm)


# --------------------------------------------------------------------------
# Long runs: step counts and schedule times beyond 2**24
# --------------------------------------------------------------------------

BIG_STEPS = [2**24 + 1, 2**24 + 3, 2**31 + 5, 2**40 + 7]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bias_correction_beyond_2_24(backend, dtype):
    """int64 step counts set beyond 2**24 (where float32 stops counting) give torch's
    bias corrections: checked against reference.adam_update_ in float64 with Python
    ints. Each count gets betas so close to 1 (no float32 representation) that both
    bias corrections are far from 1 there: they matter to the update."""
    torch.manual_seed(4)
    init = [torch.randn(5, dtype=torch.float64) for _ in BIG_STEPS]
    betas = [(1 - 0.5 / s, 1 - 0.7 / s) for s in BIG_STEPS]
    ps = [torch.nn.Parameter(t.to(dtype)) for t in init]
    opt = fusedclr.Adam([{"params": [p], "betas": b} for p, b in zip(ps, betas)], lr=0.01, weight_decay=0.01,
                        backend=backend)
    state_dtype = opt._buckets[0][0].states["exp_avg"].dtype
    exp_avg = [torch.randn(5, dtype=torch.float64).to(state_dtype) for _ in BIG_STEPS]
    exp_avg_sq = [torch.rand(5, dtype=torch.float64).to(state_dtype) for _ in BIG_STEPS]
    for i, p in enumerate(ps):
        opt._buckets[i][0].seg_steps.fill_(BIG_STEPS[i])
        opt.state[p]["exp_avg"].copy_(exp_avg[i])
        opt.state[p]["exp_avg_sq"].copy_(exp_avg_sq[i])
        p.grad = torch.randn(5, dtype=torch.float64).to(dtype)
    grads = [p.grad.to(torch.float64) for p in ps]
    opt.step()
    for i, (p, step) in enumerate(zip(ps, BIG_STEPS)):
        want, m, v = init[i].to(dtype).double(), exp_avg[i].double(), exp_avg_sq[i].double()
        beta1, beta2 = betas[i]
        reference.adam_update_(want, grads[i], m, v, None, step=step + 1, lr=0.01, beta1=beta1, beta2=beta2,
                               eps=1e-8, weight_decay=0.01, decoupled=False, maximize=False)
        assert 0.3 < 1 - beta1 ** (step + 1) < 0.7 and 0.3 < 1 - beta2 ** (step + 1) < 0.7
        torch.testing.assert_close(p.detach().double(), want, **TOL[dtype])
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, **TOL[dtype])
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), v, **TOL[dtype])
        assert int(opt.state_dict()["state"][i]["step"]) == step + 1


def _big_t_descriptors() -> dict[str, list[float]]:
    huge = 2**33
    return {
        "cosine": descriptor([stage(Kind.COSINE, [0.1, 0.001, huge])]),
        "exponential": descriptor([stage(Kind.EXPONENTIAL, [0.1, 1 - 1e-10])]),
        "step": descriptor([stage(Kind.STEP, [0.1, 0.5, 2**23 + 1])]),
        "cyclic_triangular2": descriptor([stage(Kind.CYCLIC, [0.01, 0.1, 2**20 + 3, 0.4, 1, 1.0, 0.8, 0.9],
                                                has_momentum=True)]),
        "cyclic_exp_range": descriptor([stage(Kind.CYCLIC, [0.01, 0.1, 2**25 + 1, 0.5, 2, 1 - 1e-9, 0.8, 0.9],
                                              has_momentum=True)]),
        "one_cycle": descriptor([stage(Kind.ONE_CYCLE, [0.004, 0.1, 4e-8, 0.85, 0.95, 2, 0.3 * huge, huge - 1, 0,
                                                        0], has_momentum=True)]),
        "restarts": descriptor([stage(Kind.COSINE_RESTARTS, [0.1, 0.0, 2**22 + 1, 2, 0.5, 1000, 0.0])]),
        "warmup_then_cosine": descriptor([stage(Kind.LINEAR, [0.1, 0.01, 1.0, 2**24 + 9]),
                                          stage(Kind.COSINE, [0.1, 0.0, huge], t_begin=2**24 + 9)]),
    }


BIG_T = [2**24 - 1, 2**24 + 1, 2**24 + 3, 2**24 + 10, 3 * 2**24 + 7, 2**31 + 11, 2**32 + 1, 2**33 - 5]


@pytest.mark.skipif(not ops.extension_available(), reason="needs the compiled extension")
@pytest.mark.parametrize("name", list(_big_t_descriptors()))
def test_schedule_beyond_2_24_matches_reference(name):
    """The kernels' evaluator at t > 2**24 equals reference.schedule_value, and an SGD step
    whose lr comes from that schedule moves the parameter by exactly that lr."""
    desc = _big_t_descriptors()[name]
    schedule = torch.tensor(desc, dtype=torch.float64)
    for t in BIG_T:
        lr, mom = reference.schedule_value(desc, t)
        got = ops.schedule_eval(schedule, torch.tensor(t, dtype=torch.int64)).tolist()
        assert math.isclose(got[0], lr, rel_tol=1e-12, abs_tol=1e-15), (t, got[0], lr)
        if mom is not None:
            assert got[3] == 1.0 and math.isclose(got[1], mom, rel_tol=1e-12), (t, got[1], mom)

    class Fixed:  # the scheduler protocol of docs/CONTRACTS.md, with a counter we set
        counter = torch.tensor(0, dtype=torch.int64)

        def _fc_descriptor(self, group_index):
            return desc

        def _fc_counter(self, device):
            return self.counter

    for t in BIG_T[1:]:
        # A fresh optimizer each time: its first step moves by exactly lr * grad, whatever the momentum.
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        opt = fusedclr.SGD([p], lr=1.0)
        sched = Fixed()  # kept: the optimizer holds its scheduler weakly (docs/CONTRACTS.md)
        opt._attach_schedule(sched)
        Fixed.counter.fill_(t)
        p.grad = torch.ones_like(p)
        opt.step()
        lr, _ = reference.schedule_value(desc, t)
        torch.testing.assert_close(-p.detach(), torch.full_like(p, lr), rtol=1e-12, atol=1e-15)
