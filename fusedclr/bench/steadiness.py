"""Whether torch's multi-threaded CPU steps are steady on this machine right now.

On a machine whose cores are shared (the 2-vCPU development VM with four
other people's work on it), torch at 2 threads ran its fused AdamW step 10-80x
slower than at 1 thread whenever anything else was running, and a 2-thread
ratio swung from 338x to 2.3x between two runs: every ``at::parallel_for``
waits for its slowest thread, and a thread that lost its core stalls the region
for a scheduler tick. One thread shares a core gracefully.

:func:`check_threads` times the same step at 1 thread and at ``threads``
threads, in alternating samples so that both see the same neighbours, and
:func:`judge` says whether ``threads`` is steady. ``fusedclr bench`` on a CPU
measures at 1 thread, and says so, when it is not.
"""

from __future__ import annotations

from typing import Any

import torch

from .cases import Case
from .providers import build
from .timing import Budget, Timing, _Sampler, synchronizer

# A step whose inter-quartile range exceeds this fraction of its median, or
# whose slowest sample is this many times its fastest, is noisy.
NOISY_IQR = 0.25
NOISY_MAX_OVER_MIN = 3.0
# More threads than this much slower than one thread: they are fighting over cores.
SLOWER = 1.25
# A ratio whose third quartile exceeds its first by this factor is noisy.
NOISY_RATIO_SPREAD = 1.5
# About 0.3 s at each thread count: 1M fp32 AdamW elements, several samples.
CHECK_CASE = Case("adamw", "4x256K", "fp32", "constant", "cpu")
CHECK_BUDGET = Budget(warmup_steps=2, warmup_s=0.0, min_samples=9, max_samples=15, max_time_s=0.3,
                      min_sample_s=5e-3)


def noisy(t: Timing) -> bool:
    """Whether ``t``'s spread is too wide for its median to be believed."""
    s = t.summary()
    return s["iqr_rel"] > NOISY_IQR or s["max_s"] > NOISY_MAX_OVER_MIN * s["min_s"]


def judge(one: Timing, many: Timing, threads: int) -> dict[str, Any]:
    """The verdict on ``threads`` threads against 1 thread, timed side by side.

    ``steady`` is false when the ``threads``-thread step is noisy or slower than
    the 1-thread step by more than :data:`SLOWER` (more threads than cores are
    free). ``prefer`` is the thread count to measure with: 1 when only that one
    is steady, else ``threads``.
    """
    reasons = []
    if noisy(many):
        reasons.append(f"{threads}-thread steps spread {_spread(many)}")
    if many.median > SLOWER * one.median:
        reasons.append(f"{threads} threads were {many.median / one.median:.1f}x slower than 1 "
                       f"({many.median * 1e3:.3g} vs {one.median * 1e3:.3g} ms per step)")
    steady = not reasons
    prefer = threads if steady or noisy(one) else 1
    return {
        "threads": threads,
        "steady": steady,
        "prefer": prefer,
        "reasons": reasons,
        "one_thread_noisy": noisy(one),
        "one": one.summary(),
        "many": many.summary(),
        "case": CHECK_CASE.label,
    }


def _spread(t: Timing) -> str:
    s = t.summary()
    return f"IQR {100 * s['iqr_rel']:.0f}% of the median, max {s['max_s'] / s['min_s']:.1f}x min"


def check_threads(threads: int) -> dict[str, Any]:
    """Times torch-fused AdamW (1M elements) at 1 and at ``threads`` threads, samples alternating;
    returns :func:`judge`'s verdict. Leaves torch at ``threads`` threads."""
    stepper = build("torch-fused", CHECK_CASE)
    sync = synchronizer("cpu")
    try:
        samplers = {n: _Sampler(stepper.step, sync, CHECK_BUDGET) for n in (1, threads)}
        for n, s in samplers.items():
            torch.set_num_threads(n)
            s.warm_up()
        while not all(s.done for s in samplers.values()):
            for n, s in samplers.items():
                if not s.done:
                    torch.set_num_threads(n)
                    s.sample()
    finally:
        torch.set_num_threads(threads)
        stepper.close()
    return judge(samplers[1].timing(), samplers[threads].timing(), threads)


def describe(verdict: dict[str, Any], asked: bool) -> str | None:
    """One line for the output: ``None`` when ``threads`` was steady."""
    if verdict["steady"]:
        return None
    n = verdict["threads"]
    why = "; ".join(verdict["reasons"])
    if verdict["prefer"] == 1 and not asked:
        return (f"note: torch at {n} threads is unsteady on this machine now ({why}); measuring at 1 thread, "
                f"which is steady. --threads {n} measures at {n} threads anyway.")
    if verdict["one_thread_noisy"]:
        return (f"note: this machine is busy: torch's steps are noisy at 1 and at {n} threads ({why}); "
                "read the ratios with their spread, or measure again when it is idle.")
    return (f"note: torch at {n} threads is unsteady on this machine now ({why}); measuring at {n} threads as "
            "asked: read the ratios with their spread (--threads 1 is steady).")

