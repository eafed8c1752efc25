"""Batch-size LR scaling, the training helpers and Smith's weight-decay / momentum sweep."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from conftest import interrupt_on_call

import fusedclr
import fusedclr.lr_finder
from fusedclr.tuning import (
    DEFAULT_MOMENTUMS,
    DEFAULT_WEIGHT_DECAYS,
    ScaledLR,
    evaluate,
    optimizer_classes,
    paired_difference,
    scale_lr,
    sweep,
    train_epoch,
)

# --------------------------------------------------------------------------
# scale_lr
# --------------------------------------------------------------------------


@pytest.mark.parametrize("old, new", [(256, 1024), (128, 8192), (64, 96), (512, 128)])
def test_sqrt_rule(old, new):
    s = scale_lr(0.1, old, new, "sqrt")
    assert s.lr == pytest.approx(0.1 * math.sqrt(new / old), rel=1e-12)
    assert s.warmup_epochs == 0 and s.warmup_steps is None and s.start_factor == 1.0


@pytest.mark.parametrize("old, new", [(256, 1024), (128, 8192), (64, 96)])
def test_linear_rule_comes_with_goyal_warmup(old, new):
    s = scale_lr(0.1, old, new, "linear", steps_per_epoch=37)
    k = new / old
    assert s.lr == pytest.approx(0.1 * k, rel=1e-12)
    assert s.warmup_epochs == 5.0 and s.warmup_steps == 5 * 37
    assert s.start_factor * s.lr == pytest.approx(0.1)  # the ramp starts at the old learning rate


def test_shrinking_the_batch_needs_no_warmup_and_rules_invert():
    down = scale_lr(0.4, 1024, 256, "linear", steps_per_epoch=10)
    assert down == ScaledLR(lr=pytest.approx(0.1), warmup_epochs=0.0, warmup_steps=0, start_factor=1.0)
    for rule in ("sqrt", "linear"):
        up = scale_lr(0.03, 32, 4096, rule).lr
        assert scale_lr(up, 4096, 32, rule).lr == pytest.approx(0.03, rel=1e-12)
    assert scale_lr(0.1, 64, 64, "linear").warmup_epochs == 0.0


def test_warmup_override_and_lr_scheduler_use():
    s = scale_lr(0.1, 256, 1024, "sqrt", steps_per_epoch=10, warmup_epochs=2)
    assert (s.warmup_epochs, s.warmup_steps, s.start_factor) == (2.0, 20, pytest.approx(0.5))
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=s.lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=s.start_factor, total_iters=s.warmup_steps)
    assert sched.get_last_lr()[0] == pytest.approx(0.1)
    for _ in range(s.warmup_steps):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.2)


def test_docstring_cites_the_sources():
    doc = scale_lr.__doc__
    assert "Krizhevsky" in doc and "2014" in doc and "Goyal" in doc and "2017" in doc


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0.1, 256, 1024, "cube"), {}, "rule must be one of"),
        ((0.1, 0, 1024), {}, "batch_size must be a positive integer"),
        ((0.1, 256, 10.5), {}, "new_batch_size must be a positive integer"),
        ((-0.1, 256, 1024), {}, "lr must be a finite number > 0"),
        ((0.1, 256, 1024), {"steps_per_epoch": 0}, "steps_per_epoch"),
        ((0.1, 256, 1024), {"warmup_epochs": -1.0}, "warmup_epochs"),
    ],
)
def test_scale_lr_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scale_lr(*args, **kwargs)


def test_exported_from_the_package():
    assert fusedclr.scale_lr is scale_lr and fusedclr.sweep is sweep


# --------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------


def test_evaluate_weights_by_batch_size_and_counts_hits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    target = torch.tensor([0, 0, 0, 1, 1])
    loader = [(logits[:2], target[:2]), (logits[2:], target[2:])]  # uneven batches
    loss, acc = evaluate(nn.Identity(), loader, nn.functional.cross_entropy)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, target).item(), rel=1e-6)
    assert acc == pytest.approx(3 / 5)
    _, no_acc = evaluate(nn.Identity(), [(torch.randn(4, 1), torch.randn(4, 1))], nn.functional.mse_loss)
    assert no_acc is None
    with pytest.raises(ValueError, match="empty"):
        evaluate(nn.Identity(), [], nn.functional.mse_loss)


def test_train_epoch_returns_the_mean_batch_loss_and_steps_the_scheduler():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(5)]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the losses are those of the initial model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    with torch.no_grad():
        expected = sum(nn.functional.cross_entropy(model(x), y).item() for x, y in data) / 5
    assert train_epoch(model, data, nn.functional.cross_entropy, opt, sched) == pytest.approx(expected, rel=1e-6)
    assert sched.last_epoch == 5


# --------------------------------------------------------------------------
# Paired comparisons (the demo's verdict)
# --------------------------------------------------------------------------


def test_paired_difference_is_the_t_interval_of_the_seed_differences():
    # Differences 1, 1, 1, 1, 0.5: mean 0.9, sample sd sqrt(0.05), standard error 0.1;
    # Student's t for 4 degrees of freedom at 97.5% is 2.776445.
    d = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 1.0, 2.0, 3.0, 4.5])
    assert (d.mean, d.n) == (pytest.approx(0.9), 5)
    assert d.se == pytest.approx(0.1)
    assert (d.low, d.high) == (pytest.approx(0.9 - 0.2776445), pytest.approx(0.9 + 0.2776445))
    assert d.clear and "± 0.10" in str(d) and "5 paired seeds" in str(d)


def test_pairing_sees_a_steady_gain_that_the_spread_hides_and_noise_is_not_a_win():
    seeds = [96.0, 97.5, 98.0, 96.8, 97.2]  # seed-to-seed spread ±0.8
    steady = paired_difference([s + 0.3 + 0.05 * (-1) ** i for i, s in enumerate(seeds)], seeds)
    assert steady.clear and steady.mean > 0
    # The tie: +0.18 points on average, differences of both signs.
    tie = paired_difference([97.1, 97.8, 96.9, 98.0, 97.3], [97.3, 97.2, 97.0, 97.5, 97.2])
    assert tie.mean == pytest.approx(0.18) and not tie.clear and tie.low < 0 < tie.high
    one = paired_difference([97.0], [96.0])
    assert not one.clear and math.isnan(one.se) and "no noise estimate" in str(one)
    with pytest.raises(ValueError, match="paired seed by seed"):
        paired_difference([1.0, 2.0], [1.0])


def test_demo_verdict_names_a_winner_only_beyond_the_noise():
    from fusedclr.demo import _verdict

    assert _verdict(paired_difference([2.0, 3.0, 4.0], [1.0, 2.1, 2.9])) == "one-cycle is better"
    assert _verdict(paired_difference([1.0, 2.1, 2.9], [2.0, 3.0, 4.0])) == "constant lr is better"
    assert _verdict(paired_difference([97.1, 97.8, 96.9, 98.0, 97.3], [97.3, 97.2, 97.0, 97.5, 97.2])) == \
        "no clear difference"
    assert _verdict(paired_difference([97.0], [96.0])).startswith("no verdict from one seed")


def test_demo_training_curves_log_losses_and_hold_every_seed(tmp_path):
    from fusedclr.demo import Run, _plot_curves

    def run(name, seed, acc):
        return Run(name, seed, 0.1, train_loss=[1.0, 0.05, 0.004], val_loss=[0.9, 0.2, 0.08], val_accuracy=acc)

    runs = {"one-cycle": [run("one-cycle", 0, [0.80, 0.95, 0.97]), run("one-cycle", 1, [0.60, 0.96, 0.98])],
            "constant": [run("constant", 0, [0.90, 0.95, 0.96]), run("constant", 1, [0.91, 0.94, 0.97])]}
    fig = _plot_curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    train_ax, val_ax, acc_ax = fig.axes
    assert train_ax.get_yscale() == val_ax.get_yscale() == "log"
    lo, hi = acc_ax.get_ylim()
    assert lo < 60.0 and hi > 98.0  # the worst seed's first epoch (60%) and the best final one (98%)
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert any(x.startswith("one-cycle") for x in labels) and any(x.startswith("constant") for x in labels)


# --------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------


def _blobs(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = torch.arange(n) % 3
    x = centres[y] + 0.9 * torch.randn(n, 2, generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _model():
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))


def test_defaults_are_smiths_grid():
    assert DEFAULT_WEIGHT_DECAYS == (1e-3, 1e-4, 1e-5, 0.0)
    assert DEFAULT_MOMENTUMS == (0.99, 0.97, 0.95, 0.9)


def test_sweep_finds_the_peak_with_weight_decay_zero_first_at_each_momentum(monkeypatch, tmp_path):
    calls = []
    real = fusedclr.lr_finder.lr_find

    def spy(model, loader, loss_fn, optimizer, **kwargs):
        groups = [(g["weight_decay"], g["momentum"]) for g in optimizer.param_groups]
        result = real(model, loader, loss_fn, optimizer, **kwargs)
        calls.append((groups, result))
        return result

    monkeypatch.setattr(fusedclr.lr_finder, "lr_find", spy)
    train, val = _blobs(seed=0), _blobs(seed=1)
    result = sweep(_model, train, val, weight_decays=[1e-2, 0.0], momentums=[0.95, 0.5], epochs=2,
                   lr_find_kwargs={"num_iter": 40, "end_lr": 100.0}, progress=False, plot=str(tmp_path / "s.png"))
    # One range test per momentum, at weight decay 0, before any training run.
    assert [groups for groups, _ in calls] == [[(0.0, 0.95)], [(0.0, 0.5)]]
    found = {0.95: calls[0][1], 0.5: calls[1][1]}
    assert result.lr_finds == found
    # Each row trains at the one-cycle peak found with its own momentum, not at the constant-lr suggestion.
    assert result.max_lrs == {m: f.peak for m, f in found.items()}
    assert all(f.peak > f.suggestion for f in found.values())
    assert found[0.5].peak > found[0.95].peak  # less momentum, smaller steps: a higher peak
    assert [(r.weight_decay, r.momentum) for r in result.rows] == [(1e-2, 0.95), (1e-2, 0.5), (0.0, 0.95), (0.0, 0.5)]
    assert all(r.max_lr == found[r.momentum].peak for r in result.rows)
    assert all(r.val_accuracy is not None and 0 <= r.val_accuracy <= 1 for r in result.rows)
    assert min(r.val_accuracy for r in result.rows) > 0.6  # the blobs are easy: training happened
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    best, table = result.best(), result.table()
    assert best in result.rows and "<- best val_loss" in table
    assert (f"one-cycle peak of a range test run first, at weight decay 0, with each row's momentum: "
            f"{found[0.95].peak:.3g} at momentum 0.95, {found[0.5].peak:.3g} at momentum 0.5") in table
    picked = (f"picked: weight decay {best.weight_decay:g}, momentum {best.momentum:g} -> "
              f"{best.momentum - 0.1:g} -> {best.momentum:g} over the cycle, peak lr {best.max_lr:.3g}: "
              f"the lowest validation loss, {best.val_loss:.4f} (next: ")
    assert table.splitlines()[-1].startswith(picked)
    assert json.loads(json.dumps(result.to_dict()))["picked"] == table.splitlines()[-1]


def test_each_sweep_row_is_a_reproducible_one_cycle_run():
    """A row equals a hand-written one-cycle training with the same seed, grid point and max_lr."""
    train, val = _blobs(seed=0), _blobs(seed=1)
    wds, moms, max_lr, epochs = [1e-1, 0.0], [0.9, 0.8], 0.3, 3
    result = sweep(_model, train, val, weight_decays=wds, momentums=moms, max_lr=max_lr, epochs=epochs,
                   seed=4, progress=False)
    assert result.lr_finds == {} and result.max_lrs == {0.9: 0.3, 0.8: 0.3}
    assert "max_lr=0.3 for every run, given by the caller" in result.table()
    SGD, _, OneCycleLR, _ = optimizer_classes()
    for row in result.rows:
        torch.manual_seed(4)
        model = _model()
        opt = SGD(model.parameters(), lr=max_lr, momentum=row.momentum, weight_decay=row.weight_decay)
        sched = OneCycleLR(opt, max_lr=max_lr, epochs=epochs, steps_per_epoch=len(train),
                           base_momentum=row.momentum - 0.1, max_momentum=row.momentum)
        for _ in range(epochs):
            train_epoch(model, train, nn.functional.cross_entropy, opt, sched)
        assert (row.val_loss, row.val_accuracy) == evaluate(model, val, nn.functional.cross_entropy)
    by = {(r.weight_decay, r.momentum): r.val_loss for r in result.rows}
    assert len(set(by.values())) == 4  # every hyperparameter reached the training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"weight_decays": [-1.0]}, "weight_decays"),
        ({"momentums": [1.0]}, "momentums"),
        ({"momentums": [0.05], "momentum_span": 0.1}, "momentum_span"),
        ({"max_lr": -1.0}, "max_lr"),
    ],
)
def test_sweep_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep(_model, _blobs(), _blobs(), progress=False, **{"max_lr": 0.1, **kwargs})


def test_sweep_checks_what_it_was_given_before_training(monkeypatch, tmp_path):
    """Each mistake is reported before the first range test or run, so it costs no training."""
    import fusedclr.tuning as tuning

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking its arguments")

    monkeypatch.setattr(tuning, "train_epoch", no_training)
    monkeypatch.setattr("fusedclr.lr_finder.lr_find", no_training)
    base = {"progress": False, "weight_decays": [0.0], "momentums": [0.9]}
    with pytest.raises(ValueError, match="val_loader is None"):
        sweep(_model, _blobs(), None, **base)
    with pytest.raises(ValueError, match="val_loader is empty"):
        sweep(_model, _blobs(), [], **base)
    with pytest.raises(TypeError, match="model_fn must be a function .* got Sequential"):
        sweep(_model(), _blobs(), _blobs(), **base)
    with pytest.raises(ValueError, match=r"weight_decays must be a list of numbers, got 0.0001 \(e.g. \[0.0001\]\)"):
        sweep(_model, _blobs(), _blobs(), **{**base, "weight_decays": 1e-4})
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        sweep(_model, _blobs(), _blobs(), plot=str(tmp_path / "file" / "sweep.png"), **base)


def test_numpy_scalars_are_numbers():
    """np.float32 / np.int64 (what a grid from numpy holds) pass as the Python numbers they stand for."""
    np = pytest.importorskip("numpy")
    from fusedclr import scale_lr

    assert scale_lr(np.float32(0.1), np.int64(64), np.int64(256)) == scale_lr(float(np.float32(0.1)), 64, 256)
    model, batches = _model(), _blobs()
    result = fusedclr.lr_find(model, batches, nn.functional.cross_entropy, num_iter=np.int64(12),
                              start_lr=np.float64(1e-4), end_lr=np.float32(10.0), progress=False)
    assert len(result.lrs) <= 12 and type(result.lrs[0]) is float
    json.dumps(result.to_dict())


def test_sweep_stopped_midway_keeps_the_finished_runs(monkeypatch, capsys):
    """An error (or Ctrl-C) in the third of four runs: the two finished rows are on the exception and printed."""
    import fusedclr.tuning as tuning

    monkeypatch.setattr(tuning, "evaluate", interrupt_on_call(tuning.evaluate, 3))
    with pytest.raises(KeyboardInterrupt) as exc:
        sweep(_model, _blobs(), _blobs(), weight_decays=[1e-3, 0.0], momentums=[0.9, 0.5], max_lr=0.1,
              epochs=1, progress=False)
    partial = exc.value.partial_result
    assert [(r.weight_decay, r.momentum) for r in partial.rows] == [(1e-3, 0.9), (1e-3, 0.5)]
    assert all(math.isfinite(r.val_loss) for r in partial.rows)
    err = capsys.readouterr().err
    assert "sweep stopped after 2 of 4 runs (KeyboardInterrupt)" in err and partial.table() in err


def test_sweep_rejects_an_empty_train_loader():
    with pytest.raises(ValueError, match="train_loader is empty"):
        sweep(_model, [], _blobs(), max_lr=0.1, progress=False)
