"""Learning-rate (and momentum) schedulers evaluated inside the update kernel.

Every class here is a drop-in replacement for the class of the same name in
:mod:`torch.optim.lr_scheduler`: it subclasses torch's class, takes the same
constructor arguments with the same defaults, raises the same errors and
produces the same numbers. What it adds is a second way to deliver those
numbers to the optimizer:

* **Kernel mode** (a :mod:`fusedclr` optimizer). At construction the scheduler
  describes itself as a float64 *schedule descriptor* per param group
  (``csrc/include/fusedclr/schedule.h`` [note: schedule descriptor]) and
  attaches to the optimizer through ``optimizer._attach_schedule(self)``. The
  update kernel evaluates the descriptor at an int64 0-dim counter that lives
  on the parameters' device, so :meth:`step` is one in-place ``add_(1)`` per
  device: no ``.item()``, no host-device sync, no recompilation, and it
  survives CUDA-graph capture.
* **Host mode** (any other :class:`torch.optim.Optimizer`). The scheduler
  writes ``group["lr"]`` (and the momentum / ``betas[0]`` for cyclical
  momentum) as Python floats, exactly like torch's schedulers.

In both modes :meth:`get_last_lr` and the values written into the param groups
come from the closed form ``reference.schedule_value(descriptor, last_epoch)``,
computed in double precision on the host, which is the same function the
kernels evaluate. Torch mostly uses recursive ("chainable") updates instead;
the two agree to a few ulps of double.

Differences from torch, all deliberate:

* In-kernel values are closed forms, which cannot see other schedulers.
  Several schedulers sharing an optimizer compose as torch's do: the
  multiplicative families (:class:`StepLR`, :class:`MultiStepLR`,
  :class:`ConstantLR`, :class:`LinearLR`, :class:`ExponentialLR`,
  :class:`PolynomialLR`) stepping together, e.g. in a
  :class:`ChainedScheduler`, as one in-kernel product; anything else (a
  cosine or a :class:`ReduceLROnPlateau` beside a warmup, members stepped at
  different rates, or, for the families whose torch update multiplies the
  current lr, a ``group["lr"]`` moved by a torch scheduler, a replaced
  scheduler or a manual edit) with torch's own chainable update on the host,
  the optimizer reading ``group["lr"]``; one warning per optimizer
  [note: composed schedulers]. A :class:`SequentialLR` is not a composition:
  it composes its children into one descriptor and stays in the kernel. An
  edit of ``group["lr"]`` (or of the cyclical momentum, or of a tensor lr in
  place) is seen at the optimizer's next step, which uses it, as torch's does
  [note: edits between steps].
* A scheduler that cannot be evaluated in the kernel falls back to host mode
  with a one-time :class:`UserWarning` naming the reason, and detaches from the
  optimizer, which then reads ``group["lr"]`` like any torch optimizer. This
  happens for :class:`CyclicLR` with a Python ``scale_fn``, for
  :class:`LambdaLR` and :class:`MultiplicativeLR` (Python functions), for
  :class:`CosineAnnealingWarmRestarts` stepped with a fractional epoch (until
  the epoch is an integer again) or given a ``T_cur`` that is no position of
  its schedule, for a :class:`SequentialLR` with a child that is not a
  fusedclr scheduler, once a param group was added to the optimizer after the
  scheduler was built (torch's update then schedules it, or raises), for a
  subclass that overrides ``get_lr()`` (the closed form cannot see it), and for a
  few degenerate arguments on which torch's recursive update differs from any
  closed form (e.g. a non-integer ``step_size``). A non-fusedclr optimizer
  gets no warning: it is always in host mode.
* The families whose torch update multiplies the group's current lr, built
  with ``last_epoch != -1`` (resuming), run torch's update on the host: torch's
  constructor keeps the group's lr there, one step behind the closed form.
  Loading the scheduler's ``state_dict()`` returns them to the kernel when the
  groups' lrs are then their closed form.
* :class:`CosineAnnealingWarmRestarts` takes three keyword-only extensions:
  ``cycle_decay``, ``warmup_steps`` and ``warmup_start_lr``.
* :class:`ReduceLROnPlateau` takes its metric as a device tensor with a
  fusedclr optimizer and never reads it on the host (see the class).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, SupportsFloat

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _torch_sched

from fusedclr import reference as _ref
from fusedclr.reference import Kind

__all__ = [
    "ChainedScheduler",
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "ExponentialLR",
    "LRScheduler",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "MultiplicativeLR",
    "OneCycleLR",
    "PolynomialLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "StepLR",
]

# Attributes that only make sense in this process (device tensors, caches,
# links to other objects); state_dict() leaves them out.
_RUNTIME_ATTRS = (
    "_fc_counters",
    "_fc_seen",
    "_fc_descs",
    "_fc_owned",
    "_fc_warned",
    "_fc_chained",
    "_fc_ngroups",
    "_fc_in_kernel",
    "_fc_product",
)

_GET_LR_OUTSIDE_STEP = "To get the last learning rate computed by the scheduler, please use `get_last_lr()`."

# [note: composed schedulers]
# torch lets several schedulers step one optimizer: each one's chainable update
# multiplies (or otherwise rewrites) the lr the others left in the group, so
# StepLR + ExponentialLR decays by both. A closed form evaluated in the kernel
# cannot see the others, so the schedulers of this module register here, per
# optimizer. When two or more of them (not counting the children of a
# SequentialLR) share an optimizer:
# * if all are of the multiplicative families (_fc_multiplicative: torch's
#   update multiplies the lr by a factor of the scheduler's own step; StepLR,
#   MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR), they form
#   a _Product: one PRODUCT descriptor [note: schedule descriptor], the first
#   member's stage times the others' factors, each shifted by the difference of
#   the members' step counts, evaluated at the first member's counter. The
#   offsets hold while the members step together (one step each between
#   optimizer steps, as ChainedScheduler does); the optimizer checks that before
#   every step (_fc_step_check) and, if not, the product dissolves as below;
# * otherwise all of them switch to torch's own chainable update on the host,
#   with one warning per optimizer at the first step.
# The maps are weak: neither side keeps the other alive. The same happens to a
# scheduler when group["lr"] is not what it last wrote (a torch scheduler
# beside it or a manual edit moved it, and torch's update sees that), and to
# one of a chainable family (_fc_chainable: torch's update multiplies the
# group's current lr) when, at construction, the lr is not the group's
# initial_lr (a replaced scheduler moved it, and torch continues from there).
_MEMBERS: weakref.WeakKeyDictionary[Optimizer, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
_COMPOSED_WARNED: weakref.WeakSet[Optimizer] = weakref.WeakSet()
# Process-local per-scheduler state kept outside the instance __dict__, so that a scheduler and one
# loaded from its state_dict() have equal __dict__s (torch's test_lrscheduler compares them).
_COUNTERS: weakref.WeakKeyDictionary[Any, dict[torch.device, Tensor]] = weakref.WeakKeyDictionary()
_HOST_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()
# [note: edits between steps] What the schedulers of an optimizer last left in its groups, beyond
# get_last_lr(): per group, a tensor lr's (id, _version) after the last update (else None), and the
# cyclical momentum (or beta1) last written (else None). Per optimizer: a SequentialLR's children
# write what it is checked against.
_LR_TENSORS: weakref.WeakKeyDictionary[Optimizer, list[tuple[int, int] | None]] = weakref.WeakKeyDictionary()
_MOMENTA: weakref.WeakKeyDictionary[Optimizer, list[float | None]] = weakref.WeakKeyDictionary()

_log = logging.getLogger(__name__)
# torch's classes bound once, at import: a user who drops fusedclr's classes into
# torch.optim.lr_scheduler (torch.optim.lr_scheduler.SequentialLR = fusedclr's) must not
# make fusedclr call itself through the module.
_TORCH_WARM_RESTARTS = _torch_sched.CosineAnnealingWarmRestarts
_TORCH_SEQUENTIAL = _torch_sched.SequentialLR
_RESUMED: weakref.WeakSet[Any] = weakref.WeakSet()  # built with last_epoch != -1 (a chainable family)
_RESTORED: weakref.WeakSet[Any] = weakref.WeakSet()  # unpickled or deep-copied, not yet re-attached
# [note: edited settings] Schedulers whose settings were changed after their descriptors were
# built, and the last_epoch each scheduler left after its last update (an assignment since is an edit).
_EDITED: weakref.WeakSet[Any] = weakref.WeakSet()
_EPOCHS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_EDITED_REASON = (
    "its settings (an attribute such as T_max, gamma or base_lrs, a group's max_lr, or last_epoch) were "
    "changed after it was built, and torch's update continues from the group's current lr with them"
)
_RESUMED_REASON = (
    "it was built with last_epoch != -1, and torch's constructor then keeps the group's lr (its update "
    "continues from it, one step behind the closed form)"
)
_COMPOSED_REASON = (
    "it shares the optimizer with another scheduler (or group['lr'] was moved by something else), and torch "
    "composes them, each update applying to the lr the others left in the param group"
)


def _join(scheduler: Any, optimizer: Any) -> bool:
    """Registers ``scheduler`` on ``optimizer`` and composes it with the others [note: composed schedulers].

    Returns whether there were others.
    """
    if not isinstance(optimizer, Optimizer):
        return False  # torch's constructor raises its TypeError next
    members = _MEMBERS.setdefault(optimizer, weakref.WeakSet())
    others = [s for s in members if not getattr(s, "_fc_owned", False)]
    members.add(scheduler)
    if not others:
        return False
    products = {id(p): p for p in (getattr(s, "_fc_product", None) for s in others) if p is not None}
    alone = [s for s in others if getattr(s, "_fc_product", None) is None]
    candidates = [*others, scheduler]
    if (
        all(getattr(s, "_fc_multiplicative", False) and not s._fc_chained for s in candidates)
        and (not products if len(alone) else len(products) == 1)
    ):
        product = next(iter(products.values())) if products else _Product(alone)
        if _lrs_match(optimizer, product.values()):
            product.add(scheduler)
            return True
    for s in candidates:
        s._fc_chain()
    return True


def _lrs_match(optimizer: Optimizer, values: list[float]) -> bool:
    """Whether the groups' lrs are ``values`` (up to the rounding of torch's recursive updates)."""
    current = [g["lr"] for g in optimizer.param_groups]
    return len(current) == len(values) and all(
        not isinstance(c, Tensor) and math.isclose(c, v, rel_tol=1e-12, abs_tol=1e-15)
        for c, v in zip(current, values)
    )


class _Product:
    """Schedulers of multiplicative families on one optimizer, as one in-kernel PRODUCT schedule.

    See [note: composed schedulers]. It stands in for its members in the
    optimizer protocol (docs/CONTRACTS.md): ``_fc_descriptor``,
    ``_fc_counter`` (the first member's) and ``_fc_step_check``.
    """

    def __init__(self, members: list[Any]) -> None:
        self.members: list[Any] = []
        self.offsets: list[int] = []
        self._factors: list[list[list[float]]] | None = None  # [member][group]: its own descriptor, as a factor
        for m in members:
            self.add(m)

    def add(self, member: Any) -> None:
        self.members.append(member)
        member._fc_product = self
        self._factors = None

    def viable(self) -> bool:
        # ConstantLR(factor=0): torch's update divides by the factor at total_iters (and raises).
        return all(
            not m._fc_chained and m._fc_config_reason() is None
            and len(m.optimizer.param_groups) == m._fc_ngroups
            and not (isinstance(m, ConstantLR) and m.factor == 0)
            for m in self.members
        )

    def dissolve(self) -> None:
        """Every member to torch's chainable update on the host."""
        members, self.members = self.members, []
        for m in members:
            m._fc_product = None
        for m in members:
            m._fc_chain()

    def refresh(self) -> None:
        """Offsets from the members' step counts as they are now; re-attaches."""
        first = int(self.members[0].last_epoch)
        self.offsets = [first - int(m.last_epoch) for m in self.members]
        self._factors = None
        attach = getattr(self.members[0].optimizer, "_attach_schedule", None)
        for m in self.members:
            m._fc_in_kernel = True
        if attach is not None:
            attach(self)

    def in_step(self) -> bool:
        first = int(self.members[0].last_epoch)
        return all(first - int(m.last_epoch) == off for m, off in zip(self.members, self.offsets))

    def _records(self, i: int, *, offsets: bool) -> tuple[list[list[float]], list[float]]:
        """Group ``i``: the first member's stage, then the others' as factors (P0 = 1)."""
        stages: list[list[float]] = []
        tail: list[float] = []
        for k, m in enumerate(self.members):
            rec = list(m._fc_stage(i))
            if k:  # a factor: P0 is the base lr, or, for CONSTANT, base * factor
                base = m.base_lrs[i]
                rec[_ref.S_P0] = (rec[_ref.S_P0] / base if base else 0.0) if rec[_ref.S_KIND] == Kind.CONSTANT else 1.0
            if offsets:
                rec[_ref.S_T_BEGIN] = float(self.offsets[k])
            if int(rec[_ref.S_KIND]) == Kind.MULTISTEP:
                rec[_ref.S_P0 + 2] += len(tail)
            stages.append(rec)
            tail.extend(m._fc_tail(i))
        return stages, tail

    def values(self) -> list[float]:
        """torch's lr of every group: the product of the members' closed forms at their own steps
        (computed once per combination of the members' steps: every optimizer step asks)."""
        key = (self._factors is not None, *(int(m.last_epoch) for m in self.members))
        cached = getattr(self, "_values_at", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self._factors is None:
            groups = range(len(self.members[0].optimizer.param_groups))
            self._factors = [[] for _ in self.members]
            for i in groups:
                stages, tail = self._records(i, offsets=False)
                start = 0
                for k, (rec, m) in enumerate(zip(stages, self.members)):
                    n = len(m._fc_tail(i))
                    rec = list(rec)
                    if int(rec[_ref.S_KIND]) == Kind.MULTISTEP:
                        rec[_ref.S_P0 + 2] -= start
                    self._factors[k].append(_ref.descriptor([rec], tail[start : start + n]))
                    start += n
        out = []
        for i in range(len(self._factors[0])):
            lr = 1.0
            for descs, m in zip(self._factors, self.members):
                lr *= _ref.schedule_value(descs[i], int(m.last_epoch))[0]
            out.append(lr)
        self._values_at = ((True, *key[1:]), out)
        return out

    # -- the optimizer protocol -------------------------------------------------

    def _fc_descriptor(self, group_index: int) -> list[float]:
        if not self.members or group_index >= self.members[0]._fc_ngroups:
            # A group added since (add_param_group re-attaches): the next step's check dissolves the product.
            return _ref.no_schedule()
        return _ref.descriptor(*self._records(group_index, offsets=True), product=True)

    def _fc_counter(self, device: torch.device | str) -> Tensor:
        return self.members[0]._fc_counter(device)

    def _fc_step_check(self) -> None:
        """Before an optimizer step: dissolves the product unless its members stepped together
        and the groups hold their product [note: edits between steps].

        Cheap on purpose (host values only; it runs on every step); the members
        check the rest of ``viable()`` when they step.
        """
        for m in list(self.members):
            m._fc_revive()
        if self.members and not (
            self.in_step() and len(self.members[0].optimizer.param_groups) == self.members[0]._fc_ngroups
        ):
            self.dissolve()
        elif self.members and _edited(self.members[0], self.values(), zero_lr_ok=True):  # [note: edits between steps]
            self.members[0]._fc_warn(_COMPOSED_REASON)
            self.dissolve()


def _moved(optimizer: Any) -> bool:
    """Whether some group's lr differs from its initial_lr (asked before torch's constructor sets it)."""
    return any("initial_lr" in g and g["lr"] != g["initial_lr"] for g in getattr(optimizer, "param_groups", ()))


# [note: edits between steps]
# torch's optimizer reads group["lr"] (and the momentum, or betas[0]) at every
# step, so an edit between scheduler.step() and optimizer.step() (by hand, by a
# torch scheduler, a tensor lr changed in place with mul_ or fill_) is what that
# step uses, and torch's chainable updates continue from it. An in-kernel
# schedule never reads the group, so every fusedclr optimizer step first asks
# its scheduler (_fc_step_check, host values only, never a device read) whether
# the groups still hold what the scheduler last left there: a float lr equal to
# its closed form (get_last_lr()), a tensor lr the same object at the same
# _version as after the scheduler's last write, the cyclical momentum equal to
# what it last wrote. If not, the scheduler moves to the host, as when it finds
# the edit at its own next step [note: composed schedulers], before the step's
# values are read: that step uses the edit, as torch's does. Loading an
# optimizer checkpoint after its scheduler's replaces a tensor lr, which then
# counts as an edit (host mode, with torch's numbers).


def _edited(scheduler: Any, expected: Sequence[Any], *, zero_lr_ok: bool = False) -> bool:
    """Whether ``scheduler``'s optimizer's groups moved from what it left there [note: edits between steps].

    ``zero_lr_ok``: a float lr of 0 is not an edit (the optimizer runs that step at lr 0 by
    itself: ``torch.distributed.checkpoint`` initialises optimizer states so, then restores the lr).
    """
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(expected):
        return False  # a group was added: the host reason handles it
    tensors = _LR_TENSORS.get(scheduler.optimizer, ())
    momenta = _MOMENTA.get(scheduler.optimizer, ())
    use_beta1 = getattr(scheduler, "use_beta1", "betas" in scheduler.optimizer.defaults)
    for i, (group, want) in enumerate(zip(groups, expected)):
        lr = group["lr"]
        if isinstance(lr, Tensor):
            seen = tensors[i] if i < len(tensors) else None
            if seen is None:  # nothing recorded (a copy before its first step): by value where that is free
                if lr.device.type == "cpu" and float(lr) != float(want):
                    return True
            elif seen != (id(lr), lr._version):
                return True
        elif isinstance(want, Tensor) or (lr != want and not (zero_lr_ok and lr == 0)):
            return True
        momentum = momenta[i] if i < len(momenta) else None
        if momentum is not None:
            current = group["betas"][0] if use_beta1 else group.get("momentum")
            if isinstance(current, Tensor) or current != momentum:
                return True
    return False


def _record_lr_tensors(optimizer: Any) -> None:
    """After a scheduler wrote the groups: each tensor lr as it is now [note: edits between steps]."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is not None and any(isinstance(g.get("lr"), Tensor) for g in groups):
        _LR_TENSORS[optimizer] = [
            (id(g["lr"]), g["lr"]._version) if isinstance(g.get("lr"), Tensor) else None for g in groups
        ]


_OVERRIDES: dict[type, str | None] = {}


def _overridden(cls: type) -> str | None:
    """The first of ``get_lr``/``_get_closed_form_lr`` that a class outside this module
    (a user's subclass) defines for ``cls``, or ``None``: torch's update calls it, and the
    kernel's closed form would silently ignore it."""
    if cls not in _OVERRIDES:
        found = None
        for name in ("get_lr", "_get_closed_form_lr"):
            owner = next((k for k in cls.__mro__ if name in vars(k)), None)
            if owner is not None and owner.__module__ != __name__:
                found = name
                break
        _OVERRIDES[cls] = found
    return _OVERRIDES[cls]


def _is_integral(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and float(x).is_integer()


def _per_group(name: str, optimizer: Optimizer, value: Any) -> list[float]:
    """One float per param group from a scalar or a per-group sequence."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{name} must have the same length as optimizer.param_groups. "
                f"{name} has {len(value)} values, param_groups has {n}."
            )
        return [float(v) for v in value]
    return [float(value)] * n


class _InKernelSchedule:
    """Mixin that turns a torch scheduler into an in-kernel schedule.

    A subclass describes one param group with :meth:`_fc_stage` (one stage
    record, see :func:`fusedclr.reference.stage`) and optionally
    :meth:`_fc_tail`; :meth:`_fc_config_reason` names a configuration that
    cannot run in the kernel (host mode). The mixin owns the device counters,
    computes the host-side values from the descriptor, and talks to the
    optimizer. Every constructor is one call of :meth:`_fc_build`.
    """

    # torch's update multiplies the group's current lr (by a factor of this scheduler's
    # step alone) [note: composed schedulers].
    _fc_chainable = False
    _fc_multiplicative = False

    @property
    def _fc_counters(self) -> dict[torch.device, Tensor]:
        return _COUNTERS.setdefault(self, {})

    @property
    def _fc_warned(self) -> bool:
        return self in _HOST_WARNED

    @_fc_warned.setter
    def _fc_warned(self, value: bool) -> None:
        (_HOST_WARNED.add if value else _HOST_WARNED.discard)(self)

    # -- life cycle ---------------------------------------------------------

    def _fc_build(
        self, torch_init: Callable[..., None], optimizer: Any, *args: Any, owns: Sequence[Any] = ()
    ) -> None:
        """The constructor: runtime state, torch's constructor (which runs the first ``step()``), then attach.

        ``owns``: schedulers this one composes (SequentialLR's children), which
        stop talking to the optimizer themselves.
        """
        _COUNTERS[self] = {}
        self._fc_seen = 0  # the value every counter holds
        self._fc_descs: list[list[float]] | None = None
        self._fc_owned = False  # a SequentialLR composes this scheduler
        self._fc_warned = False
        self._fc_chained = False  # [note: composed schedulers]
        self._fc_in_kernel = False  # what the optimizer was last told
        self._fc_ngroups = len(getattr(optimizer, "param_groups", ()))
        self._fc_product: _Product | None = None  # [note: composed schedulers]
        for child in owns:
            if isinstance(child, _InKernelSchedule):
                product = child._fc_product
                if product is not None:  # built side by side: composed until now
                    for m in product.members:
                        m._fc_product = None
                    product.members = []
                child._fc_owned = True
                child._fc_chained = False
                child._fc_counters.clear()
        if not _join(self, optimizer) and self._fc_chainable and args:
            if args[-1] == -1 and _moved(optimizer):
                self._fc_chain()
            elif args[-1] != -1:  # resumed by last_epoch: torch's constructor keeps the group's lr
                _RESUMED.add(self)
                self._fc_chain()
        for child in owns:  # the children follow their owner
            if isinstance(child, _InKernelSchedule):
                child._fc_chained = self._fc_chained
        torch_init(optimizer, *args)
        if self._fc_product is not None and not self._fc_product.viable():
            self._fc_product.dissolve()
        reason = self._fc_host_reason()
        if reason is not None and not self._fc_chained:
            self._fc_warn(reason, stacklevel=4)  # the user's constructor call
        self._fc_refresh()

    def _fc_chain(self) -> None:
        """Switches to torch's chainable update on the host [note: composed schedulers]."""
        if self._fc_product is not None:
            self._fc_product.dissolve()  # which chains this one too
            return
        if self._fc_chained:
            return
        self._fc_chained = True
        if hasattr(self, "optimizer"):
            self._fc_refresh()

    # -- what subclasses provide ---------------------------------------------

    def _fc_stage(self, i: int) -> list[float]:
        raise NotImplementedError

    def _fc_tail(self, i: int) -> list[float]:
        return []

    def _fc_config_reason(self) -> str | None:
        """Why this configuration cannot be evaluated in-kernel, or ``None``."""
        return None

    # -- descriptors -----------------------------------------------------------

    def _fc_host_reason(self) -> str | None:
        """Why this scheduler runs on the host (torch's own update), or ``None`` for the kernel."""
        if self._fc_chained:
            if self in _RESUMED:
                return _RESUMED_REASON
            return _EDITED_REASON if self in _EDITED else _COMPOSED_REASON
        override = _overridden(type(self))
        if override is not None:
            return (f"its class {type(self).__qualname__} overrides {override}(), which the kernel's closed form "
                    "cannot see")
        if len(self.optimizer.param_groups) != self._fc_ngroups:
            return (
                f"a param group was added to the optimizer after the scheduler was built "
                f"({self._fc_ngroups} groups then, {len(self.optimizer.param_groups)} now), and torch's "
                "update is what schedules it (or raises)"
            )
        return self._fc_config_reason()

    def _fc_parts(self, i: int) -> tuple[list[list[float]], list[float]]:
        """Stage records of group ``i`` (local time, tail indices relative to the tail) and the tail."""
        return [self._fc_stage(i)], list(self._fc_tail(i))

    def _fc_descriptors(self) -> list[list[float]]:
        if self._fc_descs is None:
            self._fc_descs = [
                _ref.descriptor(*self._fc_parts(i)) for i in range(len(self.optimizer.param_groups))
            ]
        return self._fc_descs

    def _fc_descriptor(self, group_index: int) -> list[float]:
        """The float64 schedule descriptor of param group ``group_index``.

        Part of the optimizer protocol (docs/CONTRACTS.md). A scheduler in host
        mode describes "no schedule", leaving every value to the param group.
        """
        if self._fc_host_reason() is not None:
            return _ref.no_schedule()
        return list(self._fc_descriptors()[group_index])

    # -- device counters ------------------------------------------------------

    def _fc_counter(self, device: torch.device | str) -> Tensor:
        """The schedule's step counter on ``device``: an int64 0-dim tensor equal to ``last_epoch``.

        Part of the optimizer protocol (docs/CONTRACTS.md). Created on first
        request (with a fill, not a host-to-device copy) and advanced in place
        by every :meth:`step`, so the optimizer may keep the tensor.
        """
        device = torch.device(device)
        self._fc_sync()
        counter = self._fc_counters.get(device)
        if counter is None:
            counter = torch.full((), self._fc_seen, dtype=torch.int64, device=device)
            self._fc_counters[device] = counter
        return counter

    def _fc_stepped(self) -> None:
        """After a successful update of the groups: their tensor lrs are this scheduler's now
        [note: edits between steps], and the counters follow ``last_epoch``."""
        _record_lr_tensors(self.optimizer)
        self._fc_sync()

    def _fc_sync(self) -> None:
        """Brings every counter to ``last_epoch`` with ``add_(1)`` or ``fill_``; never reads a device value."""
        target = int(self.last_epoch)
        if target == self._fc_seen:
            return
        for counter in self._fc_counters.values():
            if target == self._fc_seen + 1:
                counter.add_(1)
            else:
                counter.fill_(target)
        self._fc_seen = target

    def _fc_attach(self) -> None:
        """Configures a fusedclr optimizer: attach this schedule, or detach in host mode."""
        if self._fc_owned:
            return
        if self._fc_product is not None:
            self._fc_product.refresh()
            return
        attach = getattr(self.optimizer, "_attach_schedule", None)
        self._fc_in_kernel = self._fc_host_reason() is None
        if attach is not None:
            attach(self if self._fc_in_kernel else None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled or deep-copied: the device counters are process-local (kept outside the
        # instance), so the copy re-attaches, with counters of its own, before its first step.
        self.__dict__.update(state)
        _RESTORED.add(self)

    def _fc_revive(self) -> None:
        """After unpickling or a deep copy: registers on the (copied) optimizer and re-attaches."""
        if self in _RESTORED:
            if not self._fc_owned and isinstance(self.optimizer, Optimizer):
                _MEMBERS.setdefault(self.optimizer, weakref.WeakSet()).add(self)
            self._fc_refresh(record=False)

    def _fc_settings_edited(self, epoch: bool = True) -> bool:
        """Whether this in-kernel schedule's settings changed since its descriptors were built, or
        (``epoch``) ``last_epoch`` since its last update [note: edited settings]. Host values only."""
        if epoch and _EPOCHS.get(self, self.last_epoch) != self.last_epoch:
            return True
        built = self._fc_descs
        if built is None or len(built) != len(self.optimizer.param_groups):
            return False
        if self._fc_tensor_settings():
            return False  # rebuilding would read tensor values (a device sync on CUDA) every step
        try:
            return [_ref.descriptor(*self._fc_parts(i)) for i in range(len(built))] != built
        except Exception:  # settings no descriptor describes: torch's update decides what they mean
            return True

    def _fc_tensor_settings(self) -> bool:
        """Whether a learning-rate setting is a tensor (a tensor lr): its edits are not looked for."""
        lists = (getattr(self, "base_lrs", ()), getattr(self, "max_lrs", ()))
        if any(isinstance(v, Tensor) for values in lists for v in values):
            return True
        keys = ("lr", "initial_lr", "max_lr", "min_lr")
        return any(isinstance(g.get(k), Tensor) for g in self.optimizer.param_groups for k in keys)

    def _fc_follow_edits(self) -> None:
        """Before an update: moves to the host when the settings were edited [note: edited settings].

        [note: edited settings]
        torch's schedulers read their settings at every step: an edit of an
        attribute (``T_max``, ``gamma``, ``base_lrs``, ``milestones``...), of a
        group's ``max_lr`` / ``min_lr`` / ``initial_lr`` / momentum bounds, or
        an assignment to ``last_epoch`` (the old way to resume) changes the
        next lrs, and torch's chainable updates continue from the group's
        current lr. The kernel evaluates descriptors built from those settings
        once, so every update first rebuilds them (a few microseconds per
        group, host values only) and compares: if anything changed, the
        scheduler moves to the host for good and runs torch's own update from
        there, as it does for composed schedulers. A loaded state whose
        ``_last_lr`` is not the closed form at its ``last_epoch`` (a
        checkpoint edited before loading, or one saved in host mode) goes to
        the host for the same reason.
        """
        self._fc_revive()
        if self._fc_in_kernel and not self._fc_chained and not self._fc_owned and self._fc_product is None:
            if self._fc_settings_edited():
                _EDITED.add(self)
                self._fc_chain()

    def _fc_left_epoch(self) -> None:
        """Records the ``last_epoch`` an update (or a load) left [note: edited settings]."""
        _EPOCHS[self] = int(self.last_epoch)

    def _fc_check(self, stacklevel: int = 4) -> None:
        """Before a step: warns (once) and re-attaches when the scheduler moved between host and kernel."""
        self._fc_revive()
        if self._fc_owned or getattr(self, "_is_initial", False):
            return  # the constructor's own step: _fc_build decides
        if self._fc_product is not None and not self._fc_product.viable():
            self._fc_product.dissolve()
        if self._fc_in_kernel and not self._fc_chained:
            product = self._fc_product
            if _edited(self, product.values() if product is not None else self._last_lr):
                self._fc_chain()  # something else moved the lr: continue from it, as torch does
        reason = self._fc_host_reason()
        if reason is not None:
            self._fc_warn(reason, stacklevel=stacklevel + 1)
        if (reason is None) != self._fc_in_kernel:
            self._fc_refresh()

    def _fc_step_check(self) -> None:
        """Before an optimizer step: to the host if the groups were edited since this scheduler's
        last step, so that the step uses the edit, as torch's does [note: edits between steps].

        Part of the optimizer protocol (docs/CONTRACTS.md); host values only, no sync.
        """
        self._fc_revive()
        if self._fc_in_kernel and not self._fc_chained and not self._fc_owned and _edited(self, self._last_lr, zero_lr_ok=True):
            self._fc_warn(_COMPOSED_REASON)
            self._fc_chain()

    def _fc_warn(self, reason: str, stacklevel: int = 3) -> None:
        optimizer = self.optimizer
        if getattr(optimizer, "_attach_schedule", None) is None:
            return
        if reason is _COMPOSED_REASON or reason is _RESUMED_REASON or reason is _EDITED_REASON:
            if optimizer in _COMPOSED_WARNED:
                return
            _COMPOSED_WARNED.add(optimizer)
            # torch composes schedulers silently and the host update is torch's own: a performance
            # note, not a warning (a UserWarning here breaks code that counts or errors on warnings).
            _log.warning("fusedclr.lr_scheduler.%s: %s; this scheduler runs on the host (torch's update).",
                      type(self).__name__, reason)
            return
        elif self._fc_warned:
            return
        else:
            self._fc_warned = True
        warnings.warn(
            f"fusedclr.lr_scheduler.{type(self).__name__}: {reason}, which cannot be evaluated inside "
            "the update kernel. This scheduler runs on the host instead: it writes group['lr'] (and the "
            "momentum) every step with torch.optim.lr_scheduler's own update, and the optimizer reads them.",
            UserWarning,
            stacklevel=stacklevel,
        )

    # -- host values ----------------------------------------------------------

    def _fc_values(self) -> list[float]:
        """Closed-form lr of every group at ``last_epoch``; sets cyclical momentum like torch."""
        use_beta1 = getattr(self, "use_beta1", "betas" in self.optimizer.defaults)
        lrs, momenta = [], []
        for group, desc in zip(self.optimizer.param_groups, self._fc_descriptors(), strict=True):
            lr, momentum = _ref.schedule_value(desc, int(self.last_epoch))
            if momentum is not None:
                if use_beta1:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
            momenta.append(momentum)
            lrs.append(lr if lr is not None else group["lr"])
        _MOMENTA[self.optimizer] = momenta  # [note: edits between steps]
        return lrs

    def get_lr(self) -> list[float | Tensor]:
        """The learning rate of every param group at ``last_epoch``, from the closed form.

        Like torch's ``get_lr``, it is meant to be called by :meth:`step`; use
        :meth:`get_last_lr` to read the current values. With cyclical momentum
        it also writes the group's momentum (or ``betas[0]``). In host mode it
        is torch's own ``get_lr``.
        """
        if self._fc_host_reason() is not None:
            return super().get_lr()  # type: ignore[misc]
        if not self._get_lr_called_within_step:
            warnings.warn(_GET_LR_OUTSIDE_STEP, UserWarning, stacklevel=2)
        if self._fc_product is not None:
            return self._fc_product.values()
        return self._fc_values()

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        if self._fc_product is not None:
            # step(epoch): torch's closed form ignores the other schedulers; so does the host update.
            self._fc_product.dissolve()
        if self._fc_host_reason() is not None:
            torch_closed = getattr(super(), "_get_closed_form_lr", None)
            return torch_closed() if torch_closed is not None else super().get_lr()  # type: ignore[misc]
        return self._fc_values()

    def _update_lr(self, epoch: int | None = None) -> None:
        # Counters follow only successful updates: when torch's step raises (e.g.
        # OneCycleLR past total_steps) the group keeps its last lr, and so must
        # the kernel; the next successful step fills the counter to last_epoch.
        self._fc_follow_edits()
        self._fc_check(stacklevel=4)  # user -> step -> _update_lr -> _fc_check -> _fc_warn
        try:
            super()._update_lr(epoch)  # type: ignore[misc]
        finally:
            self._fc_left_epoch()
        self._fc_stepped()

    # -- checkpoints ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, as torch's, without device tensors or process-local attributes."""
        state = super().state_dict()  # type: ignore[misc]
        for key in _RUNTIME_ATTRS:
            state.pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state from :meth:`state_dict` (or from torch's scheduler of the same class).

        The descriptors are rebuilt, the device counters refilled from
        ``last_epoch`` and the schedule re-attached, so training resumes
        exactly where the checkpoint left off, mid-cycle included.
        """
        state_dict = {k: v for k, v in state_dict.items() if k not in _RUNTIME_ATTRS}
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._fc_unchain_if_alone()
        if not self._fc_chained and not self._fc_owned and self._fc_product is None and self._fc_off_closed_form():
            _EDITED.add(self)  # [note: edited settings]
            self._fc_chain()  # (its children too, for a SequentialLR)
        self._fc_refresh()

    def _fc_off_closed_form(self) -> bool:
        """Whether the loaded ``_last_lr`` (where torch's update stands) is not the closed form at
        ``last_epoch`` of the loaded settings [note: edited settings]."""
        last = getattr(self, "_last_lr", None)
        self._fc_descs = None
        if not isinstance(last, list) or self._fc_host_reason() is not None:
            return False
        descs = self._fc_descriptors()
        if len(last) != len(descs):
            return False
        for lr, desc in zip(last, descs):
            want = _ref.schedule_value(desc, int(self.last_epoch))[0]
            if isinstance(lr, Tensor) or want is None:
                continue
            if not math.isclose(lr, want, rel_tol=1e-9, abs_tol=1e-15):
                return True
        return False

    def _fc_unchain_if_alone(self) -> None:
        """Back to the kernel after a load, when nothing composes with this scheduler any more.

        A scheduler built after the optimizer's state was loaded (torch's docs
        ask for the other order) finds ``group["lr"]`` moved and starts on the
        host [note: composed schedulers]; once its own state is loaded, the
        groups hold its closed form again and no other scheduler shares the
        optimizer, so the two updates agree and the kernel can take over.
        """
        if not self._fc_chained or self._fc_owned:
            return
        members = _MEMBERS.get(self.optimizer, ())
        if any(s is not self and not getattr(s, "_fc_owned", False) for s in members):
            return
        self._fc_chained = False
        _RESUMED.discard(self)  # the loaded state is the checkpoint's: the closed form continues it
        _EDITED.discard(self)
        self._fc_descs = None
        if self._fc_host_reason() is None:
            current = [g["lr"] for g in self.optimizer.param_groups]
            values = [_ref.schedule_value(d, int(self.last_epoch))[0] for d in self._fc_descriptors()]
            self._fc_chained = any(
                isinstance(c, Tensor) or v is None or not math.isclose(c, v, rel_tol=1e-12, abs_tol=1e-15)
                for c, v in zip(current, values, strict=True)
            )
        else:
            self._fc_chained = True
        for child in getattr(self, "_schedulers", ()):
            if isinstance(child, _InKernelSchedule):
                child._fc_chained = self._fc_chained

    def _fc_refresh(self, *, record: bool = True) -> None:
        """Rebuilds the descriptors (eagerly, so that two schedulers in the same state have equal
        ``__dict__``s, as torch's tests compare), refills the counters and re-attaches.

        ``record``: the groups' tensor lrs are this scheduler's from here (not when reviving a
        copy, whose groups may have been edited since) [note: edits between steps].
        """
        _RESTORED.discard(self)
        self._fc_descs = None
        if self._fc_host_reason() is None and self._fc_product is None:
            descs = self._fc_descriptors()
            if not self._fc_owned:  # (a SequentialLR's child never talks to the optimizer)
                # Its momentum at last_epoch (a load moved it): the value an edit is told from.
                last = int(self.last_epoch)
                _MOMENTA[self.optimizer] = [_ref.schedule_value(d, last)[1] for d in descs]
        self._fc_seen = int(self.last_epoch)
        self._fc_left_epoch()
        for counter in self._fc_counters.values():
            counter.fill_(self._fc_seen)
        if record:
            _record_lr_tensors(self.optimizer)
        self._fc_attach()


# --------------------------------------------------------------------------
# Simple decays
# --------------------------------------------------------------------------


class StepLR(_InKernelSchedule, _torch_sched.StepLR):
    """Decays each group's learning rate by ``gamma`` every ``step_size`` steps.

    Same arguments, defaults and values as :class:`torch.optim.lr_scheduler.StepLR`;
    ``lr_t = base_lr * gamma ** (t // step_size)``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    step_size : int
        Period of the decay.
    gamma : float, default 0.1
        Multiplicative factor of the decay.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    _fc_chainable = True
    _fc_multiplicative = True

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self._fc_build(super().__init__, optimizer, step_size, gamma, last_epoch)

    def _fc_config_reason(self) -> str | None:
        if not (_is_integral(self.step_size) and self.step_size > 0):
            return f"step_size={self.step_size!r} is not a positive integer"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        return _ref.stage(Kind.STEP, [self.base_lrs[i], self.gamma, self.step_size])


class MultiStepLR(_InKernelSchedule, _torch_sched.MultiStepLR):
    """Decays each group's learning rate by ``gamma`` at every milestone.

    Same arguments, defaults and values as
    :class:`torch.optim.lr_scheduler.MultiStepLR`. A milestone listed ``n``
    times decays by ``gamma ** n``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    milestones : iterable of int
        Steps at which to decay.
    gamma : float, default 0.1
        Multiplicative factor of the decay.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    _fc_chainable = True
    _fc_multiplicative = True

    def __init__(
        self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        self._fc_build(super().__init__, optimizer, milestones, gamma, last_epoch)

    def _fc_config_reason(self) -> str | None:
        if not all(_is_integral(m) for m in self.milestones):
            return f"milestones {sorted(self.milestones)} are not all integers"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        count = sum(self.milestones.values())
        return _ref.stage(Kind.MULTISTEP, [self.base_lrs[i], self.gamma, 0, count])

    def _fc_tail(self, i: int) -> list[float]:
        return [float(m) for m in sorted(self.milestones.elements())]


class ConstantLR(_InKernelSchedule, _torch_sched.ConstantLR):
    """Multiplies each group's learning rate by ``factor`` for the first ``total_iters`` steps.

    Same arguments, defaults, errors and values as
    :class:`torch.optim.lr_scheduler.ConstantLR`. With ``total_iters <= 0``
    the factor stays applied forever, as torch's step-by-step update does.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    factor : float, default 1/3
        Factor applied until ``total_iters``; in ``[0, 1]``.
    total_iters : int, default 5
        Number of steps the factor applies.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    _fc_chainable = True
    _fc_multiplicative = True

    def __init__(
        self, optimizer: Optimizer, factor: float = 1.0 / 3, total_iters: int = 5, last_epoch: int = -1
    ) -> None:
        self._fc_build(super().__init__, optimizer, factor, total_iters, last_epoch)

    def _fc_config_reason(self) -> str | None:
        if not _is_integral(self.total_iters):
            return f"total_iters={self.total_iters!r} is not an integer"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        if self.total_iters <= 0:
            return _ref.stage(Kind.CONSTANT, [self.base_lrs[i] * self.factor])
        return _ref.stage(Kind.CONSTANT_FACTOR, [self.base_lrs[i], self.factor, self.total_iters])


class LinearLR(_InKernelSchedule, _torch_sched.LinearLR):
    """Scales each group's learning rate by a factor moving linearly from ``start_factor`` to ``end_factor``.

    Same arguments, defaults, errors and values as
    :class:`torch.optim.lr_scheduler.LinearLR`:
    ``lr_t = base_lr * (start + (end - start) * min(t, total_iters) / total_iters)``.
    The usual warmup is ``LinearLR(opt, start_factor=0.01, total_iters=w)``
    inside a :class:`SequentialLR`. With ``total_iters <= 0`` the start factor
    stays applied, as torch's step-by-step update does.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    start_factor : float, default 1/3
        Factor at step 0; in ``(0, 1]``.
    end_factor : float, default 1.0
        Factor from ``total_iters`` on; in ``[0, 1]``.
    total_iters : int, default 5
        Length of the ramp in steps.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    _fc_chainable = True
    _fc_multiplicative = True

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        self._fc_build(super().__init__, optimizer, start_factor, end_factor, total_iters, last_epoch)

    def _fc_config_reason(self) -> str | None:
        if not _is_integral(self.total_iters):
            return f"total_iters={self.total_iters!r} is not an integer"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        if self.total_iters <= 0:
            return _ref.stage(Kind.CONSTANT, [self.base_lrs[i] * self.start_factor])
        return _ref.stage(Kind.LINEAR, [self.base_lrs[i], self.start_factor, self.end_factor, self.total_iters])


class ExponentialLR(_InKernelSchedule, _torch_sched.ExponentialLR):
    """Decays each group's learning rate by ``gamma`` every step: ``lr_t = base_lr * gamma ** t``.

    Same arguments and values as :class:`torch.optim.lr_scheduler.ExponentialLR`.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    gamma : float
        Multiplicative factor of the decay.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    _fc_chainable = True
    _fc_multiplicative = True

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self._fc_build(super().__init__, optimizer, gamma, last_epoch)

    def _fc_stage(self, i: int) -> list[float]:
        return _ref.stage(Kind.EXPONENTIAL, [self.base_lrs[i], self.gamma])


class CosineAnnealingLR(_InKernelSchedule, _torch_sched.CosineAnnealingLR):
    r"""Cosine annealing from each group's base learning rate to ``eta_min`` over ``T_max`` steps.

    Same arguments, defaults and values as
    :class:`torch.optim.lr_scheduler.CosineAnnealingLR`, as the closed form

    .. math::
        \eta_t = \eta_{min} + \tfrac12 (\eta_{base} - \eta_{min})
        \left(1 + \cos\left(\pi t / T_{max}\right)\right)

    which, like torch's, keeps oscillating past ``T_max`` (no restarts).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    T_max : int
        Half period, in steps.
    eta_min : float, default 0.0
        Minimum learning rate.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    _fc_chainable = True

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        self._fc_build(super().__init__, optimizer, T_max, eta_min, last_epoch)

    def _fc_config_reason(self) -> str | None:
        if self.T_max == 0:
            return "T_max=0"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        return _ref.stage(Kind.COSINE, [self.base_lrs[i], self.eta_min, self.T_max])


# --------------------------------------------------------------------------
# SGDR
# --------------------------------------------------------------------------


class CosineAnnealingWarmRestarts(_InKernelSchedule, _torch_sched.CosineAnnealingWarmRestarts):
    r"""Cosine annealing with warm restarts (SGDR), plus peak decay and a linear warmup.

    With the defaults of the keyword-only extensions this is
    :class:`torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`: the same
    arguments, errors and values. Cycle :math:`k` (from 0) lasts
    :math:`T_0 T_{mult}^k` steps and, at position :math:`T_{cur}` in it,

    .. math::
        \eta = \eta_{min} + \tfrac12 (\eta_{base}\,\gamma^k - \eta_{min})
        \left(1 + \cos\left(\pi T_{cur} / T_i\right)\right)

    where :math:`\gamma` is ``cycle_decay``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    T_0 : int
        Length of the first cycle, in steps (after the warmup).
    T_mult : int, default 1
        Factor by which each cycle is longer than the previous one.
    eta_min : float, default 0.0
        Minimum learning rate.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    cycle_decay : float, default 1.0
        Keyword-only. The peak of cycle ``k`` is ``base_lr * cycle_decay ** k``
        (timm's ``cycle_decay``); ``1.0`` is torch's schedule.
    warmup_steps : int, default 0
        Keyword-only. Length of a linear warmup before the first cycle: for
        ``t < warmup_steps`` the lr is
        ``warmup_start_lr + (base_lr - warmup_start_lr) * t / warmup_steps``.
        The restarts schedule then starts at its own step 0 at
        ``t = warmup_steps`` (where the lr is ``base_lr``), so the cycles are
        shifted by ``warmup_steps``. ``T_cur`` is negative during the warmup.
    warmup_start_lr : float or list of float, default 0.0
        Keyword-only. Learning rate at step 0 of the warmup, for every group or
        per group.

    Notes
    -----
    ``step(epoch)`` with an integer epoch stays in-kernel (the counter is
    filled with it). A fractional epoch, which torch allows here, cannot be
    represented by the integer counter: the scheduler then warns once and
    evaluates the schedule on the host (writing ``group["lr"]``) until the
    epoch is an integer again. Restart boundaries with ``T_mult > 1`` are
    found by exact integer arithmetic rather than torch's floating-point
    logarithm.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_0: int,
        T_mult: int = 1,
        eta_min: float = 0.0,
        last_epoch: int = -1,
        *,
        cycle_decay: float = 1.0,
        warmup_steps: int = 0,
        warmup_start_lr: float | Sequence[float] = 0.0,
    ) -> None:
        if not isinstance(cycle_decay, numbers.Real) or isinstance(cycle_decay, bool) or not cycle_decay > 0:
            raise ValueError(f"Expected positive float cycle_decay, but got {cycle_decay}")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"Expected non-negative integer warmup_steps, but got {warmup_steps}")
        self.cycle_decay = float(cycle_decay)
        self.warmup_steps = warmup_steps
        self.warmup_start_lrs = _per_group("warmup_start_lr", optimizer, warmup_start_lr)
        # Fractional part of the position (torch allows step(epoch=2.5)); last_epoch is the floor.
        self._fc_frac = 0.0
        # Position minus last_epoch once the user moved T_cur; and whether
        # torch's own update runs because T_cur / T_i were set to no position of the schedule.
        self._fc_shift = 0
        self._fc_torch_update = False
        self._fc_build(super().__init__, optimizer, T_0, T_mult, eta_min, last_epoch)

    def _fc_config_reason(self) -> str | None:
        if self._fc_frac:
            return "step(epoch) was given a fractional epoch"
        if self._fc_torch_update:
            if self in _EDITED:
                return _EDITED_REASON
            return (
                f"T_cur was set to {self.T_cur!r} with T_i={self.T_i!r}, which is no position of the restart "
                "schedule (torch's update continues from them; so does this scheduler, on the host, without "
                "cycle_decay and warmup_steps)"
            )
        return None

    def _fc_stage(self, i: int) -> list[float]:
        # A shifted schedule (T_cur moved by the user) is the same stage evaluated _fc_shift steps ahead.
        return _ref.stage(
            Kind.COSINE_RESTARTS,
            [
                self.base_lrs[i],
                self.eta_min,
                self.T_0,
                self.T_mult,
                self.cycle_decay,
                self.warmup_steps,
                self.warmup_start_lrs[i],
            ],
            t_begin=-self._fc_shift,
        )

    def _fc_off_closed_form(self) -> bool:
        # Its lr is a closed form of the loaded T_cur and T_i, which _fc_follow_t_cur follows.
        return False

    def _fc_position(self, t_cur: Any, t_i: Any, cycle: int) -> int | None:
        """The position whose (T_cur, T_i) these are (in cycle ``cycle`` when T_mult is 1), or ``None``."""
        if not (_is_integral(t_cur) and _is_integral(t_i) and 0 <= t_cur < t_i):
            return None
        if self.T_mult == 1:
            return None if t_i != self.T_0 else self.warmup_steps + cycle * self.T_0 + int(t_cur)
        start, ti = 0, self.T_0
        while ti < t_i:
            start += ti
            ti *= self.T_mult
        return None if ti != t_i else self.warmup_steps + start + int(t_cur)

    def _fc_follow_t_cur(self) -> None:
        """torch's ``step()`` continues from ``T_cur`` / ``T_i`` as they are: follows a user's edit of them.

        An edit that lands on a position of the schedule shifts the in-kernel
        schedule (``_fc_shift``); any other runs torch's own update on the host.
        """
        if self._fc_frac or self._fc_torch_update or self._fc_owned:
            return
        tc, ti, cycle = self._fc_cycle(self.last_epoch + self._fc_shift)
        if (self.T_cur, self.T_i) == (tc, ti):
            return
        pos = self._fc_position(self.T_cur, self.T_i, cycle)
        if pos is None:
            self._fc_torch_update = True
        else:
            self._fc_shift = pos - int(self.last_epoch)
            self._fc_refresh()

    def _fc_cycle(self, pos: float) -> tuple[float, int, int]:
        """(T_cur, T_i, cycle index) at position ``pos`` after the warmup."""
        tc, ti, cycle = pos - self.warmup_steps, self.T_0, 0
        if tc < 0:
            return tc, ti, 0
        if self.T_mult == 1:
            cycle = int(tc // ti)
            tc = tc - cycle * ti
        else:
            while tc >= ti:
                tc -= ti
                ti *= self.T_mult
                cycle += 1
        return tc, ti, cycle

    def _fc_value_at(self, i: int, pos: float) -> float:
        """Host evaluation at a possibly fractional position (the descriptor's formula in real time)."""
        base, start = self.base_lrs[i], self.warmup_start_lrs[i]
        if pos < self.warmup_steps:
            return start + (base - start) * pos / self.warmup_steps
        tc, ti, cycle = self._fc_cycle(pos)
        peak = base * self.cycle_decay**cycle
        return self.eta_min + (peak - self.eta_min) * (1.0 + math.cos(math.pi * tc / ti)) / 2.0

    def get_lr(self) -> list[float | Tensor]:
        """The learning rate of every param group at the current position (closed form)."""
        if not self._get_lr_called_within_step:
            warnings.warn(_GET_LR_OUTSIDE_STEP, UserWarning, stacklevel=2)
        if self._fc_torch_update:
            return super(_InKernelSchedule, self).get_lr()  # torch's, from T_cur and T_i
        if self._fc_host_reason() is not None:
            # Like torch's get_lr, one value per base lr (torch's zip then raises if a group was added).
            pos = self.last_epoch + self._fc_shift + self._fc_frac
            return [self._fc_value_at(i, pos) for i in range(len(self.base_lrs))]
        return self._fc_values()

    def step(self, epoch: float | None = None) -> None:
        """Advances the schedule by one step, or moves it to ``epoch``.

        As in torch, ``epoch`` may be fractional (for example
        ``epoch + batch / iters`` to restart within an epoch); see the class
        notes for what that means for the in-kernel schedule.

        Raises
        ------
        ValueError
            If ``epoch`` is negative.
        """
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        shifted = 0
        if epoch is None:
            self._fc_revive()
            if (self._fc_in_kernel and not self._fc_torch_update and not self._fc_owned
                    and self._fc_settings_edited(epoch=False)):
                # [note: edited settings] torch's update reads T_cur, T_i and the edited settings
                # (last_epoch plays no part in it: an assignment is followed through T_cur below).
                _EDITED.add(self)
                self._fc_torch_update = True
            self._fc_follow_t_cur()
            if self._fc_torch_update:
                self._fc_check(stacklevel=3)
                _TORCH_WARM_RESTARTS.step(self)
                self._fc_stepped()
                return
            pos: float = self.last_epoch + 1 + self._fc_frac
        else:
            if epoch < 0:
                raise ValueError(f"Expected non-negative epoch, but got {epoch}")
            pos = epoch
            shifted, self._fc_shift = self._fc_shift, 0  # torch recomputes T_cur from the epoch
            self._fc_torch_update = False
        whole = math.floor(pos)
        self._fc_frac = float(pos - whole)
        self.last_epoch = whole
        self.T_cur, self.T_i, _ = self._fc_cycle(pos + self._fc_shift)
        if shifted:
            self._fc_refresh()  # the descriptor without the shift
        self._fc_check(stacklevel=3)
        try:
            with _torch_sched._enable_get_lr_call(self):
                values = self.get_lr()
            for group, lr in zip(self.optimizer.param_groups, values, strict=True):
                _torch_sched._update_param_group_val(group, "lr", lr)
            self._last_lr = _torch_sched._param_groups_val_list(self.optimizer, "lr")
            _record_lr_tensors(self.optimizer)
        finally:
            self._fc_sync()

    def _update_lr(self, epoch: int | None = None) -> None:
        # SequentialLR restarts a child with child._update_lr(0).
        self.step(epoch)


# --------------------------------------------------------------------------
# Cyclical schedules with cyclical momentum
# --------------------------------------------------------------------------


class CyclicLR(_InKernelSchedule, _torch_sched.CyclicLR):
    """Cyclical learning rate (CLR) with optional cyclical momentum (Smith, 2015).

    Same arguments, defaults, errors and values as
    :class:`torch.optim.lr_scheduler.CyclicLR`, including how it initialises
    the param groups (``lr = base_lr``; with ``cycle_momentum``, momentum or
    ``betas[0]`` set to ``max_momentum`` and ``base_momentum`` /
    ``max_momentum`` stored in every group). The built-in modes
    ``"triangular"``, ``"triangular2"`` and ``"exp_range"`` and the cyclical
    momentum (SGD's momentum, Adam's ``beta1``) run in-kernel.

    A user ``scale_fn`` is a Python callable, which the kernel cannot call:
    with a fusedclr optimizer the scheduler then warns once at construction and
    runs on the host with torch's own computation (it writes ``group["lr"]``
    and the momentum as floats every step, and the optimizer reads them). With
    a stock torch optimizer it behaves exactly like torch's, without warning.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    base_lr : float or list of float
        Lower learning-rate boundary of the cycle, per group.
    max_lr : float or list of float
        Upper learning-rate boundary of the cycle, per group.
    step_size_up : int, default 2000
        Steps in the increasing half of a cycle.
    step_size_down : int, optional
        Steps in the decreasing half; ``step_size_up`` when ``None``.
    mode : {"triangular", "triangular2", "exp_range"}, default "triangular"
        Amplitude policy: constant, halved every cycle, or ``gamma ** t``.
    gamma : float, default 1.0
        Base of the ``"exp_range"`` scaling.
    scale_fn : callable, optional
        Custom amplitude policy (host mode, see above); overrides ``mode``.
    scale_mode : {"cycle", "iterations"}, default "cycle"
        Argument of ``scale_fn``: the cycle number or the step.
    cycle_momentum : bool, default True
        Cycle the momentum inversely to the learning rate.
    base_momentum : float or list of float, default 0.8
        Momentum at the lr peak.
    max_momentum : float or list of float, default 0.9
        Momentum at the cycle start.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_lr: float | list[float],
        max_lr: float | list[float],
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: Literal["cycle", "iterations"] = "cycle",
        cycle_momentum: bool = True,
        base_momentum: float = 0.8,
        max_momentum: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        self._fc_build(
            super().__init__,
            optimizer,
            base_lr,
            max_lr,
            step_size_up,
            step_size_down,
            mode,
            gamma,
            scale_fn,
            scale_mode,
            cycle_momentum,
            base_momentum,
            max_momentum,
            last_epoch,
        )

    def _fc_config_reason(self) -> str | None:
        if self._scale_fn_custom is not None:
            return "a Python scale_fn was given"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        if self.cycle_momentum:
            base_m, max_m = self.base_momentums[i], self.max_momentums[i]
        else:
            base_m = max_m = 0.0
        return _ref.stage(
            Kind.CYCLIC,
            [
                self.base_lrs[i],
                self.max_lrs[i],
                self.total_size,
                self.step_ratio,
                _ref.CYCLIC_MODES[self.mode],
                self.gamma,
                base_m,
                max_m,
            ],
            has_momentum=bool(self.cycle_momentum),
        )


class OneCycleLR(_InKernelSchedule, _torch_sched.OneCycleLR):
    """The 1cycle policy (Smith & Topin, super-convergence) with cyclical momentum.

    Same arguments, defaults, errors and values as
    :class:`torch.optim.lr_scheduler.OneCycleLR`, including the group
    initialisation (``initial_lr``, ``max_lr``, ``min_lr`` and, with
    ``cycle_momentum``, ``max_momentum`` / ``base_momentum`` and the momentum
    or ``betas[0]``), two- and three-phase schedules and cosine or linear
    annealing. The cyclical momentum (SGD's momentum, Adam's and AdamW's
    ``beta1``) runs in-kernel. Stepping past ``total_steps`` raises torch's
    :class:`ValueError`.

    The schedule is read from the param groups at construction (and again by
    :meth:`load_state_dict`); later edits of ``group["max_lr"]`` and friends
    are not followed.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    max_lr : float or list of float
        Peak learning rate, per group.
    total_steps : int, optional
        Length of the cycle; else ``epochs * steps_per_epoch``.
    epochs : int, optional
        Number of epochs, with ``steps_per_epoch``.
    steps_per_epoch : int, optional
        Steps per epoch, with ``epochs``.
    pct_start : float, default 0.3
        Fraction of the cycle spent increasing the lr.
    anneal_strategy : {"cos", "linear"}, default "cos"
        Annealing shape.
    cycle_momentum : bool, default True
        Cycle the momentum inversely to the learning rate.
    base_momentum : float or list of float, default 0.85
        Momentum at the lr peak.
    max_momentum : float or list of float, default 0.95
        Momentum at the start and the end.
    div_factor : float, default 25.0
        ``initial_lr = max_lr / div_factor``.
    final_div_factor : float, default 1e4
        ``min_lr = initial_lr / final_div_factor``.
    three_phase : bool, default False
        Use the paper's three phases instead of fastai's two.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.

    Raises
    ------
    ValueError
        From :meth:`step`, once the scheduler is stepped more than
        ``total_steps`` times (message as torch's).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        self._fc_build(
            super().__init__,
            optimizer,
            max_lr,
            total_steps,
            epochs,
            steps_per_epoch,
            pct_start,
            anneal_strategy,
            cycle_momentum,
            base_momentum,
            max_momentum,
            div_factor,
            final_div_factor,
            three_phase,
            last_epoch,
        )

    def _fc_config_reason(self) -> str | None:
        if getattr(self, "_anneal_func_type", None) not in _ref.ANNEAL:
            return "the anneal function is a Python callable"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        group = self.optimizer.param_groups[i]
        if self.cycle_momentum:
            base_m, max_m = group["base_momentum"], group["max_momentum"]
        else:
            base_m = max_m = 0.0
        ends = [float(phase["end_step"]) for phase in self._schedule_phases]
        ends += [0.0] * (3 - len(ends))
        return _ref.stage(
            Kind.ONE_CYCLE,
            [
                group["initial_lr"],
                group["max_lr"],
                group["min_lr"],
                base_m,
                max_m,
                len(self._schedule_phases),
                *ends,
                _ref.ANNEAL[self._anneal_func_type],
            ],
            has_momentum=bool(self.cycle_momentum),
        )

    def _fc_values(self) -> list[float]:
        if self.last_epoch > self.total_steps:
            raise ValueError(
                f"Tried to step {self.last_epoch} times. The specified number of total steps is {self.total_steps}"
            )
        return super()._fc_values()


# --------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------


class SequentialLR(_InKernelSchedule, _torch_sched.SequentialLR):
    """Runs schedulers one after another, switching at the milestones.

    Same arguments, errors and values as
    :class:`torch.optim.lr_scheduler.SequentialLR`: scheduler ``k`` runs from
    ``milestones[k - 1]`` on, restarted at its own step 0. The children's
    descriptors are composed into one (one stage each, beginning at its
    milestone), so a warmup chain such as ``LinearLR -> CosineAnnealingLR``
    runs in-kernel as a single schedule. The children stop talking to the
    optimizer; this scheduler attaches after them and owns the counter.

    If a child is not a :mod:`fusedclr.lr_scheduler` scheduler (or is in host
    mode itself), the whole chain runs on the host like torch's, with a
    one-time warning when the optimizer is a fusedclr optimizer.

    Every child runs from its own ``base_lrs`` (the groups' ``initial_lr`` when
    it was built). Torch's step-by-step children instead continue from the
    groups' ``initial_lr`` as it is when the SequentialLR is built; the two
    differ only when a later child rewrites ``initial_lr``, as
    :class:`OneCycleLR` does, so put a OneCycleLR first in a chain.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    schedulers : list of LRScheduler
        The schedulers, in order, all built on ``optimizer``.
    milestones : list of int
        The steps at which to switch to the next scheduler.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: list[_torch_sched.LRScheduler],
        milestones: list[int],
        last_epoch: int = -1,
    ) -> None:
        self._fc_build(super().__init__, optimizer, schedulers, milestones, last_epoch, owns=list(schedulers))

    def _fc_chain(self) -> None:
        super()._fc_chain()
        for child in getattr(self, "_schedulers", ()):
            if isinstance(child, _InKernelSchedule):
                child._fc_chained = True

    def _fc_config_reason(self) -> str | None:
        if list(self._milestones) != sorted(self._milestones) or not all(_is_integral(m) for m in self._milestones):
            return f"milestones {list(self._milestones)} are not increasing integers"
        for k, child in enumerate(self._schedulers):
            if not isinstance(child, _InKernelSchedule):
                return f"the scheduler at index {k} ({type(child).__name__}) is not a fusedclr.lr_scheduler class"
            override = _overridden(type(child))
            if override is not None:
                return (f"the scheduler at index {k} ({type(child).__qualname__}) overrides {override}(), which the "
                        "kernel's closed form cannot see")
            reason = child._fc_config_reason()
            if reason is not None:
                return f"in the scheduler at index {k} ({type(child).__name__}), {reason}"
        return None

    def _fc_parts(self, i: int) -> tuple[list[list[float]], list[float]]:
        stages: list[list[float]] = []
        tail: list[float] = []
        for k, child in enumerate(self._schedulers):
            begin = 0 if k == 0 else int(self._milestones[k - 1])
            child_stages, child_tail = child._fc_parts(i)  # type: ignore[attr-defined]
            for rec in child_stages:
                rec = list(rec)
                rec[_ref.S_T_BEGIN] += begin
                if int(rec[_ref.S_KIND]) == Kind.MULTISTEP:
                    rec[_ref.S_P0 + 2] += len(tail)
                stages.append(rec)
            tail.extend(child_tail)
        return stages, tail

    def step(self) -> None:  # type: ignore[override]
        """Advances the active child (restarting the next one at its milestone) and the device counters."""
        self._fc_follow_edits()
        self._fc_check(stacklevel=3)
        try:
            _TORCH_SEQUENTIAL.step(self)
        finally:
            self._fc_left_epoch()
        self._fc_stepped()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state from :meth:`state_dict`, children included, and re-attaches the composed schedule."""
        super().load_state_dict(state_dict)


# --------------------------------------------------------------------------
# Polynomial decay, Python callables, chains
# --------------------------------------------------------------------------


class PolynomialLR(_InKernelSchedule, _torch_sched.PolynomialLR):
    """Decays each group's learning rate polynomially to 0 over ``total_iters`` steps.

    Same arguments, defaults and values as
    :class:`torch.optim.lr_scheduler.PolynomialLR`:
    ``lr_t = base_lr * (1 - min(t, total_iters) / total_iters) ** power``,
    evaluated in the kernel. A ``total_iters`` that is not a positive integer or
    a negative ``power`` runs torch's update on the host (with a one-time
    warning on a fusedclr optimizer).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Wrapped optimizer.
    total_iters : int, default 5
        Number of steps of the decay.
    power : float, default 1.0
        Power of the polynomial.
    last_epoch : int, default -1
        Index of the last step; ``-1`` starts the schedule.
    """

    _fc_chainable = True
    _fc_multiplicative = True

    def __init__(
        self, optimizer: Optimizer, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1
    ) -> None:
        self._fc_build(super().__init__, optimizer, total_iters, power, last_epoch)

    def _fc_config_reason(self) -> str | None:
        if not (_is_integral(self.total_iters) and self.total_iters > 0):
            return f"total_iters={self.total_iters!r} is not a positive integer"
        if not (isinstance(self.power, numbers.Real) and self.power >= 0):
            return f"power={self.power!r} is not a non-negative number"
        return None

    def _fc_stage(self, i: int) -> list[float]:
        return _ref.stage(Kind.POLYNOMIAL, [self.base_lrs[i], self.total_iters, self.power])


class LambdaLR(_InKernelSchedule, _torch_sched.LambdaLR):
    """Sets each group's learning rate to ``base_lr * lr_lambda(t)``.

    :class:`torch.optim.lr_scheduler.LambdaLR` itself: ``lr_lambda`` is a
    Python function, which the kernel cannot call, so this scheduler always
    runs torch's computation on the host (with a one-time warning on a fusedclr
    optimizer, which then reads ``group["lr"]``). It is here so that a
    fusedclr optimizer knows about it: another scheduler on the same optimizer
    composes with it as in torch [note: composed schedulers].
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        self._fc_build(super().__init__, optimizer, lr_lambda, last_epoch)

    def _fc_config_reason(self) -> str | None:
        return "lr_lambda is a Python function"


class MultiplicativeLR(_InKernelSchedule, _torch_sched.MultiplicativeLR):
    """Multiplies each group's learning rate by ``lr_lambda(t)`` every step.

    :class:`torch.optim.lr_scheduler.MultiplicativeLR` itself, on the host, for
    the reason given in :class:`LambdaLR`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        self._fc_build(super().__init__, optimizer, lr_lambda, last_epoch)

    def _fc_config_reason(self) -> str | None:
        return "lr_lambda is a Python function"


class ChainedScheduler(_torch_sched.ChainedScheduler):
    """Steps several schedulers of one optimizer together; their effects multiply.

    :class:`torch.optim.lr_scheduler.ChainedScheduler` itself. Chaining needs
    no wrapper: schedulers of this module that share an optimizer compose as
    torch's do [note: composed schedulers], in the kernel for the
    multiplicative families, else on the host with torch's chainable update
    (one warning per optimizer).
    """

    def __init__(self, schedulers: Sequence[_torch_sched.LRScheduler], optimizer: Optimizer | None = None) -> None:
        super().__init__(schedulers, optimizer)


LRScheduler = _torch_sched.LRScheduler


# --------------------------------------------------------------------------
# ReduceLROnPlateau on the device
# --------------------------------------------------------------------------


class ReduceLROnPlateau(_torch_sched.ReduceLROnPlateau):
    """Reduces the learning rate when a metric stops improving, without reading the metric on the host.

    Same arguments, defaults, errors and values as
    :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`. A Python number
    passed to :meth:`step` runs torch's code exactly.

    With a fusedclr optimizer, :meth:`step` also accepts the metric as a
    one-element tensor (typically a 0-dim validation loss on the GPU) and
    never reads it on the host [note: plateau on the device]: the best value,
    the bad-epoch count and the cooldown become 0-dim device tensors, and so
    does every group's ``lr`` (float64, on the metric's device), which the
    optimizer copies device-side into its kernel every step. Torch's
    ``float(metrics)`` costs a host sync per epoch and, under
    ``torch.compile``, a recompilation whenever the lr changes.
    ``get_last_lr()`` then returns 0-dim tensors, as torch's does for tensor
    lrs. Other schedulers stepping the same optimizer (a warmup, say) compose
    with it as in torch, on those tensors [note: composed schedulers].

    Difference from torch: with a device metric, a param group added to the
    optimizer without a matching ``min_lrs`` entry raises torch's
    ``RuntimeError`` at the next :meth:`step` rather than at the next
    reduction, which only the device knows about.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: list[float] | float = 0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(optimizer, mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps)
        self._fc_owned = False
        _join(self, optimizer)

    def _fc_chain(self) -> None:
        """Part of [note: composed schedulers]; torch's update is the only one this class has."""

    def step(self, metrics: SupportsFloat | Tensor, epoch: int | None = None) -> None:  # type: ignore[override]
        """Records ``metrics`` for this epoch and reduces the learning rate after ``patience`` bad epochs.

        Parameters
        ----------
        metrics : float or Tensor
            The monitored value. A one-element tensor with a fusedclr optimizer
            stays on its device (see the class notes); anything else goes
            through ``float()`` as in torch.
        epoch : int, optional
            Deprecated in torch; sets ``last_epoch``.
        """
        if not (isinstance(metrics, Tensor) and getattr(self.optimizer, "_attach_schedule", None) is not None):
            super().step(metrics, epoch)  # type: ignore[arg-type]
            return
        if metrics.numel() != 1:
            raise ValueError(
                f"ReduceLROnPlateau.step: metrics must be a number or a one-element tensor, got a tensor of shape "
                f"{tuple(metrics.shape)}; reduce it first (e.g. metrics.mean())"
            )
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(_torch_sched.EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch
        self._fc_device_step(metrics.detach().reshape(()))
        self._last_lr = _torch_sched._param_groups_val_list(self.optimizer, "lr")

    def _fc_device_step(self, metric: Tensor) -> None:
        """torch's step as tensor ops on ``metric``'s device [note: plateau on the device]."""
        # [note: plateau on the device]
        # torch's branches become torch.where over 0-dim tensors, in torch's order,
        # in float64 (torch computes in Python floats), so the lrs are torch's to the
        # last bit and nothing is read back. The tensors are updated in place, so a
        # reference to them (or a captured graph) stays current.
        device = metric.device
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"The number of param groups in the `optimizer` ({len(groups)}) differs from when "
                    f"`ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), usually due to a new param group "
                    "being added to the optimizer. Please modify the `min_lrs` field to match the length of the "
                    "`optimizer` param groups."
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        best = self.best = _on_device(self.best, torch.float64, device)
        bad = self.num_bad_epochs = _on_device(self.num_bad_epochs, torch.int64, device)
        cool = self.cooldown_counter = _on_device(self.cooldown_counter, torch.int64, device)
        for group in groups:
            if not isinstance(group["lr"], Tensor):
                group["lr"] = torch.full((), float(group["lr"]), dtype=torch.float64, device=device)
        current = metric.to(torch.float64)
        if self.mode == "min" and self.threshold_mode == "rel":
            better = current < best * (1.0 - self.threshold)
        elif self.mode == "min":
            better = current < best - self.threshold
        elif self.threshold_mode == "rel":
            better = current > best * (self.threshold + 1.0)
        else:
            better = current > best + self.threshold
        best.copy_(torch.where(better, current, best))
        new_bad = torch.where(better, 0, bad + 1)
        in_cooldown = cool > 0
        cool.sub_(in_cooldown.to(torch.int64))
        new_bad = torch.where(in_cooldown, 0, new_bad)
        reduce = new_bad > self.patience
        for group, min_lr in zip(groups, self.min_lrs, strict=True):
            old = group["lr"]
            new = torch.clamp(old * self.factor, min=min_lr)
            old.copy_(torch.where(reduce & (old - new > self.eps), new, old))
        cool.copy_(torch.where(reduce, self.cooldown, cool))
        bad.copy_(torch.where(reduce, 0, new_bad))


def _on_device(value: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a 0-dim tensor on ``device``: a number by a fill (no copy), a tensor moved if it must be."""
    if isinstance(value, Tensor):
        return value if value.device == device and value.dtype == dtype else value.to(device=device, dtype=dtype)
    return torch.full((), value, dtype=dtype, device=device)
