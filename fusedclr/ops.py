"""Python side of the ``fusedclr`` operator library.

Loads the compiled extension when it is there (a guarded import: the package
imports and falls back to the reference backend, with one warning, when it is
not), registers a fake (meta) kernel for every op so that ``torch.compile`` and
fake tensors can trace them, and exposes thin wrappers.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "adam_step_",
    "build_mismatch",
    "cuda_kernels_registered",
    "extension_available",
    "extension_error",
    "grads_are",
    "grads_checker",
    "schedule_eval",
    "sgd_step_",
]

_EXT_ERROR: str | None = None
_grads_checker = None
_grads_match = None
try:
    from fusedclr import _C  # registers the ops with the dispatcher

    _grads_checker = getattr(_C, "grads_checker", None)
    _grads_match = getattr(_C, "grads_match", None)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    _EXT_ERROR = str(exc)



def build_mismatch() -> str | None:
    """Why the compiled extension may not fit the torch running now, or ``None``.

    setup.py records ``torch.__version__`` at build time in ``fusedclr/_build_info.py``.
    A plain ``pip install .`` builds in an isolated environment against whatever
    torch pip picks there, which need not be the one installed beside fusedclr;
    torch's C++ ABI changes between versions, so the library then fails to load
    or misbehaves. ``None`` also when nothing was recorded (no build, or one made
    before the record existed): there is nothing to compare.
    """
    try:
        from fusedclr import _build_info
    except ImportError:
        return None
    built = getattr(_build_info, "TORCH_VERSION", None)
    if built is None or built == torch.__version__:
        return None
    return (f"fusedclr's compiled extension was built against torch {built}, but torch {torch.__version__} is "
            "running; rebuild it against this torch with `pip install --no-build-isolation .` "
            "(or `-e .` in a checkout)")


_BUILD_MISMATCH = build_mismatch()
if _BUILD_MISMATCH is not None:
    warnings.warn(_BUILD_MISMATCH, RuntimeWarning, stacklevel=2)
    if _EXT_ERROR is not None:
        _EXT_ERROR += f" ({_BUILD_MISMATCH})"

_grad_of = operator.attrgetter("grad")

_warned = False


def extension_available() -> bool:
    """Whether the compiled ``fusedclr._C`` extension loaded."""
    return _EXT_ERROR is None


def extension_error() -> str | None:
    """Why the compiled extension did not load, or ``None``."""
    return _EXT_ERROR


def warn_missing_extension() -> None:
    """Warns once that the compiled kernels are missing and the reference path is used."""
    global _warned
    if not _warned and _EXT_ERROR is not None:
        _warned = True
        warnings.warn(
            "fusedclr: the compiled extension is not available "
            f"({_EXT_ERROR}); using the pure-PyTorch reference backend, which is slower. "
            "Rebuild with `pip install --no-build-isolation -e .` to get the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


def grads_are(params: list[Tensor], expected: list[Tensor | None]) -> bool:
    """Whether every ``params[i].grad is expected[i]``: the optimizers' check that no
    gradient was replaced, once. Buckets prepare it (:func:`grads_checker`) and run it
    every step."""
    return grads_checker(params, expected)()


def grads_checker(params: list[Tensor], expected: list[Tensor | None]) -> Callable[[], bool]:
    """:func:`grads_are` prepared for repeated use: a function of no arguments that answers
    it for these lists as they are now (later changes to the lists are not seen). With the
    extension it is one C loop that reads two pointers per parameter (a few ns, where
    Python's ``.grad`` getter costs ~80) [note: grads check]."""
    if _grads_checker is not None:
        # The partial holds the objects the capsule points to, where Python's GC sees them.
        return functools.partial(_grads_match, _grads_checker(params, expected), tuple(params), tuple(expected))
    params, expected = list(params), list(expected)
    return lambda: all(map(operator.is_, map(_grad_of, params), expected))


def cuda_kernels_registered() -> bool:
    """Whether the extension was built with its CUDA kernels (true even without a GPU)."""
    return extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fusedclr::adam_step_", "CUDA")


if extension_available():

    @torch.library.register_fake("fusedclr::sgd_step_")
    def _sgd_step_fake(param, grad, momentum_buffer, seg_steps, chunks, active, hyper, schedule,
                       schedule_step, dampening, weight_decay, nesterov, maximize, grad_scale, found_inf,
                       master_param=None, sr_seed=None):
        return None

    @torch.library.register_fake("fusedclr::adam_step_")
    def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, seg_steps, chunks, active, hyper,
                        schedule, schedule_step, beta2, eps, weight_decay, decoupled, maximize, grad_scale,
                        found_inf, master_param=None, sr_seed=None):
        return None

    @torch.library.register_fake("fusedclr::schedule_eval")
    def _schedule_eval_fake(schedule, schedule_step):
        return schedule.new_empty(4)


def sgd_step_(*args, **kwargs) -> None:
    """``torch.ops.fusedclr.sgd_step_``; see csrc/ops.cpp for the contract."""
    torch.ops.fusedclr.sgd_step_(*args, **kwargs)


def adam_step_(*args, **kwargs) -> None:
    """``torch.ops.fusedclr.adam_step_``; see csrc/ops.cpp for the contract."""
    torch.ops.fusedclr.adam_step_(*args, **kwargs)


def schedule_eval(schedule: Tensor, schedule_step: Tensor) -> Tensor:
    """The kernels' schedule evaluator: float64 ``[lr, momentum, has_lr, has_momentum]``."""
    return torch.ops.fusedclr.schedule_eval(schedule, schedule_step)
