"""The CUDA kernels' device code, run on the CPU under host emulation.

CI has no GPU, so tests/test_cuda.py's GPU checks never run there. This module
compiles csrc/cuda/optim_kernels.cuh (with the kernel selection of
optim_dispatch.cuh) as host C++ (tests/cuda_emulation.cpp), which runs every
(block, thread) of each launch in turn, and drives the same checks against the
reference through it: indexing, 128-bit and scalar paths, chunk splitting,
per-segment scalars, segments without a gradient, found_inf, the step counters
and the gradients' sum of squares. What it cannot see:
real concurrency, the memory model, nvcc's code generation and speed.

The build is conftest.py's session fixture ``emulated`` (one build and load per
session: tests/test_golden_schedules.py evaluates schedules through it too).
"""

from __future__ import annotations

import itertools

import pytest
import test_cuda as checks
import torch

@pytest.fixture(autouse=True)
def _on_emulator(emulated, monkeypatch):
    monkeypatch.setattr(checks, "OPS", emulated)
    monkeypatch.setattr(checks, "DEVICE", "cpu")


@pytest.mark.parametrize("mode", list(checks.SGD_MOMENTUM))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sgd(dtype, mode):
    checks.test_sgd_matches_reference(dtype, mode, 0.05, True)


@pytest.mark.parametrize(("amsgrad", "decoupled"), list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_adam(dtype, amsgrad, decoupled):
    checks.test_adam_matches_reference(dtype, amsgrad, decoupled, True, 0.05)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_float64(kind):
    checks.test_float64(kind)


@pytest.mark.parametrize("schedule", ["onecycle", "multistep"])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_schedules(kind, schedule):
    checks.test_schedules(kind, schedule)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_active_grad_scale_found_inf(kind):
    checks.test_active_grad_scale_found_inf(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_grad_sumsq(dtype):
    checks.test_grad_sumsq_matches_reference(dtype)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunking_and_alignment(dtype, offset):
    checks.test_chunking_and_alignment(dtype, offset, 65536)


def test_many_small_segments():
    checks.test_many_small_segments("adam")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_bf16_states(kind):
    checks.test_bf16_states(kind)


@pytest.mark.parametrize("schedule", list(checks.SCHEDULES))
def test_schedule_eval(schedule):
    checks.test_schedule_eval_matches_reference(schedule)


@pytest.mark.parametrize("dtype", checks.LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_master_weights(kind, dtype):
    checks.test_master_weights_match_reference(kind, dtype)


@pytest.mark.parametrize("seed", [1234, 2**40 + 7])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_stochastic_rounding(kind, seed):
    checks.test_stochastic_rounding_matches_reference(kind, seed)


def test_stochastic_rounding_is_unbiased():
    checks.test_stochastic_rounding_is_unbiased()


def test_precision_arguments_are_checked():
    checks.test_precision_arguments_are_checked()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_skipped_step_leaves_masters_and_rounding_alone(kind):
    checks.test_skipped_step_leaves_masters_and_rounding_alone(kind)
