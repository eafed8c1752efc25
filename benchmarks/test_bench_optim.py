"""Optimizer step time: torch for-loop / foreach / fused / compiled against fusedclr's backends.

Every (optimizer, shape, dtype, schedule, device) is one pytest-benchmark
group, so ``--benchmark-group-by=group`` tables put the providers of a case
side by side. Each test's ``extra_info`` holds the effective GB/s (bytes from
``fusedclr.bench.bytes_per_param``), the same-run copy bandwidth and the
percentage of it, host CPU time per step and, on a GPU, launches per step.
Method: [note: bench method] in ``fusedclr/bench/__init__.py``.
"""

from __future__ import annotations

import pytest
import torch
from shapes import shape_params

from fusedclr import bench

OPTIMS = ["adamw", "sgd"]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("provider", list(bench.PROVIDERS))
@pytest.mark.parametrize("schedule", bench.SCHEDULES)
@pytest.mark.parametrize("dtype", list(bench.DTYPES))
@pytest.mark.parametrize("shape", shape_params())
@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("device", DEVICES)
def test_step(benchmark, copy_gbps, compile_timeout, device, optim, shape, dtype, schedule, provider):
    case = bench.Case(optim, shape, dtype, schedule, device)
    reason = bench.unavailable(provider, case, compile_timeout=compile_timeout)
    if reason is not None:
        pytest.skip(reason)
    copy = copy_gbps(case)  # before this provider allocates, so the two never share memory
    stepper = bench.build(provider, case)
    try:
        sync = bench.synchronizer(device)

        def step() -> None:
            stepper.step()
            sync()

        try:
            with bench.deadline(compile_timeout if provider == "torch-compile" else None):
                steps_per_round, rounds = bench.prepare(stepper.step, device, bench.FULL)
        except TimeoutError as e:
            pytest.skip(f"torch.compile: compiling {e}")
        benchmark.group = case.label
        benchmark.pedantic(step, rounds=rounds, iterations=steps_per_round, warmup_rounds=0)
        if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing was timed
            return

        bpp = bench.bytes_per_param(optim, case.torch_dtype, stepper.state_dtype)
        gbps = bpp * case.numel / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(
            {
                "provider": provider,
                "tensors": len(case.shapes),
                "numel": case.numel,
                "bytes_per_param": bpp,
                "gbps": gbps,
                "copy_gbps": copy,
                "pct_copy": 100.0 * gbps / copy,
                "cpu_s_per_step": bench.cpu_time_per_step(stepper.step, device),
                "launches_per_step": bench.count_launches(stepper.step, device),
                "note": stepper.note,
                "torch": torch.__version__,
            }
        )
    finally:
        stepper.close()
        del stepper
        bench.free(case)
