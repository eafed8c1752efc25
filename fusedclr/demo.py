"""``fusedclr demo``: the tuning workflow end to end on real data, offline.

On scikit-learn's handwritten digits (1797 8x8 images that ship with the
package, no download):

1. an LR range test (:func:`fusedclr.lr_find`) gives two learning rates: the
   one-cycle peak (``result.peak``) and the constant-lr ``suggestion``;
2. a small MLP trains for the same number of epochs with the one-cycle policy
   at its peak (``OneCycleLR(opt, **result.one_cycle(...))``) and with a
   constant learning rate at the suggestion, on the same seeds; the accuracy
   and time of both are printed as measured, and the verdict calls a
   difference only when it exceeds its noise (paired seeds, a 95% t interval);
3. plots of the range test, the schedules and the training curves of both
   arms go to the output folder;
4. :func:`step_time_table` times one optimizer step of ``fusedclr.AdamW``
   against ``torch.optim.AdamW(fused=True)`` on CPU for a few model-shaped
   parameter lists.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusedclr.bench.shapes import SHAPES

__all__ = ["DEFAULT_OUT", "digits_data", "digits_model", "model_shapes", "run_demo", "step_time_table"]

DEFAULT_OUT = "fusedclr-out"
WEIGHT_DECAY = 5e-4
CONSTANT_MOMENTUM = 0.9


# --------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------


def digits_data(seed: int = 0, val_fraction: float = 0.25):
    """``(train, val)`` TensorDatasets of sklearn's digits, standardised with the training split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std < 1e-3] = 1.0  # border pixels that are always 0 in the training split

    def to_ds(xs, ys):
        xs = torch.tensor((xs - mean) / std, dtype=torch.float32)
        return torch.utils.data.TensorDataset(xs, torch.tensor(ys, dtype=torch.long))

    return to_ds(x_tr, y_tr), to_ds(x_va, y_va)


def digits_model(seed: int = 0, hidden: int = 128) -> nn.Module:
    """A small MLP with BatchNorm (so the range test has running statistics to restore)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def _loader(ds, batch_size: int, seed: int, shuffle: bool = True):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       drop_last=shuffle)


# --------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------


@dataclass
class Run:
    schedule: str
    seed: int
    lr: float
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    momentums: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _train(schedule: str, lr: float, epochs: int, seed: int, train_ds, val_ds, batch_size: int,
           one_cycle: dict[str, Any] | None = None) -> Run:
    from fusedclr.tuning import evaluate, optimizer_classes, train_epoch

    SGD, _, OneCycleLR, _ = optimizer_classes()
    model = digits_model(seed)
    train = _loader(train_ds, batch_size, seed + 1000)
    val = _loader(val_ds, 512, 0, shuffle=False)
    opt = SGD(model.parameters(), lr=lr, momentum=CONSTANT_MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = None
    if one_cycle is not None:
        # The range test's recommendation: peak, warm-up from peak/25, momentum 0.95 -> 0.85 -> 0.95.
        sched = OneCycleLR(opt, **{**one_cycle, "max_lr": lr}, epochs=epochs, steps_per_epoch=len(train))
    run = Run(schedule, seed, lr)
    group = opt.param_groups[0]

    def record() -> None:
        run.lrs.append(float(group["lr"]))
        run.momentums.append(float(group["momentum"]))

    # Values used by each step: the initial ones, then the scheduler's after every step but the last.
    record()
    for _ in range(epochs):
        t0 = time.perf_counter()
        loss = train_epoch(model, train, nn.functional.cross_entropy, opt, sched, on_step=record)
        run.seconds += time.perf_counter() - t0
        val_loss, val_acc = evaluate(model, val, nn.functional.cross_entropy)
        run.train_loss.append(loss)
        run.val_loss.append(val_loss)
        run.val_accuracy.append(val_acc)
    del run.lrs[-1], run.momentums[-1]
    return run


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_schedules(one_cycle: Run, constant: Run, steps_per_epoch: int, path: Path) -> None:
    fig = _figure((8, 4.6))
    ax_lr, ax_m = fig.subplots(2, 1, sharex=True)
    epochs = [i / steps_per_epoch for i in range(len(one_cycle.lrs))]
    ax_lr.plot(epochs, one_cycle.lrs, color="tab:red", label=f"one-cycle, peak {one_cycle.lr:.2g} (range test's peak)")
    ax_lr.plot(epochs, constant.lrs, color="tab:blue", ls="--", label=f"constant {constant.lr:.2g} (its suggestion)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend(fontsize=8)
    ax_lr.grid(True, alpha=0.3)
    ax_m.plot(epochs, one_cycle.momentums, color="tab:red", label="one-cycle (cyclical momentum)")
    ax_m.plot(epochs, constant.momentums, color="tab:blue", ls="--", label="constant")
    ax_m.set_ylabel("momentum")
    ax_m.set_xlabel("epoch")
    ax_m.legend(fontsize=8)
    ax_m.grid(True, alpha=0.3)
    fig.suptitle("Schedules: learning rate up while momentum goes down, then back", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _plot_curves(runs: dict[str, list[Run]], path: Path):
    fig = _figure((11, 3.8))
    axes = fig.subplots(1, 3)
    colors = {"one-cycle": "tab:red", "constant": "tab:blue"}
    for name, group in runs.items():
        epochs = range(1, len(group[0].val_loss) + 1)
        for ax, key, scale in ((axes[0], "train_loss", 1), (axes[1], "val_loss", 1), (axes[2], "val_accuracy", 100)):
            per_epoch = list(zip(*[[scale * v for v in getattr(r, key)] for r in group]))
            mean = [statistics.fmean(v) for v in per_epoch]
            ax.plot(epochs, mean, color=colors[name], marker="o", ms=3,
                    label=f"{name}, lr {group[0].lr:.2g} (mean of {len(group)})")
            if len(group) > 1:
                ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                                color=colors[name], alpha=0.15)
    for ax, title in zip(axes, ("training loss (log scale)", "validation loss (log scale)", "validation accuracy (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:2]:
        # Late epochs differ by factors, not by absolute amounts: a linear axis flattens them to zero.
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper right")
    # Every seed's accuracy inside the axis (the band is min..max over seeds), from the worst epoch shown.
    lowest = min(100 * v for group in runs.values() for r in group for v in r.val_accuracy)
    highest = max(100 * v for group in runs.values() for r in group for v in r.val_accuracy)
    margin = max(0.5, 0.05 * (highest - lowest))
    axes[2].set_ylim(max(0.0, lowest - margin), min(100.0, highest) + margin)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle("Training curves on sklearn digits: one-cycle at the range test's peak vs constant lr at its "
                 "suggestion (band: min..max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return fig


# --------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------


def _verdict(diff) -> str:
    """Name a winner only when the paired interval excludes 0 [fusedclr.tuning.paired_difference]."""
    if diff.n < 2:
        return "no verdict from one seed (no noise estimate; run --seeds 3 or more)"
    if not diff.clear:
        return "no clear difference"
    return "one-cycle is better" if diff.mean > 0 else "constant lr is better"


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def run_demo(
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    epochs: int = 8,
    seeds: int = 5,
    batch_size: int = 64,
    num_iter: int = 100,
    step_time: bool = True,
    quick: bool = False,
    threads: int | None = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo, print its tables, write plots and ``results.json`` to ``out``; return the results.

    ``threads`` sets torch's intra-op threads for the range test and the
    trainings (the tiny MLP runs faster on one thread than on two); the
    step-time table uses torch's default. ``quick`` is for tests: 2 epochs,
    1 seed, a 40-step range test and a small step-time table.
    """
    from fusedclr.lr_finder import lr_find
    from fusedclr.tuning import optimizer_classes, paired_difference

    if quick:
        epochs, seeds, num_iter = min(epochs, 2), 1, min(num_iter, 40)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    SGD, _, _, backend = optimizer_classes()
    t_start = time.perf_counter()
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        train_ds, val_ds = digits_data()
        echo(f"fusedclr demo: sklearn digits, {len(train_ds)} train / {len(val_ds)} validation images, "
             f"batch {batch_size}, optimizers from {backend}, {torch.get_num_threads()} torch thread(s)")

        # 1. Range test with weight decay 0 (Smith: find the LR first, tune weight decay after).
        model = digits_model(0)
        opt = SGD(model.parameters(), lr=1e-7, momentum=CONSTANT_MOMENTUM, weight_decay=0.0)
        finder = lr_find(model, _loader(train_ds, batch_size, 0), nn.functional.cross_entropy, opt,
                         num_iter=num_iter, progress=progress)
        echo("\n" + finder.summary())
        if finder.suggestion is None or finder.peak is None:
            raise RuntimeError("the range test suggested no learning rate; see the warnings above")
        finder.plot(out / "lr_find.png", title=f"LR range test on digits: constant lr {finder.suggestion:.3g}, "
                    f"one-cycle peak {finder.peak:.3g}")
        lrs = {"one-cycle": finder.peak, "constant": finder.suggestion}
        cycle = finder.one_cycle()

        # 2. Same epochs, same seeds: one-cycle at the peak vs constant at the suggestion.
        runs: dict[str, list[Run]] = {"one-cycle": [], "constant": []}
        for seed in range(seeds):
            for name in runs:
                runs[name].append(_train(name, lrs[name], epochs, seed, train_ds, val_ds, batch_size,
                                         cycle if name == "one-cycle" else None))
    finally:
        torch.set_num_threads(saved_threads)

    steps_per_epoch = len(runs["one-cycle"][0].lrs) // epochs
    momentum_txt = (f"momentum {cycle['max_momentum']:g} -> {cycle['base_momentum']:g} -> {cycle['max_momentum']:g}"
                    if cycle.get("cycle_momentum") else f"momentum {CONSTANT_MOMENTUM:g}")
    echo(f"\nTraining: SGD, weight decay {WEIGHT_DECAY:g}, {epochs} epochs x {steps_per_epoch} steps, "
         f"{seeds} seed(s); one-cycle peaks at the range test's one-cycle peak lr={lrs['one-cycle']:.3g} "
         f"(from lr/{cycle['div_factor']:g}, {momentum_txt}), constant stays at the suggestion "
         f"lr={lrs['constant']:.3g} (momentum {CONSTANT_MOMENTUM:g})")
    header = f"{'schedule':<10} {'val acc % (final)':>18} {'best epoch acc %':>17} {'val loss':>13} {'train s/run':>12}"
    echo(header)
    echo("-" * len(header))
    summary = {}
    for name, group in runs.items():
        final_acc = [100 * r.val_accuracy[-1] for r in group]
        best_acc = [100 * max(r.val_accuracy) for r in group]
        final_loss = [r.val_loss[-1] for r in group]
        secs = [r.seconds for r in group]
        summary[name] = {
            "val_accuracy_final": final_acc, "val_accuracy_best_epoch": best_acc,
            "val_loss_final": final_loss, "train_seconds": secs,
        }
        loss_txt = f"{statistics.fmean(final_loss):.4f}"
        echo(f"{name:<10} {_mean_sd(final_acc):>18} {_mean_sd(best_acc):>17} {loss_txt:>13} "
             f"{statistics.fmean(secs):>12.2f}")
    diff = paired_difference(summary["one-cycle"]["val_accuracy_final"], summary["constant"]["val_accuracy_final"])
    verdict = _verdict(diff)
    echo(f"=> verdict: {verdict}. One-cycle minus constant, final accuracy: {diff} points"
         + (f"; the ± in the table is the standard deviation over {seeds} seeds" if seeds > 1 else ""))

    _plot_schedules(runs["one-cycle"][0], runs["constant"][0], steps_per_epoch, out / "schedules.png")
    _plot_curves(runs, out / "training_curves.png")
    results: dict[str, Any] = {
        "lr_find": finder.to_dict(),
        "one_cycle_peak": lrs["one-cycle"],
        "constant_lr": lrs["constant"],
        "one_cycle": cycle,
        "verdict": verdict,
        "difference": diff._asdict(),
        "epochs": epochs,
        "seeds": seeds,
        "batch_size": batch_size,
        "optimizers": backend,
        "summary": summary,
        "runs": {name: [asdict(r) for r in group] for name, group in runs.items()},
        "demo_seconds": time.perf_counter() - t_start,
    }
    echo(f"\nplots: {out / 'lr_find.png'}, {out / 'schedules.png'}, {out / 'training_curves.png'}")

    if step_time:
        echo("")
        results["step_time"] = step_time_table(quick=quick, echo=echo)
    results["demo_seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    echo(f"\nresults: {out / 'results.json'} (demo took {results['demo_seconds']:.1f} s)")
    return results


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------
# Step time: fusedclr.AdamW vs torch.optim.AdamW(fused=True)
# --------------------------------------------------------------------------


def model_shapes(quick: bool = False) -> dict[str, list[tuple[int, ...]]]:
    """Model-like parameter lists, built from shapes (nothing is downloaded)."""
    mlp = [tuple(p.shape) for p in digits_model(0).parameters()]
    if quick:
        return {"digits MLP (this demo)": mlp, "500 x 64 (many small tensors)": [(64,)] * 500}
    return {
        "digits MLP (this demo)": mlp,
        "10000 x 64 (many small tensors)": SHAPES["10000x64"],
        "ResNet-50-like": SHAPES["resnet50"],
    }


def _time_steps(opts: Sequence[torch.optim.Optimizer], reps: int | None, warmup: int,
                budget_s: float) -> tuple[list[float], int]:
    """Median seconds per ``step()`` of each optimizer, measured interleaved so load drift hits both.

    Without ``reps``, as many rounds as fit in ``budget_s`` (3 to 50).
    """
    for _ in range(warmup):
        for o in opts:
            o.step()
    if reps is None:
        t0 = time.perf_counter()
        for o in opts:
            o.step()
        reps = max(3, min(50, int(budget_s / max(time.perf_counter() - t0, 1e-9))))
    samples: list[list[float]] = [[] for _ in opts]
    for _ in range(reps):
        for o, s in zip(opts, samples):
            t0 = time.perf_counter()
            o.step()
            s.append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples], reps


def _adamw_pair(shapes: Sequence[tuple[int, ...]], fused_cls: type | None) -> list[torch.optim.Optimizer]:
    """torch's fused AdamW and (when available) fusedclr's over equal parameters and gradients."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    p_torch = [v.clone().requires_grad_() for v in values]
    for p, g in zip(p_torch, grads):
        p.grad = g.clone()
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(p_torch, lr=1e-3, weight_decay=1e-2, fused=True)]
    if fused_cls is not None:
        p_fused = [v.clone().requires_grad_() for v in values]
        opts.append(fused_cls(p_fused, lr=1e-3, weight_decay=1e-2))
        for p, g in zip(p_fused, grads):
            p.grad = g.clone()
    return opts


def step_time_table(
    cases: dict[str, list[tuple[int, ...]]] | None = None,
    *,
    quick: bool = False,
    threads: Sequence[int] | None = None,
    reps: int | None = None,
    warmup: int = 1,
    budget_s: float = 1.0,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time one AdamW step, ``fusedclr.AdamW`` vs ``torch.optim.AdamW(fused=True)``, on CPU, side by side.

    Both optimizers get the same parameters and gradients (fp32, lr 1e-3,
    weight decay 1e-2) and are stepped alternately; each number is the median
    over ``reps`` steps (by default as many as fit in ``budget_s``, 3 to 50)
    after ``warmup`` steps, at each torch thread count in ``threads`` (default:
    1 and torch's default). One thread is the column to trust on a busy
    machine: with more threads than free cores, every parallel region can
    wait for a descheduled thread, which punishes whoever opens more regions.

    Returns one dict per (case, thread count); ``fusedclr_ms`` is ``None``
    when fusedclr's AdamW is unavailable.
    """
    cases = cases or model_shapes(quick)
    default_threads = torch.get_num_threads()
    threads = list(threads) if threads is not None else sorted({1, default_threads})
    try:
        from fusedclr import AdamW as FusedAdamW
        from fusedclr import extension_available

        missing = None if extension_available() else "the compiled extension is missing: reference backend"
    except ImportError as exc:
        FusedAdamW, missing = None, f"fusedclr.AdamW unavailable ({exc})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    echo(f"Optimizer step time on CPU, fusedclr.AdamW vs torch.optim.AdamW(fused=True): median ms per step, "
         f"stepped alternately (load average {load:.1f} on {os.cpu_count()} cores)")
    if load > (os.cpu_count() or 1):
        echo("note: the machine is busy: timings are noisy, the 1-thread columns least so")
    if missing:
        echo(f"note: {missing}")
    header = f"{'parameters':<32} {'tensors':>7} {'elements':>11}"
    for t in threads:
        header += f" | {f'torch {t}t':>10} {f'fusedclr {t}t':>11} {'speedup':>7}"
    echo(header)
    echo("-" * len(header))
    rows = []
    try:
        for name, shapes in cases.items():
            numel = sum(math.prod(s) for s in shapes)
            opts = _adamw_pair(shapes, FusedAdamW)
            line = f"{name:<32} {len(shapes):>7} {numel:>11,}"
            for t in threads:
                torch.set_num_threads(t)
                times, n_reps = _time_steps(opts, reps, warmup, budget_s / 4 if quick else budget_s)
                t_torch = times[0] * 1e3
                t_fused = times[1] * 1e3 if len(times) > 1 else None
                speedup = None if t_fused is None else t_torch / t_fused
                rows.append({"parameters": name, "tensors": len(shapes), "elements": numel, "threads": t,
                             "torch_fused_ms": t_torch, "fusedclr_ms": t_fused, "speedup": speedup, "reps": n_reps})
                fused_txt = "n/a" if t_fused is None else f"{t_fused:.3f}"
                speed_txt = "n/a" if speedup is None else f"{speedup:.2f}x"
                line += f" | {t_torch:>10.3f} {fused_txt:>11} {speed_txt:>7}"
            echo(line)
            del opts
    finally:
        torch.set_num_threads(default_threads)
    echo("speedup = torch fused time / fusedclr time (>1: fusedclr is faster); Nt = N torch threads. "
         "'fusedclr bench' adds GPT-2-small and DESIGN.md's shapes with GB/s")
    return rows
