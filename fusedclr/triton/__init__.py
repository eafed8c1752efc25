"""Triton kernels for the flat-buffer SGD and Adam/AdamW steps (``backend="triton"``).

:func:`sgd_step_` and :func:`adam_step_` have exactly the signatures of
``fusedclr.reference.sgd_step_`` / ``adam_step_`` and of the
``fusedclr::sgd_step_`` / ``adam_step_`` ops [note: flat-buffer step contract]:
one update launch over the whole flat buffer (plus one tiny launch that
advances the step counters), with the learning rate and momentum / beta1
evaluated in-kernel from the schedule descriptor.

Nothing here imports Triton: the kernels are built, and the
``fusedclr::triton_sgd_step_`` / ``fusedclr::triton_adam_step_`` ops
registered, on first use. The package imports without Triton; asking for the
Triton backend then raises an error that says why.

On CPU tensors the kernels run through Triton's interpreter, which Triton
selects when ``@triton.jit`` runs: set ``TRITON_INTERPRET=1`` in the
environment before importing triton or fusedclr. Without it, CPU tensors get a
clear error rather than a crash.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

from torch import Tensor

__all__ = ["adam_step_", "available", "for_buckets", "load", "sgd_step_", "step_", "why_unavailable"]

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
    """The implementation of ``fusedclr::step_`` that fusedclr's optimizers call: the same
    signature, but a bucket's buffers are checked on their first step and again only when one
    of them is replaced, not on every step (the arguments that change per step are checked
    every time)."""
    if op != "step_":
        raise ValueError(f"op must be 'step_', got {op!r}")
    impl = _load()
    return functools.partial(_step, impl.sgd_step_for_bucket_, impl.adam_step_for_bucket_)


def step_(*args, **kwargs) -> None:
    """Triton ``fusedclr::step_`` (see csrc/ops.cpp [note: step contract])."""
    impl = _load()
    _step(impl.sgd_step_, impl.adam_step_, *args, **kwargs)


def _step(sgd, adam, optimizer, segments, param_dtype, states, seg_steps, seg_scalars, chunks, hyper, schedule,
          schedule_step, options, maximize=False, grad_scale=None, found_inf=None, master_param=None,
          sr_seed=None) -> None:
    if optimizer == "sgd":
        dampening, weight_decay, nesterov = options
        sgd(segments, param_dtype, states[0], seg_steps, chunks, hyper, schedule, schedule_step, dampening,
            weight_decay, bool(nesterov), maximize, grad_scale, found_inf, master_param, sr_seed)
    elif optimizer == "adam":
        beta2, eps, weight_decay, decoupled = options
        adam(segments, param_dtype, states[0], states[1], states[2], seg_steps, chunks, hyper, schedule,
             schedule_step, beta2, eps, weight_decay, bool(decoupled), maximize, grad_scale, found_inf, master_param,
             sr_seed)
    else:
        raise NotImplementedError(f"fusedclr.triton: no Triton kernel for {optimizer!r} yet")


def sgd_step_(
    segments: Tensor,
    param_dtype: torch.dtype,
    momentum_buffer: Tensor | None,
    seg_steps: Tensor,
    chunks: Tensor,
    hyper: Tensor,
    schedule: Tensor,
    schedule_step: Tensor,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    master_param: Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """Triton ``fusedclr::sgd_step_`` (see csrc/ops.cpp for the contract)."""
    _load().sgd_step_(segments, param_dtype, momentum_buffer, seg_steps, chunks, hyper, schedule, schedule_step,
                      dampening, weight_decay, nesterov, maximize, grad_scale, found_inf, master_param, sr_seed)


def adam_step_(
    segments: Tensor,
    param_dtype: torch.dtype,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    seg_steps: Tensor,
    chunks: Tensor,
    hyper: Tensor,
    schedule: Tensor,
    schedule_step: Tensor,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    master_param: Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """Triton ``fusedclr::adam_step_`` (see csrc/ops.cpp for the contract)."""
    _load().adam_step_(segments, param_dtype, exp_avg, exp_avg_sq, max_exp_avg_sq, seg_steps, chunks, hyper,
                       schedule, schedule_step, beta2, eps, weight_decay, decoupled, maximize, grad_scale, found_inf,
                       master_param, sr_seed)
