"""fusedclr.RMSprop: torch's RMSprop (centered, momentum) over flat state buffers, one launch per bucket."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedclr.optim._base import FlatOptimizerMixin
from fusedclr.optim._flat import Bucket
from fusedclr.optim.sgd import schedules_momentum


class RMSprop(FlatOptimizerMixin, torch.optim.RMSprop):
    """Drop-in :class:`torch.optim.RMSprop` whose step is one fused kernel launch per bucket.

    Takes torch's arguments (``foreach`` and ``capturable`` are accepted and
    ignored: the step is always fused and capturable; ``differentiable=True``
    runs torch's own implementation) plus the keyword-only ``backend``,
    ``max_grad_norm``, ``skip_nonfinite``, ``state_dtype``, ``master_weights``
    and ``stochastic_rounding`` (see :class:`fusedclr.AdamW`). The momentum
    may be cycled by a :mod:`fusedclr.lr_scheduler` schedule (``CyclicLR`` /
    ``OneCycleLR`` with ``cycle_momentum``); the momentum buffer is then kept
    even when the group's momentum is 0, and a step whose momentum is 0 runs
    without it, as torch's ``if momentum > 0``.
    """

    _KERNEL = "rmsprop"  # csrc/include/fusedclr/optimizers/rmsprop.h
    _KERNEL_STATES = ("square_avg", "grad_avg", "momentum_buffer")
    _STEP_IN_STATE = True

    def __init__(self, params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False, *,
                 backend: str = "auto", max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding,
                        differentiable)
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable=capturable,
                         foreach=foreach, maximize=maximize, differentiable=differentiable)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return (("square_avg",) + (("grad_avg",) if group["centered"] else ())
                + (("momentum_buffer",) if group["momentum"] > 0 else ()))

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["momentum"])

    def _options(self, group: dict[str, Any]) -> list[float]:
        return [float(group["alpha"]), float(group["eps"]), float(group["weight_decay"])]

    def _on_schedule(self, bucket: Bucket, desc: list[float] | None) -> None:
        if desc is not None and schedules_momentum(desc) and "momentum_buffer" not in bucket.states:
            bucket.add_state("momentum_buffer")  # torch's buffer starts at zero: nothing else to reset

    def _before_launch(self, b: Bucket, group: dict[str, Any]) -> None:
        if group["momentum"] > 0 and "momentum_buffer" not in b.states:
            b.add_state("momentum_buffer")

