"""fusedclr.Adam and fusedclr.AdamW: torch's classes over flat buffers, one launch per bucket."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from fusedclr.optim._base import FlatOptimizerMixin, step_value
from fusedclr.optim._flat import Bucket

_ADAM_TAKES_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


class _AdamFlat(FlatOptimizerMixin):
    _OP = "adam_step_"
    _STEP_IN_STATE = True
    _DECOUPLED: bool

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", self._DECOUPLED))

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if group["amsgrad"] else names

    def _state_keys(self) -> set[str]:
        return {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        beta1 = group["betas"][0]
        return float(beta1)

    def _launch(self, fn, b: Bucket, group: dict[str, Any], active, grad_scale, found_inf) -> None:
        beta2 = group["betas"][1]
        fn(
            b.flat, b.grad_flat, b.states["exp_avg"], b.states["exp_avg_sq"], b.states.get("max_exp_avg_sq"),
            b.seg_steps, b.chunks, active, b.hyper, b.schedule, b.schedule_step,
            float(beta2), float(group["eps"]), float(group["weight_decay"]), self._decoupled(group),
            bool(group["maximize"]), grad_scale, found_inf,
        )

    def _export_state(self, group, bucket: Bucket, index: int, step: int) -> dict[str, Any]:
        if step == 0:
            return {}
        out: dict[str, Any] = {"step": self._step_tensor(step)}
        for name in self._state_names(group):
            out[name] = bucket.state_view(name, index)
        return out

    def _import_state(self, group, bucket: Bucket, index: int, state: dict[str, Any]) -> int:
        if not state:
            for name in bucket.states:
                bucket.state_view(name, index).zero_()
            return 0
        for name in bucket.states:
            view = bucket.state_view(name, index)
            if name in state:
                view.copy_(state[name].reshape(view.shape))
            else:  # e.g. amsgrad turned on when resuming: torch starts max_exp_avg_sq at zero
                view.zero_()
        return step_value(state["step"])


def _check_supported(differentiable: bool) -> None:
    if differentiable:
        raise ValueError("fusedclr optimizers do not support differentiable=True; use torch.optim for that")


class Adam(_AdamFlat, torch.optim.Adam):
    """Drop-in :class:`torch.optim.Adam` over flat buffers (see :class:`AdamW` for details).

    Takes torch's arguments (``foreach``, ``fused`` and ``capturable`` are
    accepted and ignored: the step is always fused and capturable) plus the
    keyword-only ``backend``: ``"auto"`` (default), ``"cpu"``, ``"cuda"``,
    ``"triton"`` or ``"reference"``.
    """

    _DECOUPLED = False

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, backend: str = "auto") -> None:
        _check_supported(differentiable)
        self._init_flat(backend)
        extra = {"decoupled_weight_decay": decoupled_weight_decay} if _ADAM_TAKES_DECOUPLED else {}
        if decoupled_weight_decay and not _ADAM_TAKES_DECOUPLED:
            self._DECOUPLED = True
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused, **extra)


class AdamW(_AdamFlat, torch.optim.AdamW):
    """Drop-in :class:`torch.optim.AdamW` whose step is one fused kernel launch per bucket.

    Parameters, gradients and the ``exp_avg`` / ``exp_avg_sq`` (/ ``max_exp_avg_sq``)
    states of each (param group, device, dtype) live in flat buffers; every
    ``param.data`` and ``param.grad`` is a view into them. The learning rate and
    beta1 come from the param group or, when a :mod:`fusedclr.lr_scheduler`
    scheduler is attached, from the schedule evaluated inside the kernel.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW.
        foreach, fused, capturable: accepted for compatibility; the step is always
            fused and capturable.
        differentiable: not supported (``ValueError`` if True).
        backend: ``"auto"`` (default: the C++ kernel for CPU tensors, CUDA
            kernels, else Triton, else the reference, for CUDA tensors),
            ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedclr.AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _DECOUPLED = True

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backend: str = "auto") -> None:
        _check_supported(differentiable)
        self._init_flat(backend)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)
