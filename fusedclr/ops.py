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
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "build_mismatch",
    "cuda_kernels_registered",
    "extension_available",
    "extension_error",
    "grad_sumsq",
    "grad_zero_",
    "schedule_eval",
    "segment_tracker",
    "state_args",
    "step_",
]

_EXT_ERROR: str | None = None
_C = None
try:
    from fusedclr import _C  # registers the ops with the dispatcher
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    _EXT_ERROR = str(exc)

# Flags of the segment refresh [note: segment refresh] (csrc/ops.cpp).
TABLE_CHANGED, SLOW_PATH, PARAM_CHANGED, GRAD_READ_ONLY = 1, 2, 4, 8
if _C is not None and ((getattr(_C, "TABLE_CHANGED", None), getattr(_C, "SLOW_PATH", None),
                       getattr(_C, "PARAM_CHANGED", None), getattr(_C, "GRAD_READ_ONLY", None)) != (
        TABLE_CHANGED, SLOW_PATH, PARAM_CHANGED, GRAD_READ_ONLY) or not hasattr(_C, "same_items")):
    raise ImportError("fusedclr._C was built from other sources than this fusedclr: rebuild it")


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


def segment_tracker(params: list[Tensor], dtype: torch.dtype, device: torch.device,
                    local: bool = False) -> Callable[[Tensor], int]:
    """The per-step refresh of a bucket's host segment table [note: segment refresh].

    Returns a function of the host table (CPU int64 ``[n, 4]``, its NUMEL column
    filled) that writes the current parameter and gradient addresses into its
    first two columns and returns the flags ``TABLE_CHANGED | SLOW_PATH |
    PARAM_CHANGED | GRAD_READ_ONLY``; ``dtype`` (real) and ``device`` are what
    the bucket was built for. With the extension it is one C loop over the
    parameters; without it, the same in Python. ``local``: the parameters are
    DTensors, walked through their local shards.
    """
    params = list(params)
    if _C is not None:
        like = torch.empty(0, dtype=dtype, device=device)
        # The partial holds the parameters the capsule points to, where Python's GC sees them.
        return functools.partial(_C.segment_refresh, _C.segment_tracker(params, local, like), tuple(params))
    return functools.partial(_refresh_in_python, params, local, (dtype, torch.device(device)))


def same_items(items: list, snapshot: tuple) -> bool:
    """Whether ``items[i] is snapshot[i]`` for every ``i`` (and the lengths are equal).

    A step asks it of every param group [note: followed groups]: one C loop of
    pointer compares with the extension, ``operator.is_`` over the pairs without.
    """
    if _C is not None and type(items) is list:
        return _C.same_items(items, snapshot)
    return len(items) == len(snapshot) and all(map(operator.is_, items, snapshot))


def _refresh_in_python(params: list[Tensor], local: bool, expected: tuple, table: Tensor) -> int:
    """:func:`segment_tracker`'s loop without the extension (the reference backend's fallback)."""
    flags = 0
    rows = table.tolist()
    for i, p in enumerate(params):
        t = p._local_tensor if local else p
        real = t.real.dtype if t.is_complex() else t.dtype
        if (real, t.device) != expected or t.numel() * (2 if t.is_complex() else 1) != rows[i][3]:
            return flags | PARAM_CHANGED
        g = p.grad
        gaddr = 0
        if g is not None:
            g = g._local_tensor if local and hasattr(g, "_local_tensor") else g
            if (g.layout != torch.strided or g.dtype != t.dtype or g.device != t.device or g.shape != t.shape
                    or g.stride() != t.stride() or (local and g is p.grad)):
                return flags | SLOW_PATH
            # An empty gradient is not "no gradient" (reference.grad_address); const_data_ptr, as the C
            # loop reads it, does not materialise a copy-on-write gradient.
            gaddr = g.const_data_ptr() or 1
            if p.grad.requires_grad or g.requires_grad or torch._C._is_cow_tensor(g):
                flags |= GRAD_READ_ONLY
        if rows[i][0] != t.data_ptr() or rows[i][1] != gaddr:
            table[i, 0], table[i, 1] = t.data_ptr(), gaddr
            flags |= TABLE_CHANGED
    return flags


def cuda_kernels_registered() -> bool:
    """Whether the extension was built with its CUDA kernels (true even without a GPU)."""
    return extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fusedclr::step_", "CUDA")


if extension_available():

    @torch.library.register_fake("fusedclr::step_")
    def _step_fake(optimizer, segments, param_dtype, state0, state1, state2, state3, seg_steps, seg_scalars, chunks,
                   hyper, schedule, schedule_step, options, maximize=False, grad_scale=None, found_inf=None,
                   master_param=None, sr_seed=None):
        return None

    @torch.library.register_fake("fusedclr::grad_sumsq")
    def _grad_sumsq_fake(segments, param_dtype, chunks):
        return segments.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("fusedclr::grad_zero_")
    def _grad_zero_fake(segments, param_dtype, chunks):
        return None

    @torch.library.register_fake("fusedclr::schedule_eval")
    def _schedule_eval_fake(schedule, schedule_step):
        return schedule.new_empty(4)


MAX_STATES = 4  # the op's state0..state3 (csrc/include/fusedclr/policy.h kMaxStates)


def state_args(optimizer: str, states: Sequence[Tensor | None]) -> list[Tensor | None]:
    """A ``states`` list as the op's four optional state arguments (csrc/ops.cpp [note: step contract])."""
    if len(states) > MAX_STATES:
        raise RuntimeError(f"fusedclr: {optimizer} passes {len(states)} state buffers; the op takes at most {MAX_STATES}")
    return [*states, *([None] * (MAX_STATES - len(states)))]


def step_(optimizer: str, segments: Tensor, param_dtype: torch.dtype, states: Sequence[Tensor | None],
          seg_steps: Tensor, seg_scalars: Tensor | None, chunks: Tensor, hyper: Tensor, schedule: Tensor,
          schedule_step: Tensor, options: Sequence[float], maximize: bool = False, grad_scale: Tensor | None = None,
          found_inf: Tensor | None = None, master_param: Tensor | None = None, sr_seed: int | None = None) -> None:
    """One optimizer step of one bucket, ``torch.ops.fusedclr.step_`` (csrc/ops.cpp [note: step contract]).

    ``states`` is the optimizer's list of flat state buffers (None where
    absent), as ``fusedclr.reference.step_`` and ``fusedclr.triton.step_``
    take it; the op itself takes them as four optional arguments.
    """
    torch.ops.fusedclr.step_(optimizer, segments, param_dtype, *state_args(optimizer, states), seg_steps, seg_scalars,
                             chunks, hyper, schedule, schedule_step, list(options), maximize, grad_scale, found_inf,
                             master_param, sr_seed)


def schedule_eval(schedule: Tensor, schedule_step: Tensor) -> Tensor:
    """The kernels' schedule evaluator: float64 ``[lr, momentum, has_lr, has_momentum]``."""
    return torch.ops.fusedclr.schedule_eval(schedule, schedule_step)


def grad_sumsq(segments: Tensor, param_dtype: torch.dtype, chunks: Tensor) -> Tensor:
    """The active gradients' sum of squares (float64, 0-dim) over a segment table [note: fused clipping]."""
    return torch.ops.fusedclr.grad_sumsq(segments, param_dtype, chunks)


def grad_zero_(segments: Tensor, param_dtype: torch.dtype, chunks: Tensor) -> None:
    """Zeroes the active gradients of a segment table, in place (csrc/ops.cpp [note: zeroing through the table])."""
    torch.ops.fusedclr.grad_zero_(segments, param_dtype, chunks)
