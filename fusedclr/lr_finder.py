"""The learning-rate range test (Smith, "Cyclical Learning Rates", 2015/2017).

:func:`lr_find` trains for a few iterations while the learning rate grows from
``start_lr`` to ``end_lr``, records the loss at every step, stops once the loss
has clearly blown up, and puts the model and the optimizer back exactly as they
were. :class:`LRFinderResult` turns the curve into named suggestions and a plot.

[note: two smoothers]
The loss is smoothed twice, for two different jobs:

* during the run, a bias-corrected exponential moving average (``smooth``) of
  the raw losses decides when to stop. It is causal, so it can run online, but
  it lags: with ``smooth=0.98`` it averages roughly the last 50 steps, and a
  falling loss reaches its smoothed minimum well after the real one.
* after the run, suggestions are read from a *centred* trend: a running median
  (robust to single-batch spikes) followed by a running mean, both over a
  window of about a tenth of the points and both symmetric, so the trend has no
  lag. Locating the minimum or the steepest descent on the lagging EMA would
  push every suggestion towards divergence; the centred trend does not.

[note: suggestions]
Everything is read from the trend over the finite prefix of the curve (the run
stops at the first NaN/inf), with half a window trimmed at each end, where the
shrinking windows are noisy. Let ``top`` be the highest trend value before the
trend's minimum ``bottom``, and ``drop = top - bottom``:

* ``minimum``: the learning rate at ``bottom``, divided by 10;
* ``steep``: the steepest descent of the trend against log(lr), between
  ``top`` and ``bottom``;
* ``valley``: the first learning rate whose trend is within 20% of ``drop``
  from ``bottom``: the descent has done most of its work and the loss is
  entering the valley floor. This is the default ``suggestion``.
* ``max_lr``: Smith's upper CLR bound, where the loss stops falling: the first
  learning rate within 5% of ``drop`` from ``bottom``;
* ``base_lr``: Smith's lower bound, ``max_lr / 4`` (he suggests a factor of 3
  to 4; :meth:`LRFinderResult.clr_bounds` takes another factor).

Every suggestion is at or below the trend's minimum, hence below the point
where the run diverged.

[note: one-cycle peak]
The suggestions above are for a *constant* learning rate. The one-cycle policy
(Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
arXiv:1506.01186; Smith & Topin, "Super-Convergence", 2017, arXiv:1708.07120;
Smith, "A disciplined approach to neural network hyper-parameters: Part 1",
2018, arXiv:1803.09820) peaks much higher: at the largest learning rate at
which the range test still trains. The large-lr phase regularises, the
annealing phase converges. ``peak`` is

    min(lr at the trend's minimum, 4 x valley)

* The trend's minimum is the last point before the loss rises: the peak
  never goes past it. It is read from the centred trend, so one noisy batch
  cannot move it, and the minimum is taken over the trimmed window, so a
  cliff at the end cannot be averaged into it.
* The range test's loss lags its learning rate: an instability that starts at
  some lr shows up as a rising loss only several steps (hence several lr
  multiples) later. On noisy minibatch training the lag is short; on a
  noise-free full-batch quadratic it is long enough that the trend's minimum
  lands 2-3x past 2/L, where gradient descent diverges. The cap of 4 times the
  constant-lr suggestion (``valley``, the most stable point of the curve)
  bounds that lag's effect: it keeps the peak below 2/L there (tested), and
  within the noise of the best one-cycle peak on each task of the evaluation
  in docs/tuning.md.
* When the test ended before the loss rose (``loss_rose`` false: after its
  minimum the trend never climbed a tenth of the drop, nor 4 standard errors,
  above it), ``peak`` is the lr of the lowest loss tested, never
  extrapolated, and a warning says it may be too low.

:meth:`LRFinderResult.one_cycle` adds the rest of the cycle: warm-up from
``peak / 25`` (torch's default; below the constant suggestion), momentum
cycling 0.95 -> 0.85 -> 0.95 (Smith 2018), lowered to the range test's own
momentum when that was lower, so that the peak never takes larger heavy-ball
steps than the range test took at that lr.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["LRFinderResult", "LossFunctionError", "RangeTestInputError", "default_optimizer", "lr_find"]

MODES = ("exp", "linear")

# Fractions of the total drop used by the level-crossing suggestions
# [note: suggestions].
VALLEY_LEVEL = 0.20
MAX_LR_LEVEL = 0.05
# Smith: the lower CLR bound is 1/3 to 1/4 of the upper one.
DEFAULT_CLR_FACTOR = 4.0
# A drop smaller than this many standard errors of the trend is not a descent.
MIN_DROP_SIGMAS = 4.0
MIN_POINTS = 5

SUGGESTION_NAMES = ("steep", "valley", "minimum", "max_lr", "base_lr", "peak")

# [note: one-cycle peak] The peak is at most this factor above the constant-lr
# suggestion: the range test's loss lags the lr (see the note).
PEAK_OVER_VALLEY = 4.0
# The cycle starts this factor below the peak (torch's and fastai's default), hence
# at most 4/25 of the constant-lr suggestion.
ONE_CYCLE_DIV_FACTOR = 25.0
ONE_CYCLE_FINAL_DIV_FACTOR = 1e4
# Smith 2018: momentum cycles from 0.95 down to 0.85 while the lr rises, and back.
ONE_CYCLE_MOMENTUM = (0.85, 0.95)
ONE_CYCLE_MOMENTUM_SPAN = ONE_CYCLE_MOMENTUM[1] - ONE_CYCLE_MOMENTUM[0]


# --------------------------------------------------------------------------
# Curve analysis
# --------------------------------------------------------------------------


def ema_smooth(losses: Sequence[float], smooth: float) -> list[float]:
    """Bias-corrected exponential moving average of ``losses`` (NaN once a loss is non-finite)."""
    out: list[float] = []
    avg = 0.0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            out.extend([math.nan] * (len(losses) - i))
            break
        avg = smooth * avg + (1.0 - smooth) * loss
        out.append(avg / (1.0 - smooth ** (i + 1)))
    return out


def _half_window(n: int) -> int:
    return max(1, round(n / 20))


def _running_median(y: np.ndarray, h: int) -> np.ndarray:
    # Windows are clipped at the ends rather than shrunk: a median of 1-3 points
    # would let a spike in the first batches through.
    n = len(y)
    return np.array([np.median(y[max(0, i - h) : i + h + 1]) for i in range(n)])


def _running_mean(y: np.ndarray, h: int) -> np.ndarray:
    # Symmetric windows, shrinking at the ends, keep the mean free of lag there.
    n = len(y)
    out = np.empty(n)
    for i in range(n):
        k = min(h, i, n - 1 - i)
        out[i] = y[i - k : i + k + 1].mean()
    return out


def centred_trend(losses: Sequence[float]) -> np.ndarray:
    """Zero-lag trend of a loss curve: running median, then running mean [note: two smoothers]."""
    y = np.asarray(losses, dtype=np.float64)
    h = _half_window(len(y))
    return _running_mean(_running_median(y, h), h)


def _local_slopes(x: np.ndarray, y: np.ndarray, h: int) -> np.ndarray:
    # Least-squares slope over a centred window: a derivative that noise cannot whip around.
    n = len(y)
    out = np.zeros(n)
    for i in range(n):
        k = max(1, min(h, i, n - 1 - i))
        lo, hi = max(0, i - k), min(n, i + k + 1)
        xs, ys = x[lo:hi], y[lo:hi]
        dx = xs - xs.mean()
        denom = float(dx @ dx)
        out[i] = float(dx @ (ys - ys.mean())) / denom if denom > 0 else 0.0
    return out


@dataclass
class _Analysis:
    trend: list[float]
    suggestions: dict[str, float | None]
    warnings: list[str]
    # Whether the trend was seen rising after its minimum [note: one-cycle peak].
    rose: bool = False


def _analyse(lrs: Sequence[float], losses: Sequence[float], diverged: bool) -> _Analysis:
    none: dict[str, float | None] = dict.fromkeys(SUGGESTION_NAMES)
    raw = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(raw)
    valid = len(raw) if finite.all() else int(np.argmin(finite))
    warnings: list[str] = []
    if valid < len(raw):
        warnings.append(f"loss became non-finite at lr={lrs[valid]:.3g}; only the {valid} points before it are used")
    if valid < MIN_POINTS:
        warnings.append(f"only {valid} finite losses recorded; at least {MIN_POINTS} are needed to suggest anything")
        return _Analysis([], none, warnings)

    x = np.log10(np.asarray(lrs[:valid], dtype=np.float64))
    y = raw[:valid]
    trend = centred_trend(y)
    h = _half_window(valid)
    lo, hi = (h, valid - h) if valid - 2 * h >= MIN_POINTS else (0, valid)

    i_min = lo + int(np.argmin(trend[lo:hi]))
    i_top = lo + int(np.argmax(trend[lo : i_min + 1]))
    bottom, top = float(trend[i_min]), float(trend[i_top])
    drop = top - bottom

    resid = y - trend
    sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    noise = sigma / math.sqrt(2 * h + 1)
    if drop <= MIN_DROP_SIGMAS * noise or drop <= 1e-12 * max(1.0, abs(top)):
        warnings.append(
            "the loss does not clearly fall over the tested range "
            f"(drop {drop:.3g} vs trend noise {noise:.3g}); the suggestions are unreliable: "
            "lower start_lr, raise end_lr or num_iter, or check the model and data"
        )
    # The loss "rises" once the trend climbs a clear step (the larger of a tenth of the
    # drop and the descent threshold in noise units) above its minimum, after it.
    rise_level = bottom + max(0.1 * drop, MIN_DROP_SIGMAS * noise)
    rose = bool(np.any(trend[i_min:] > rise_level)) or diverged
    if i_min >= hi - 1 and not diverged:
        warnings.append(
            "the loss was still falling at the end of the range; raise end_lr to see where it stops "
            "(the one-cycle peak is then read from the lowest loss tested, not extrapolated, and likely too low)"
        )
    elif not rose:
        warnings.append(
            "the range test ended before the loss rose; the one-cycle peak is the lr of the lowest loss "
            "tested, not extrapolated, and may be too low: raise end_lr to see where training breaks down"
        )

    def first_at_or_below(level: float) -> int:
        for i in range(i_top, i_min + 1):
            if trend[i] <= level:
                return i
        return i_min

    lr = lambda i: float(lrs[i])  # noqa: E731
    out = dict(none)
    out["minimum"] = lr(i_min) / 10.0
    if i_min > i_top:
        slopes = _local_slopes(x, trend, h)
        out["steep"] = lr(i_top + int(np.argmin(slopes[i_top : i_min + 1])))
    else:
        out["steep"] = lr(i_min)
    out["valley"] = lr(first_at_or_below(bottom + VALLEY_LEVEL * drop))
    out["max_lr"] = lr(first_at_or_below(bottom + MAX_LR_LEVEL * drop))
    out["base_lr"] = out["max_lr"] / DEFAULT_CLR_FACTOR
    out["peak"] = min(lr(i_min), PEAK_OVER_VALLEY * out["valley"])
    return _Analysis(trend.tolist(), out, warnings, rose)


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------


@dataclass
class LRFinderResult:
    """The curve of an LR range test and what it suggests.

    Build one from any curve (``LRFinderResult(lrs, losses)``) to analyse
    recorded losses; :func:`lr_find` returns one.

    Attributes:
        lrs: learning rate used at each iteration.
        losses: raw loss at each iteration (the last one may be NaN/inf).
        smoothed_losses: bias-corrected EMA of ``losses`` (computed when not given).
        stop_reason: ``"completed"``, ``"diverged"`` or ``"non-finite"``.
        steep, valley, minimum, max_lr, base_lr: the named suggestions
            [note: suggestions]; ``None`` when the curve is too short.
        suggestion: the learning rate for a *constant* schedule (``valley``).
        peak: the peak learning rate for the *one-cycle* policy
            [note: one-cycle peak]; :meth:`one_cycle` gives all of
            ``OneCycleLR``'s arguments.
        loss_rose: whether the loss was seen rising after its minimum; when
            not, ``peak`` is only the best lr tested (a warning says so).
        momentum: the optimizer's momentum (SGD) or ``beta1`` (Adam) during
            the test; 0 for an optimizer that has neither (Adagrad), ``None``
            when unknown (a curve built by hand). :meth:`one_cycle` matches it:
            no momentum cycling after a test without momentum.
        trend: the centred trend the suggestions are read from.
        warnings: why a suggestion may not be trustworthy.
    """

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float] | None = None
    stop_reason: str = "completed"
    smooth: float = 0.98
    mode: str = "exp"
    loss_source: str = "train"
    seconds: float = 0.0
    momentum: float | None = None
    _analysis: _Analysis = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.lrs = [float(v) for v in self.lrs]
        self.losses = [float(v) for v in self.losses]
        if len(self.lrs) != len(self.losses):
            raise ValueError(f"lrs and losses must have the same length, got {len(self.lrs)} and {len(self.losses)}")
        if self.smoothed_losses is None:
            self.smoothed_losses = ema_smooth(self.losses, self.smooth)
        self._analysis = _analyse(self.lrs, self.losses, diverged=self.stop_reason != "completed")

    # -- suggestions -------------------------------------------------------

    @property
    def suggestions(self) -> dict[str, float | None]:
        return dict(self._analysis.suggestions)

    @property
    def steep(self) -> float | None:
        return self._analysis.suggestions["steep"]

    @property
    def valley(self) -> float | None:
        return self._analysis.suggestions["valley"]

    @property
    def minimum(self) -> float | None:
        return self._analysis.suggestions["minimum"]

    @property
    def max_lr(self) -> float | None:
        return self._analysis.suggestions["max_lr"]

    @property
    def base_lr(self) -> float | None:
        return self._analysis.suggestions["base_lr"]

    @property
    def peak(self) -> float | None:
        return self._analysis.suggestions["peak"]

    @property
    def loss_rose(self) -> bool:
        return self._analysis.rose

    @property
    def suggestion(self) -> float | None:
        return self.valley

    @property
    def trend(self) -> list[float]:
        return list(self._analysis.trend)

    @property
    def warnings(self) -> list[str]:
        return list(self._analysis.warnings)

    def clr_bounds(self, factor: float = DEFAULT_CLR_FACTOR) -> tuple[float, float] | None:
        """Smith's triangular-CLR bounds ``(max_lr / factor, max_lr)``; he suggests factor 3 to 4."""
        if factor < 1:
            raise ValueError(f"factor must be >= 1 (base_lr = max_lr / factor), got {factor}")
        return None if self.max_lr is None else (self.max_lr / factor, self.max_lr)

    def one_cycle(
        self,
        total_steps: int | None = None,
        *,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
    ) -> dict[str, Any]:
        """Keyword arguments for ``OneCycleLR`` at the recommended peak [note: one-cycle peak].

        ``OneCycleLR(optimizer, **result.one_cycle(total_steps))`` (fusedclr's or
        torch's) runs the cycle: ``max_lr`` is :attr:`peak`; ``div_factor=25``
        starts the warm-up at ``peak / 25``, below the constant-lr
        :attr:`suggestion`; momentum cycles from
        ``max_momentum`` down to ``base_momentum`` at the peak and back (Smith's
        0.95 -> 0.85, lowered to the test's momentum when that was lower, so
        the peak never takes larger steps than the range test did there; no
        cycling when the test ran without momentum). Give ``total_steps`` or
        ``epochs`` and ``steps_per_epoch``, or pass them to ``OneCycleLR``
        yourself.

        Raises:
            ValueError: the curve gave no peak (too short), or bad step counts.
        """
        peak = self.peak
        if peak is None:
            raise ValueError(
                "this range test recommends no one-cycle peak (too few finite losses); "
                "rerun it with more iterations or a lower start_lr: " + "; ".join(self.warnings)
            )
        if total_steps is not None and (epochs is not None or steps_per_epoch is not None):
            raise ValueError("pass either total_steps or epochs and steps_per_epoch, not both")
        if (epochs is None) != (steps_per_epoch is None):
            raise ValueError(
                f"epochs and steps_per_epoch go together (got epochs={epochs!r}, "
                f"steps_per_epoch={steps_per_epoch!r}); or pass total_steps"
            )
        for name, value in (("total_steps", total_steps), ("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 0.0 < pct_start < 1.0:
            raise ValueError(
                f"pct_start must be in (0, 1): the fraction of the cycle spent warming up, got {pct_start!r}"
            )
        kwargs: dict[str, Any] = {
            "max_lr": peak,
            "pct_start": pct_start,
            "div_factor": ONE_CYCLE_DIV_FACTOR,
            "final_div_factor": ONE_CYCLE_FINAL_DIV_FACTOR,
        }
        if total_steps is not None:
            kwargs["total_steps"] = int(total_steps)
        if epochs is not None:
            kwargs.update(epochs=int(epochs), steps_per_epoch=int(steps_per_epoch))
        low, high = ONE_CYCLE_MOMENTUM
        if self.momentum is not None and self.momentum <= 0.0:
            kwargs["cycle_momentum"] = False
        else:
            base = low if self.momentum is None else min(low, self.momentum)
            top = min(high, base + ONE_CYCLE_MOMENTUM_SPAN)
            kwargs.update(cycle_momentum=True, base_momentum=base, max_momentum=top)
        return kwargs

    # -- reporting ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (non-finite losses become ``None``)."""

        def clean(values: Sequence[float]) -> list[float | None]:
            return [v if math.isfinite(v) else None for v in values]

        return {
            "lrs": list(self.lrs),
            "losses": clean(self.losses),
            "smoothed_losses": clean(self.smoothed_losses or []),
            "trend": self.trend,
            "stop_reason": self.stop_reason,
            "mode": self.mode,
            "smooth": self.smooth,
            "loss_source": self.loss_source,
            "seconds": self.seconds,
            "suggestion": self.suggestion,
            "suggestions": self.suggestions,
            "peak": self.peak,
            "loss_rose": self.loss_rose,
            "momentum": self.momentum,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        """A few human-readable lines: the suggestions and any warnings."""
        last = self.lrs[-1] if self.lrs else math.nan
        lines = [f"LR range test: {len(self.lrs)} iterations, stopped ({self.stop_reason}) at lr={last:.3g}"]
        for name in SUGGESTION_NAMES:
            value = self._analysis.suggestions[name]
            shown = "-" if value is None else f"{value:.3g}"
            mark = {"valley": "   <- suggestion (constant lr)",
                    "peak": "   <- one-cycle peak: OneCycleLR(opt, **result.one_cycle(total_steps))"}.get(name, "")
            lines.append(f"  {name:<8} {shown}{mark}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, path: str | None = None, *, title: str | None = None):
        """Plot the curve with its suggestions on a log lr axis; save a PNG when ``path`` is given.

        Uses matplotlib's Agg canvas directly (no pyplot), so it neither needs a
        display nor changes the caller's backend. Returns the ``Figure``.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 4.6), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        lrs = np.asarray(self.lrs)
        raw = np.asarray(self.losses, dtype=np.float64)
        ax.plot(lrs, raw, color="0.6", lw=0.8, alpha=0.6, marker=".", ms=3, label="raw loss")
        ax.plot(lrs, self.smoothed_losses, color="tab:blue", lw=1.0, ls="--", alpha=0.8,
                label=f"EMA (smooth={self.smooth:g}), stops the run")
        trend = np.asarray(self._analysis.trend)
        n = len(trend)
        if n:
            ax.plot(lrs[:n], trend, color="black", lw=2.0, label="centred trend, used for suggestions")
        s = self._analysis.suggestions
        if s["max_lr"] is not None:
            ax.axvspan(s["base_lr"], s["max_lr"], color="tab:green", alpha=0.12,
                       label=f"CLR bounds base_lr={s['base_lr']:.2g} .. max_lr={s['max_lr']:.2g}")
        if s["minimum"] is not None:
            ax.axvline(s["minimum"], color="tab:purple", ls=":", lw=1.2, label=f"minimum/10 = {s['minimum']:.2g}")

        def on_trend(lr: float) -> float:
            return float(np.interp(np.log10(lr), np.log10(lrs[:n]), trend))

        marks = (("steep", "v", "tab:orange", 9, ""), ("valley", "*", "tab:red", 16, " (suggestion, constant lr)"),
                 ("peak", "D", "tab:cyan", 9, " (one-cycle peak)"))
        for name, marker, color, size, note in marks:
            if s[name] is not None:
                label = f"{name} = {s[name]:.2g}{note}"
                ax.plot([s[name]], [on_trend(s[name])], marker=marker, color=color, ms=size, ls="none",
                        markeredgecolor="black", label=label, zorder=5)
        if self.stop_reason != "completed" and len(lrs):
            ax.axvline(lrs[-1], color="tab:red", ls="-.", lw=1.0, alpha=0.7, label=f"stopped: {self.stop_reason}")
        ax.set_xscale("log")
        if n:
            i_min = int(np.argmin(trend))
            low = min(float(trend.min()), float(raw[:n].min()))  # the valid prefix is all finite
            high = float(np.max(trend[: i_min + 1]))
            span = max(high - low, 1e-12 * max(1.0, abs(high)))
            ax.set_ylim(low - 0.08 * span, high + 0.12 * span)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("validation loss" if self.loss_source == "val" else "training loss")
        sug, peak = self.suggestion, self.peak
        ax.set_title(title or ("LR range test" + (f": constant lr {sug:.3g}, one-cycle peak {peak:.3g}"
                                                  if sug is not None and peak is not None else "")))
        ax.grid(True, which="both", alpha=0.25)
        # The curve starts high on the left and falls to the right: the lower-left corner is free.
        ax.legend(fontsize=7.5, loc="lower left", framealpha=0.9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


# --------------------------------------------------------------------------
# The range test
# --------------------------------------------------------------------------


def default_optimizer(params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """``fusedclr.SGD(momentum=0.9)`` when the package provides it, else ``torch.optim.SGD``."""
    try:
        from fusedclr import SGD
    except ImportError:
        SGD = torch.optim.SGD
    return SGD(params, lr=lr, momentum=0.9)


def _check_args(model: Any, optimizer: Any, loss_fn: Any, start_lr: float, end_lr: float, num_iter: int,
                mode: str, smooth: float, diverge_threshold: float, accumulation_steps: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
    if not (isinstance(start_lr, numbers.Real) and math.isfinite(start_lr) and start_lr > 0):
        raise ValueError(f"start_lr must be a finite number > 0, got {start_lr!r}")
    if not (isinstance(end_lr, numbers.Real) and math.isfinite(end_lr)):
        raise ValueError(f"end_lr must be a finite number, got {end_lr!r}")
    if start_lr >= end_lr:
        raise ValueError(f"start_lr ({start_lr:g}) must be smaller than end_lr ({end_lr:g}): the test sweeps upwards")
    if isinstance(num_iter, bool) or not isinstance(num_iter, numbers.Integral) or num_iter < 2:
        raise ValueError(f"num_iter must be an integer >= 2 (one loss per learning rate), got {num_iter!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1) (0 disables smoothing), got {smooth!r}")
    if not diverge_threshold > 1.0:
        raise ValueError(f"diverge_threshold must be > 1 (math.inf never stops), got {diverge_threshold!r}")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")


def lr_schedule(start_lr: float, end_lr: float, num_iter: int, mode: str) -> list[float]:
    """The learning rates of the test: geometric (``"exp"``) or arithmetic (``"linear"``)."""
    if mode == "exp":
        return np.geomspace(start_lr, end_lr, num_iter).tolist()
    return np.linspace(start_lr, end_lr, num_iter).tolist()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _batches(loader: Iterable, name: str) -> Iterator[Any]:
    """Yield batches forever, restarting ``loader`` at the end of each pass."""
    seen = 0
    while True:
        before = seen
        for batch in loader:
            seen += 1
            yield batch
        if seen == before:
            if seen == 0:
                raise RangeTestInputError(
                    f"{name} is empty: it yielded no batch; pass a loader with at least one batch")
            raise RangeTestInputError(
                f"{name} yielded {seen} batches and then nothing on the next pass; pass a re-iterable loader "
                "(e.g. a torch.utils.data.DataLoader, not a generator) or lower num_iter"
            )


class RangeTestInputError(ValueError):
    """Something the range test was given (a loader, the model, the loss) that it cannot use;
    the message says what and how to fix it. The ``fusedclr lr-find`` command prints it as
    one error line. Subclasses are also the built-in exception a caller may already catch."""


class LossFunctionError(RangeTestInputError, RuntimeError):
    """``loss_fn(output, target)`` raised: the message names the shapes and dtypes it was given.
    Also a ``RuntimeError``, as torch's own errors inside a loss are."""


class _InputTypeError(RangeTestInputError, TypeError):
    """A batch or a loss of the wrong kind."""


class _NonFiniteLossError(RangeTestInputError, FloatingPointError):
    """The loss was not finite before the learning rate could matter."""


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"{str(obj.dtype).replace('torch.', '')} tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__


def call_loss(loss_fn: Callable[[Any, Any], Tensor], output: Any, target: Any) -> Tensor:
    """``loss_fn(output, target)``; an error inside it is re-raised as a
    :class:`LossFunctionError` that says what the loss was given, with a hint
    when the target holds class indices and the loss wants values."""
    try:
        return loss_fn(output, target)
    except torch.OutOfMemoryError:
        raise  # not the loss's fault: callers that back off the batch size must see it as it is
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        hint = ""
        if (isinstance(output, Tensor) and isinstance(target, Tensor) and output.is_floating_point()
                and not target.is_floating_point() and output.ndim == target.ndim + 1):
            hint = (" The target holds class indices, one per sample: cross_entropy (or nll on "
                    "log-probabilities) takes those; mse, l1 and smooth_l1 need a target shaped like the output.")
        raise LossFunctionError(
            f"the loss {name}(output, target) failed on output: {_describe(output)}, target: "
            f"{_describe(target)} ({type(exc).__name__}: {exc}).{hint}"
        ) from exc


def _split(batch: Any, name: str) -> tuple[tuple[Any, ...], Any]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return tuple(batch[:-1]), batch[-1]
    raise _InputTypeError(
        f"{name} must yield (inputs..., target) tuples or lists; got {type(batch).__name__}. "
        "Wrap the loader so each batch is (x, y): the finder calls model(*inputs) and loss_fn(output, target)"
    )


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    first = next(iter(model.parameters()), None)
    if first is None:
        raise RangeTestInputError("model has no parameters: there is nothing for the range test to train")
    if device is None:
        return first.device
    want = torch.device(device)
    have = first.device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ValueError(
            f"device={str(want)!r} but the model's parameters are on {str(have)!r}; move the model there "
            "(before building its optimizer) or leave device=None to use the model's device"
        )
    return have


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class _Snapshot:
    """Everything the test changes, copied to CPU, and put back bit for bit."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        # Parameters and *all* buffers, persistent or not (BatchNorm statistics, counters).
        self.tensors = {("p", k): _cpu_copy(v) for k, v in model.named_parameters()}
        self.tensors.update({("b", k): _cpu_copy(v) for k, v in model.named_buffers()})
        self.grads = {k: None if p.grad is None else _cpu_copy(p.grad) for k, p in model.named_parameters()}
        # The tensors themselves, not only their values: a fusedclr optimizer's
        # parameters and grads are views into its flat buffers, and must stay so.
        self.data = {k: p.data for k, p in model.named_parameters()}
        self.grad_objects = {k: p.grad for k, p in model.named_parameters()}
        self.training = {k: m.training for k, m in model.named_modules()}
        self.optimizer = None if optimizer is None else _cpu_copy(optimizer.state_dict())

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, own_optimizer: bool) -> None:
        params = dict(model.named_parameters())
        if own_optimizer:
            # The temporary optimizer may have moved the parameters into its own flat
            # buffers; hand back the original storage (possibly another optimizer's views).
            for k, p in params.items():
                if p.data_ptr() != self.data[k].data_ptr():
                    p.data = self.data[k]
        for k, p in params.items():
            p.copy_(self.tensors[("p", k)])
        for k, b in model.named_buffers():
            b.copy_(self.tensors[("b", k)])
        for k, p in params.items():
            saved, original = self.grads[k], self.grad_objects[k]
            if saved is None:
                p.grad = None
                continue
            if p.grad is not original:
                p.grad = original
            p.grad.copy_(saved)
        for k, m in model.named_modules():
            m.training = self.training.get(k, m.training)
        if optimizer is not None and self.optimizer is not None:
            optimizer.load_state_dict(self.optimizer)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="lr_find", unit="it", leave=False)
        except ImportError:
            pass
    return None


def lr_find(
    model: nn.Module,
    train_loader: Iterable,
    loss_fn: Callable[[Any, Any], Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    mode: str = "exp",
    smooth: float = 0.98,
    diverge_threshold: float = 4.0,
    accumulation_steps: int = 1,
    val_loader: Iterable | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    progress: bool = True,
) -> LRFinderResult:
    """Run an LR range test and return the curve with its suggestions.

    Iteration ``i`` sets every param group's learning rate to the ``i``-th
    value between ``start_lr`` and ``end_lr`` (geometric for ``mode="exp"``,
    arithmetic for ``"linear"``), takes one optimizer step over
    ``accumulation_steps`` batches, and records the mean batch loss (or, with
    ``val_loader``, the loss over the whole validation set after the step).
    The run stops early when the bias-corrected EMA of the loss (``smooth``)
    exceeds ``diverge_threshold`` times its best value (a rule that needs
    positive losses), or when the loss turns NaN/inf.

    Afterwards the model's parameters, gradients and every buffer (BatchNorm
    statistics included), its train/eval flags and the optimizer's state are
    put back bit-exactly, even when the test raises. The test consumes batches
    and random numbers, so the loaders and the RNG are not rewound.

    Args:
        model: the model, already on its device. Batches must be
            ``(inputs..., target)``; the loss is ``loss_fn(model(*inputs), target)``.
        train_loader: a re-iterable loader (restarted when exhausted).
        loss_fn: returns a scalar tensor.
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters,
            fusedclr's or torch's; its state is restored afterwards. ``None``
            builds ``fusedclr.SGD(momentum=0.9)`` (``torch.optim.SGD`` when
            fusedclr's is unavailable) for the test only.
        device: where batches go; defaults to the model's device.
        amp: run forward passes under autocast (fp16 with a GradScaler on
            CUDA, bf16 on CPU).
        progress: show a tqdm bar with the current learning rate and loss.

    Raises:
        ValueError: an empty ``train_loader``/``val_loader``, ``start_lr >=
            end_lr``, ``num_iter < 2`` and other out-of-range arguments.
        FloatingPointError: the loss is NaN/inf on the first step, before the
            learning rate had any effect: no learning rate can be suggested.
    """
    _check_args(model, optimizer, loss_fn, start_lr, end_lr, num_iter, mode, smooth,
                diverge_threshold, accumulation_steps)
    # numpy scalars pass the checks: the result holds Python numbers (JSON, reprs).
    start_lr, end_lr, num_iter, accumulation_steps = float(start_lr), float(end_lr), int(num_iter), int(
        accumulation_steps)
    dev = _resolve_device(model, device)
    own = optimizer is None
    snapshot = _Snapshot(model, None if own else optimizer)
    if own:
        optimizer = default_optimizer([p for p in model.parameters() if p.requires_grad], start_lr)
    schedule = lr_schedule(start_lr, end_lr, num_iter, mode)

    scaler = None
    autocast_dtype = None
    if amp:
        autocast_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
        if dev.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")

    # A fusedclr optimizer with an attached in-kernel schedule would ignore group["lr"]:
    # detach it for the test (docs/CONTRACTS.md, "Schedules") and re-attach afterwards.
    in_kernel = getattr(optimizer, "_scheduler", None)
    if in_kernel is not None:
        optimizer._attach_schedule(None)

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stop_reason = "completed"
    bar = _progress(num_iter, progress)
    t0 = time.perf_counter()
    try:
        batches = _batches(train_loader, "train_loader")
        model.train()
        avg, best = 0.0, math.inf
        for i, lr in enumerate(schedule):
            _set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=False)
            total = 0.0
            for _ in range(accumulation_steps):
                inputs, target = _split(_to(next(batches), dev), "train_loader")
                with torch.autocast(dev.type, dtype=autocast_dtype, enabled=amp):
                    loss = call_loss(loss_fn, model(*inputs), target)
                if not (isinstance(loss, Tensor) and loss.numel() == 1):
                    raise _InputTypeError(
                        f"loss_fn must return a scalar tensor, got "
                        f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}; "
                        "reduce it (e.g. reduction='mean')"
                    )
                scaled = loss.float() / accumulation_steps
                (scaled if scaler is None else scaler.scale(scaled)).backward()
                # One host sync per iteration is the point of the tool: the curve is the output.
                total += float(loss.detach())
            value = total / accumulation_steps
            if i == 0 and not math.isfinite(value):
                raise _NonFiniteLossError(
                    f"loss_fn returned {value} on the very first step (lr=start_lr={start_lr:g}), before the learning "
                    "rate could have any effect, so no learning rate can be suggested; check the model's "
                    "initialisation, the data (NaN/inf inputs or targets) and loss_fn"
                )
            if math.isfinite(value):
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                if val_loader is not None:
                    value = _evaluate(model, val_loader, loss_fn, dev, autocast_dtype if amp else None)
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                smoothed.append(math.nan)
                stop_reason = "non-finite"
                break
            avg = smooth * avg + (1.0 - smooth) * value
            current = avg / (1.0 - smooth ** (i + 1))
            smoothed.append(current)
            if bar is not None:
                bar.set_postfix(lr=f"{lr:.2e}", loss=f"{current:.4g}", refresh=False)
                bar.update(1)
            if i > 0 and best > 0 and current > diverge_threshold * best:
                stop_reason = "diverged"
                break
            best = min(best, current)
    finally:
        if bar is not None:
            bar.close()
        snapshot.restore(model, optimizer, own_optimizer=own)
        if in_kernel is not None:
            optimizer._attach_schedule(in_kernel)
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed_losses=smoothed,
        stop_reason=stop_reason,
        smooth=smooth,
        mode=mode,
        loss_source="train" if val_loader is None else "val",
        seconds=time.perf_counter() - t0,
        momentum=_momentum_of(optimizer),
    )


def _momentum_of(optimizer: torch.optim.Optimizer) -> float | None:
    """The first group's momentum (SGD) or beta1 (Adam family); 0 for optimizers without either
    (Adagrad): ``OneCycleLR`` has no momentum of theirs to cycle, and raises if asked to."""
    group = optimizer.param_groups[0]
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    return 0.0


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable, dev: torch.device,
              autocast_dtype: torch.dtype | None) -> float:
    """Mean loss over ``loader`` in eval mode, weighted by batch size."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            inputs, target = _split(_to(batch, dev), "val_loader")
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = call_loss(loss_fn, model(*inputs), target)
            n = len(target) if hasattr(target, "__len__") else 1
            total += float(loss) * n
            count += n
    finally:
        for m, flag in was_training.items():
            m.training = flag
    if count == 0:
        raise RangeTestInputError(
            "val_loader is empty: it yielded no batch; pass a loader with at least one batch or None")
    return total / count
