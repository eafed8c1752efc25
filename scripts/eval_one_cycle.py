"""Does the range test's one-cycle peak win? An offline evaluation on three tasks.

For each task and seed, a range test (weight decay 0, SGD momentum 0.9, 100
iterations) gives the constant-lr ``suggestion`` and the one-cycle ``peak``
(docs/tuning.md, "The one-cycle peak"). Then every arm trains a fresh model
from the same initial weights, on the same split and batch order, for the
same number of epochs, with SGD and the task's weight decay:

* one-cycle, ``OneCycleLR(opt, **result.one_cycle(...))``, at the peak and at
  GRID x the peak (the whole cycle scaled, momentum 0.95 -> 0.85 -> 0.95);
* constant lr (momentum 0.9) at the suggestion and at GRID x the peak.

It prints mean ± standard deviation of the final validation accuracy and loss
per arm, and two verdicts per task, both on paired seeds with a 95% t interval
(``fusedclr.tuning.paired_difference``): one-cycle at the peak against the
best constant lr (the arm with the best mean, picked after the fact, which
favours the constant side), and against the best one-cycle of the grid.

    python scripts/eval_one_cycle.py [--seeds 5] [--plot docs/img/eval_one_cycle.png]
                                     [--json out.json] [--markdown out.md] [--tasks digits-mlp ...]

Runs on one CPU thread: 6 to 8 minutes on a busy shared 2-core VM, about 3 when it is idle.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Run as a script from a checkout: import this checkout's fusedclr, not an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusedclr.demo import digits_data, digits_model  # noqa: E402
from fusedclr.lr_finder import lr_find  # noqa: E402
from fusedclr.tuning import evaluate, optimizer_classes, paired_difference, train_epoch  # noqa: E402

GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
MOMENTUM = 0.9
BATCH = 64
RANGE_TEST_ITERS = 100


# --------------------------------------------------------------------------
# Tasks: data (per seed: split) and a model (per seed: initial weights)
# --------------------------------------------------------------------------


def _digits_images(seed: int):
    train, val = digits_data(seed)
    as_images = lambda ds: torch.utils.data.TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1])  # noqa: E731
    return as_images(train), as_images(val)


def _digits_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def _tabular(seed: int):
    """scikit-learn's make_classification: 5 classes, 20 features (12 informative), 2% flipped labels.

    The data set is fixed; each seed draws its own 75/25 split.
    """
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=4000, n_features=20, n_informative=12, n_redundant=4, n_classes=5,
                               n_clusters_per_class=2, class_sep=1.0, flip_y=0.02, random_state=0)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)

    def to_ds(xs, ys):
        return torch.utils.data.TensorDataset(torch.tensor((xs - mean) / std, dtype=torch.float32),
                                              torch.tensor(ys, dtype=torch.long))

    return to_ds(x_tr, y_tr), to_ds(x_va, y_va)


def _tabular_mlp(seed: int) -> nn.Module:
    # No BatchNorm, unlike the digits models: a plain ReLU MLP.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5))


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    data: Callable
    model: Callable[[int], nn.Module]
    epochs: int
    weight_decay: float


TASKS = {
    t.name: t
    for t in (
        Task("digits-mlp", "sklearn digits, MLP 64-128-128-10 with BatchNorm (the demo's)", digits_data,
             digits_model, 8, 5e-4),
        Task("digits-cnn", "sklearn digits as 1x8x8 images, 2 conv layers with BatchNorm + linear", _digits_images,
             _digits_cnn, 8, 5e-4),
        Task("tabular-mlp", "sklearn make_classification (4000 x 20, 5 classes), MLP 20-128-128-5, no BatchNorm",
             _tabular, _tabular_mlp, 8, 5e-4),
    )
}


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


def _loader(ds, seed: int, shuffle: bool = True):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH if shuffle else 1024, shuffle=shuffle, generator=gen,
                                       drop_last=shuffle)


def _train(task: Task, seed: int, train_ds, val_ds, lr: float, one_cycle: dict | None) -> tuple[float, float, float]:
    """Final (validation accuracy %, validation loss, training-set loss) of one run."""
    SGD, _, OneCycleLR, _ = optimizer_classes()
    model = task.model(seed)
    train = _loader(train_ds, seed + 1000)
    opt = SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=task.weight_decay)
    sched = None
    if one_cycle is not None:
        sched = OneCycleLR(opt, **{**one_cycle, "max_lr": lr}, epochs=task.epochs, steps_per_epoch=len(train))
    for _ in range(task.epochs):
        train_epoch(model, train, nn.functional.cross_entropy, opt, sched)
    loss, acc = evaluate(model, _loader(val_ds, 0, shuffle=False), nn.functional.cross_entropy)
    # The training set's loss in eval mode: did the run fit the data, or is it held back by lr noise?
    fit, _ = evaluate(model, _loader(train_ds, 0, shuffle=False), nn.functional.cross_entropy)
    return 100.0 * acc, loss, fit


def run_task(task: Task, seeds: int, echo=print) -> dict:
    SGD, *_ = optimizer_classes()
    arms: dict[str, dict[str, list[float]]] = {}

    def record(arm: str, acc: float, loss: float, fit: float, lr: float) -> None:
        entry = arms.setdefault(arm, {"acc": [], "loss": [], "train_loss": [], "lr": []})
        entry["acc"].append(acc)
        entry["loss"].append(loss)
        entry["train_loss"].append(fit)
        entry["lr"].append(lr)

    finders = []
    t0 = time.perf_counter()
    for seed in range(seeds):
        train_ds, val_ds = task.data(seed)
        model = task.model(seed)
        opt = SGD(model.parameters(), lr=1e-7, momentum=MOMENTUM, weight_decay=0.0)
        found = lr_find(model, _loader(train_ds, seed), nn.functional.cross_entropy, opt,
                        num_iter=RANGE_TEST_ITERS, progress=False)
        if found.peak is None:
            raise RuntimeError(f"{task.name} seed {seed}: the range test gave no peak:\n{found.summary()}")
        finders.append({"suggestion": found.suggestion, "peak": found.peak, "max_lr": found.max_lr,
                        "loss_rose": found.loss_rose, "warnings": found.warnings,
                        "diverged_at": found.lrs[-1] if found.stop_reason != "completed" else None})
        cycle = found.one_cycle()
        for m in GRID:
            record(f"one-cycle {m:g}x", *_train(task, seed, train_ds, val_ds, m * found.peak, cycle), m * found.peak)
            record(f"constant {m:g}x", *_train(task, seed, train_ds, val_ds, m * found.peak, None), m * found.peak)
        record("constant @suggestion", *_train(task, seed, train_ds, val_ds, found.suggestion, None), found.suggestion)
        echo(f"  {task.name} seed {seed}: peak {found.peak:.3g}, suggestion {found.suggestion:.3g}, "
             f"one-cycle@peak {arms['one-cycle 1x']['acc'][-1]:.2f}%  ({time.perf_counter() - t0:.0f} s)")
    return {"task": task.name, "description": task.description, "epochs": task.epochs,
            "weight_decay": task.weight_decay, "seeds": seeds, "finders": finders, "arms": arms,
            "seconds": time.perf_counter() - t0}


def verdicts(result: dict) -> dict:
    arms = result["arms"]
    at_peak = arms["one-cycle 1x"]["acc"]
    constants = [a for a in arms if a.startswith("constant")]
    one_cycles = [a for a in arms if a.startswith("one-cycle")]
    best_const = max(constants, key=lambda a: statistics.fmean(arms[a]["acc"]))
    best_oc = max(one_cycles, key=lambda a: statistics.fmean(arms[a]["acc"]))
    vs_const = paired_difference(at_peak, arms[best_const]["acc"])
    vs_oc = paired_difference(at_peak, arms[best_oc]["acc"])
    return {
        "best_constant": best_const, "vs_best_constant": vs_const._asdict(),
        "beats_best_constant": vs_const.clear and vs_const.mean > 0,
        "loses_to_best_constant": vs_const.clear and vs_const.mean < 0,
        "best_one_cycle": best_oc, "vs_best_one_cycle": vs_oc._asdict(),
        "within_noise_of_best_one_cycle": best_oc == "one-cycle 1x" or not vs_oc.clear,
        "text_vs_constant": str(vs_const), "text_vs_one_cycle": str(vs_oc),
    }


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


def _ms(values: list[float], digits: int = 2) -> str:
    if any(not math.isfinite(v) for v in values):
        return "diverged (NaN)"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(results: list[dict]) -> str:
    names = list(results[0]["arms"])
    order = ["one-cycle 1x"] + [n for n in names if n.startswith("one-cycle") and n != "one-cycle 1x"] + \
        ["constant @suggestion"] + [n for n in names if n.startswith("constant ") and n != "constant @suggestion"]
    lines = ["| arm (lr) | " + " | ".join(f"{r['task']} acc % | loss" for r in results) + " |",
             "|---|" + "---|---|" * len(results)]
    for arm in order:
        label = arm.replace("1x", "1x = peak") if arm == "one-cycle 1x" else arm
        label = label.replace("x", "x peak") if label.endswith("x") else label
        cells = [f"{_ms(r['arms'][arm]['acc'])} | {_ms(r['arms'][arm]['loss'], 3)}" for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        v = r["verdicts"]
        f = r["finders"]
        lines.append(
            f"- **{r['task']}** ({r['description']}; {r['epochs']} epochs, weight decay {r['weight_decay']:g}, "
            f"{r['seeds']} seeds): peak {statistics.fmean(x['peak'] for x in f):.3g} "
            f"(range {min(x['peak'] for x in f):.3g}..{max(x['peak'] for x in f):.3g}), suggestion "
            f"{statistics.fmean(x['suggestion'] for x in f):.3g}; final training-set loss: one-cycle at the peak "
            f"{_ms(r['arms']['one-cycle 1x']['train_loss'], 3)}, best constant "
            f"{_ms(r['arms'][v['best_constant']]['train_loss'], 3)}. One-cycle at the peak minus the best constant "
            f"({v['best_constant']}): {v['text_vs_constant']}: "
            + ("**beats it**" if v["beats_best_constant"] else
               "**the constant lr is clearly better**" if v.get("loses_to_best_constant") else
               "**no clear difference**")
            + (". It is the best one-cycle of the grid." if v["best_one_cycle"] == "one-cycle 1x" else
               f". Minus the best one-cycle ({v['best_one_cycle']}): {v['text_vs_one_cycle']}: "
               + ("within noise." if v["within_noise_of_best_one_cycle"] else "**clearly worse**."))
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(results), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, r in zip(axes, results):
        arms = r["arms"]
        for kind, color, marker in (("one-cycle", "tab:red", "o"), ("constant", "tab:blue", "s")):
            means = [statistics.fmean(arms[f"{kind} {m:g}x"]["acc"]) for m in GRID]
            sds = [statistics.stdev(arms[f"{kind} {m:g}x"]["acc"]) for m in GRID]
            ax.errorbar(GRID, means, yerr=sds, color=color, marker=marker, ms=4, capsize=3, label=f"{kind}")
        sug = arms["constant @suggestion"]
        x_sug = statistics.fmean(s / p for s, p in zip(sug["lr"], (f["peak"] for f in r["finders"])))
        ax.errorbar([x_sug], [statistics.fmean(sug["acc"])], yerr=[statistics.stdev(sug["acc"])], color="tab:blue",
                    marker="*", ms=11, mfc="white", capsize=3, ls="none",
                    label=f"constant at the suggestion ({x_sug:.2g}x peak)")
        peak = arms["one-cycle 1x"]["acc"]
        ax.plot([1.0], [statistics.fmean(peak)], marker="*", ms=15, color="tab:red", markeredgecolor="black",
                ls="none", zorder=5, label="one-cycle at the peak")
        ax.set_xscale("log")
        ax.set_xticks(list(GRID), [f"{m:g}" for m in GRID], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("lr / range-test peak (log scale)")
        ax.set_ylabel("final validation accuracy (%)")
        ax.set_title(f"{r['task']} ({r['epochs']} epochs, {r['seeds']} seeds)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower left")
    fig.suptitle("One-cycle vs constant lr, scaled from the range test's one-cycle peak (mean ± sd over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--plot", default=None, help="PNG path for the accuracy-vs-lr plot")
    parser.add_argument("--json", default=None, help="path for the raw results")
    parser.add_argument("--markdown", default=None, help="path for the markdown table")
    parser.add_argument("--from-json", default=None, help="redo the table and plot from a --json file, no training")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        print(markdown(results))
        if args.plot:
            plot(results, args.plot)
        return 0
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the verdicts need a noise estimate")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = []
    for name in args.tasks:
        r = run_task(TASKS[name], args.seeds)
        r["verdicts"] = verdicts(r)
        results.append(r)
    table = markdown(results)
    print(table)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s on 1 thread")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
