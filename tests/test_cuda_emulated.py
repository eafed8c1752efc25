"""The CUDA kernels' device code, run on the CPU under host emulation.

CI has no GPU, so tests/test_cuda.py's GPU checks never run there. The
``emulated_ops`` fixture (conftest.py) compiles csrc/cuda/optim_kernels.cuh
(with the kernel selection of optim_dispatch.cuh) as host C++
(tests/cuda_emulation.cpp), which runs every (block, thread) of each launch in
turn. The optimizers' updates run on it from the optimizer table, against the
reference, in tests/test_op_parity.py (indexing, 128-bit and scalar paths,
chunk splitting, per-segment scalars, segments without a gradient, found_inf,
the step counters, the precision opt-ins), and its argument checks in
tests/test_op_errors.py. Here: test_cuda.py's checks of grad_sumsq,
schedule_eval and the rounding statistics, through its OPS / DEVICE
indirection. What the emulation cannot see: real concurrency, the memory
model, nvcc's code generation and speed.
"""

from __future__ import annotations

import pytest
import test_cuda as checks
import torch


@pytest.fixture(autouse=True)
def _on_emulator(emulated_ops, monkeypatch):
    monkeypatch.setattr(checks, "OPS", emulated_ops)
    monkeypatch.setattr(checks, "DEVICE", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_grad_sumsq(dtype):
    checks.test_grad_sumsq_matches_reference(dtype)


@pytest.mark.parametrize("schedule", list(checks.SCHEDULES))
def test_schedule_eval(schedule):
    checks.test_schedule_eval_matches_reference(schedule)


def test_stochastic_rounding_is_unbiased():
    checks.test_stochastic_rounding_is_unbiased()
