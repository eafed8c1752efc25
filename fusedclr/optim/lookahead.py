"""fusedclr.Lookahead: k steps forward, one step back (Zhang et al. 2019), in the kernel."""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from fusedclr.optim._base import FlatOptimizerMixin, _is_reference, _on
from fusedclr.optim._flat import Bucket


def _sync_seed(seed: int) -> int:
    """The stochastic-rounding seed of a bucket's synchronisations: not the inner step's, whose
    bits the same step count and element would draw again; rounding a value twice with the same
    bits is biased (the errors add instead of averaging out)."""
    return (seed * 0xD6E8FEB86659FD93 + 0x9E3779B97F4A7C15) % 2**63


class Lookahead(torch.optim.Optimizer):
    """Lookahead, from Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back".

    Wraps a fusedclr optimizer (the fast one). Every ``k``-th step of a
    parameter, after the wrapped optimizer's update, its slow weights move
    towards the fast ones and the fast weights restart from them::

        slow = slow + alpha * (fast - slow);  fast = slow

    The slow weights are a flat state per bucket; the synchronisation is a
    kernel over the bucket's segment table that reads each parameter's own step
    count on the device: no host branch or sync per step, so the step stays
    capturable. A parameter without a gradient in a step neither steps nor
    synchronises, as for the wrapped optimizer; a step skipped by a GradScaler
    or ``skip_nonfinite`` skips the synchronisation too. The slow weights start
    from the parameters at the first ``step()`` (so loading model weights after
    building the optimizer is safe). A group whose parameters change dtype or
    device after that (``model.to(...)``, which the wrapped optimizer follows by
    rebuilding its buckets) keeps its slow weights, converted as its states are.

    ``Lookahead`` is a ``torch.optim.Optimizer``: its ``param_groups`` are the
    wrapped optimizer's (one list), and hooks, ``zero_grad``, GradScaler and
    schedulers (torch's and :mod:`fusedclr.lr_scheduler`'s, which keep the
    schedule in the kernel) attach to it. ``state_dict()`` is the wrapped
    optimizer's plus a ``"lookahead"`` entry with ``k``, ``alpha``, the slow
    weights and the step counts.

    Args:
        optimizer: a fusedclr optimizer (:class:`fusedclr.SGD`, :class:`fusedclr.AdamW`, ...).
        k: synchronise every ``k`` steps (default 5).
        alpha: the slow weights' step size, in [0, 1] (default 0.5).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedclr.Lookahead(fusedclr.AdamW(model.parameters(), lr=1e-3), k=5, alpha=0.5)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _KERNEL = "lookahead"  # csrc/include/fusedclr/optimizers/lookahead.h
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if isinstance(optimizer, Lookahead) or not isinstance(optimizer, FlatOptimizerMixin):
            raise TypeError(
                f"Lookahead wraps a fusedclr optimizer (fusedclr.SGD, AdamW, Lion, ...), got "
                f"{type(optimizer).__module__}.{type(optimizer).__name__}"
            )
        if optimizer._torch_impl:
            raise ValueError("Lookahead cannot wrap an optimizer built with differentiable=True (torch's own step)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r}; Lookahead synchronises every k >= 1 steps")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha!r}; the slow weights' step size is in [0, 1]")
        self.optimizer = optimizer
        optimizer._report_skips()  # [note: lookahead skips]
        self.k = k
        self.alpha = float(alpha)
        # torch.optim.Optimizer's bookkeeping, without adding the groups again: they are the wrapped optimizer's.
        torch._C._log_api_usage_once("python.optimizer")
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's groups, the list itself: ``load_state_dict`` replaces that list, and
        a scheduler or framework that sets a group's lr through the Lookahead must reach the kernel."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        """The wrapped optimizer's ``state`` (the slow weights are in ``state_dict()["lookahead"]``)."""
        return self.optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the wrapped optimizer (the groups are one list); its slow weights start at its next step."""
        self.optimizer.add_param_group(param_group)

    def _attach_schedule(self, scheduler: Any) -> None:
        """fusedclr schedulers evaluate their schedule in the wrapped optimizer's kernels."""
        self.optimizer._attach_schedule(scheduler)

    @property
    def _scheduler(self) -> Any:
        """The fusedclr scheduler attached to the wrapped optimizer, or ``None`` (what the range
        test detaches while it sets the lr itself, and re-attaches)."""
        return getattr(self.optimizer, "_scheduler", None)

    def _buckets(self) -> list[Bucket]:
        return [b for buckets in self.optimizer._buckets for b in buckets]

    @staticmethod
    def _ensure_slow(b: Bucket) -> Tensor:
        """The bucket's slow weights, started from its parameters (or fp32 masters) when it has none.

        In the math type (fp32, or fp64 for fp64 parameters), whatever the state dtype: bf16 slow
        weights would round every synchronisation to nearest and lose the moves smaller than half
        an ulp, and write that rounding into the fp32 masters.
        """
        slow = getattr(b, "lookahead_slow", None)
        dtype = torch.float64 if b.state_dtype == torch.float64 else torch.float32
        if slow is None or slow.device != b.device or slow.dtype != dtype:
            slow = b.lookahead_slow = b._zeros(b.total, dtype)
            if b.master is not None:
                slow.copy_(b.master)
            else:
                b._copy_params_to(slow)
        return slow

    def _carry_slow(self, old_buckets: list[Bucket]) -> None:
        """Moves the slow weights of re-built buckets' parameters over from their old buckets, converted
        to the new state dtype and device, as the wrapped optimizer moves its own states."""
        where = {p: (b, i) for b in old_buckets for i, p in enumerate(b.params)}
        for b in self._buckets():
            if getattr(b, "lookahead_slow", None) is not None:
                continue
            slow = self._ensure_slow(b)
            for i, p in enumerate(b.params):
                if p in where:
                    ob, oi = where[p]
                    slow[b.offsets[i] : b.offsets[i] + b.numels[i]].copy_(
                        ob.lookahead_slow[ob.offsets[oi] : ob.offsets[oi] + ob.numels[oi]])

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Any:
        """The wrapped optimizer's step, then the synchronisation of the parameters at a multiple of ``k`` steps.

        ``grad_scale`` and ``found_inf``: GradScaler's fused protocol, as for
        the wrapped optimizer (which a GradScaler may also set as attributes).
        """
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        inner = self.optimizer
        # Before the inner step, so that a bucket's first slow weights are the weights it starts from.
        before = self._buckets()
        for b in before:
            self._ensure_slow(b)
        loss = inner.step(closure, grad_scale=grad_scale, found_inf=found_inf)
        if len(before) != len(self._buckets()) or any(map(operator.is_not, before, self._buckets())):
            self._carry_slow(before)  # the inner step re-bucketed a group (model.to(...)): no host work otherwise
        # [note: lookahead skips] Whether the inner step was skipped, as a tensor it wrote in place
        # (an attribute assigned inside a step traced by torch.compile does not reach us).
        skipped = inner._skip_flag if getattr(inner, "_skip_flag", None) is not None else inner._report_skips()
        options = [float(self.k), self.alpha]
        for b in self._buckets():
            fn = inner._impl_for(b.device)
            segments = b.reference_segments() if _is_reference(fn) else b.table
            fn(optimizer=self._KERNEL, segments=segments, param_dtype=b.dtype, states=[self._ensure_slow(b)],
               seg_steps=b.seg_steps, seg_scalars=None, chunks=b.chunks, hyper=b.hyper, schedule=b.schedule,
               schedule_step=b.schedule_step, options=options, found_inf=_on(skipped, b.device),
               master_param=b.master, sr_seed=None if b.sr_seed is None else _sync_seed(b.sr_seed))
            for i in b._shadowed:  # parameters with gaps are stepped through dense shadows [note: shadowed parameters]
                b.params[i].copy_(b.locals[i])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state_dict plus ``"lookahead"``: k, alpha, and per parameter (by its
        state_dict id) the slow weights and the step count that the synchronisation reads."""
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        sd = self.optimizer.state_dict()
        slow: dict[int, Tensor] = {}
        steps: dict[int, int] = {}
        where = self.optimizer.state._where
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            for p, pid in zip(group["params"], saved["params"]):
                b, i = where[p]
                buf = getattr(b, "lookahead_slow", None)
                if buf is not None:
                    o, n = b.offsets[i], b.numels[i]
                    slow[pid] = buf[o : o + n].view(b.locals[i].shape if not b.locals[i].is_complex()
                                                    else (*b.locals[i].shape, 2))
                    steps[pid] = int(b.seg_steps[i])  # a host copy: state_dict is not on the step path
        sd = {**sd, "lookahead": {"k": self.k, "alpha": self.alpha, "slow": slow, "steps": steps}}
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict` (or a plain state_dict of the wrapped optimizer: the slow weights then
        start from the parameters at the next step)."""
        state_dict = dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        extra = state_dict.pop("lookahead", None)
        if extra is not None:
            k, alpha = extra["k"], extra["alpha"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not 0.0 <= float(alpha) <= 1.0:
                raise ValueError(f"loaded lookahead entry has an invalid k={k!r} or alpha={alpha!r}")
        self.optimizer.load_state_dict(state_dict)
        for b in self._buckets():
            b.lookahead_slow = None
        if extra is not None:
            self.k, self.alpha = int(extra["k"]), float(extra["alpha"])
            where = self.optimizer.state._where
            with torch.no_grad():
                for group, saved in zip(self.param_groups, state_dict["param_groups"]):
                    for p, pid in zip(group["params"], saved["params"]):
                        if pid not in extra["slow"]:
                            continue
                        b, i = where[p]
                        o, n = b.offsets[i], b.numels[i]
                        self._ensure_slow(b)[o : o + n].copy_(extra["slow"][pid].reshape(-1))
                        b.seg_steps[i] = int(extra["steps"][pid])
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"
