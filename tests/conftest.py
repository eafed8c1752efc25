"""Shared test helpers: the tolerance table and backend availability."""

from __future__ import annotations

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


__all__ = ["CPU_BACKENDS", "TOL", "fusedclr", "requires_extension"]
