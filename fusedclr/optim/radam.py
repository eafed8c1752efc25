"""fusedclr.RAdam and fusedclr.NAdam: torch's classes over flat state buffers, one launch per bucket."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedclr.optim._base import FlatOptimizerMixin


class _AdamFamily(FlatOptimizerMixin):
    _KERNEL_STATES = ("exp_avg", "exp_avg_sq")
    _STEP_IN_STATE = True

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["betas"][0])


class RAdam(_AdamFamily, torch.optim.RAdam):
    """Drop-in :class:`torch.optim.RAdam` whose step is one fused kernel launch per bucket.

    Takes torch's arguments (``foreach`` and ``capturable`` are accepted and
    ignored; ``differentiable=True`` runs torch's own implementation) plus the
    keyword-only ``backend``, ``max_grad_norm``, ``skip_nonfinite``,
    ``state_dtype``, ``master_weights`` and ``stochastic_rounding`` (see
    :class:`fusedclr.AdamW`). beta1 may be cycled by a schedule.
    """

    _KERNEL = "radam"  # csrc/include/fusedclr/optimizers/radam.h

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 backend: str = "auto", max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding,
                        differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable)

    def _options(self, group: dict[str, Any]) -> list[float]:
        return [float(group["betas"][1]), float(group["eps"]), float(group["weight_decay"]),
                float(group["decoupled_weight_decay"])]


class NAdam(_AdamFamily, torch.optim.NAdam):
    """Drop-in :class:`torch.optim.NAdam` whose step is one fused kernel launch per bucket.

    Takes torch's arguments (``foreach`` and ``capturable`` are accepted and
    ignored; ``differentiable=True`` runs torch's own implementation) plus the
    keyword-only ``backend``, ``max_grad_norm``, ``skip_nonfinite``,
    ``state_dtype``, ``master_weights`` and ``stochastic_rounding`` (see
    :class:`fusedclr.AdamW`). beta1 may be cycled by a schedule; NAdam's own
    momentum-decay schedule applies on top of it, and the running product
    ``mu_product`` is kept per parameter on the device, as torch keeps it.
    """

    _KERNEL = "nadam"  # csrc/include/fusedclr/optimizers/nadam.h
    _SEG_SCALAR = ("mu_product", 1.0)

    def __init__(self, params, lr: float | Tensor = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, backend: str = "auto", max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding,
                        differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable)

    def _options(self, group: dict[str, Any]) -> list[float]:
        return [float(group["betas"][1]), float(group["eps"]), float(group["weight_decay"]),
                float(group["decoupled_weight_decay"]), float(group["momentum_decay"])]
