"""fusedclr.lr_scheduler.ReduceLROnPlateau against torch's, with the metric on the host and on the device.

* a Python float metric: torch's code, torch's numbers;
* a 0-dim tensor metric with a fusedclr optimizer: the same lrs (to the bit:
  both compute in float64), best / bad-epoch / cooldown bookkeeping, at every
  epoch of scripted sequences (plateaus, cooldown, min_lr, eps, rel / abs
  thresholds, min / max, a NaN), and no host read of any tensor on the way
  (the sync guard below; on CUDA, torch's sync debug mode);
* it composes with a warmup stepped every iteration, as torch's does;
* no recompilation under torch.compile as the lr drops.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as TS

import fusedclr
from fusedclr import lr_scheduler as FS

LR0, LR1 = 0.1, 0.03

# Improvements just above and just below 1% (rel) or 0.05 (abs), plateaus long
# enough for several reductions, a NaN (never an improvement) and a late recovery.
METRICS = [
    1.0, 0.9, 0.895, 0.8899, 0.85, 0.85, 0.86, 0.849, 0.84, 0.84, 0.84, 0.84, 0.83, 0.7, 0.7, 0.71,
    float("nan"), 0.69, 0.72, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.49, 0.3, 0.31, 0.32, 0.33, 0.34,
]

CONFIGS = {
    "min_rel": dict(mode="min", patience=2, factor=0.5, threshold=1e-2, threshold_mode="rel"),
    "min_abs_cooldown_min_lrs": dict(mode="min", patience=1, factor=0.3, threshold=0.05, threshold_mode="abs",
                                     cooldown=2, min_lr=[0.01, 0.002]),
    "max_rel_cooldown_min_lr": dict(mode="max", patience=0, factor=0.5, threshold=0.1, threshold_mode="rel",
                                    cooldown=1, min_lr=0.02),
    "max_abs_eps": dict(mode="max", patience=1, factor=0.7, threshold=0.0, threshold_mode="abs", eps=2e-3),
    "defaults": dict(),
}


def _metrics(config: dict) -> list[float]:
    # "max" mode watches an accuracy-like metric that rises and stalls the same way.
    return [2.0 - m for m in METRICS] if config.get("mode") == "max" else list(METRICS)


def _groups(device="cpu"):
    a = torch.nn.Parameter(torch.zeros(3, device=device))
    b = torch.nn.Parameter(torch.zeros(2, device=device))
    return [{"params": [a]}, {"params": [b], "lr": LR1}]


def _fc_sgd(device="cpu", backend="cpu"):
    opt = fusedclr.SGD(_groups(device), lr=LR0, backend=backend)
    for g in opt.param_groups:
        g["params"][0].grad = torch.ones_like(g["params"][0])
    return opt


def _backend() -> str:
    return "cpu" if fusedclr.ops.extension_available() else "reference"


def _bookkeeping(s) -> list[float]:
    return [float(s.best), float(s.num_bad_epochs), float(s.cooldown_counter), float(s.last_epoch)]


def _torch_run(config, metrics, iters_per_epoch=0, warmup=None):
    """Per iteration: [lr0, lr1] (+ bookkeeping after each epoch) from torch's classes on torch.optim.SGD."""
    opt = torch.optim.SGD(_groups(), lr=LR0)
    warm = warmup(TS, opt) if warmup else None
    plateau = TS.ReduceLROnPlateau(opt, **config)
    rows = []
    for m in metrics:
        for _ in range(iters_per_epoch):
            opt.step()
            warm.step()
            rows.append([g["lr"] for g in opt.param_groups])
        plateau.step(m)
        rows.append([g["lr"] for g in opt.param_groups] + _bookkeeping(plateau))
    return rows


def _forbid(*_args, **_kwargs):
    raise AssertionError("a tensor was read on the host (sync)")


class NoSync:
    """Makes every Python-level read of a tensor value raise (CPU stand-in for CUDA's sync debug mode)."""

    NAMES = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        self.ctx = self.mp.context()
        mp = self.ctx.__enter__()
        for name in self.NAMES:
            mp.setattr(torch.Tensor, name, _forbid)
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def test_the_guard_catches_reads(monkeypatch):
    with NoSync(monkeypatch), pytest.raises(AssertionError, match="sync"):
        float(torch.ones(()))
    with NoSync(monkeypatch), pytest.raises(AssertionError, match="sync"):
        TS.ReduceLROnPlateau(torch.optim.SGD(_groups(), lr=0.1)).step(torch.ones(()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float_metric_is_torchs_code(name):
    config = CONFIGS[name]
    expected = _torch_run(config, _metrics(config))
    for opt in (torch.optim.SGD(_groups(), lr=LR0), _fc_sgd(backend=_backend())):
        sched = FS.ReduceLROnPlateau(opt, **config)
        got = []
        for m in _metrics(config):
            sched.step(m)
            got.append([g["lr"] for g in opt.param_groups] + _bookkeeping(sched))
            assert all(type(g["lr"]) is float for g in opt.param_groups)
        assert got == expected


def _applied(opt) -> list[float]:
    """The lr the optimizer applies, per group: params zeroed, grad 1, no momentum -> update -lr."""
    params = [g["params"][0] for g in opt.param_groups]
    with torch.no_grad():
        for p in params:
            p.zero_()
    opt.step()
    return [-p.detach()[0] for p in params]  # tensors: read after the guarded section


@pytest.mark.parametrize("name", list(CONFIGS))
def test_device_metric_matches_torch_every_epoch_without_a_sync(name, monkeypatch):
    config = CONFIGS[name]
    metrics = _metrics(config)
    expected = _torch_run(config, metrics)
    opt = _fc_sgd(backend=_backend())
    sched = FS.ReduceLROnPlateau(opt, **config)
    lrs, applied, books = [], [], []
    for m in metrics:
        metric = torch.tensor(m)  # float32 on the device, as a loss would be
        with NoSync(monkeypatch):
            sched.step(metric)
            applied.append(_applied(opt))
            lrs.append([g["lr"].clone() for g in opt.param_groups])  # the tensors are updated in place
            last = sched.get_last_lr()
        books.append(_bookkeeping(sched))
        assert all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in last)
    # float32(m) is what torch's float(metric) would see from that tensor: redo torch's run with it.
    expected = _torch_run(config, [float(torch.tensor(m)) for m in metrics])
    got = [[float(a), float(b)] + bk for (a, b), bk in zip(lrs, books)]
    assert got == expected
    torch.testing.assert_close([[float(x) for x in row] for row in applied], [row[:2] for row in expected],
                               rtol=1e-6, atol=0.0)  # fp32 parameters


def test_device_metric_composes_with_a_warmup_like_torch(monkeypatch, caplog):
    config = dict(patience=1, factor=0.5, threshold=1e-2, cooldown=1, min_lr=0.004)
    metrics = [float(torch.tensor(m)) for m in METRICS]

    def warmup(m, o):
        return m.LinearLR(o, start_factor=0.1, total_iters=7)

    expected = _torch_run(config, metrics, iters_per_epoch=3, warmup=warmup)
    opt = _fc_sgd(backend=_backend())
    warm = warmup(FS, opt)
    sched = FS.ReduceLROnPlateau(opt, **config)
    rows, applied, wanted = [], [], []
    # The lrs after LinearLR's constructor.
    prev = [torch.tensor(LR0 * 0.1, dtype=torch.float64), torch.tensor(LR1 * 0.1, dtype=torch.float64)]
    with caplog.at_level(logging.WARNING, "fusedclr.lr_scheduler"):
        for m in metrics:
            for _ in range(3):
                with NoSync(monkeypatch):
                    applied.append(_applied(opt))
                    warm.step()
                    current = [torch.as_tensor(g["lr"], dtype=torch.float64).clone() for g in opt.param_groups]
                wanted.append(prev)
                rows.append(current)
                prev = current
            with NoSync(monkeypatch):
                sched.step(torch.tensor(m))
                prev = [g["lr"].clone() for g in opt.param_groups]
            rows.append(prev + _bookkeeping(sched))
    assert sum("shares the optimizer" in r.getMessage() for r in caplog.records) == 1  # the host fallback, once
    got = [[float(x) for x in row] for row in rows]
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0.0)  # torch's chainable LinearLR: same floats
    torch.testing.assert_close([[float(x) for x in r] for r in applied], [[float(x) for x in r] for r in wanted],
                               rtol=1e-6, atol=0.0)  # fp32 parameters


def test_device_metric_errors():
    opt = _fc_sgd(backend=_backend())
    sched = FS.ReduceLROnPlateau(opt, min_lr=[0.0, 0.0])
    with pytest.raises(ValueError, match="one-element tensor"):
        sched.step(torch.ones(3))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(RuntimeError, match="differs from when `ReduceLROnPlateau` was initialized"):
        sched.step(torch.ones(()))


def test_state_dict_round_trip_with_device_state():
    import io

    opt = _fc_sgd(backend=_backend())
    sched = FS.ReduceLROnPlateau(opt, patience=0, cooldown=1)
    for m in (1.0, 2.0, 3.0, 0.5):
        sched.step(torch.tensor(m))
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    fresh = FS.ReduceLROnPlateau(_fc_sgd(backend=_backend()), patience=0, cooldown=1)
    fresh.load_state_dict(torch.load(buf))
    assert _bookkeeping(fresh) == _bookkeeping(sched)


def test_no_recompile_as_the_lr_drops():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()

    def run(opt_cls, sched_cls, device_metric):
        model = torch.nn.Linear(4, 1)
        opt = opt_cls(model.parameters())
        sched = sched_cls(opt, patience=0, factor=0.5)
        x = torch.randn(8, 4)
        counter = CompileCounter()

        @torch.compile(backend=counter)
        def train_step():
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        frames = []
        for m in (1.0, 2.0, 3.0, 4.0, 5.0):  # a reduction every epoch
            train_step()
            sched.step(torch.tensor(m) if device_metric else m)
            frames.append(counter.frame_count)
        return frames, float(opt.param_groups[0]["lr"])

    # The counter sees recompiles: torch's optimizer guards on its float lr.
    torch_frames, torch_lr = run(lambda p: torch.optim.SGD(p, lr=0.1), TS.ReduceLROnPlateau, False)
    assert torch_frames[-1] > torch_frames[0]
    frames, lr = run(lambda p: fusedclr.SGD(p, lr=0.1, backend=_backend()), FS.ReduceLROnPlateau, True)
    assert frames == [frames[0]] * len(frames)
    assert lr == torch_lr == 0.1 * 0.5**4


def test_compiled_device_step_stops_recompiling():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    opt = _fc_sgd(backend=_backend())
    sched = FS.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    counter = CompileCounter()
    step = torch.compile(sched.step, backend=counter)
    frames = []
    for m in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        step(torch.tensor(m))
        frames.append(counter.frame_count)
    # last_epoch is a Python int: Dynamo specialises on it once, then marks it dynamic.
    assert frames[2:] == [frames[2]] * (len(frames) - 2) and frames[-1] <= 2
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(LR0 * 0.5**5, rel=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_metric_never_syncs():
    if not fusedclr.ops.cuda_kernels_registered():
        pytest.skip("fusedclr built without its CUDA kernels")
    opt = _fc_sgd("cuda", backend="cuda")
    warm = FS.LinearLR(opt, start_factor=0.1, total_iters=5)
    sched = FS.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    metrics = torch.tensor([float(torch.tensor(m)) for m in METRICS if not math.isnan(m)], device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt.step()
        warm.step()
        sched.step(metrics[0])  # first device step: the group lrs become device tensors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for m in metrics[1:]:
            opt.step()
            warm.step()
            sched.step(m)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = _torch_run(dict(patience=1, factor=0.5), [float(m) for m in metrics], iters_per_epoch=1,
                          warmup=lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=5))
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx(expected[-1][:2], rel=1e-12)
