"""Warm-up, samples and their statistics; the copy yardstick; launch counts; deadlines."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to measure each provider of a case."""

    warmup_steps: int = 3
    warmup_s: float = 0.2  # keep warming up until this long has passed, too
    min_samples: int = 7
    max_samples: int = 200
    max_time_s: float = 2.0  # per provider, once min_samples are in
    min_sample_s: float = 2e-3  # steps per sample are raised until a sample takes this long

    @property
    def sample_s(self) -> float:
        """Target length of one sample: at least ``min_sample_s``, and long enough that
        ``2 x min_samples`` samples fill ``max_time_s``, so that providers taking turns
        need about as many turns whatever the length of their steps."""
        return max(self.min_sample_s, self.max_time_s / (2 * self.min_samples))


FULL = Budget()
QUICK = Budget(warmup_steps=2, warmup_s=0.0, min_samples=3, max_samples=5, max_time_s=0.01, min_sample_s=5e-4)


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


@dataclasses.dataclass
class Timing:
    """Per-step statistics over samples (seconds)."""

    wall: list[float]
    cpu: list[float]
    inner: int

    def _q(self, q: float) -> float:
        if len(self.wall) < 2:
            return self.wall[0]
        return statistics.quantiles(self.wall, n=4, method="inclusive")[int(q * 4) - 1]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def q1(self) -> float:
        return self._q(0.25)

    @property
    def q3(self) -> float:
        return self._q(0.75)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def summary(self) -> dict[str, float | int]:
        return {
            "median_s": self.median,
            "q1_s": self.q1,
            "q3_s": self.q3,
            "min_s": min(self.wall),
            "max_s": max(self.wall),
            "iqr_rel": (self.q3 - self.q1) / self.median if self.median > 0 else 0.0,
            "samples": len(self.wall),
            "steps_per_sample": self.inner,
            "cpu_s": self.cpu_median,
        }


class _Sampler:
    """Warm-up, calibration and samples of one step function."""

    def __init__(self, step: Callable[[], None], sync: Callable[[], None], budget: Budget) -> None:
        self.step, self.sync, self.budget = step, sync, budget
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.inner = 1
        self.one = 0.0  # fastest warm-up step, seconds
        self.spent = 0.0

    def warm_up(self) -> None:
        """Runs the warm-up steps, then sets ``inner`` from the fastest of them.

        The first step (lazy state, compilation) is left out, and the minimum
        is used because a preempted step only ever looks slower: a single
        stalled step must not set ``inner`` to 1 for a microsecond step.
        """
        b = self.budget
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max(2, b.warmup_steps) or time.perf_counter() - start < b.warmup_s:
            t0 = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - t0)
        self.one = min(times[1:])
        self.inner = max(1, min(1 << 14, math.ceil(b.sample_s / max(self.one, 1e-9))))

    @property
    def done(self) -> bool:
        b = self.budget
        n = len(self.wall)
        return n >= b.max_samples or (n >= b.min_samples and self.spent >= b.max_time_s)

    def sample(self) -> None:
        self.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(self.inner):
            self.step()
        # Host time up to the last launch, before the wait (a GPU sync spins on the CPU).
        c1 = time.process_time()
        self.sync()
        t1 = time.perf_counter()
        self.wall.append((t1 - t0) / self.inner)
        self.cpu.append((c1 - c0) / self.inner)
        self.spent += t1 - t0

    def timing(self) -> Timing:
        return Timing(self.wall, self.cpu, self.inner)

    def fork(self) -> _Sampler:
        """A fresh sampler of the same (warm, calibrated) step: new samples, same steps per sample."""
        other = _Sampler(self.step, self.sync, self.budget)
        other.inner, other.one = self.inner, self.one
        return other


def ratio_quartiles(base: Sequence[float], other: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles of ``base[i] / other[i]``: the spread of a ratio taken in turns.

    Sample ``i`` of two providers sampling in turns (:func:`~fusedclr.bench.runner.measure`)
    falls in the same stretch of time, so each pair's ratio saw the same neighbours.
    """
    ratios = [b / o for b, o in zip(base, other) if o > 0]
    if not ratios:
        raise ValueError("ratio_quartiles needs at least one pair of samples")
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return q[0], q[2]


def time_step(step: Callable[[], None], device: str, budget: Budget) -> Timing:
    """Warms up and times ``step`` (synchronized) on ``device``."""
    s = _Sampler(step, synchronizer(device), budget)
    s.warm_up()
    while not s.done:
        s.sample()
    return s.timing()


def prepare(step: Callable[[], None], device: str, budget: Budget) -> tuple[int, int]:
    """Warms ``step`` up and plans its measurement: (steps per sample, samples).

    For pytest-benchmark's pedantic mode, which then takes the samples itself.
    """
    s = _Sampler(step, synchronizer(device), budget)
    s.warm_up()
    per_sample = s.inner * s.one
    samples = max(budget.min_samples, min(budget.max_samples, int(budget.max_time_s / max(per_sample, 1e-9))))
    return s.inner, samples


def cpu_time_per_step(step: Callable[[], None], device: str, steps: int = 3) -> float:
    """Median process CPU time of one synchronized step (see [note: bench method])."""
    sync = synchronizer(device)
    sync()
    out = []
    for _ in range(steps):
        c0 = time.process_time()
        step()
        sync()
        out.append(time.process_time() - c0)
    return statistics.median(out)


def copy_bandwidth(nbytes: int, device: str, budget: Budget) -> tuple[float, Timing, int]:
    """GB/s of ``dst.copy_(src)`` moving about ``nbytes`` (read + write) on ``device``.

    Capped at 2 GiB moved (1 GiB buffers): far beyond any last-level cache, so
    larger copies run at the same speed and would only cost memory.
    """
    n = max(1 << 12, min(nbytes // 2, 1 << 30) // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_step(lambda: dst.copy_(src), device, budget)
    moved = 2 * n * 4
    del src, dst
    return moved / timing.median / 1e9, timing, moved


def count_launches(step: Callable[[], None], device: str, steps: int = 3) -> float | None:
    """Device activities (kernels, memsets, memcpys) per step, from torch.profiler; GPUs only.

    Profiles the device alone and counts from the raw profiler events (building
    torch's per-event Python objects takes ~40 us each, which is minutes for a
    for-loop step over 10000 tensors). The ``Optimizer.step#...`` user
    annotations that torch.optim and fusedclr open every step are device-side
    events too and are not launches. ``None`` when the profiler sees nothing
    (no CUPTI, or another tool holds it) or fails.
    """
    if not device.startswith("cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        cuda = torch.autograd.DeviceType.CUDA
        n = sum(1 for e in prof.profiler.kineto_results.events()
                if e.device_type() == cuda and not _is_user_annotation(e))
    except Exception:  # noqa: BLE001 - a missing count must not end the run
        return None
    return n / steps if n else None


def _is_user_annotation(event: Any) -> bool:
    flag = getattr(event, "is_user_annotation", None)
    if flag is None:
        return False
    return bool(flag() if callable(flag) else flag)


class _Deadline(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raises :class:`TimeoutError` in the block after ``seconds`` (main thread on POSIX; else no limit)."""
    usable = seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
    if usable:
        import threading

        usable = threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except BaseException as e:
        # Compilers wrap what interrupts them (dynamo's BackendCompilerFailed): look down the chain.
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, _Deadline):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise TimeoutError(f"did not finish within {seconds:g} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
