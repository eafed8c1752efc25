"""The table-driven optimizer tests (tests/test_optim_table.py, and tests/test_zero_grad.py's
``zero_grad``) on the CUDA kernels under host emulation.

The emulated-CUDA backend is tests-only: ``backend="emulated"`` builds the optimizer as a
CPU one and hands its buckets to ``fusedclr_emulated::step_`` (tests/cuda_emulation.cpp, the
CUDA kernels' device code compiled as host C++, conftest.py's ``emulated_ops``), which walks
the same segment tables. So the CUDA update code meets torch's option sets (and the table's
oracles for Lion and Lookahead) through the public classes, as the cpu, reference and Triton
backends do. The emulation runs every thread of a launch in turn: small shapes, 10 steps,
torch's and the table's own option sets, one per optimizer for the bf16 and checkpoint checks.
"""

import pytest
from optim_harness import SMALL_SHAPES

import fusedclr.optim._base as base
from test_optim_table import *  # noqa: F403 - the tests and the hook that parametrizes them
from test_optim_table import Backend
from test_zero_grad import *  # noqa: F403 - zero_grad(set_to_none=False) through the table

BACKENDS = [Backend("emulated", shapes=SMALL_SHAPES, small_shapes=SMALL_SHAPES, sources=("torch", "own"),
                    sampled=("test_bf16_error_within_factor_of_reference", "test_state_dict_round_trip_mid_run"))]


@pytest.fixture(autouse=True)
def _emulated_backend(emulated_ops, monkeypatch):
    """``backend="emulated"``: CPU buckets stepped (and their gradients zeroed) by the emulated CUDA kernels."""
    resolve = base.resolve_backend

    def resolve_emulated(backend, device, op="step_"):
        return getattr(emulated_ops, op) if backend == "emulated" else resolve(backend, device, op)

    monkeypatch.setattr(base, "BACKENDS", (*base.BACKENDS, "emulated"))
    monkeypatch.setattr(base, "resolve_backend", resolve_emulated)
