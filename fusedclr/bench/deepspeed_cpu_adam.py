"""DeepSpeed's ``DeepSpeedCPUAdam`` as a provider: the CPU Adam(W) that ZeRO-Offload steps.

It runs only where ``deepspeed`` is importable: fusedclr does not depend on it
and CI does not install it (docs/benchmarks.md has the pip command, which
keeps the installed torch). Everywhere else the provider is left out with the
reason, as a provider without a GPU is.

DeepSpeed JIT-builds its ``cpu_adam`` op with torch's cpp_extension when the
first ``DeepSpeedCPUAdam`` is constructed, and caches it under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``): 95 s the
first time on the 2-vCPU development VM, about 2 s to load after that. The
benches construct one (:func:`~fusedclr.bench.providers.unavailable` probes a
tiny optimizer) before anything is timed, so the build is never in a sample,
and a build that fails is the reason the provider is left out.

Configuration: that of torch's optimizer in :data:`~fusedclr.bench.cases.OPTIMS`
(AdamW: ``adamw_mode=True``, decoupled weight decay 1e-2; Adam:
``adamw_mode=False``, no decay), with torch's lr, betas, eps and weight
decay read from a torch optimizer so they cannot drift from it; bias
correction on; fp32 moments (also for bf16 parameters, as fusedclr keeps
them). Its ``step()`` reads ``lr``, ``betas``, ``eps`` and ``weight_decay``
from its param groups every step, so torch's ``OneCycleLR`` drives it (lr and
beta1) as it drives torch's AdamW.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .cases import OPTIMS

NAME = "deepspeed-cpu-adam"
# The pip command of docs/benchmarks.md: deepspeed without its dependency list, which
# would otherwise be free to change torch, plus the three modules it imports at start-up.
INSTALL = "pip install --no-deps deepspeed==0.19.8 hjson msgpack einops"

_announced = [False]


def unsupported(optim: str) -> str | None:
    """Why DeepSpeedCPUAdam cannot run the bench's ``optim`` (``None`` when it can)."""
    spec = OPTIMS[optim]
    if spec.torch_class not in ("Adam", "AdamW") or spec.kwargs.get("amsgrad") or spec.lookahead is not None:
        return f"DeepSpeedCPUAdam is Adam or AdamW only (no amsgrad, no Lookahead), not {optim}"
    return None


def _cpu_adam_class() -> type[torch.optim.Optimizer]:
    """``deepspeed.ops.adam.DeepSpeedCPUAdam``; an ImportError that says how to install it."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError as e:
        raise ImportError(f"deepspeed is not importable ({e}); to run this provider: {INSTALL} "
                          "(docs/benchmarks.md)") from e
    return DeepSpeedCPUAdam


def version() -> str | None:
    """deepspeed's version, or ``None`` when it is not importable."""
    try:
        import deepspeed
    except ImportError:
        return None
    return deepspeed.__version__


def optimizer(optim: str, params: Any) -> torch.optim.Optimizer:
    """A ``DeepSpeedCPUAdam`` configured as torch's ``optim`` of :data:`~fusedclr.bench.cases.OPTIMS`.

    The first one in a process loads (first use: builds) DeepSpeed's
    ``cpu_adam`` op; a failed build raises a RuntimeError that names its cause.
    """
    why = unsupported(optim)
    if why is not None:
        raise ValueError(why)
    cls = _cpu_adam_class()
    params = list(params)
    spec = OPTIMS[optim]
    # torch's own defaults for what the bench does not set (betas, eps; Adam's weight decay).
    torch_defaults = getattr(torch.optim, spec.torch_class)([torch.zeros(1, requires_grad=True)], lr=spec.lr,
                                                            **spec.kwargs).defaults
    if not _announced[0]:
        _announced[0] = True
        print(f"{NAME}: loading DeepSpeed's cpu_adam op (built on first use: minutes; loaded from "
              "TORCH_EXTENSIONS_DIR in seconds after)", file=sys.stderr, flush=True)
    try:
        return cls(params, lr=torch_defaults["lr"], betas=torch_defaults["betas"], eps=torch_defaults["eps"],
                   weight_decay=torch_defaults["weight_decay"], bias_correction=True,
                   adamw_mode=spec.torch_class == "AdamW", fp32_optimizer_states=True)
    except RuntimeError as e:
        if "cpu_adam" not in str(e):
            raise
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise RuntimeError(f"DeepSpeed's cpu_adam op did not build or load here ({type(cause).__name__}: "
                           f"{first}); DeepSpeed builds it with torch's cpp_extension, which needs a C++ "
                           "compiler and ninja") from e
