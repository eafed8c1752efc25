"""``optimizer.state`` of the fusedclr optimizers: torch's mapping over the flat buckets [note: lazy state]."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from fusedclr.optim._flat import Bucket, ShardBucket


def step_value(step: Any) -> int:
    """A loaded ``step`` entry (tensor or number) as an int."""
    value = float(step)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"loaded state has an invalid step count {value}")
    return int(value)


# Every name a fusedclr optimizer keeps in its flat buffers (or as its step count): a key of a state
# entry that is one of them is checked against what this optimizer keeps; any other is kept as it is
# [note: extra state keys].
FLAT_STATE_NAMES = frozenset({
    "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg", "sum",
    "mu_product", "master_param",
})


def _lives_at(loc: tuple[Bucket, int] | None, bucket: Bucket, index: int) -> bool:
    return loc is not None and loc[0] is bucket and loc[1] == index


class ParamState(MutableMapping):
    """``optimizer.state`` of a fusedclr optimizer: torch's mapping, read from the flat buckets.

    [note: lazy state]
    torch.optim creates a parameter's entry in its first step, and SGD without
    momentum never does. fusedclr keeps states in flat buffers allocated at
    construction, so this mapping shows an entry (a :class:`StateEntry` of live
    views) only for a parameter that has stepped, which it reads from the
    bucket's device step counts when asked, at most once per bucket between two
    steps: the step itself only counts itself on the host. What it has seen
    stepped stays shown without reading again; a load or a reset forgets it.
    Entries with no states (SGD without momentum) are never shown, unless the
    bucket keeps fp32 masters. DTensor parameters (ShardBuckets) show theirs
    from construction on, see :meth:`FlatOptimizerMixin._stepped_state`. Keys
    that are not parameters of the optimizer are kept as in torch's
    ``defaultdict(dict)``.

    [note: extra state keys]
    Code that keeps its own per-parameter values in the optimizer's state, as
    torch allows (timm's ``Lookahead`` keeps ``lookahead_slow_buff`` in the
    wrapped optimizer's ``state[p]``), gets them kept as they are, beside the
    flat states: shown in the entry, saved by ``state_dict()``, loaded back,
    dropped with the entry. Only the names of the flat states are checked.
    """

    def __init__(self, step_in_state: bool, other: Mapping[Any, Any] | None = None) -> None:
        self._step_in_state = step_in_state
        self._where: dict[Tensor, tuple[Bucket, int]] = {}
        self._shown: dict[Bucket, list[bool]] = {}  # per bucket: the parameters known to have stepped
        # Steps taken (counted by the optimizer's host half), and at which count each bucket's
        # step counts were last read: they are read again only after another step.
        self.steps_taken = 0
        self._read_at: dict[Bucket, int] = {}
        self._other: defaultdict[Any, Any] = defaultdict(dict, other or {})
        self._extras: dict[Tensor, dict[str, Any]] = {}  # [note: extra state keys]

    # -- bookkeeping -----------------------------------------------------------

    def add_buckets(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            self._shown[b] = [isinstance(b, ShardBucket) and p.requires_grad for p in b.params]
            for i, p in enumerate(b.params):
                self._where[p] = (b, i)
                assigned = self._other.pop(p, None)
                if isinstance(assigned, Mapping):  # a state given to a parameter new to the buckets
                    for key, value in assigned.items():
                        if key not in FLAT_STATE_NAMES:
                            self.set_extra(p, key, value)  # [note: extra state keys]

    def forget(self, bucket: Bucket, shown: list[bool] | None = None) -> None:
        """The bucket's step counts were reset (a load, a new momentum buffer): ``shown`` or nothing is stepped."""
        self._shown[bucket] = list(shown) if shown is not None else [
            isinstance(bucket, ShardBucket) and p.requires_grad for p in bucket.params
        ]
        self._read_at.pop(bucket, None)

    def stepped(self, bucket: Bucket) -> list[bool]:
        """Which parameters of ``bucket`` have an entry; reads the step counts only while some have none."""
        shown = self._shown[bucket]
        if not all(shown) and self._read_at.get(bucket) != self.steps_taken and not bucket.seg_steps.is_meta:
            # (meta buckets, built before to_empty(): no counts to read, and none has stepped)
            steps = bucket.seg_steps.cpu().tolist()  # on access only, never on the step path
            shown[:] = [s or n > 0 for s, n in zip(shown, steps)]
            self._read_at[bucket] = self.steps_taken
        return shown

    def _has_states(self, bucket: Bucket) -> bool:
        return self.keeps_step(bucket) or bool(bucket.states) or bucket.master is not None

    def keeps_step(self, bucket: Bucket) -> bool:
        """Whether ``bucket``'s entries show ``step``: where torch keeps one (Adam), and where
        stochastic rounding draws its bits by step count (SGD too, so a resume continues them)."""
        return self._step_in_state or getattr(bucket, "sr_seed", None) is not None

    def _visible(self) -> Iterator[Tensor]:
        seen: set[Bucket] = set()
        for b, _ in self._where.values():
            if b in seen:
                continue
            seen.add(b)
            shown = self.stepped(b) if self._has_states(b) else [False] * len(b.params)
            # A bucket re-built since holds some of these parameters now: each shows once, where it lives.
            yield from (p for i, (p, s) in enumerate(zip(b.params, shown))
                        if (s or self.extras(p)) and _lives_at(self._where.get(p), b, i))

    def _is_visible(self, key: Any) -> bool:
        loc = self._where.get(key) if isinstance(key, Tensor) else None
        if loc is None:
            return False
        return bool(self.extras(key)) or (self._has_states(loc[0]) and self.stepped(loc[0])[loc[1]])

    def extras(self, param: Tensor) -> dict[str, Any]:
        """The keys of ``param``'s entry that are not flat states [note: extra state keys]."""
        return self.__dict__.get("_extras", {}).get(param, {})  # (absent from optimizers pickled before it)

    def set_extra(self, param: Tensor, key: str, value: Any) -> None:
        self.__dict__.setdefault("_extras", {}).setdefault(param, {})[key] = value

    def clear_extras(self, param: Tensor | None = None) -> None:
        """Drops ``param``'s extra keys, or every parameter's."""
        extras = self.__dict__.setdefault("_extras", {})
        if param is None:
            extras.clear()
        else:
            extras.pop(param, None)

    # -- the mapping -------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        loc = self._where.get(key) if isinstance(key, Tensor) else None
        if loc is not None:
            return StateEntry(self, *loc)  # empty until the parameter steps, like torch's defaultdict entry
        return self._other[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        loc = self._where.get(key) if isinstance(key, Tensor) else None
        if loc is None:
            self._other[key] = value
            return
        if not isinstance(value, Mapping):
            raise TypeError(f"optimizer.state[param] must be a mapping of state names to values, got "
                            f"{type(value).__name__}")
        entry = StateEntry(self, *loc)
        entry.check(value)
        del self[key]
        entry.update(value)

    _MISSING = object()

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Removes a parameter's entry, as torch's ``dict.pop``, and returns its values: copies,
        since the entry's live views are zeroed with it (the ``opt.state[new] = opt.state.pop(old)``
        recipe of a replaced parameter keeps them)."""
        if isinstance(key, Tensor) and key in self._where:
            if not self._is_visible(key):
                if default is ParamState._MISSING:
                    raise KeyError(key)
                return default
            extras = self.extras(key)
            value = {k: (v.detach().clone() if isinstance(v, Tensor) and k not in extras else v)
                     for k, v in self[key].items()}
            del self[key]
            return value
        if default is ParamState._MISSING:
            return self._other.pop(key)
        return self._other.pop(key, default)

    def assigned(self, key: Tensor) -> Any:
        """The state assigned to a parameter the buckets do not hold yet (one added to a group
        since), or ``None``: its re-bucketing starts it from there, as torch's step would."""
        return self._other.get(key)

    def __delitem__(self, key: Any) -> None:
        loc = self._where.get(key) if isinstance(key, Tensor) else None
        if loc is None:
            del self._other[key]
            return
        # torch starts a deleted entry afresh at the next step: zero states, step 0.
        b, i = loc
        self.clear_extras(key)
        b.reset_state(i)
        self._shown[b][i] = False
        self._read_at.pop(b, None)

    def __contains__(self, key: Any) -> bool:
        return self._is_visible(key) or (key not in self._where and key in self._other)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[Any]:
        yield from self._visible()
        yield from (k for k in list(self._other) if k not in self._where)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({ {k: dict(v) if isinstance(v, StateEntry) else v for k, v in self.items()} })"


class StateEntry(MutableMapping):
    """``optimizer.state[param]``: live views of one parameter's states in the flat buffers.

    Reading a state gives a view (in-place changes reach the next step);
    assigning one copies the value in. ``"step"`` reads as torch's dtype
    (float32, or float64 under a float64 default dtype), converted from the
    exact int64 count the kernels keep; assigning it sets that count. The entry
    is empty until the parameter steps [note: lazy state]; assigning a state
    to an empty entry starts it, with every other state zero and step 0.
    """

    def __init__(self, owner: ParamState, bucket: Bucket, index: int) -> None:
        self._owner = owner
        self._bucket = bucket
        self._index = index

    def _names(self) -> list[str]:
        b = self._bucket
        names = (["step"] if self._owner.keeps_step(b) else []) + list(b.states)
        if b.seg_scalar is not None:
            names.append(b.seg_scalar[0])
        if b.master is not None:
            names.append("master_param")
        return names

    def _live(self) -> bool:
        return self._owner._has_states(self._bucket) and self._owner.stepped(self._bucket)[self._index]

    def check(self, values: Mapping[str, Any]) -> None:
        """Validates every value of ``values`` before anything is written."""
        names = self._names()
        b, i = self._bucket, self._index
        for key, value in values.items():
            if key not in names:
                if not isinstance(key, str):
                    raise TypeError(f"optimizer.state[param] keys are state names (str), got {key!r}")
                if key in FLAT_STATE_NAMES:
                    raise KeyError(
                        f"{key!r}: a fusedclr optimizer keeps only {names} for this parameter"
                        + ("" if names else " (SGD keeps no state without momentum)")
                        + f", and {key!r} is a state it does not keep with these settings"
                    )
                continue  # kept as it is [note: extra state keys]
            if key != "step" and (b.seg_scalar is None or key != b.seg_scalar[0]):
                shape = b.locals[i].shape
                if not isinstance(value, Tensor) or value.numel() != b.locals[i].numel():
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"state {key!r} must be a tensor of the parameter's shape {tuple(shape)}, "
                                     f"got {got}")

    def __getitem__(self, key: str) -> Tensor:
        extras = self._owner.extras(self._param)
        if key in extras:
            return extras[key]
        if not self._live() or key not in self._names():
            raise KeyError(key)
        b, i = self._bucket, self._index
        if key == "step":
            return b.seg_steps[i].to(_get_scalar_dtype())
        if b.seg_scalar is not None and key == b.seg_scalar[0]:
            return b.seg_scalars[i].to(_get_scalar_dtype())
        if key == "master_param":
            return b.master_tensor(i)
        return b.state_tensor(key, i)

    def __setitem__(self, key: str, value: Any) -> None:
        self.check({key: value})
        b, i = self._bucket, self._index
        if key not in self._names():
            self._owner.set_extra(self._param, key, value)
            return
        if not self._live():
            b.reset_state(i)
            self._owner._shown[b][i] = True
        if key == "step":
            if isinstance(value, Tensor) and value.device.type != "cpu":
                b.seg_steps[i].copy_(value.reshape(()))  # no sync: the device casts it
            else:
                b.seg_steps[i].fill_(step_value(value))
        elif b.seg_scalar is not None and key == b.seg_scalar[0]:
            b.seg_scalars[i].copy_(torch.as_tensor(value, dtype=torch.float64).reshape(()))
        elif key == "master_param":
            b.master_view(i).copy_(b.local_value(value, i))
        else:
            b.state_view(key, i).copy_(b.local_value(value, i))

    _MISSING = object()

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        """``dict.pop``: the value as it was (a flat state's copy, since removing it zeroes the view)."""
        if key not in self:
            if default is StateEntry._MISSING:
                raise KeyError(key)
            return default
        value = self[key]
        if isinstance(value, Tensor) and key not in self._owner.extras(self._param):
            value = value.detach().clone()
        del self[key]
        return value

    @property
    def _param(self) -> Tensor:
        return self._bucket.params[self._index]

    def __delitem__(self, key: str) -> None:
        extras = self._owner.extras(self._param)
        if key in extras:
            del extras[key]
            return
        if key not in self:
            raise KeyError(key)
        if key == "momentum_buffer" and not self._owner._step_in_state:
            # torch's SGD starts a removed buffer afresh from the next gradient (the momentum reset of
            # ``state[p].pop("momentum_buffer", None)``): so does a parameter started afresh.
            b, i = self._bucket, self._index
            b.reset_state(i)
            self._owner._shown[b][i] = False
            self._owner._read_at.pop(b, None)
            return
        raise TypeError(
            f"cannot delete {key!r} from a fusedclr optimizer's state entry (its states live in flat buffers); "
            "`del optimizer.state[param]` starts the parameter's state afresh, as in torch"
        )

    def __iter__(self) -> Iterator[str]:
        return iter([*(self._names() if self._live() else []), *self._owner.extras(self._param)])

    def __len__(self) -> int:
        return (len(self._names()) if self._live() else 0) + len(self._owner.extras(self._param))

    def __repr__(self) -> str:
        return repr(dict(self))
