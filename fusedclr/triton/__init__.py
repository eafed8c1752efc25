"""Triton kernels of the flat-buffer optimizer step (``backend="triton"``).

:func:`step_` has exactly the signature of ``fusedclr.reference.step_`` and of
the ``fusedclr::step_`` op (csrc/ops.cpp [note: step contract]): every
optimizer the C++ kernels know (sgd, adam, rmsprop, adagrad, radam, nadam,
lion, lookahead), one generic walk over the flat buffers with the optimizer's
math policy chosen at compile time (fusedclr/triton/_walk.py and
_policies.py, [note: math policies]), one update launch whatever the number of
tensors plus one tiny launch that advances the step counters, with the
learning rate and momentum / beta1 evaluated in-kernel from the schedule
descriptor.

Nothing here imports Triton: the kernels are built, and the
``fusedclr::triton_step_`` op registered, on first use. The package imports
without Triton; asking for the Triton backend then raises an error that says
why.

On CPU tensors the kernels run through Triton's interpreter, which Triton
selects when ``@triton.jit`` runs: set ``TRITON_INTERPRET=1`` in the
environment before importing triton or fusedclr. Without it, CPU tensors get a
clear error rather than a crash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from torch import Tensor

__all__ = ["available", "for_buckets", "grad_zero_", "load", "step_", "why_unavailable"]

_impl: ModuleType | None = None
_import_error: str | None = None


def why_unavailable() -> str:
    """Why the Triton backend cannot be used, or ``""`` when it can.

    Checks that torch has ``torch.library.triton_op`` (torch >= 2.6) and that
    Triton imports; the import happens here, on the first call, never at
    package import.
    """
    global _import_error
    if _impl is not None:
        return ""
    if _import_error is None:
        import torch

        if not hasattr(torch.library, "triton_op"):
            _import_error = f"torch {torch.__version__} has no torch.library.triton_op (torch >= 2.6 needed)"
        else:
            try:
                import triton  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton"
                _import_error = f"Triton is not importable ({type(exc).__name__}: {exc})"
            else:
                _import_error = ""
    return _import_error


def available() -> bool:
    """Whether the Triton backend can be used (Triton importable, torch >= 2.6).

    CPU tensors additionally need TRITON_INTERPRET=1 in the environment before
    import; the step functions check that and say so.
    """
    return why_unavailable() == ""


def load() -> None:
    """Imports Triton, builds the kernels and registers the ops now.

    Optional: the step functions do it on first use. Call it before
    ``torch.compile`` traces a step, because the import cannot be traced: a
    first use inside a compiled region costs a graph break (an error under
    ``fullgraph=True``) and one recompile.
    """
    _load()


def _load() -> ModuleType:
    global _impl
    if _impl is None:
        reason = why_unavailable()
        if reason:
            raise RuntimeError(
                f"fusedclr: backend='triton' was requested but the Triton backend is unavailable: {reason}. "
                "Install Triton (torch's CUDA wheels ship it) or use backend='auto', 'cuda', 'cpu' or 'reference'."
            )
        _impl = importlib.import_module("fusedclr.triton._ops")
    return _impl


def for_buckets(op: str = "step_") -> Callable[..., None]:
    """The implementation of op ``op`` that fusedclr's optimizers call. ``"step_"``: the
    signature of ``fusedclr::step_``, but a bucket's buffers are checked on their first step
    and again only when one of them is replaced, not on every step (the arguments that change
    per step are checked every time) [note: triton checks per bucket]. ``"grad_zero_"``:
    :func:`grad_zero_`."""
    if op == "step_":
        return _load().step_for_bucket_
    if op == "grad_zero_":
        return _load().grad_zero_
    raise ValueError(f"op must be 'step_' or 'grad_zero_', got {op!r}")


def step_(
    optimizer: str,
    segments: Tensor,
    param_dtype: torch.dtype,
    states: list[Tensor | None],
    seg_steps: Tensor,
    seg_scalars: Tensor | None,
    chunks: Tensor,
    hyper: Tensor,
    schedule: Tensor,
    schedule_step: Tensor,
    options: list[float],
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_param: Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """Triton ``fusedclr::step_`` (see csrc/ops.cpp [note: step contract])."""
    _load().step_(optimizer, segments, param_dtype, states, seg_steps, seg_scalars, chunks, hyper, schedule,
                  schedule_step, options, maximize, grad_scale, found_inf, master_param, sr_seed)


def grad_zero_(segments: Tensor, param_dtype: torch.dtype, chunks: Tensor) -> None:
    """Triton ``fusedclr::grad_zero_``: zeroes the active gradients of a segment table in place
    (csrc/ops.cpp [note: zeroing through the table])."""
    _load().grad_zero_(segments, param_dtype, chunks)
