"""Straightforward torch implementations of what torch.optim lacks: Lion and Lookahead.

The bench compares fusedclr's Lion and Lookahead with these, written the way a
user without fusedclr would write them: torch's ``_foreach_*`` ops over the
parameter list, one pass per operation, no custom kernel.

* :class:`ForeachLion`: Lion (Chen et al. 2023) with ``_foreach_mul_`` (the
  decoupled weight decay), ``_foreach_lerp`` and ``_foreach_sign_`` (the
  update direction, a temporary list), ``_foreach_add_`` (the step) and
  ``_foreach_lerp_`` (the momentum). It is the ``torch-foreach`` provider of
  ``lion``; torch has no Lion, so there is no for-loop or fused one.
* :class:`ForeachLookahead`: any torch.optim optimizer (the bench wraps
  ``torch.optim.AdamW``: for-loop, foreach or fused) and, every ``k``-th step,
  ``_foreach_lerp_`` of the slow weights towards the parameters and
  ``_foreach_copy_`` back. One step counter for the whole list: it assumes
  that every parameter has a gradient at every step (as in the bench; fusedclr
  counts per parameter). Schedulers attach to ``.optimizer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class ForeachLion(torch.optim.Optimizer):
    """Lion over torch's foreach ops: ``p = p * (1 - lr wd) - lr sign(lerp(m, g, 1 - beta1))``,
    then ``m = lerp(m, g, 1 - beta2)``; the state ``exp_avg`` starts at zero."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            moms = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moms.append(state["exp_avg"])
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            update = torch._foreach_lerp(moms, grads, 1.0 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_lerp_(moms, grads, 1.0 - beta2)
        return loss


class ForeachLookahead:
    """``optimizer``'s step, then every ``k``-th step ``slow += alpha (fast - slow); fast = slow``
    with foreach ops. The slow weights are copies of the parameters taken at the first step."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.steps = 0
        self.slow: list[Tensor] | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.slow is None:
            self.slow = [p.detach().clone() for p in self._params()]
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            fast = self._params()
            torch._foreach_lerp_(self.slow, fast, self.alpha)
            torch._foreach_copy_(fast, self.slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)
