"""fusedclr.Adagrad: torch's Adagrad (lr_decay, initial_accumulator_value) over flat state buffers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedclr.optim._base import FlatOptimizerMixin


class Adagrad(FlatOptimizerMixin, torch.optim.Adagrad):
    """Drop-in :class:`torch.optim.Adagrad` whose step is one fused kernel launch per bucket.

    As torch's, every parameter has a state (``step`` 0 and ``sum`` at
    ``initial_accumulator_value``) from construction on. Takes torch's
    arguments (``foreach`` and ``fused`` are accepted and ignored: the step is
    always fused; ``differentiable=True`` runs torch's own implementation)
    plus the keyword-only ``backend``, ``max_grad_norm``, ``skip_nonfinite``,
    ``state_dtype``, ``master_weights`` and ``stochastic_rounding`` (see
    :class:`fusedclr.AdamW`). Sparse gradients are not supported.
    """

    _KERNEL = "adagrad"  # csrc/include/fusedclr/optimizers/adagrad.h
    _KERNEL_STATES = ("sum",)
    _STEP_IN_STATE = True

    def __init__(self, params, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 backend: str = "auto", max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding,
                        differentiable)
        # torch's constructor writes every parameter's initial state through optimizer.state.
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach,
                         maximize=maximize, differentiable=differentiable, fused=fused)

    def _sparse_error(self, group: dict[str, Any]) -> str | None:
        # torch's Adagrad takes sparse gradients without weight decay [note: sparse gradients].
        return "weight_decay option is not compatible with sparse gradients" if group["weight_decay"] != 0 else None

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {"sum": float(group["initial_accumulator_value"])}

    def _options(self, group: dict[str, Any]) -> list[float]:
        return [float(group["lr_decay"]), float(group["weight_decay"]), float(group["eps"])]
