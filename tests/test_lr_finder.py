"""LR range test: known answers, exact restoration, suggestions on noisy curves, bad input."""

from __future__ import annotations

import copy
import json
import math

import matplotlib
import numpy as np
import pytest
import torch
from conftest import TOL
from torch import nn

import fusedclr
from fusedclr.lr_finder import LRFinderResult, ema_smooth, lr_find, lr_schedule

# --------------------------------------------------------------------------
# A quadratic with a known largest Hessian eigenvalue
# --------------------------------------------------------------------------


def _regression(seed: int, L: float = 4.0, kappa: float = 10.0, n: int = 128, d: int = 16):
    """Least squares whose MSE Hessian 2 X^T X / n has eigenvalues evenly spread in [L / kappa, L]."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    eig = torch.linspace(L / kappa, L, d)
    x = u @ torch.diag(torch.sqrt(eig * n / 2)) @ v.T
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    hess_max = torch.linalg.eigvalsh(2 * x.T @ x / n).max().item()
    return x, y, hess_max


@pytest.mark.parametrize("num_iter", [100, 200])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_stops_after_divergence_and_suggests_below_2_over_L(seed, num_iter):
    """Plain gradient descent on a quadratic diverges exactly for lr > 2/L.

    The sweep multiplies the lr by r = (end/start)^(1/(num_iter-1)) per step, so
    by the time it reaches lr the steps taken so far add up to about
    lr / (1 - 1/r); the top eigendirections collapse once that sum times L is
    of order 1, i.e. near lr ~ (1 - 1/r)/L (0.09 * 2/L for 100 steps over 8
    decades, 0.05 * 2/L for 200). The suggestion must land in
    [(2/L)/25, (2/L)/2], and nothing may be suggested at or past 2/L.
    """
    x, y, L = _regression(seed)
    assert L == pytest.approx(4.0, rel=1e-4)
    torch.manual_seed(seed)
    model = nn.Linear(16, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lr_find(model, [(x, y)], nn.MSELoss(), opt, num_iter=num_iter, progress=False)

    assert result.stop_reason == "diverged"
    assert len(result.lrs) < num_iter  # stopped early...
    assert result.lrs[-1] > 2 / L  # ...after divergence,
    i_edge = int(np.searchsorted(result.lrs, 2 / L))
    assert result.losses[-1] > 4 * min(result.losses[:i_edge])  # which the losses show
    assert (2 / L) / 25 <= result.suggestion <= (2 / L) / 2
    for name, value in result.suggestions.items():
        assert value < 2 / L, name
    assert result.steep <= result.valley <= result.max_lr
    assert result.base_lr == pytest.approx(result.max_lr / 4)
    assert result.warnings == []


def test_quadratic_with_momentum_scales_the_suggestion_by_one_minus_beta():
    """Heavy ball with momentum b takes steps of about lr / (1 - b) and diverges for lr > 2 (1 + b) / L.

    The default optimizer (fusedclr.SGD, momentum 0.9) must therefore stop
    past 3.8/L and suggest (1 - b) times the plain-SGD range.
    """
    x, y, L = _regression(0)
    torch.manual_seed(0)
    model = nn.Linear(16, 1, bias=False)
    result = lr_find(model, [(x, y)], nn.MSELoss(), num_iter=100, progress=False)
    beta = 0.9
    assert result.stop_reason == "diverged"
    assert result.lrs[-1] > 2 * (1 + beta) / L
    assert (1 - beta) * (2 / L) / 25 <= result.suggestion <= (1 - beta) * (2 / L) / 2
    assert max(result.suggestions.values()) < 2 * (1 + beta) / L


# --------------------------------------------------------------------------
# Exact restoration
# --------------------------------------------------------------------------


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def _data(n_batches=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n_batches)]


OPTIMIZERS = {
    "torch.SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "torch.AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "torch.Adam(fused, tensor lr)": lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-3), fused=True),
    "fusedclr.SGD": lambda p: fusedclr.SGD(p, lr=0.05, momentum=0.9),
    "fusedclr.AdamW": lambda p: fusedclr.AdamW(p, lr=1e-3, weight_decay=1e-2),
}


def _setup(make_opt, with_schedule=False):
    model = _bn_model()
    opt = make_opt(model.parameters())
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=50) if with_schedule else None
    for xb, yb in _data(3, seed=7):  # some history: optimizer state, BN statistics, a leftover gradient
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model, opt, sched


def _continue(model, opt, sched, steps=3):
    torch.manual_seed(123)  # dropout draws the same masks in both twins
    for xb, yb in _data(steps, seed=9):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _assert_same(model_a, opt_a, model_b, opt_b):
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for (k, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), k
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), k
    oa, ob = opt_a.state_dict(), opt_b.state_dict()
    assert oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        assert oa["state"][pid].keys() == ob["state"][pid].keys()
        for key, va in oa["state"][pid].items():
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(ob["state"][pid][key])), (pid, key)
    for ga, gb in zip(oa["param_groups"], ob["param_groups"]):
        assert ga.keys() == gb.keys()
        for key in ga:
            va, vb = ga[key], gb[key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key


CASES = [(name, False) for name in OPTIMIZERS] + [("fusedclr.SGD", True), ("fusedclr.AdamW", True)]


@pytest.mark.parametrize("name, schedule", CASES, ids=[n + (" + OneCycleLR" if s else "") for n, s in CASES])
def test_restores_model_buffers_and_optimizer_bit_exactly(name, schedule):
    model, opt, sched = _setup(OPTIMIZERS[name], schedule)
    twin_model, twin_opt, twin_sched = _setup(OPTIMIZERS[name], schedule)
    model.eval()
    model[1].train()  # mixed train/eval flags must survive too
    twin_model.eval()
    twin_model[1].train()
    ptrs = [p.data_ptr() for p in model.parameters()]

    result = lr_find(model, _data(), nn.functional.cross_entropy, opt, num_iter=25, progress=False)

    assert len(result.lrs) >= 5 and math.isfinite(result.losses[0])
    assert [m.training for m in model.modules()] == [m.training for m in twin_model.modules()]
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # the optimizer's views are still the parameters
    _assert_same(model, opt, twin_model, twin_opt)
    # The strongest check: training goes on exactly as if the test never ran.
    model.train()
    twin_model.train()
    _continue(model, opt, sched)
    _continue(twin_model, twin_opt, twin_sched)
    _assert_same(model, opt, twin_model, twin_opt)


def test_default_optimizer_leaves_parameter_storage_untouched():
    model = _bn_model()
    twin = copy.deepcopy(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    lr_find(model, _data(), nn.functional.cross_entropy, num_iter=20, progress=False)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.grad is None for p in model.parameters())
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


def test_default_optimizer_hands_the_parameters_back_to_the_users_fusedclr_optimizer():
    """The temporary fusedclr.SGD re-points .data/.grad into its own buffers; they must come back."""
    model, opt, _ = _setup(OPTIMIZERS["fusedclr.AdamW"])
    twin_model, twin_opt, _ = _setup(OPTIMIZERS["fusedclr.AdamW"])
    ptrs = [p.data_ptr() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    lr_find(model, _data(), nn.functional.cross_entropy, num_iter=20, progress=False)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    _assert_same(model, opt, twin_model, twin_opt)
    _continue(model, opt, None)
    _continue(twin_model, twin_opt, None)
    _assert_same(model, opt, twin_model, twin_opt)


def test_restores_state_when_the_loss_is_nan_from_the_first_step():
    model, opt, _ = _setup(OPTIMIZERS["torch.SGD"])
    twin_model, twin_opt, _ = _setup(OPTIMIZERS["torch.SGD"])
    bad = [(torch.full((16, 8), math.nan), torch.zeros(16, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match=r"loss_fn returned nan on the very first step.*start_lr"):
        lr_find(model, bad, nn.functional.cross_entropy, opt, num_iter=10, progress=False)
    _assert_same(model, opt, twin_model, twin_opt)


# --------------------------------------------------------------------------
# What the run records
# --------------------------------------------------------------------------


class _Scripted(nn.Module):
    """A one-weight model whose loss is read from a script; records the lr and batches it sees."""

    def __init__(self, values, opt_ref):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.values = list(values)
        self.calls = 0
        self.seen_lrs = []
        self.opt_ref = opt_ref

    def forward(self, x):
        if self.opt_ref:
            self.seen_lrs.append(float(self.opt_ref[0].param_groups[0]["lr"]))
        v = self.values[self.calls]
        self.calls += 1
        return self.w * 0 + v + x.sum() * 0


def _scripted_run(values, opt_cls=torch.optim.SGD, **kwargs):
    ref = []
    model = _Scripted(values, ref)
    opt = opt_cls(model.parameters(), lr=1.0)
    ref.append(opt)
    data = [(torch.zeros(1), torch.zeros(()))]
    result = lr_find(model, data, lambda out, target: out, opt, progress=False, **kwargs)
    return model, result


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, fusedclr.SGD], ids=["torch", "fusedclr"])
@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_sets_every_step_to_the_scheduled_lr(mode, opt_cls):
    n = 30
    model, result = _scripted_run([1.0] * n, opt_cls, start_lr=1e-4, end_lr=1.0, num_iter=n, mode=mode)
    expected = np.geomspace(1e-4, 1.0, n) if mode == "exp" else np.linspace(1e-4, 1.0, n)
    np.testing.assert_allclose(model.seen_lrs, expected, rtol=1e-12)
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-12)
    assert result.stop_reason == "completed" and result.mode == mode


def test_fusedclr_optimizer_with_attached_schedule_follows_the_sweep():
    """An attached in-kernel schedule must not override the test's learning rates."""
    curves = []
    for attach in (False, True):
        model, opt, _ = _setup(OPTIMIZERS["fusedclr.SGD"])
        if attach:
            # Kept alive: a dropped scheduler detaches itself (the optimizer holds it weakly).
            sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=50, cycle_momentum=False)
            assert opt._scheduler is sched
        torch.manual_seed(5)
        curves.append(lr_find(model, _data(), nn.functional.cross_entropy, opt, num_iter=40, progress=False).losses)
    assert curves[0] == curves[1]
    # ... and both are torch.optim.SGD's curve (an optimizer that never stepped would pass the above).
    model, opt, _ = _setup(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    torch.manual_seed(5)
    want = lr_find(model, _data(), nn.functional.cross_entropy, opt, num_iter=40, progress=False).losses
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(want), **TOL[torch.float32])


@pytest.mark.parametrize("wrap", [False, True], ids=["optimizer", "lookahead"])
def test_attached_schedule_stays_in_the_kernel_after_the_test(wrap, caplog):
    """The test sets the lr itself with the schedule detached, then puts both back: the schedule is
    still the kernel's afterwards, not switched to the host as if the user had edited the lr."""
    model, opt, _ = _setup(OPTIMIZERS["fusedclr.SGD"])
    if wrap:
        opt = fusedclr.Lookahead(opt)
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=50, cycle_momentum=False)
    assert opt._scheduler is sched
    lr_find(model, _data(), nn.functional.cross_entropy, opt, num_iter=20, progress=False)
    assert opt._scheduler is sched
    for x, y in _data()[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert sched._fc_in_kernel and not sched._fc_chained
    assert "runs on the host" not in caplog.text


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adagrad(p, lr=0.01),
                                      lambda p: fusedclr.Adagrad(p, lr=0.01)], ids=["torch", "fusedclr"])
def test_one_cycle_after_a_test_without_momentum_does_not_cycle_it(make_opt):
    """Adagrad has neither momentum nor beta1: the documented recipe OneCycleLR(opt, **one_cycle(n))
    must not ask OneCycleLR to cycle one (torch raises)."""
    model, opt, _ = _setup(make_opt)
    torch.manual_seed(5)
    result = lr_find(model, _data(), nn.functional.cross_entropy, opt, num_iter=40, end_lr=100, progress=False)
    assert result.momentum == 0.0
    kwargs = result.one_cycle(100)
    assert kwargs["cycle_momentum"] is False
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, **kwargs)
    assert sched.get_last_lr()[0] == pytest.approx(kwargs["max_lr"] / kwargs["div_factor"])


def test_smoothing_is_the_bias_corrected_ema():
    rng = np.random.default_rng(0)
    values = (2.0 + rng.standard_normal(40) * 0.1).tolist()
    _, result = _scripted_run(values, num_iter=40, smooth=0.9)
    assert result.losses == pytest.approx(values, rel=1e-6)
    beta = 0.9
    for i, got in enumerate(result.smoothed_losses):
        weights = np.array([(1 - beta) * beta ** (i - j) for j in range(i + 1)])
        assert got == pytest.approx(float(weights @ np.array(values[: i + 1]) / weights.sum()), rel=1e-6)
    _, raw = _scripted_run(values, num_iter=40, smooth=0.0)
    assert raw.smoothed_losses == pytest.approx(raw.losses)


@pytest.mark.parametrize("threshold", [2.0, 4.0])
def test_stops_when_the_smoothed_loss_exceeds_threshold_times_best(threshold):
    values = [1.0] * 10 + [0.5] * 10 + [0.5 * 1.6**k for k in range(1, 30)]
    smoothed = ema_smooth(values, 0.5)
    best = math.inf
    expected = None
    for i, s in enumerate(smoothed):
        if i > 0 and s > threshold * best:
            expected = i + 1
            break
        best = min(best, s)
    _, result = _scripted_run(values, num_iter=len(values), smooth=0.5, diverge_threshold=threshold)
    assert result.stop_reason == "diverged"
    assert len(result.lrs) == expected
    assert result.smoothed_losses[-1] > threshold * min(result.smoothed_losses[:-1])
    assert all(s <= threshold * min(result.smoothed_losses[: i + 1])
               for i, s in enumerate(result.smoothed_losses[:-1]))


def test_stops_at_the_first_nan_and_suggests_only_before_it():
    values = list(np.linspace(3.0, 0.5, 25)) + [0.5] * 10 + [math.nan] + [0.1] * 10
    _, result = _scripted_run(values, num_iter=len(values))
    assert result.stop_reason == "non-finite"
    assert len(result.lrs) == 36 and math.isnan(result.losses[-1])
    assert all(v < result.lrs[-1] for v in result.suggestions.values())
    assert any("non-finite" in w for w in result.warnings)
    assert json.loads(json.dumps(result.to_dict()))["losses"][-1] is None


def test_accumulation_steps_average_the_batch_losses():
    values = [float(v) for v in range(1, 1 + 3 * 8)]
    model, result = _scripted_run(values, num_iter=8, accumulation_steps=3, smooth=0.0,
                                  diverge_threshold=math.inf)
    assert model.calls == 24
    assert result.losses == pytest.approx([sum(values[3 * i : 3 * i + 3]) / 3 for i in range(8)])


def test_val_loader_records_the_validation_loss_in_eval_mode():
    model = _bn_model()
    val = _data(2, seed=3)
    seen = []
    model[1].register_forward_hook(lambda mod, inp, out: seen.append(mod.training))
    result = lr_find(model, _data(), nn.functional.cross_entropy, num_iter=10, val_loader=val, progress=False)
    assert result.loss_source == "val"
    # per iteration: one training forward (train mode), then both validation batches (eval mode)
    assert seen == [True, False, False] * 10
    assert model.training


def test_amp_on_cpu_runs_in_bfloat16():
    model = _bn_model()
    dtypes = []
    model[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    result = lr_find(model, _data(), nn.functional.cross_entropy, num_iter=10, amp=True, progress=False)
    assert set(dtypes) == {torch.bfloat16}
    assert all(math.isfinite(v) for v in result.losses)


def test_progress_bar_shows_the_loss(capsys, monkeypatch):
    import tqdm.auto

    class EveryStep(tqdm.auto.tqdm):  # no rate limit, so a 10-step run draws every step
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", EveryStep)
    result = lr_find(_bn_model(), _data(), nn.functional.cross_entropy, num_iter=10, progress=True)
    err = capsys.readouterr().err
    assert "lr_find" in err and "10/10" in err
    assert f"loss={result.smoothed_losses[-1]:.4g}" in err and f"lr={result.lrs[-1]:.2e}" in err


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"train_loader": []}, ValueError, "train_loader is empty"),
        ({"start_lr": 1.0, "end_lr": 1.0}, ValueError, r"start_lr \(1\) must be smaller than end_lr \(1\)"),
        ({"start_lr": 2.0, "end_lr": 1.0}, ValueError, "start_lr"),
        ({"start_lr": 0.0}, ValueError, "start_lr must be a finite number > 0"),
        ({"num_iter": 1}, ValueError, "num_iter must be an integer >= 2"),
        ({"num_iter": 2.5}, ValueError, "num_iter"),
        ({"mode": "cos"}, ValueError, "mode must be one of"),
        ({"smooth": 1.0}, ValueError, "smooth must be in"),
        ({"diverge_threshold": 1.0}, ValueError, "diverge_threshold must be > 1"),
        ({"accumulation_steps": 0}, ValueError, "accumulation_steps"),
        ({"device": "meta"}, ValueError, "device='meta'"),
        ({"train_loader": [torch.zeros(3)]}, TypeError, r"train_loader must yield \(inputs..., target\)"),
        ({"loss_fn": lambda o, t: o}, TypeError, "loss_fn must return a scalar tensor"),
        ({"val_loader": []}, ValueError, "val_loader is empty"),
        ({"optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    model = _bn_model()
    twin = copy.deepcopy(model)
    args = {"train_loader": _data(), "loss_fn": nn.functional.cross_entropy, "num_iter": 5, "progress": False}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lr_find(model, **args)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


def test_one_shot_iterator_that_runs_out_is_reported():
    gen = iter(_data(3))
    with pytest.raises(ValueError, match="re-iterable loader"):
        lr_find(_bn_model(), gen, nn.functional.cross_entropy, num_iter=10, progress=False)


def test_cycles_through_a_short_loader():
    data = _data(3)
    result = lr_find(_bn_model(), data, nn.functional.cross_entropy, num_iter=10, progress=False)
    assert len(result.lrs) == 10


# --------------------------------------------------------------------------
# Suggestions on synthetic noisy curves with a known answer
# --------------------------------------------------------------------------

CENTRE, WIDTH, DIVERGE = -3.0, 0.35, -0.5  # log10 lr of the descent's midpoint, its width, divergence


def _noisy_curve(seed, n=100, noise=0.08, spikes=0.03):
    """log10(lr) in [-7, 1]: plateau 2.3, logistic descent to 0.3 around CENTRE, blow-up past DIVERGE.

    Multiplicative Gaussian noise plus occasional spikes (a bad batch) of up to 3x.
    """
    rng = np.random.default_rng(seed)
    x = np.linspace(-7, 1, n)
    clean = 0.3 + 2.0 / (1 + np.exp((x - CENTRE) / WIDTH))
    clean += np.where(x > DIVERGE, 0.6 * np.expm1(3.0 * (x - DIVERGE)), 0.0)
    y = clean * (1 + noise * rng.standard_normal(n))
    hit = rng.random(n) < spikes
    y[hit] *= 1 + 2 * rng.random(hit.sum())
    return 10**x, y


def _as_run(lrs, losses, threshold=4.0):
    """Truncate like lr_find does: stop once the EMA exceeds threshold x its best."""
    smoothed = ema_smooth(losses, 0.98)
    best = math.inf
    for i, s in enumerate(smoothed):
        if i > 0 and s > threshold * best:
            return LRFinderResult(lrs[: i + 1], losses[: i + 1], stop_reason="diverged")
        best = min(best, s)
    return LRFinderResult(lrs, losses)


def test_suggestions_on_noisy_curves_land_where_the_curve_says():
    # Where a logistic descent has done a fraction f of its drop: CENTRE + WIDTH * ln(f / (1 - f)).
    at = lambda f: CENTRE + WIDTH * math.log(f / (1 - f))  # noqa: E731
    logs = {name: [] for name in ("steep", "valley", "minimum", "max_lr")}
    naive = []
    for seed in range(40):
        lrs, y = _noisy_curve(seed)
        r = _as_run(lrs, y)
        for name in logs:
            logs[name].append(math.log10(r.suggestions[name]))
        assert all(v < 10**DIVERGE for v in r.suggestions.values()), seed  # never past divergence
        assert r.suggestion == r.valley and r.base_lr == pytest.approx(r.max_lr / 4)
        assert r.warnings == []
        naive.append(math.log10(lrs[int(np.argmin(np.gradient(y)))]))
    steep, valley, max_lr = (np.array(logs[k]) for k in ("steep", "valley", "max_lr"))
    assert np.all(np.abs(steep - CENTRE) < 0.5)  # steepest point of a logistic is its centre
    assert np.all(np.abs(valley - at(0.8)) < 0.25)
    assert np.all(np.abs(max_lr - at(0.95)) < 0.3)
    assert valley.std() < 0.1 and max_lr.std() < 0.1  # stable from seed to seed
    # The noise is real: the naive steepest raw gradient scatters over decades.
    assert np.ptp(naive) > 2.0


def test_suggestions_never_pass_a_sudden_divergence():
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        x = np.linspace(-6, 0, 80)
        clean = 0.2 + 2.0 / (1 + np.exp((x + 3.5) / 0.3))
        edge = -1.5 + rng.uniform(-0.3, 0.3)
        clean = np.where(x > edge, clean * 50, clean)  # a cliff, no warning
        y = clean * (1 + 0.1 * rng.standard_normal(x.size))
        r = _as_run(10**x, y)
        assert r.stop_reason == "diverged"
        assert max(r.suggestions.values()) < 10**edge, seed


def test_one_cycle_peak_lands_below_divergence_in_a_stated_band():
    """The one-cycle peak is the trend's minimum capped at 4x valley [note: one-cycle peak].

    On the noisy logistic curves the blow-up starts at DIVERGE and the descent
    has done 95% of its drop at CENTRE + WIDTH ln 19 (-1.97): the peak must land
    in [10**-2.1, 10**(DIVERGE - 1)], a decade or more below divergence, never
    below the constant suggestion, and the same from seed to seed. Moving the
    divergence closer (a narrow valley floor) must pull the peak with it.
    """
    peaks = []
    for seed in range(40):
        r = _as_run(*_noisy_curve(seed))
        assert r.loss_rose and r.valley < r.peak <= 4 * r.valley * (1 + 1e-12)
        peaks.append(math.log10(r.peak))
    peaks = np.array(peaks)
    assert np.all((peaks >= -2.1) & (peaks <= DIVERGE - 1.0))
    assert peaks.std() < 0.1
    for edge in (-2.0, -1.5):
        for seed in range(10):
            rng = np.random.default_rng(seed)
            x = np.linspace(-7, 1, 100)
            clean = 0.3 + 2.0 / (1 + np.exp((x - CENTRE) / WIDTH))
            clean += np.where(x > edge, 0.6 * np.expm1(3 * (x - edge)), 0)
            r = _as_run(10**x, clean * (1 + 0.08 * rng.standard_normal(100)))
            assert edge - 0.5 <= math.log10(r.peak) < edge, (edge, seed)


def test_one_cycle_peak_before_a_cliff_and_on_a_quadratic():
    # A cliff: the loss jumps 50x at a random edge; the peak stays below it, above the constant lr.
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        x = np.linspace(-6, 0, 80)
        edge = -1.5 + rng.uniform(-0.3, 0.3)
        clean = 0.2 + 2.0 / (1 + np.exp((x + 3.5) / 0.3))
        r = _as_run(10**x, np.where(x > edge, clean * 50, clean) * (1 + 0.1 * rng.standard_normal(x.size)))
        assert r.valley < r.peak < 10**edge, seed
    # Gradient descent on a quadratic diverges for lr > 2/L. Its noise-free range test lags
    # (the trend's minimum lands 2-3x past 2/L); the 4x-valley cap keeps the peak in [(2/L)/8, 2/L).
    for seed in range(3):
        for num_iter in (100, 200):
            x, y, L = _regression(seed)
            torch.manual_seed(seed)
            model = nn.Linear(16, 1, bias=False)
            r = lr_find(model, [(x, y)], nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                        num_iter=num_iter, progress=False)
            assert (2 / L) / 8 <= r.peak < 2 / L, (seed, num_iter)
            assert r.momentum == 0.0


def test_test_that_ends_before_the_loss_rises_gives_the_best_tested_lr_and_says_so():
    lrs = np.geomspace(1e-6, 1e-1, 80)
    x = np.log10(lrs)
    # Falls by 2.0, then creeps up by 0.1: less than the tenth of the drop that counts as rising.
    falls_then_flat = 0.3 + 2.0 / (1 + np.exp((x + 4) / 0.3)) + np.where(x > -2.5, 0.04 * (x + 2.5), 0.0)
    r = LRFinderResult(lrs, falls_then_flat)
    assert not r.loss_rose and r.stop_reason == "completed"
    assert any("ended before the loss rose" in w and "not extrapolated" in w for w in r.warnings)
    h = 4  # half a trend window, trimmed at each end
    lowest = lrs[h + int(np.argmin(r.trend[h:-h]))]
    assert r.peak == pytest.approx(min(lowest, 4 * r.valley)) and r.peak < lrs[-1]
    still_falling = LRFinderResult(lrs, np.linspace(2.3, 0.5, 80))
    assert not still_falling.loss_rose and still_falling.peak <= lrs[-1]
    assert any("still falling" in w and "one-cycle peak" in w for w in still_falling.warnings)
    # A curve that does rise is not flagged.
    rises = LRFinderResult(lrs, falls_then_flat + np.where(x > -1.5, 2.0 * (x + 1.5), 0.0))
    assert rises.loss_rose and not any("rose" in w for w in rises.warnings)


@pytest.mark.parametrize("momentum, expected", [
    (0.9, dict(cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)),
    (0.99, dict(cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)),
    (0.5, dict(cycle_momentum=True, base_momentum=0.5, max_momentum=pytest.approx(0.6))),
    (0.0, dict(cycle_momentum=False)),
    (None, dict(cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)),
])
def test_one_cycle_kwargs_drive_onecycle_lr(momentum, expected):
    lrs, y = _noisy_curve(3)
    r = _as_run(lrs, y)
    r.momentum = momentum
    kwargs = r.one_cycle(50)
    for key, value in expected.items():
        assert kwargs[key] == value, key
    assert kwargs["max_lr"] == r.peak and kwargs["div_factor"] == 25.0 and kwargs["total_steps"] == 50
    for sched_cls, opt_cls in ((torch.optim.lr_scheduler.OneCycleLR, torch.optim.SGD),
                               (fusedclr.lr_scheduler.OneCycleLR, fusedclr.SGD)):
        p = nn.Parameter(torch.zeros(4))
        opt = opt_cls([p], lr=0.1, momentum=momentum or 0.0)
        sched = sched_cls(opt, **kwargs)
        seen = []
        for step in range(50):
            seen.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones_like(p)
            opt.step()
            if step < 49:
                sched.step()
        assert max(seen) == pytest.approx(r.peak, rel=1e-6)
        assert seen[0] == pytest.approx(r.peak / 25) and seen[0] < r.suggestion
    by_epochs = r.one_cycle(epochs=3, steps_per_epoch=7)
    assert (by_epochs["epochs"], by_epochs["steps_per_epoch"]) == (3, 7) and "total_steps" not in by_epochs
    assert "total_steps" not in r.one_cycle()


@pytest.mark.parametrize("args, kwargs, match", [
    ((0,), {}, "total_steps must be a positive integer"),
    ((10,), {"epochs": 2, "steps_per_epoch": 3}, "either total_steps or epochs"),
    ((), {"epochs": 2}, "epochs and steps_per_epoch go together"),
    ((10,), {"pct_start": 1.0}, "pct_start"),
])
def test_one_cycle_bad_arguments_name_themselves(args, kwargs, match):
    r = _as_run(*_noisy_curve(0))
    with pytest.raises(ValueError, match=match):
        r.one_cycle(*args, **kwargs)


def test_lr_find_records_the_momentum_it_ran_with():
    x, y, _ = _regression(0)
    model = nn.Linear(16, 1, bias=False)
    adam = torch.optim.Adam(model.parameters(), betas=(0.8, 0.99))
    assert lr_find(model, [(x, y)], nn.MSELoss(), adam, num_iter=10, progress=False).momentum == 0.8
    assert lr_find(model, [(x, y)], nn.MSELoss(), num_iter=10, progress=False).momentum == 0.9


def test_flat_curve_is_flagged_unreliable():
    rng = np.random.default_rng(0)
    lrs = np.geomspace(1e-7, 10, 100)
    r = LRFinderResult(lrs, 2.3 * (1 + 0.05 * rng.standard_normal(100)))
    assert any("does not clearly fall" in w for w in r.warnings)


def test_still_falling_at_the_end_is_flagged():
    lrs = np.geomspace(1e-7, 1e-3, 60)
    r = LRFinderResult(lrs, np.linspace(2.3, 0.5, 60))
    assert any("still falling" in w for w in r.warnings)
    assert r.suggestion is not None and r.suggestion < lrs[-1]


def test_too_few_points_suggest_nothing():
    r = LRFinderResult([1e-3, 1e-2, 1e-1], [2.0, 1.0, 50.0], stop_reason="diverged")
    assert r.suggestion is None and r.peak is None and all(v is None for v in r.suggestions.values())
    assert r.clr_bounds() is None
    with pytest.raises(ValueError, match="recommends no one-cycle peak"):
        r.one_cycle(10)
    assert "at least" in r.warnings[-1]


def test_clr_bounds_and_schedule_helpers():
    lrs, y = _noisy_curve(0)
    r = _as_run(lrs, y)
    lo, hi = r.clr_bounds(3)
    assert hi == r.max_lr and lo == pytest.approx(r.max_lr / 3)
    with pytest.raises(ValueError, match="factor"):
        r.clr_bounds(0.5)
    assert lr_schedule(1e-3, 1.0, 4, "exp") == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def test_plot_writes_a_png_without_touching_the_backend(tmp_path):
    backend = matplotlib.get_backend()
    lrs, y = _noisy_curve(1)
    r = _as_run(lrs, y)
    fig = r.plot(tmp_path / "lr.png")
    data = (tmp_path / "lr.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    for name in ("steep", "valley", "minimum/10", "max_lr", "base_lr", "one-cycle peak", "stopped: diverged"):
        assert name in labels
    assert matplotlib.get_backend() == backend


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_plot_legend_leaves_the_curve_visible(tmp_path, seed):
    """No point of the trend or the raw curve, inside the axes, lies under the legend box."""
    r = _as_run(*_noisy_curve(seed))
    fig = r.plot()
    fig.canvas.draw()
    ax = fig.axes[0]
    box = ax.get_legend().get_window_extent()
    n = len(r.trend)
    lo, hi = ax.get_ylim()
    for ys in (np.asarray(r.trend), np.asarray(r.losses[:n])):
        inside = (ys >= lo) & (ys <= hi)
        pts = ax.transData.transform(np.column_stack([np.asarray(r.lrs[:n])[inside], ys[inside]]))
        covered = (pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1) & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1)
        assert not covered.any(), f"{covered.sum()} points under the legend"


def test_to_dict_is_json_and_round_trips_the_numbers():
    lrs, y = _noisy_curve(2)
    r = _as_run(lrs, y)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["suggestion"] == r.suggestion and d["suggestions"] == r.suggestions and d["peak"] == r.peak
    assert d["loss_rose"] is True
    assert d["lrs"] == r.lrs and d["losses"] == r.losses and len(d["trend"]) == len(r.lrs)
    assert d["stop_reason"] == "diverged"
    assert "valley" in str(r) and "suggestion" in str(r) and "one_cycle(" in str(r)


def test_exported_from_the_package():
    assert fusedclr.lr_find is lr_find and fusedclr.LRFinderResult is LRFinderResult
