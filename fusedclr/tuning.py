"""Batch-size LR scaling and Smith's momentum / weight-decay sweep.

Leslie Smith's recipe for the optimization hyperparameters ("A disciplined
approach to neural network hyper-parameters", 2018), in the order this module
implements it:

1. with weight decay 0, find the learning rate with a range test
   (:func:`fusedclr.lr_find`);
2. when the batch size changes, rescale that learning rate (:func:`scale_lr`);
3. cycle momentum against the learning rate (one-cycle);
4. then tune the weight decay (:func:`sweep`, which also compares momentum
   ranges).
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fusedclr.lr_finder import call_loss

__all__ = [
    "DEFAULT_MOMENTUMS",
    "DEFAULT_WEIGHT_DECAYS",
    "PairedDifference",
    "ScaledLR",
    "SweepResult",
    "SweepRow",
    "evaluate",
    "paired_difference",
    "scale_lr",
    "sweep",
    "train_epoch",
]

SCALE_RULES = ("sqrt", "linear")
# Goyal et al. 2017 ramp the learning rate linearly over the first 5 epochs.
GOYAL_WARMUP_EPOCHS = 5.0

DEFAULT_WEIGHT_DECAYS = (1e-3, 1e-4, 1e-5, 0.0)
DEFAULT_MOMENTUMS = (0.99, 0.97, 0.95, 0.9)


# --------------------------------------------------------------------------
# Batch-size scaling
# --------------------------------------------------------------------------


class ScaledLR(NamedTuple):
    """A learning rate rescaled for a new batch size, and the warm-up that goes with it.

    Attributes:
        lr: the learning rate for the new batch size.
        warmup_epochs: how long to ramp up to ``lr`` (0: no warm-up).
        warmup_steps: ``warmup_epochs`` in optimizer steps, when
            ``steps_per_epoch`` was given; else ``None``.
        start_factor: where the ramp starts, as a fraction of ``lr`` (the old
            learning rate): ``LinearLR(opt, start_factor, total_iters=warmup_steps)``.
    """

    lr: float
    warmup_epochs: float
    warmup_steps: int | None
    start_factor: float


def scale_lr(
    lr: float,
    batch_size: int,
    new_batch_size: int,
    rule: str = "sqrt",
    *,
    steps_per_epoch: int | None = None,
    warmup_epochs: float | None = None,
) -> ScaledLR:
    """Rescale a learning rate found at ``batch_size`` for ``new_batch_size``.

    With ``k = new_batch_size / batch_size``:

    * ``rule="sqrt"``: ``lr * sqrt(k)``, which keeps the variance of the
      update's gradient noise constant (Krizhevsky, "One weird trick for
      parallelizing convolutional neural networks", 2014, arXiv:1404.5997;
      the rule in Smith's bag of tricks). It comes with no warm-up
      (``warmup_epochs=0``): the one-cycle policy's own rising phase already
      ramps the learning rate up.
    * ``rule="linear"``: ``lr * k`` (Goyal et al., "Accurate, Large Minibatch
      SGD: Training ImageNet in 1 Hour", 2017, arXiv:1706.02677). Large ``k``
      needs their gradual warm-up: a linear ramp from the old ``lr`` to the
      new one over the first 5 epochs, offered as ``warmup_epochs=5``.

    Shrinking the batch (``k < 1``) lowers the learning rate and needs no
    warm-up. ``warmup_epochs`` overrides the rule's warm-up length.

    Example::

        >>> scale_lr(0.1, 256, 1024, "linear", steps_per_epoch=100)
        ScaledLR(lr=0.4, warmup_epochs=5.0, warmup_steps=500, start_factor=0.25)
    """
    for name, value in (("batch_size", batch_size), ("new_batch_size", new_batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if rule not in SCALE_RULES:
        raise ValueError(f"rule must be one of {SCALE_RULES} (Krizhevsky 2014 / Goyal et al. 2017), got {rule!r}")
    if steps_per_epoch is not None and (
        isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, numbers.Integral) or steps_per_epoch < 1
    ):
        raise ValueError(f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")
    # numpy scalars pass the checks: the results are Python numbers (JSON, reprs).
    batch_size, new_batch_size, lr = int(batch_size), int(new_batch_size), float(lr)
    steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
    if warmup_epochs is not None and not (math.isfinite(warmup_epochs) and warmup_epochs >= 0):
        raise ValueError(f"warmup_epochs must be a finite number >= 0 or None, got {warmup_epochs!r}")

    k = new_batch_size / batch_size
    factor = math.sqrt(k) if rule == "sqrt" else k
    new_lr = lr * factor
    if warmup_epochs is None:
        warmup_epochs = GOYAL_WARMUP_EPOCHS if (rule == "linear" and k > 1) else 0.0
    steps = None if steps_per_epoch is None else round(warmup_epochs * steps_per_epoch)
    start = min(1.0, 1.0 / factor) if warmup_epochs > 0 else 1.0
    return ScaledLR(lr=new_lr, warmup_epochs=float(warmup_epochs), warmup_steps=steps, start_factor=start)


# --------------------------------------------------------------------------
# Training helpers (shared with the demo)
# --------------------------------------------------------------------------


def optimizer_classes() -> tuple[type, type, type, str]:
    """``(SGD, AdamW, OneCycleLR, name)`` from fusedclr when it provides them, else from torch."""
    try:
        from fusedclr import SGD, AdamW
        from fusedclr.lr_scheduler import OneCycleLR

        return SGD, AdamW, OneCycleLR, "fusedclr"
    except ImportError:
        return torch.optim.SGD, torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR, "torch"


def _batch(batch: Any, device: torch.device | None) -> tuple[tuple[Any, ...], Any]:
    if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
        raise TypeError(f"loaders must yield (inputs..., target) tuples, got {type(batch).__name__}")
    if device is not None:
        batch = [b.to(device, non_blocking=True) if isinstance(b, Tensor) else b for b in batch]
    return tuple(batch[:-1]), batch[-1]


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Any, Any], Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    device: torch.device | None = None,
    on_step: Callable[[], None] | None = None,
) -> float:
    """One pass over ``loader``; steps ``scheduler`` after every batch. Returns the mean batch loss."""
    model.train()
    total: Tensor | None = None
    count = 0
    for batch in loader:
        inputs, target = _batch(batch, device)
        optimizer.zero_grad()
        loss = call_loss(loss_fn, model(*inputs), target)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step()
        # Summed on the loss's device: one host sync per epoch, not one per step.
        total = loss.detach().double() if total is None else total + loss.detach()
        count += 1
    if total is None:
        raise ValueError("the training loader is empty: it yielded no batch")
    return float(total) / count


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    device: torch.device | None = None,
) -> tuple[float, float | None]:
    """``(mean loss, accuracy)`` over ``loader`` in eval mode.

    Accuracy is the arg-max hit rate when the model outputs ``[batch, classes]``
    scores and targets are class indices, else ``None``. The loss is weighted
    by batch size, so it is the per-sample mean for mean-reduced losses.
    """
    was = model.training
    model.eval()
    loss_sum, hits, count, classify = 0.0, 0, 0, True
    try:
        for batch in loader:
            inputs, target = _batch(batch, device)
            out = model(*inputs)
            n = len(target)
            loss_sum += float(call_loss(loss_fn, out, target)) * n
            classify = classify and out.ndim == 2 and not target.is_floating_point() and target.ndim == 1
            if classify:
                hits += int((out.argmax(1) == target).sum())
            count += n
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("the evaluation loader is empty: it yielded no batch")
    return loss_sum / count, (hits / count if classify else None)


def _steps_per_epoch(loader: Iterable, name: str) -> int:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in loader)
    if n == 0:
        raise ValueError(f"{name} is empty: it yielded no batch")
    return n


# --------------------------------------------------------------------------
# Comparing two arms over seeds
# --------------------------------------------------------------------------


class PairedDifference(NamedTuple):
    """``a - b`` over paired seeds: the mean, its standard error and a t confidence interval.

    ``clear`` is true when the interval excludes 0: only then does a report
    call one arm better; otherwise it says "no clear difference".
    """

    mean: float
    se: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def clear(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} (one seed: no noise estimate)"
        return (f"{self.mean:+.2f} ± {self.se:.2f} (standard error over {self.n} paired seeds; "
                f"{100 * self.confidence:g}% interval {self.low:+.2f} .. {self.high:+.2f})")


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Compare two arms run on the same seeds: statistics of ``a[i] - b[i]``.

    Pairing removes what the seeds share (initial weights, data order, split),
    so the noise left is that of the difference itself. The interval is
    Student's t with ``n - 1`` degrees of freedom (needs scipy, which
    scikit-learn brings: ``pip install 'fusedclr[tune]'``). With one seed the
    standard error and interval are NaN and ``clear`` is false.
    """
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"a and b must be non-empty and paired seed by seed, got {len(a)} and {len(b)} values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, math.nan, n, confidence)
    from scipy.stats import t as student_t

    se = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * se
    return PairedDifference(mean, se, mean - half, mean + half, n, confidence)


# --------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------


class SweepRow(NamedTuple):
    weight_decay: float
    momentum: float
    val_loss: float
    val_accuracy: float | None
    train_loss: float
    seconds: float
    max_lr: float = math.nan


@dataclass
class SweepResult:
    """The table of a :func:`sweep`: one row per (weight decay, momentum).

    ``max_lrs`` maps each momentum to the one-cycle peak its rows used;
    ``lr_finds`` maps it to the range test that peak came from (its
    :attr:`~fusedclr.LRFinderResult.peak`; empty when ``max_lr`` was given).
    Momentum cycles from each row's value down by ``momentum_span`` at the
    peak and back.
    """

    rows: list[SweepRow]
    max_lrs: dict[float, float]
    epochs: int
    lr_finds: dict[float, Any] = field(default_factory=dict)
    weight_decays: list[float] = field(default_factory=list)
    momentums: list[float] = field(default_factory=list)
    momentum_span: float = 0.1

    def best(self, by: str = "val_loss") -> SweepRow:
        """The row with the lowest validation loss (``by="val_loss"``) or highest accuracy (``"val_accuracy"``)."""
        if by == "val_loss":
            return min(self.rows, key=lambda r: (math.isnan(r.val_loss), r.val_loss))
        if by == "val_accuracy":
            if any(r.val_accuracy is None for r in self.rows):
                raise ValueError("by='val_accuracy' needs accuracies; this sweep's model/targets are not classification")
            return max(self.rows, key=lambda r: r.val_accuracy)
        raise ValueError(f"by must be 'val_loss' or 'val_accuracy', got {by!r}")

    def source(self) -> str:
        """Where the peaks came from, in words."""
        if not self.lr_finds:
            return f"max_lr={next(iter(self.max_lrs.values())):.3g} for every run, given by the caller"
        peaks = ", ".join(f"{p:.3g} at momentum {m:g}" for m, p in self.max_lrs.items())
        return (f"max_lr = the one-cycle peak of a range test run first, at weight decay 0, with each row's "
                f"momentum: {peaks}")

    def picked(self) -> str:
        """The chosen weight decay and momentum range, and why (one line)."""
        best = self.best()
        others = sorted((r for r in self.rows if r is not best), key=lambda r: (math.isnan(r.val_loss), r.val_loss))
        why = f"the lowest validation loss, {best.val_loss:.4f}"
        if others:
            nxt = others[0]
            why += (f" (next: {nxt.val_loss:.4f} at weight decay {nxt.weight_decay:g}, momentum {nxt.momentum:g}; "
                    "one seed per cell, so a gap smaller than the seed-to-seed noise is not resolved)")
        low = best.momentum - self.momentum_span
        return (f"picked: weight decay {best.weight_decay:g}, momentum {best.momentum:g} -> {low:g} -> "
                f"{best.momentum:g} over the cycle, peak lr {best.max_lr:.3g}: {why}")

    def table(self) -> str:
        best = self.best()
        lines = [
            f"one-cycle, {self.epochs} epoch(s) per run; {self.source()}; momentum cycles from the listed value "
            f"down by {self.momentum_span:g} at the peak and back",
            f"{'weight_decay':>12} {'momentum':>9} {'max_lr':>8} {'val_loss':>9} {'val_acc':>8} {'train_loss':>10} "
            f"{'time':>7}",
        ]
        for r in self.rows:
            acc = "-" if r.val_accuracy is None else f"{100 * r.val_accuracy:.2f}%"
            mark = "  <- best val_loss" if r is best else ""
            lines.append(
                f"{r.weight_decay:>12g} {r.momentum:>9g} {r.max_lr:>8.3g} {r.val_loss:>9.4f} {acc:>8} "
                f"{r.train_loss:>10.4f} {r.seconds:>6.2f}s{mark}"
            )
        lines.append(self.picked())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_lrs": {str(m): p for m, p in self.max_lrs.items()},
            "max_lr_source": self.source(),
            "momentum_span": self.momentum_span,
            "picked": self.picked(),
            "epochs": self.epochs,
            "rows": [r._asdict() for r in self.rows],
            "best": self.best()._asdict(),
            "lr_finds": {str(m): f.to_dict() for m, f in self.lr_finds.items()},
        }

    def plot(self, path: str | None = None):
        """Validation loss and accuracy against weight decay, one line per momentum. Returns the ``Figure``."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        has_acc = all(r.val_accuracy is not None for r in self.rows)
        fig = Figure(figsize=(10 if has_acc else 5.5, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
        wds = self.weight_decays or sorted({r.weight_decay for r in self.rows}, reverse=True)
        moms = self.momentums or sorted({r.momentum for r in self.rows}, reverse=True)
        positions = range(len(wds))
        for m in moms:
            by_wd = {r.weight_decay: r for r in self.rows if r.momentum == m}
            losses = [by_wd[w].val_loss if w in by_wd else math.nan for w in wds]
            axes[0].plot(positions, losses, marker="o", label=f"momentum {m:g}")
            if has_acc:
                accs = [100 * by_wd[w].val_accuracy if w in by_wd else math.nan for w in wds]
                axes[1].plot(positions, accs, marker="o", label=f"momentum {m:g}")
        best = self.best()
        for ax, ylabel in zip(axes, ("validation loss", "validation accuracy (%)")):
            ax.set_xticks(list(positions), [f"{w:g}" for w in wds])
            ax.set_xlabel("weight decay")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        axes[0].plot([wds.index(best.weight_decay)], [best.val_loss], marker="*", ms=16, color="tab:red",
                     markeredgecolor="black", ls="none", zorder=5)
        fig.suptitle(f"one-cycle sweep at the range test's peak ({self.epochs} epoch(s) per run); "
                     f"best: wd={best.weight_decay:g}, momentum={best.momentum:g}", fontsize=10)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def sweep(
    model_fn: Callable[[], nn.Module],
    train_loader: Iterable,
    val_loader: Iterable,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    *,
    epochs: int = 2,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    momentums: Sequence[float] = DEFAULT_MOMENTUMS,
    momentum_span: float = 0.1,
    max_lr: float | None = None,
    lr_find_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    plot: str | None = None,
) -> SweepResult:
    """Smith's weight-decay / momentum sweep with short one-cycle trainings.

    The order is Smith's: first, with weight decay 0, a range test
    (:func:`fusedclr.lr_find`) per momentum of the grid gives that momentum's
    one-cycle :attr:`~fusedclr.LRFinderResult.peak` (skipped when ``max_lr``
    is given: every run uses it). A peak is found with the momentum it is used
    with, because momentum scales the steps: a peak found at 0.99 is far too
    low for 0.9, and one found at 0.9 unsafe for 0.99. Then every
    (weight decay, momentum) pair in the grid trains a fresh model
    (``model_fn()`` under ``torch.manual_seed(seed)``, so every run starts from
    the same weights) for ``epochs`` epochs of SGD with the one-cycle policy
    at its momentum's peak, momentum cycling from ``m`` down to
    ``m - momentum_span`` and back, and is scored on ``val_loader``. The
    table ends with the pick, the lowest validation loss, and the runner-up.

    Cost: ``len(weight_decays) * len(momentums) * epochs`` epochs plus
    ``len(momentums)`` range tests (16 x 2 epochs and 4 tests with the defaults).

    Args:
        model_fn: builds a fresh model (already on ``device``, if any).
        loss_fn: defaults to ``torch.nn.functional.cross_entropy``.
        plot: a PNG path for :meth:`SweepResult.plot`.

    Returns:
        A :class:`SweepResult` (``.table()``, ``.best()``, ``.plot()``, ``.to_dict()``).
    """
    from fusedclr.lr_finder import lr_find

    loss_fn = loss_fn or nn.functional.cross_entropy
    if isinstance(model_fn, nn.Module) or not callable(model_fn):
        raise TypeError(f"model_fn must be a function that builds a fresh model (every run starts from the same "
                        f"weights), got {type(model_fn).__name__}")
    if val_loader is None:
        raise ValueError("val_loader is None: every run of the sweep is scored on validation data; pass a loader")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    epochs = int(epochs)
    for name, grid_values in (("weight_decays", weight_decays), ("momentums", momentums)):
        if not isinstance(grid_values, Iterable) or isinstance(grid_values, (str, bytes)):
            raise ValueError(f"{name} must be a list of numbers, got {grid_values!r} (e.g. [{grid_values!r}])")
    weight_decays = [float(w) for w in weight_decays]
    momentums = [float(m) for m in momentums]
    if not weight_decays or any(not (math.isfinite(w) and w >= 0) for w in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty list of numbers >= 0, got {weight_decays!r}")
    if not momentums or any(not 0 <= m < 1 for m in momentums):
        raise ValueError(f"momentums must be a non-empty list of numbers in [0, 1), got {momentums!r}")
    if not 0 <= momentum_span <= min(momentums):
        raise ValueError(
            f"momentum_span must be in [0, min(momentums)={min(momentums):g}] so that momentum stays >= 0, "
            f"got {momentum_span!r}"
        )
    dev = None if device is None else torch.device(device)
    if plot is not None:
        from fusedclr._io import ensure_writable

        ensure_writable(plot)  # before hours of training, not after
    SGD, _, OneCycleLR, _ = optimizer_classes()
    steps = _steps_per_epoch(train_loader, "train_loader")
    _steps_per_epoch(val_loader, "val_loader")

    finds: dict[float, Any] = {}
    if max_lr is None:
        peaks = {}
        for mom in momentums:
            torch.manual_seed(seed)
            model = model_fn()
            opt = SGD(model.parameters(), lr=1e-3, momentum=mom, weight_decay=0.0)
            found = lr_find(model, train_loader, loss_fn, opt, **{"device": dev, "progress": progress,
                                                                  **(lr_find_kwargs or {})})
            if found.peak is None:
                raise RuntimeError(f"the range test at momentum {mom:g} suggested no one-cycle peak:\n"
                                   + found.summary())
            finds[mom], peaks[mom] = found, found.peak
    elif not (math.isfinite(max_lr) and max_lr > 0):
        raise ValueError(f"max_lr must be a finite number > 0 or None (run a range test), got {max_lr!r}")
    else:
        peaks = dict.fromkeys(momentums, float(max_lr))

    rows = []
    grid = [(w, m) for w in weight_decays for m in momentums]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(grid) * epochs, desc="sweep", unit="epoch", leave=False)
        except ImportError:
            pass
    try:
        for wd, mom in grid:
            torch.manual_seed(seed)
            model = model_fn()
            peak = peaks[mom]
            opt = SGD(model.parameters(), lr=peak, momentum=mom, weight_decay=wd)
            sched = OneCycleLR(opt, max_lr=peak, epochs=epochs, steps_per_epoch=steps,
                               base_momentum=mom - momentum_span, max_momentum=mom)
            t0 = time.perf_counter()
            train_loss = math.nan
            for _ in range(epochs):
                train_loss = train_epoch(model, train_loader, loss_fn, opt, sched, device=dev)
                if bar is not None:
                    bar.update(1)
            seconds = time.perf_counter() - t0
            val_loss, val_acc = evaluate(model, val_loader, loss_fn, device=dev)
            rows.append(SweepRow(wd, mom, val_loss, val_acc, train_loss, seconds, peak))
    except BaseException as exc:  # an error or Ctrl-C: what finished is kept, and shown
        if rows:
            partial = SweepResult(rows, peaks, epochs, finds, weight_decays, momentums, float(momentum_span))
            exc.partial_result = partial  # type: ignore[attr-defined]
            print(f"sweep stopped after {len(rows)} of {len(grid)} runs ({type(exc).__name__}); the finished "
                  f"runs (also on the exception, as .partial_result):\n{partial.table()}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    result = SweepResult(rows, peaks, epochs, finds, weight_decays, momentums, float(momentum_span))
    if plot is not None:
        result.plot(plot)
    return result
