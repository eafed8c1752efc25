"""Shared test helpers: the tolerance table, backend availability and the op backends."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable

import pytest
import torch

import fusedclr
from fusedclr import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One table of tolerances keyed by dtype (torch.testing.assert_close defaults
# for fp32/fp64; low precision is judged relative to torch's own error instead).
TOL = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
}
# A low-precision buffer against the reference in the same dtype: the two may round
# the final store differently (fused multiply-adds, evaluation order), so two units in
# the last place of the dtype. fp32 states of such a bucket are held to the same bound:
# they inherit the parameters' rounding (weight decay reads the stored parameter).
TOL_LOWP = {dt: {"rtol": 2 * torch.finfo(dt).eps, "atol": 1e-5} for dt in (torch.bfloat16, torch.float16)}


def interrupt_on_call(real: Callable, n: int, exc: type[BaseException] = KeyboardInterrupt) -> Callable:
    """``real``, except that its ``n``-th call raises ``exc`` (a run stopped part way: Ctrl-C, a time limit)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)

    return wrapper


def tol_lowp(dtype: torch.dtype, want: torch.Tensor) -> dict:
    """TOL_LOWP[dtype] for a buffer that steps went through: a store rounded the other way
    leaves an absolute difference of an ulp of the magnitude it had then, which a value
    that later moved towards zero keeps (cancellation), so the absolute term is two ulps
    at the buffer's root-mean-square magnitude."""
    rms = want.double().square().mean().sqrt().item() if want.numel() else 0.0
    tol = dict(TOL_LOWP[dtype])
    tol["atol"] = max(tol["atol"], tol["rtol"] * rms)
    return tol

CPU_BACKENDS = ["cpu", "reference"] if ops.extension_available() else ["reference"]


def requires_extension():
    return pytest.mark.skipif(
        not ops.extension_available(), reason=f"compiled extension missing: {ops.extension_error()}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# -- the op backends: fusedclr::step_ on the CPU, on CUDA, and CUDA's device code emulated --------

# The emulated device's resident blocks: small enough to keep the emulation quick, few enough
# that plan_launch splits chunks into several work items.
RESIDENT_BLOCKS = 4


@dataclasses.dataclass(frozen=True)
class OpBackend:
    """One implementation of the ops: ``step_``, ``grad_sumsq`` and ``grad_zero_`` (op signatures) on ``device``."""

    name: str
    step_: Callable[..., None]
    grad_sumsq: Callable[..., torch.Tensor]
    grad_zero_: Callable[..., None]
    schedule_eval: Callable[..., torch.Tensor]
    device: str


def has_cuda_kernels() -> bool:
    return torch.cuda.is_available() and ops.cuda_kernels_registered()


def _emulation_build_dir(config) -> str:
    """Where the emulation is built: pytest's cache directory, or without the cache plugin
    (scripts/test.sh) a directory of this checkout's own under the system's temporary one.
    Kept between sessions: ninja rebuilds only when the source or a header it includes
    changed (a few minutes on 2 cores), and concurrent sessions share it under torch's lock."""
    cache = getattr(config, "cache", None)
    if cache is not None:
        return str(cache.mkdir("cuda_emulation"))
    key = hashlib.sha1(ROOT.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"fusedclr-cuda-emulation-{key}")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def emulated_ops(request) -> OpBackend:
    """The CUDA kernels' device code compiled as host C++ (tests/cuda_emulation.cpp), as an
    OpBackend on CPU tensors (built once per checkout: _emulation_build_dir)."""
    if not os.path.isdir(os.path.join(ROOT, "csrc", "cuda")):
        pytest.skip("needs the source checkout (csrc/cuda)")
    from torch.utils.cpp_extension import load

    build = _emulation_build_dir(request.config)
    load(
        name="fusedclr_cuda_emulation",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cuda")],
        extra_cflags=["-O1"],
        build_directory=str(build),
        is_python_module=False,
    )
    lib = torch.ops.fusedclr_emulated
    return OpBackend("emulated", _with_state_args(functools.partial(lib.step_, resident=RESIDENT_BLOCKS)),
                     functools.partial(lib.grad_sumsq, resident=RESIDENT_BLOCKS),
                     functools.partial(lib.grad_zero_, resident=RESIDENT_BLOCKS), lib.schedule_eval, "cpu")


def _with_state_args(op: Callable[..., None]) -> Callable[..., None]:
    """``op`` (the schema's state0..state3) called with a ``states`` list, as fusedclr.ops.step_ does."""

    def step_(optimizer, segments, param_dtype, states, *args, **kwargs):
        return op(optimizer, segments, param_dtype, *ops.state_args(optimizer, states), *args, **kwargs)

    return step_


def _compiled(device: str) -> OpBackend:
    lib = torch.ops.fusedclr
    return OpBackend("cpu" if device == "cpu" else "cuda", _with_state_args(lib.step_), lib.grad_sumsq,
                     lib.grad_zero_, lib.schedule_eval, device)


# The backends a parity or error test runs on (see the `op_backend` fixture); a CUDA GPU's
# rows are marked gpu and skip without one.
OP_BACKENDS = [
    pytest.param("cpu", marks=requires_extension()),
    "emulated",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not has_cuda_kernels(),
                                                                    reason="needs a CUDA GPU and the CUDA kernels")]),
]


def op_backend_named(request, name: str) -> OpBackend:
    if name == "emulated":
        return request.getfixturevalue("emulated_ops")
    if name == "cpu" and not ops.extension_available():
        pytest.skip(f"compiled extension missing: {ops.extension_error()}")
    return _compiled(name)


@pytest.fixture(params=OP_BACKENDS)
def op_backend(request) -> OpBackend:
    """fusedclr::step_ on the CPU (the compiled op), under host emulation of the CUDA
    kernels, and on a CUDA GPU (skipped without one)."""
    return op_backend_named(request, request.param)


def available_op_backends(request) -> list[OpBackend]:
    """Every op backend this machine runs (the emulated one builds on first use)."""
    out = [_compiled("cpu")] if ops.extension_available() else []
    out.append(request.getfixturevalue("emulated_ops"))
    if has_cuda_kernels():
        out.append(_compiled("cuda"))
    return out


__all__ = ["CPU_BACKENDS", "OP_BACKENDS", "TOL", "TOL_LOWP", "tol_lowp", "OpBackend", "fusedclr", "requires_extension"]
