"""fusedclr.Lion: the Lion optimizer (Chen et al. 2023) over flat state buffers, one launch per bucket."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedclr.optim._base import FlatOptimizerMixin


class Lion(FlatOptimizerMixin, torch.optim.Optimizer):
    """Lion, from Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms".

    Per element, with ``m`` the ``exp_avg`` state::

        c = beta1 * m + (1 - beta1) * g
        p = p * (1 - lr * weight_decay) - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    ``sign(0)`` is 0, as :func:`torch.sign`. The update has the same size
    ``lr`` in every coordinate, so Lion wants a learning rate 3-10x smaller
    than AdamW's and a weight decay 3-10x larger (the paper's advice). beta1
    is the group's momentum that a :mod:`fusedclr.lr_scheduler` schedule may
    cycle (``betas`` as in torch's Adam: ``cycle_momentum`` moves beta1).

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: the step size (default 1e-4).
        betas: (beta1, beta2): the interpolation weight of the update
            direction and the momentum's decay (default (0.9, 0.99)).
        weight_decay: decoupled weight decay (default 0).
        maximize: maximize the objective instead of minimizing it.
        backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights,
            stochastic_rounding: as :class:`fusedclr.AdamW`.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedclr.Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _KERNEL = "lion"  # csrc/include/fusedclr/optimizers/lion.h
    _KERNEL_STATES = ("exp_avg",)
    _STEP_IN_STATE = True

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, backend: str = "auto",
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding)
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["betas"][0])

    def _options(self, group: dict[str, Any]) -> list[float]:
        return [float(group["betas"][1]), float(group["weight_decay"])]
