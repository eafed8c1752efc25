"""pytest-benchmark suite of optimizer steps: ``pytest benchmarks/ [-m "not big"] [-m gpu]``.

Providers, shapes, byte counts, timing plans and the copy-bandwidth yardstick
all come from :mod:`fusedclr.bench`, which ``fusedclr bench`` uses as well.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fusedclr import bench


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedclr bench")
    group.addoption(
        "--bench-compile-timeout",
        type=float,
        default=300.0,
        help="seconds allowed to compile the torch-compile provider before it is skipped (0 skips it)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "big: shapes over 100M parameters, minutes on a CPU (deselect: -m 'not big')")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def compile_timeout(request: pytest.FixtureRequest) -> float:
    return request.config.getoption("--bench-compile-timeout")


@pytest.fixture(scope="session")
def copy_gbps() -> Callable[[bench.Case], float]:
    """GB/s of a plain copy of a case's byte count, measured once per size in this session."""
    cache: dict[tuple[str, int], float] = {}

    def measure(case: bench.Case) -> float:
        key = (case.device, case.copy_bytes)
        if key not in cache:
            cache[key] = bench.copy_bandwidth(case.copy_bytes, case.device, bench.FULL)[0]
        return cache[key]

    return measure
