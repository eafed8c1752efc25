"""Shared test helpers: the tolerance table, backend availability and the CUDA host emulation."""

from __future__ import annotations

import os
import types

import pytest
import torch

import fusedclr
from fusedclr import ops

# One table of tolerances keyed by dtype (torch.testing.assert_close defaults
# for fp32/fp64; low precision is judged relative to torch's own error instead).
TOL = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
}

CPU_BACKENDS = ["cpu", "reference"] if ops.extension_available() else ["reference"]


def requires_extension():
    return pytest.mark.skipif(
        not ops.extension_available(), reason=f"compiled extension missing: {ops.extension_error()}"
    )


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough to keep the emulation quick, large enough that the chunk split
# (plan_launch) cuts the long chunks of test_cuda_emulated.py's test_chunking_and_alignment.
RESIDENT_BLOCKS = 4


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """The CUDA kernels' device code compiled as host C++ (tests/cuda_emulation.cpp), as ops.

    Session-scoped: the ops register the ``fusedclr_emulated`` namespace, which
    a process can load once.
    """
    if not os.path.isdir(os.path.join(ROOT, "csrc", "cuda")):
        pytest.skip("needs the source checkout (csrc/cuda)")
    from torch.utils.cpp_extension import load

    load(
        name="fusedclr_cuda_emulation",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cuda")],
        extra_cflags=["-O1"],
        build_directory=str(tmp_path_factory.mktemp("cuda_emulation")),
        is_python_module=False,
    )
    lib = torch.ops.fusedclr_emulated
    return types.SimpleNamespace(
        sgd_step_=lambda *args: lib.sgd_step_(*args, resident=RESIDENT_BLOCKS),
        adam_step_=lambda *args: lib.adam_step_(*args, resident=RESIDENT_BLOCKS),
        schedule_eval=lib.schedule_eval,
        grad_sumsq=lambda *args: lib.grad_sumsq(*args, resident=RESIDENT_BLOCKS),
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


__all__ = ["CPU_BACKENDS", "TOL", "fusedclr", "requires_extension"]
