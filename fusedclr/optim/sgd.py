"""fusedclr.SGD: torch's SGD (momentum, dampening, Nesterov) over flat buffers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedclr import reference
from fusedclr.optim._base import FlatOptimizerMixin
from fusedclr.optim._flat import Bucket


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

    _OP = "sgd_step_"
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
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _state_keys(self) -> set[str]:
        return {"momentum_buffer"}

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["momentum"])

    def _ensure_buffer(self, b: Bucket) -> None:
        if "momentum_buffer" not in b.states:
            b.add_state("momentum_buffer")
            # The buffer starts like torch's None: the next step of each segment copies the grad.
            b.seg_steps.zero_()
            self.state.forget(b)

    def _on_schedule(self, bucket: Bucket, desc: list[float] | None) -> None:
        if desc is not None and _schedules_momentum(desc):
            self._ensure_buffer(bucket)

    def _launch_args(self, b: Bucket, group: dict[str, Any]) -> tuple[Any, ...]:
        if group["momentum"] != 0 and "momentum_buffer" not in b.states:
            self._ensure_buffer(b)
        return (
            b.states.get("momentum_buffer"), b.seg_steps, b.chunks, b.hyper,
            b.schedule, b.schedule_step, float(group["dampening"]), float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group["maximize"]),
        )

    def _export_state(self, group, bucket: Bucket, index: int, step: int) -> dict[str, Any]:
        # A DTensor's placeholder buffer (step 0) loads as a stepped one: exact unless
        # dampening != 0 (torch's first step copies the gradient).
        if "momentum_buffer" not in bucket.states:
            return {}
        return {"momentum_buffer": bucket.state_tensor("momentum_buffer", index)}

    def _import_state(self, group, bucket: Bucket, index: int, state: dict[str, Any]) -> int:
        buf = state.get("momentum_buffer")
        if buf is None:
            if "momentum_buffer" in bucket.states:
                bucket.state_view("momentum_buffer", index).zero_()
            return 0
        self._ensure_buffer(bucket)
        view = bucket.state_view("momentum_buffer", index)
        view.copy_(bucket.local_value(buf, index))
        return 1


def _schedules_momentum(desc: list[float]) -> bool:
    n = int(desc[0])
    return any(
        desc[reference.HEADER_WORDS + i * reference.STAGE_WORDS + reference.S_HAS_MOM] for i in range(n)
    )
