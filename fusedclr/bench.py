"""Optimizer-step benchmarks against stock PyTorch: the one harness.

``fusedclr bench`` (:func:`main`, also ``python -m fusedclr.bench``) and the
pytest-benchmark suite in ``benchmarks/`` both take everything from here: the
shapes, the providers, the byte counts, the copy-bandwidth yardstick and the
timing. Nothing is duplicated between them, so the two cannot drift apart.

What is measured [note: bench method]
-------------------------------------
* One *case* is (optimizer, shape list, dtype, schedule, device). Each provider
  gets fresh parameters with constant random gradients and times the whole
  training-loop step: ``optimizer.step()`` and, with a schedule,
  ``scheduler.step()``. Gradients are written once and never replaced, as a
  backward pass would accumulate them in place.
* Wall time is synchronized (``torch.cuda.synchronize()`` around every sample
  on a GPU). A sample is ``inner`` consecutive steps, ``inner`` chosen so that
  a sample lasts about ``Budget.sample_s`` (GPU steps of a few microseconds
  would otherwise be dominated by the synchronization). After
  warm-up steps (which also compile, for ``torch-compile``), samples are taken
  until both a minimum count and a time budget are reached. We report the
  median and the spread: the inter-quartile range and min..max.
* Providers of a case take their samples in turns, so that a noisy
  neighbour hurts all of them alike: all together when they fit in memory
  together, else each one paired with torch-fused (the 200 x 1M fp32 AdamW
  case holds ~3.4 GB per provider), its ratio then taken against the
  torch-fused samples of its own pairing (see :func:`measure`).
* Ratios are ``torch-fused time / provider time`` in the same process, so
  > 1 means faster than ``torch.optim.X(fused=True)``.
* Effective GB/s = bytes moved per step / median time, with the bytes of
  :func:`bytes_per_param` (the roofline table of DESIGN.md section 4). It is divided
  by the bandwidth of ``dst.copy_(src)`` measured in the same run, on the
  same device, over a comparable byte count (``% copy``).
* Host CPU time per step is ``time.process_time()``: all threads of this
  process. On a CPU device it is the compute itself (about wall time x the
  threads that worked); on a GPU it is the host-side launch and Python cost,
  read before the sample's closing synchronization (which spins on the CPU).
  A sample whose launches fill the GPU's launch queue waits inside a step, and
  that wait counts.
* On a GPU, launches per step are counted with ``torch.profiler``: kernels,
  memsets and memcpys that ran on the device, per step (not the
  ``Optimizer.step#...`` annotations).
* On a GPU the copy yardstick moves at least 1 GiB, so that it measures the
  memory's bandwidth rather than the L2 cache's (an H100/H200 holds 50-60 MB).
  The two smallest shapes' optimizer states fit in L2, and a step after a step
  finds them there: their GB/s are not HBM figures, and their ratios are about
  launch and host costs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BASELINE",
    "BIG_SHAPES",
    "DTYPES",
    "FULL",
    "OPTIMS",
    "PROVIDERS",
    "QUICK",
    "QUICK_SHAPES",
    "SCHEDULES",
    "SHAPES",
    "Budget",
    "Case",
    "Stepper",
    "Timing",
    "build",
    "bytes_per_param",
    "copy_bandwidth",
    "count_launches",
    "cpu_time_per_step",
    "deadline",
    "free",
    "main",
    "markdown_report",
    "measure",
    "prepare",
    "run",
    "unavailable",
]

# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------

Shape = tuple[int, ...]
K, M = 1 << 10, 1 << 20


def resnet50_shapes() -> list[Shape]:
    """Parameter shapes of torchvision's ResNet-50 (161 tensors, 25,557,032 elements).

    Written from the architecture: a 7x7 stem, bottleneck stages of
    (3, 4, 6, 3) blocks of widths (64, 128, 256, 512) with expansion 4, a
    projection shortcut in each stage's first block, batch-norm weight and
    bias after every convolution, and a 1000-way classifier.
    """
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_small_shapes() -> list[Shape]:
    """Parameter shapes of GPT-2 small (148 tensors, 124,439,808 elements; LM head tied to wte).

    Vocabulary 50257, 1024 positions, 12 layers of width 768 with a fused
    QKV projection (Conv1D layout, in x out), a 4x MLP and pre-LayerNorms.
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


# DESIGN.md section 4: n tensors x elements each, then the two model-shaped lists.
SHAPES: dict[str, list[Shape]] = {
    "10000x64": [(64,)] * 10000,
    "2000x1024": [(1024,)] * 2000,
    "200x1M": [(M,)] * 200,
    "10x16M": [(16 * M,)] * 10,
    "resnet50": resnet50_shapes(),
    "gpt2-small": gpt2_small_shapes(),
}
# The "n tensors x numel" lists (DESIGN.md's and the quick ones), as opposed to model-shaped lists.
SHAPES_NXM = frozenset({"10000x64", "2000x1024", "200x1M", "10x16M", "128x64", "4x256K"})
# Over 100M elements: seconds per step and gigabytes per provider on a laptop-class CPU.
BIG_SHAPES = frozenset({"200x1M", "10x16M", "gpt2-small"})
# `--quick`: the same two regimes (many small tensors, few large ones), scaled
# down so that the whole run takes seconds on 2 cores.
QUICK_SHAPES: dict[str, list[Shape]] = {
    "128x64": [(64,)] * 128,
    "4x256K": [(256 * K,)] * 4,
}


def shape_list(name: str) -> list[Shape]:
    """The shape list called ``name`` in :data:`SHAPES` or :data:`QUICK_SHAPES`."""
    if name in SHAPES:
        return SHAPES[name]
    if name in QUICK_SHAPES:
        return QUICK_SHAPES[name]
    raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES) + sorted(QUICK_SHAPES)}")


def numel_of(shapes: Sequence[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


# --------------------------------------------------------------------------
# Optimizers, dtypes, schedules and bytes
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """One optimizer configuration, named on the command line."""

    torch_class: str
    kwargs: dict[str, Any]
    states: int  # per-element state tensors read and written every step
    lr: float
    momentum: bool  # whether OneCycleLR cycles its momentum (SGD momentum or Adam beta1)


OPTIMS: dict[str, OptimSpec] = {
    "adamw": OptimSpec("AdamW", {"weight_decay": 1e-2}, 2, 1e-3, True),
    "adam": OptimSpec("Adam", {}, 2, 1e-3, True),
    "adamw-amsgrad": OptimSpec("AdamW", {"weight_decay": 1e-2, "amsgrad": True}, 3, 1e-3, True),
    "sgd": OptimSpec("SGD", {"momentum": 0.9}, 1, 1e-2, True),
    "sgd-plain": OptimSpec("SGD", {"momentum": 0.0}, 0, 1e-2, False),
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCHEDULES = ("constant", "onecycle")
# Long enough that no run steps past the end of the cycle (OneCycleLR raises there).
ONECYCLE_TOTAL_STEPS = 10**9


def bytes_per_param(optim: str, param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """Bytes one parameter element moves per step: the roofline of DESIGN.md section 4.

    The parameter is read and written, the gradient read, and every state
    tensor read and written: ``2 p + g + 2 s x states``. This gives DESIGN's
    table: SGD 12, SGD momentum 20, Adam/AdamW 28 (+8 amsgrad) at fp32; 22 for
    bf16 parameters and gradients with fp32 moments; 14 with bf16 moments (what
    ``torch.optim`` keeps for bf16 parameters).
    """
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    return 3 * p + 2 * s * OPTIMS[optim].states


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked configuration; every provider runs it."""

    optim: str
    shape: str
    dtype: str
    schedule: str
    device: str = "cpu"

    @property
    def shapes(self) -> list[Shape]:
        return shape_list(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return numel_of(self.shapes)

    @property
    def label(self) -> str:
        return f"{self.optim} {self.shape} {self.dtype} {self.schedule} {self.device}"

    @property
    def copy_bytes(self) -> int:
        """Bytes a step of this case moves with fp32 states: the copy yardstick's size."""
        return self.numel * bytes_per_param(self.optim, self.torch_dtype, torch.float32)


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Stepper:
    """A built provider: ``step()`` is one training-loop step (optimizer, then scheduler)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    state_dtype: torch.dtype
    run_step: Callable[[], Any]
    note: str = ""
    on_close: Callable[[], None] | None = None

    def step(self) -> None:
        self.run_step()
        if self.scheduler is not None:
            self.scheduler.step()

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
        self.optimizer = self.scheduler = self.run_step = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable[[list[Tensor], Case], Stepper]
    devices: tuple[str, ...] = ("cpu", "cuda")


def _make_params(case: Case, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator(device=case.device).manual_seed(seed)
    return [
        torch.nn.Parameter(torch.empty(s, dtype=case.torch_dtype, device=case.device).uniform_(-1, 1, generator=gen))
        for s in case.shapes
    ]


def _fill_grads(params: Sequence[Tensor], seed: int = 1) -> None:
    """Gives every parameter a gradient, in place where one exists (a fusedclr flat-buffer view)."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.uniform_(-1e-2, 1e-2, generator=gen)


def _scheduler(module: Any, opt: torch.optim.Optimizer, case: Case, cycle_momentum: bool | None = None) -> Any:
    if case.schedule == "constant":
        return None
    spec = OPTIMS[case.optim]
    return module.OneCycleLR(
        opt,
        max_lr=spec.lr,
        total_steps=ONECYCLE_TOTAL_STEPS,
        cycle_momentum=spec.momentum if cycle_momentum is None else cycle_momentum,
    )


def _torch_builder(impl: dict[str, bool]) -> Callable[[list[Tensor], Case], Stepper]:
    def build_torch(params: list[Tensor], case: Case) -> Stepper:
        spec = OPTIMS[case.optim]
        opt = getattr(torch.optim, spec.torch_class)(params, lr=spec.lr, **spec.kwargs, **impl)
        sched = _scheduler(torch.optim.lr_scheduler, opt, case)
        return Stepper(opt, sched, case.torch_dtype, opt.step)

    return build_torch


def _build_compiled(params: list[Tensor], case: Case) -> Stepper:
    """``torch.compile`` of torch's step with a tensor lr, as torch's compiled-optimizer tutorial does.

    A tensor lr lets torch's scheduler update it in place without a
    recompile. Its OneCycleLR would still write beta1 (or SGD's momentum) as a
    new Python float every step, and dynamo specializes on that float: measured
    here, 8 recompiles of ~60 s each and then eager fallback for 100 x 1K
    tensors. So this provider's schedule cycles the lr only, which is noted in
    the results.
    """
    spec = OPTIMS[case.optim]
    opt = getattr(torch.optim, spec.torch_class)(
        params, lr=torch.tensor(spec.lr, device=case.device), **spec.kwargs
    )
    sched = _scheduler(torch.optim.lr_scheduler, opt, case, cycle_momentum=False)

    @torch.compile(fullgraph=False)
    def compiled_step() -> None:
        opt.step()

    note = "lr cycled, momentum not (torch would recompile on every beta1 float)" if sched is not None else ""
    # Dynamo's caches hold the optimizer (and so gigabytes of state) until reset.
    return Stepper(opt, sched, case.torch_dtype, compiled_step, note, on_close=torch._dynamo.reset)


def _fusedclr_builder(backend: str) -> Callable[[list[Tensor], Case], Stepper]:
    def build_fusedclr(params: list[Tensor], case: Case) -> Stepper:
        import fusedclr
        import fusedclr.lr_scheduler

        spec = OPTIMS[case.optim]
        opt = getattr(fusedclr, spec.torch_class)(params, lr=spec.lr, **spec.kwargs, backend=backend)
        sched = _scheduler(fusedclr.lr_scheduler, opt, case)
        # fp32 moments for bf16/fp16 parameters (DESIGN.md section 3).
        state_dtype = torch.float64 if case.torch_dtype == torch.float64 else torch.float32
        return Stepper(opt, sched, state_dtype, opt.step)

    return build_fusedclr


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("torch-forloop", "torch.optim, foreach=False", _torch_builder({"foreach": False})),
        Provider("torch-foreach", "torch.optim, foreach=True", _torch_builder({"foreach": True})),
        Provider("torch-fused", "torch.optim, fused=True", _torch_builder({"fused": True})),
        Provider("torch-compile", "torch.compile(optimizer.step), tensor lr", _build_compiled),
        Provider("fusedclr-cpu", "fusedclr, C++ CPU kernel", _fusedclr_builder("cpu"), ("cpu",)),
        Provider("fusedclr-cuda", "fusedclr, CUDA kernel", _fusedclr_builder("cuda"), ("cuda",)),
        Provider("fusedclr-triton", "fusedclr, Triton kernel", _fusedclr_builder("triton"), ("cuda",)),
    )
}
BASELINE = "torch-fused"

# Compiling the optimizer step takes time that grows with the number of
# tensors (the graph unrolls over them): 100 x 1K AdamW took ~50 s on the
# 2-core dev machine under load, so longer lists are skipped, not compiled for
# many minutes.
COMPILE_MAX_TENSORS = 512

_PROBED: dict[tuple[str, str, str], str | None] = {}


def unavailable(provider: str, case: Case, *, compile_timeout: float | None = None) -> str | None:
    """Why ``provider`` cannot run ``case`` here (``None`` when it can).

    fusedclr providers are probed once per (provider, device, dtype) with a
    tiny optimizer, so a missing extension, kernel or Triton reads as a reason
    instead of an error in the middle of a run.
    """
    prov = PROVIDERS[provider]
    if case.device not in prov.devices:
        return f"runs on {' or '.join(prov.devices)} only"
    if case.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if provider == "torch-compile":
        if compile_timeout is not None and compile_timeout <= 0:
            return "not compiled (--quick, or --compile-timeout 0): compiling takes tens of seconds on a CPU"
        if len(case.shapes) > COMPILE_MAX_TENSORS:
            return f"compiling {len(case.shapes)} tensors takes too long here (limit {COMPILE_MAX_TENSORS})"
        return None
    if provider.startswith("fusedclr-"):
        key = (provider, case.device, case.dtype)
        if key not in _PROBED:
            _PROBED[key] = _probe(prov, case)
        return _PROBED[key]
    return None


def _probe(prov: Provider, case: Case) -> str | None:
    try:
        params = [torch.nn.Parameter(torch.zeros(8, dtype=case.torch_dtype, device=case.device))]
        stepper = prov.build(params, dataclasses.replace(case, schedule="onecycle"))
        _fill_grads(params)
        stepper.step()
        stepper.close()
    except Exception as e:  # noqa: BLE001 - any failure is the reason to skip
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


def build(provider: str, case: Case, *, seed: int = 0) -> Stepper:
    """Fresh parameters, gradients and optimizer (+ scheduler) of ``provider`` for ``case``."""
    params = _make_params(case, seed)
    stepper = PROVIDERS[provider].build(params, case)
    _fill_grads(params, seed + 1)
    return stepper


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------


def free(case: Case) -> None:
    """Returns a provider's memory before the next one allocates its own.

    Optimizers and schedulers hold reference cycles (torch's schedulers wrap
    ``optimizer.step``), so only the collector frees them; it costs ~0.3 s
    with torch loaded, which is spent only where the memory matters.
    """
    if _state_footprint(case) >= 64 << 20:
        gc.collect()
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _state_footprint(case: Case) -> int:
    """Bytes one provider holds for ``case`` (parameters, grads, fp32 states)."""
    p = case.torch_dtype.itemsize
    return case.numel * (2 * p + 4 * OPTIMS[case.optim].states)


# Providers of a case sample round-robin when together they hold at most this much.
INTERLEAVE_BYTES = 2 << 30


def _memory_room(device: str) -> int:
    """Half of the memory available now on ``device``: what two providers may hold at once."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0] // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError):
        pass
    return INTERLEAVE_BYTES


def _lockstep(samplers: Sequence[_Sampler]) -> None:
    """Samples ``samplers`` in turns (order reversed every round) until each is done.

    Taking turns puts the samplers in the same stretches of time, so a busy
    neighbour slows them alike. Samples last about ``Budget.sample_s``
    whatever the step, so the providers need about as many turns.
    """
    order = list(samplers)
    while not all(s.done for s in order):
        for s in order:
            if not s.done:
                s.sample()
        order.reverse()


def measure(
    case: Case,
    providers: Sequence[str],
    budget: Budget,
    *,
    compile_timeout: float | None = 300.0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Times every provider on ``case``; one result row per provider (skips and errors included).

    Three ways to share the machine's time fairly, by memory [note: bench method]:

    * ``interleaved``: all providers live at once and sample in turns;
    * ``paired``: too big for that, so torch-fused (the baseline) stays live and
      each other provider samples in turns with it, then is freed; its ratio is
      taken against the baseline samples of its own pairing;
    * ``sequential``: not even two fit; one provider after another.
    """
    rows: dict[str, dict[str, Any]] = {}
    runnable = []
    for name in providers:
        reason = unavailable(name, case, compile_timeout=compile_timeout)
        if reason is None:
            runnable.append(name)
        else:
            rows[name] = {"provider": name, "status": "skipped", "reason": reason}
    sync = synchronizer(case.device)
    per, room = _state_footprint(case), _memory_room(case.device)
    if per * len(runnable) <= min(INTERLEAVE_BYTES, room):
        mode = "interleaved"
    elif BASELINE in runnable and len(runnable) > 1 and 2 * per <= room:
        mode = "paired"
    else:
        mode = "sequential"

    def start(name: str) -> tuple[Stepper, _Sampler] | None:
        stepper = None
        try:
            stepper = build(name, case)
            sampler = _Sampler(stepper.step, sync, budget)
            with deadline(compile_timeout if name == "torch-compile" else None):
                sampler.warm_up()
            return stepper, sampler
        except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
            if stepper is not None:
                stepper.close()
            if isinstance(e, TimeoutError) and name == "torch-compile":
                rows[name] = {"provider": name, "status": "skipped", "reason": f"compiling {e}"}
            else:
                rows[name] = {"provider": name, "status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}
            log(f"  {name}: {rows[name]['reason']}")
            free(case)
            return None

    def finish(name: str, stepper: Stepper, samplers: Sequence[_Sampler], pair: Timing | None = None) -> None:
        pooled = Timing([w for s in samplers for w in s.wall], [c for s in samplers for c in s.cpu],
                        samplers[0].inner)
        rows[name] = {
            "provider": name,
            "status": "ok",
            **pooled.summary(),
            "state_dtype": str(stepper.state_dtype).removeprefix("torch."),
            # One step when steps are slow (for-loop steps over thousands of tensors): enough to count.
            "launches_per_step": count_launches(stepper.step, case.device,
                                                steps=1 if samplers[0].one > 0.01 else 3),
            "note": stepper.note,
        }
        if pair is not None:
            rows[name]["paired_baseline"] = {"median_s": pair.median, "min_s": min(pair.wall),
                                             "cpu_s": pair.cpu_median}
        stepper.close()
        free(case)

    base = start(BASELINE) if mode == "paired" else None
    if mode == "paired" and base is None:
        mode, runnable = "sequential", [n for n in runnable if n != BASELINE]
    if mode == "interleaved":
        live = {name: got for name in runnable if (got := start(name)) is not None}
        _lockstep([s for _, s in live.values()])
        for name, (stepper, sampler) in live.items():
            finish(name, stepper, [sampler])
    elif mode == "paired" and base is not None:
        base_runs: list[_Sampler] = []
        for name in runnable:
            got = None if name == BASELINE else start(name)
            if got is None:
                continue
            with_base = base[1].fork()
            _lockstep([with_base, got[1]])
            base_runs.append(with_base)
            finish(name, got[0], [got[1]], pair=with_base.timing())
        if not base_runs:
            _lockstep([base[1]])
            base_runs.append(base[1])
        finish(BASELINE, base[0], base_runs)
    else:
        for name in runnable:
            got = start(name)
            if got is not None:
                _lockstep([got[1]])
                finish(name, got[0], [got[1]])

    out = []
    for name in providers:
        row = {**dataclasses.asdict(case), "tensors": len(case.shapes), "numel": case.numel, **rows[name]}
        row["mode"] = mode
        out.append(row)
    return out


def _annotate(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    """Adds bytes, GB/s, % of copy bandwidth and the ratio against torch-fused to a case's rows."""
    base_row = next((r for r in rows if r["provider"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        r["copy_gbps"] = copy_gbps
        if r["status"] != "ok":
            continue
        base = r.get("paired_baseline", base_row)
        bpp = bytes_per_param(r["optim"], DTYPES[r["dtype"]], getattr(torch, r["state_dtype"]))
        r["bytes_per_param"] = bpp
        r["bytes_per_step"] = bpp * r["numel"]
        r["gbps"] = r["bytes_per_step"] / r["median_s"] / 1e9
        r["pct_copy"] = 100.0 * r["gbps"] / copy_gbps
        r["ratio_vs_fused"] = base["median_s"] / r["median_s"] if base else None
        # Best against best: what each would do undisturbed, a check on the medians of a busy machine.
        r["ratio_vs_fused_min"] = base["min_s"] / r["min_s"] if base else None
        # Host CPU time is what a preempted step does not accrue: on a CPU run with
        # --threads 1 (no spin-waiting threads) it measures the work itself.
        r["ratio_vs_fused_cpu"] = base["cpu_s"] / r["cpu_s"] if base and r["cpu_s"] > 0 else None


def run(
    *,
    device: str,
    optims: Sequence[str],
    shapes: Sequence[str],
    dtypes: Sequence[str],
    schedules: Sequence[str],
    providers: Sequence[str],
    budget: Budget,
    compile_timeout: float | None = 300.0,
    time_limit_s: float | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every case; returns the report that :func:`main` prints and writes as JSON.

    The copy yardstick is measured right before and right after each case's
    providers, and the faster of the two is used: noise from other processes
    only ever slows a copy down, so this is the conservative denominator.

    Cases run optimizer by optimizer, then dtype by dtype, schedule by schedule,
    every shape in the order given: a run cut short has the fp32 rows of every
    shape, constant lr then OneCycleLR, before any bf16 row. With ``time_limit_s``, no case starts once that many
    seconds have passed, or when the last case's length would take the run past
    them; the cases left out are listed in the report's ``not_run`` (a case
    already started runs to its end). ``on_case`` receives the report so far
    after every case (``complete`` false, the cases still to come under
    ``not_run``), so that a run cut short from outside still leaves its results.
    """
    started = time.perf_counter()
    load_before = _loadavg()
    results: list[dict[str, Any]] = []
    copies: list[dict[str, Any]] = []
    not_run: list[dict[str, str]] = []
    plan = [Case(optim, shape, dtype, schedule, device)
            for optim in optims for dtype in dtypes for schedule in schedules for shape in shapes]

    def skipped(case: Case, reason: str) -> dict[str, str]:
        return {"optim": case.optim, "shape": case.shape, "dtype": case.dtype, "schedule": case.schedule,
                "reason": reason}

    def report(pending: Sequence[Case] = ()) -> dict[str, Any]:
        machine = machine_info(device)
        machine["loadavg_before"], machine["loadavg_after"] = load_before, _loadavg()
        return {
            "schema": "fusedclr-bench/1",
            "machine": machine,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "config": {
                "device": device,
                "optims": list(optims),
                "shapes": {s: {"tensors": len(shape_list(s)), "numel": numel_of(shape_list(s))} for s in shapes},
                "dtypes": list(dtypes),
                "schedules": list(schedules),
                "providers": list(providers),
                "baseline": BASELINE,
                "budget": dataclasses.asdict(budget),
                "time_limit_s": time_limit_s,
                "bytes_per_param": "2*param + grad + 2*state*states (DESIGN.md section 4)",
                "onecycle_total_steps": ONECYCLE_TOTAL_STEPS,
            },
            "copy": copies,
            "results": results,
            # Whether every planned case ran: false in the reports written while the
            # run goes on, and when --time-limit left cases out (listed under not_run).
            "complete": not pending and not not_run,
            "not_run": not_run + [skipped(c, "not reached: the run was still going when this was written")
                                  for c in pending],
            "elapsed_s": time.perf_counter() - started,
        }

    def copy(case: Case, when: str) -> float:
        nbytes = case.copy_bytes if device == "cpu" else max(case.copy_bytes, 1 << 30)
        gbps, timing, moved = copy_bandwidth(nbytes, device, budget)
        copies.append({"optim": case.optim, "shape": case.shape, "dtype": case.dtype, "schedule": case.schedule,
                       "when": when, "bytes": moved, "gbps": gbps, **timing.summary()})
        return gbps

    last_case_s = 0.0
    for i, case in enumerate(plan):
        elapsed = time.perf_counter() - started
        if time_limit_s is not None and elapsed + last_case_s > time_limit_s:
            not_run.append(skipped(case, f"--time-limit {time_limit_s:g} s reached"))
            continue
        case_start = time.perf_counter()
        before = copy(case, "before")
        rows = measure(case, providers, budget, compile_timeout=compile_timeout, log=log)
        gbps = max(before, copy(case, "after"))
        _annotate(rows, gbps)
        results += rows
        log(format_table(rows, device))
        last_case_s = time.perf_counter() - case_start
        if on_case is not None:
            on_case(report(plan[i + 1:]))
    if not_run:
        log(f"time limit reached: {len(not_run)} case(s) not run (listed under 'not_run' in the report)")
    return report()


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (the timings' context)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
    try:
        import fusedclr

        info["fusedclr"] = getattr(fusedclr, "__version__", "?")
        info["fusedclr_extension"] = bool(fusedclr.extension_available())
    except Exception as e:  # noqa: BLE001 - the report still says why
        info["fusedclr"] = f"not importable: {type(e).__name__}: {e}"
    return info


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------
# Output: table, JSON, plot
# --------------------------------------------------------------------------


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def format_table(rows: Sequence[dict[str, Any]], device: str) -> str:
    """One case's rows as an aligned text table."""
    if not rows:
        return ""
    r0 = rows[0]
    head = (f"{r0['optim']} {r0['shape']} ({r0['tensors']} tensors, {r0['numel'] / 1e6:.3g}M params) "
            f"{r0['dtype']} {r0['schedule']} on {device}; copy {r0.get('copy_gbps', float('nan')):.1f} GB/s")
    cols = ["provider", "median ms", "IQR", "min..max ms", "x fused", "(min)", "GB/s", "% copy", "cpu ms"]
    if device.startswith("cuda"):
        cols.append("launches")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["provider"], f"{r['status']}: {r['reason']}"])
            continue
        ratio = r.get("ratio_vs_fused")
        line = [
            r["provider"],
            _ms(r["median_s"]),
            f"{100 * r['iqr_rel']:.0f}%",
            f"{_ms(r['min_s'])}..{_ms(r['max_s'])}",
            _ratio(ratio),
            _ratio(r.get("ratio_vs_fused_min")),
            f"{r['gbps']:.1f}",
            f"{r['pct_copy']:.0f}%",
            _ms(r["cpu_s"]),
        ]
        if device.startswith("cuda"):
            lp = r.get("launches_per_step")
            line.append("-" if lp is None else f"{lp:.0f}")
        if r.get("note"):
            line.append(f"({r['note']})")
        lines.append(line)
    widths = [max(len(c), *(len(x[i]) for x in lines if len(x) > 2 and i < len(x))) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) if i < len(widths) else c for i, c in enumerate(cells)
    )
    out = [head, "  " + fmt(cols)]
    for x in lines:
        out.append("  " + (fmt(x) if len(x) > 2 else f"{x[0].ljust(widths[0])}  {x[1]}"))
    return "\n".join(out)


def markdown_table(report: dict[str, Any], optim: str, schedule: str = "constant") -> str:
    """Median ms per step, ratio vs torch-fused and IQR for one optimizer and schedule, as markdown.

    A ratio marked with a dagger was taken against the torch-fused samples of
    its own pairing (``mode == "paired"``), not against the torch-fused cell.
    """
    rows = [r for r in report["results"] if r["schedule"] == schedule and r["optim"] == optim]
    providers = [p for p in report["config"]["providers"] if any(r["provider"] == p and r["status"] == "ok"
                                                                   for r in rows)]
    keys = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows))
    out = ["| shape | dtype | " + " | ".join(providers) + " | fusedclr GB/s (% copy) |",
           "|---|---|" + "---|" * len(providers) + "---|"]
    for key in keys:
        cells = []
        fc = None
        for p in providers:
            r = next((r for r in rows if (r["shape"], r["dtype"]) == key and r["provider"] == p), None)
            if r is None or r["status"] != "ok":
                cells.append("-")
                continue
            ratio = r.get("ratio_vs_fused")
            mark = "†" if "paired_baseline" in r else ""
            cells.append(f"{_ms(r['median_s'])} ms" + ("" if ratio is None else f", {_ratio(ratio)}{mark}")
                         + f" (IQR {100 * r['iqr_rel']:.0f}%)")
            if p.startswith("fusedclr-") and fc is None:
                fc = r
        bw = "-" if fc is None else f"{fc['gbps']:.1f} ({fc['pct_copy']:.0f}%)"
        out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {bw} |")
    return "\n".join(out)


def markdown_report(report: dict[str, Any]) -> str:
    """The machine line and one :func:`markdown_table` per (optimizer, schedule)."""
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
    parts = [f"Measured {report['date'][:10]} on {where}; torch {m['torch']}, commit "
             f"{(report['git_commit'] or '?')[:12]}, load average {m.get('loadavg_before')} before and "
             f"{m.get('loadavg_after')} after. Cells: median time per step, ratio torch-fused time / this "
             "time (> 1 is faster), inter-quartile range as % of the median; †: ratio against the torch-fused "
             "samples taken in turns with this provider (big shapes), which can differ from the torch-fused "
             "cell (all its samples). Last column: the first fusedclr provider's GB/s and % of the same run's "
             "copy bandwidth."]
    for optim in report["config"]["optims"]:
        for schedule in report["config"]["schedules"]:
            if not any(r["optim"] == optim and r["schedule"] == schedule for r in report["results"]):
                continue  # not reached (time limit, or a run still going)
            parts.append(f"**{optim}, {'constant lr' if schedule == 'constant' else 'OneCycleLR'}**\n\n"
                         + markdown_table(report, optim, schedule))
    by_reason: dict[str, list[str]] = {}
    for c in report.get("not_run", []):
        by_reason.setdefault(c["reason"], []).append(f"{c['optim']} {c['shape']} {c['dtype']} {c['schedule']}")
    for reason, cases in by_reason.items():
        parts.append(f"Not run ({reason}): {', '.join(cases)}.")
    return "\n\n".join(parts) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """Log-log time per step against tensor count (left) and parameter count (right).

    One row per (optimizer, dtype, schedule), one colour per provider. The
    ``n x numel`` shapes are joined by lines (in that family, more tensors
    means smaller ones); model-shaped lists are stars, unjoined. Bars span the
    inter-quartile range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [r for r in report["results"] if r["status"] == "ok"]
    panels = list(dict.fromkeys((r["optim"], r["dtype"], r["schedule"]) for r in ok)) or [("-", "-", "-")]
    providers = [p for p in report["config"]["providers"] if any(r["provider"] == p for r in ok)]
    colors = {p: f"C{i}" for i, p in enumerate(PROVIDERS)}
    top_in, bottom_in = 0.9, 1.0  # title; x label and legend (inches)
    height = 3.9 * len(panels) + top_in + bottom_in
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, height), squeeze=False)
    # Fixed margins: tight_layout measured every label and took half the time of the whole plot.
    fig.subplots_adjust(left=0.065, right=0.985, top=1 - top_in / height, bottom=bottom_in / height,
                        hspace=0.38, wspace=0.18)
    for row, (optim, dtype, schedule) in enumerate(panels):
        mine = [r for r in ok if (r["optim"], r["dtype"], r["schedule"]) == (optim, dtype, schedule)]
        for col, (xkey, xlabel) in enumerate((("tensors", "tensors per step"), ("numel", "parameters per step"))):
            ax = axes[row][col]
            for p in providers:
                for family, fmt in ((SHAPES_NXM, "o-"), (None, "*")):
                    pts = sorted(
                        (r[xkey], r["median_s"] * 1e3, r["q1_s"] * 1e3, r["q3_s"] * 1e3)
                        for r in mine
                        if r["provider"] == p and ((r["shape"] in family) if family else (r["shape"] not in SHAPES_NXM))
                    )
                    if not pts:
                        continue
                    xs, ys, lo, hi = zip(*pts)
                    ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                                fmt=fmt, color=colors[p], ms=4 if family else 9, capsize=2, lw=1.3)
            for r in mine:
                if r["provider"] == BASELINE:
                    ax.annotate(r["shape"], (r[xkey], r["median_s"] * 1e3), textcoords="offset points",
                                xytext=(5, 4), fontsize=7, color="0.3")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel("ms per step (median)", fontsize=9)
            sched = "constant lr" if schedule == "constant" else "OneCycleLR (torch's / fusedclr's in-kernel)"
            ax.set_title(f"{optim} {dtype}, {sched}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m.get('torch_threads', '?')} torch threads"
    fig.suptitle(f"fusedclr bench on {report['config']['device']}: {where}, torch {m['torch']}, "
                 f"{report['date'][:10]}; bars: inter-quartile range", fontsize=10, y=1 - 0.3 / height)
    handles = [Line2D([], [], color=colors[p], marker="o", label=p) for p in providers]
    handles.append(Line2D([], [], color="0.3", marker="*", ms=9, ls="", label="model-shaped lists"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _names(value: str, choices: Sequence[str], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or value!r}; choose from {', '.join(choices)}")
    return names


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fusedclr bench",
        description="Time fusedclr's optimizer step against torch.optim (for-loop, foreach, fused, compiled) "
        "and report ratios vs torch fused, GB/s and % of copy bandwidth.",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, short budget: finishes in seconds")
    ap.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a log-log plot (PNG) of time per step")
    ap.add_argument("--markdown", metavar="PATH", help="write markdown tables (constant lr and OneCycleLR)")
    ap.add_argument("--optim", default="adamw", type=lambda v: _names(v, list(OPTIMS), "optimizer"),
                    help=f"comma-separated, from {', '.join(OPTIMS)} (default adamw)")
    ap.add_argument("--shapes", type=lambda v: _names(v, [*SHAPES, *QUICK_SHAPES], "shape"),
                    help=f"comma-separated, from {', '.join([*SHAPES, *QUICK_SHAPES])} "
                    "(default: all of DESIGN.md's, or the quick ones with --quick)")
    ap.add_argument("--dtypes", default="fp32,bf16", type=lambda v: _names(v, list(DTYPES), "dtype"))
    ap.add_argument("--schedules", default=",".join(SCHEDULES), type=lambda v: _names(v, SCHEDULES, "schedule"))
    ap.add_argument("--providers", type=lambda v: _names(v, list(PROVIDERS), "provider"),
                    help=f"comma-separated, from {', '.join(PROVIDERS)} (default: all)")
    ap.add_argument("--compile-timeout", type=float, default=300.0, metavar="S",
                    help="give up compiling torch-compile after S seconds (0: skip it; default 300)")
    ap.add_argument("--from-json", metavar="PATH",
                    help="measure nothing: print, plot and tabulate the report in PATH (from --json)")
    ap.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) first (default: torch's)")
    ap.add_argument("--no-big", action="store_true", help=f"skip the big shapes ({', '.join(sorted(BIG_SHAPES))})")
    ap.add_argument("--seconds", type=_positive_float, metavar="S",
                    help=f"time each provider of a case for about S seconds once its minimum samples are in "
                    f"(default {FULL.max_time_s:g}; --quick: {QUICK.max_time_s:g})")
    ap.add_argument("--time-limit", type=_positive_float, metavar="S",
                    help="start no case after S seconds; the cases left out are listed in the report. "
                    "With --json, the report is rewritten after every case")
    return ap


def _positive_float(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not out > 0 or math.isinf(out):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``fusedclr bench``: run, print the tables, write JSON and plot; returns the exit status."""
    args = parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        for key in dict.fromkeys((r["optim"], r["shape"], r["dtype"], r["schedule"]) for r in report["results"]):
            rows = [r for r in report["results"] if (r["optim"], r["shape"], r["dtype"], r["schedule"]) == key]
            print(format_table(rows, report["config"]["device"]))
        _write(report, args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fusedclr bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else list(SHAPES))
    if args.no_big:
        shapes = [s for s in shapes if s not in BIG_SHAPES]
    providers = args.providers or list(PROVIDERS)
    compile_timeout = args.compile_timeout
    if args.quick and args.providers is None:
        compile_timeout = 0.0  # compiling alone takes tens of seconds on a CPU
    budget = QUICK if args.quick else FULL
    if args.seconds is not None:
        budget = dataclasses.replace(budget, max_time_s=args.seconds)
    report = run(
        device=args.device,
        optims=args.optim,
        shapes=shapes,
        dtypes=args.dtypes,
        schedules=args.schedules,
        providers=providers,
        budget=budget,
        compile_timeout=compile_timeout,
        time_limit_s=args.time_limit,
        on_case=lambda partial: _write_partial(partial, args),
        log=lambda s: print(s, flush=True),
    )
    _write(report, args)
    return 0


def _write_partial(report: dict[str, Any], args: argparse.Namespace) -> None:
    """After every case: the JSON report and the markdown tables so far (the plot waits for the end)."""
    if args.json:
        _dump_json(report, args.json)
    if args.markdown:
        _dump_text(markdown_report(report), args.markdown)


def _dump_text(text: str, path: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, so the file is always whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _dump_json(report: dict[str, Any], path: str) -> None:
    _dump_text(json.dumps(report, indent=1), path)


def _write(report: dict[str, Any], args: argparse.Namespace) -> None:
    m = report["machine"]
    print(f"\n{m.get('gpu') or m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
          f"torch {m['torch']}, {report['date']}, commit {report['git_commit']}, {report['elapsed_s']:.0f} s, "
          f"load average {m.get('loadavg_before')} -> {m.get('loadavg_after')}")
    if args.json and args.json != args.from_json:
        _dump_json(report, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        _dump_text(markdown_report(report), args.markdown)
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(report, args.plot)
        except ImportError as exc:  # matplotlib is an optional dependency
            print(f"no plot: {exc} (pip install matplotlib)", file=sys.stderr)
        else:
            print(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
