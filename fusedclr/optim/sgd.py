"""fusedclr.SGD: torch's SGD (momentum, dampening, Nesterov) over flat buffers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedclr import reference
from fusedclr.optim._base import FlatOptimizerMixin
from fusedclr.optim._flat import Bucket
from fusedclr.optim._state import step_value


class SGD(FlatOptimizerMixin, torch.optim.SGD):
    """Drop-in :class:`torch.optim.SGD` whose step is one fused kernel launch per bucket.

    The momentum buffer is allocated when the group's momentum is non-zero or an
    attached schedule cycles momentum; its first update copies the gradient, as
    torch's does. Takes torch's arguments (``foreach`` and ``fused`` are accepted
    and ignored) plus the keyword-only ``backend``, ``max_grad_norm``,
    ``skip_nonfinite``, ``state_dtype``, ``master_weights`` and
    ``stochastic_rounding`` (see :class:`fusedclr.AdamW`). ``differentiable=True``
    runs torch.optim.SGD's own implementation, with a one-time warning.
    """

    _KERNEL = "sgd"  # csrc/include/fusedclr/optimizers/sgd.h
    _KERNEL_STATES = ("momentum_buffer",)
    _STEP_IN_STATE = False

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 backend: str = "auto", max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding,
                        differentiable)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._KERNEL_STATES if group["momentum"] != 0 else ()

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["momentum"])

    def _options(self, group: dict[str, Any]) -> list[float]:
        return [float(group["dampening"]), float(group["weight_decay"]), float(group["nesterov"])]

    def _on_schedule(self, bucket: Bucket, desc: list[float] | None) -> None:
        if desc is not None and schedules_momentum(desc):
            ensure_momentum_buffer(self, bucket)

    def _sparse_error(self, group: dict[str, Any]) -> str | None:
        # torch's SGD takes sparse gradients without weight decay [note: sparse gradients].
        return "weight decay needs dense gradients (torch.optim.SGD raises too)" if group["weight_decay"] != 0 else None

    def _before_launch(self, b: Bucket, group: dict[str, Any]) -> None:
        if group["momentum"] != 0:
            ensure_momentum_buffer(self, b)

    def _export_state(self, group, bucket: Bucket, index: int, step: int) -> dict[str, Any]:
        # A DTensor's placeholder buffer (step 0) loads as a stepped one: exact unless
        # dampening != 0 (torch's first step copies the gradient).
        out: dict[str, Any] = {}
        if bucket.sr_seed is not None:
            # torch's SGD keeps no step; stochastic rounding draws its bits by step count, so a
            # checkpoint carries it and a resumed run continues the bits instead of replaying them.
            out["step"] = self._step_tensor(step)
        if "momentum_buffer" in bucket.states:
            out["momentum_buffer"] = bucket.state_tensor("momentum_buffer", index)
        return out

    def _import_state(self, group, bucket: Bucket, index: int, state: dict[str, Any]) -> int:
        buf = state.get("momentum_buffer")
        # The count a stochastic-rounding checkpoint carries (else 1: "the buffer has started").
        saved = step_value(state["step"]) if "step" in state and bucket.sr_seed is not None else 0
        if buf is None:
            bucket.reset_state(index)
            # Without a buffer, a count would say it had started: only where no momentum reads it.
            return saved if group["momentum"] == 0 else 0
        ensure_momentum_buffer(self, bucket)
        bucket.state_view("momentum_buffer", index).copy_(bucket.local_value(buf, index))
        return max(saved, 1)


def ensure_momentum_buffer(opt: FlatOptimizerMixin, b: Bucket) -> None:
    """Allocates a bucket's momentum buffer when momentum appears (a group's, or a cycled one)."""
    if "momentum_buffer" not in b.states:
        b.add_state("momentum_buffer")
        # The buffer starts like torch's None: the next step of each segment copies the grad.
        b.seg_steps.zero_()
        opt.state.forget(b)


def schedules_momentum(desc: list[float]) -> bool:
    """Whether a schedule descriptor cycles the momentum (or beta1) in any stage."""
    n = int(desc[0])
    return any(
        desc[reference.HEADER_WORDS + i * reference.STAGE_WORDS + reference.S_HAS_MOM] for i in range(n)
    )
