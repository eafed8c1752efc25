"""fusedclr.Adam and fusedclr.AdamW: torch's classes over flat buffers, one launch per bucket."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from fusedclr.optim._base import FlatOptimizerMixin

_ADAM_TAKES_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


class _AdamFlat(FlatOptimizerMixin):
    _KERNEL = "adam"  # csrc/include/fusedclr/optimizers/adam.h
    _KERNEL_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _STEP_IN_STATE = True
    _DECOUPLED: bool

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", self._DECOUPLED))

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._KERNEL_STATES if group["amsgrad"] else self._KERNEL_STATES[:2]

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return float(group["betas"][0])

    def _options(self, group: dict[str, Any]) -> list[float]:
        return [float(group["betas"][1]), float(group["eps"]), float(group["weight_decay"]),
                float(self._decoupled(group))]

    def _check_groups(self) -> None:
        # beta1 == 1 zeroes the bias correction 1 - beta1**step that the update divides by. torch's
        # default (foreach and for-loop) Adam raises ZeroDivisionError for it, after it has moved
        # the states; its fused step writes inf/NaN. Here it raises before anything changes. A
        # scheduler's cyclical momentum writes betas[0] into the group every step, so the host value
        # is the one the kernel computes.
        for gi, group in enumerate(self.param_groups):
            beta1 = group["betas"][0]
            if isinstance(beta1, Tensor) or beta1 != 1 or all(p.grad is None for p in group["params"]):
                continue
            if "max_momentum" in group:
                how = (f"the scheduler's cyclical momentum set it (base_momentum={group.get('base_momentum')}, "
                       f"max_momentum={group['max_momentum']}): give both below 1")
            else:
                how = "set betas[0] below 1"
            raise ZeroDivisionError(
                f"fusedclr: betas[0] of param group {gi} is {beta1!r}: {type(self).__name__}'s bias correction "
                f"1 - beta1**step is then 0 and the step would divide by it (torch.optim.{type(self).__name__} "
                f"raises ZeroDivisionError too); nothing was changed. {how[0].upper()}{how[1:]}"
            )


class Adam(_AdamFlat, torch.optim.Adam):
    """Drop-in :class:`torch.optim.Adam` over flat buffers (see :class:`AdamW` for details).

    Takes torch's arguments (``foreach``, ``fused`` and ``capturable`` are
    accepted and ignored: the step is always fused and capturable;
    ``differentiable=True`` runs torch's own implementation) plus the
    keyword-only ``backend``, ``max_grad_norm``, ``skip_nonfinite``,
    ``state_dtype``, ``master_weights`` and ``stochastic_rounding`` (see
    :class:`AdamW`).
    """

    _DECOUPLED = False

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, backend: str = "auto",
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding,
                        differentiable)
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
        differentiable: ``True`` runs torch.optim.AdamW's own implementation
            (with a one-time warning): no fused kernel, flat buffers or
            in-kernel schedule, and none of the options below.
        backend: ``"auto"`` (default: the C++ kernel for CPU tensors, CUDA
            kernels, else Triton, else the reference, for CUDA tensors),
            ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
        max_grad_norm: clip the global L2 norm of all gradients to this value
            as ``torch.nn.utils.clip_grad_norm_`` would, inside the update kernel
            (no host sync; the ``.grad`` tensors themselves are left unscaled).
            The norm of the last step (of the unscaled gradients, under a
            GradScaler) is kept in ``last_grad_norm``, a 0-dim device tensor
            updated in place. ``None`` (default) does not clip.
        skip_nonfinite: skip the whole step on the device (parameters, states
            and step counts stay as they are) when the global L2 norm of the
            gradients is not finite: a NaN or inf gradient, or a norm beyond
            the float range (~1.8e19 in float32). Or-ed with a GradScaler's
            ``found_inf``. Without it, as in torch, NaN and inf propagate into
            the parameters.
        state_dtype: ``None`` (default) or ``torch.float32``: fp32 states (fp64
            for fp64 parameters). ``torch.bfloat16``: buckets of bf16
            parameters keep their states in bf16 (the math stays fp32; 14
            instead of 22 bytes per parameter per step). Other buckets keep fp32.
        master_weights: buckets of bf16 and fp16 parameters keep an fp32
            master copy, updated in fp32; the parameter is the master rounded to
            nearest, so updates below half an ulp of the parameter accumulate.
            The master is the ``master_param`` state in ``optimizer.state`` and
            ``state_dict()``. A parameter written outside the optimizer (e.g.
            ``model.load_state_dict``) wins: its master restarts from it.
        stochastic_rounding: bf16 parameters are written with stochastic
            rounding (unbiased in expectation), from a counter-based hash of
            (seed, step, element), so runs are reproducible: the seed derives
            from ``torch.initial_seed()``. Not with ``master_weights``.

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
                 fused: bool | None = None, backend: str = "auto", max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, state_dtype: torch.dtype | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        self._init_flat(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights, stochastic_rounding,
                        differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)
