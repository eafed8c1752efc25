"""Optimizer-step benchmarks against stock PyTorch: the one harness.

``fusedclr bench`` (:func:`main`, also ``python -m fusedclr.bench``) and the
pytest-benchmark suite in ``benchmarks/`` both take everything from here: the
shapes, the providers, the byte counts, the copy-bandwidth yardstick and the
timing. Nothing is duplicated between them, so the two cannot drift apart.

The package, in the order a run uses it:

* :mod:`.shapes`: the shape lists;
* :mod:`.cases`: optimizers, dtypes, schedules, bytes per parameter, :class:`Case`;
* :mod:`.providers`: torch.optim's implementations and fusedclr's backends;
* :mod:`.deepspeed_cpu_adam`: DeepSpeed's CPU Adam, a provider where deepspeed is installed;
* :mod:`.foreach_impls`: foreach Lion and Lookahead, for what torch.optim lacks;
* :mod:`.check`: whether each provider steps, and to torch's parameters, before it is timed;
* :mod:`.timing`: warm-up, samples, statistics, the copy yardstick, launch counts;
* :mod:`.steadiness`: whether multi-threaded CPU steps are steady here now;
* :mod:`.runner`: every provider of a case in turns, and a whole run's report;
* :mod:`.machine`: what the timings were taken on;
* :mod:`.report`: text table, markdown and plot;
* :mod:`.cli`: ``fusedclr bench``.

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
* Before it is timed, every provider steps a small version of the case, and
  must change the parameters and agree with torch's (:func:`~.check.wrong`);
  one that does not is reported as an error, not timed.
* Ratios are ``baseline time / provider time`` in the same process, so
  > 1 means faster than the baseline: ``torch.optim.X(fused=True)``, or
  ``foreach=True`` where torch has no fused step for the optimizer (RMSprop,
  RAdam, NAdam; Lion's is the bench's foreach Lion). fusedclr's rows also
  carry ``vs_torch``: the per-round ratio against each torch implementation.
* Effective GB/s = bytes moved per step / median time, with the bytes of
  :func:`bytes_per_param` (the roofline table of docs/DESIGN.md section 4). It is divided
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

from .cases import BYTES_TABLE, DTYPES, ONECYCLE_TOTAL_STEPS, OPTIMS, SCHEDULES, Case, OptimSpec, bytes_per_param
from .check import wrong
from .cli import main, parser
from .foreach_impls import ForeachLion, ForeachLookahead
from .machine import git_commit, machine_info
from .providers import (
    BASELINE,
    COMPARED_PROVIDERS,
    COMPILE_MAX_TENSORS,
    PROVIDERS,
    TORCH_PROVIDERS,
    Provider,
    Stepper,
    baseline,
    build,
    fusedclr_optimizer,
    torch_optimizer,
    unavailable,
)
from .report import format_table, markdown_report, markdown_table, markdown_vs_torch, plot
from .runner import INTERLEAVE_BYTES, free, measure, run
from .shapes import (
    BIG_SHAPES,
    EXTRA_SHAPES,
    QUICK_SHAPES,
    SHAPES,
    SHAPES_NXM,
    Shape,
    gpt2_small_shapes,
    numel_of,
    resnet50_shapes,
    shape_list,
)
from .timing import (
    FULL,
    QUICK,
    Budget,
    Timing,
    _is_user_annotation,
    copy_bandwidth,
    count_launches,
    cpu_time_per_step,
    deadline,
    prepare,
    ratio_quartiles,
    synchronizer,
    time_step,
)

# _is_user_annotation is imported for its unit test, not exported.
__all__ = [
    "BASELINE",
    "BIG_SHAPES",
    "BYTES_TABLE",
    "COMPARED_PROVIDERS",
    "COMPILE_MAX_TENSORS",
    "DTYPES",
    "EXTRA_SHAPES",
    "FULL",
    "INTERLEAVE_BYTES",
    "ONECYCLE_TOTAL_STEPS",
    "OPTIMS",
    "PROVIDERS",
    "QUICK",
    "QUICK_SHAPES",
    "SCHEDULES",
    "SHAPES",
    "SHAPES_NXM",
    "TORCH_PROVIDERS",
    "Budget",
    "Case",
    "ForeachLion",
    "ForeachLookahead",
    "OptimSpec",
    "Provider",
    "Shape",
    "Stepper",
    "Timing",
    "baseline",
    "build",
    "bytes_per_param",
    "copy_bandwidth",
    "count_launches",
    "cpu_time_per_step",
    "deadline",
    "format_table",
    "free",
    "fusedclr_optimizer",
    "git_commit",
    "gpt2_small_shapes",
    "machine_info",
    "main",
    "markdown_report",
    "markdown_table",
    "markdown_vs_torch",
    "measure",
    "numel_of",
    "parser",
    "plot",
    "prepare",
    "ratio_quartiles",
    "resnet50_shapes",
    "run",
    "shape_list",
    "synchronizer",
    "time_step",
    "torch_optimizer",
    "unavailable",
    "wrong",
]
