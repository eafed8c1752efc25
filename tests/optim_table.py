"""The optimizer table: one :class:`OptimInfo` per fusedclr optimizer, driving the parity tests.

Modelled on torch's ``OptimizerInfo`` / ``optim_db``
(torch/testing/_internal/common_optimizers.py). For every optimizer torch also has,
the option sets and the construction errors are read from torch's own ``optim_db``
at import (``optim_inputs_func(device="cpu")``, ``optim_error_inputs_func``), so they
follow torch's sets as torch changes them; options fusedclr accepts and ignores are
dropped (:data:`DROPPED`). Lion and Lookahead have no torch class: their reference is
a float64 implementation of the paper's algorithm written here (:class:`LionOracle`,
:class:`LookaheadOracle`).

The fusedclr class of an entry is looked up when a test runs (:meth:`OptimInfo.ours`),
so a class that fusedclr does not have yet fails its rows with an AttributeError and
leaves every other row alone.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from conftest import TOL

import fusedclr

# Options that fusedclr accepts for compatibility and ignores: its step is always fused and
# capturable, and ``differentiable=True`` runs torch's own implementation, not fusedclr's.
# A tensor lr stays: fusedclr's classes take it as torch's do (SGD's and Adagrad's sets have one).
DROPPED = frozenset({"foreach", "fused", "capturable", "differentiable"})

# The bf16 criterion: fusedclr's error against a float64 run is at most this factor times
# the reference implementation's own bf16 error (both over the whole model).
BF16_FACTOR = 2.0


# --------------------------------------------------------------------------
# torch's optim_db, read once
# --------------------------------------------------------------------------


def _load_torch_optim_db() -> dict[str, Any]:
    """torch's ``optim_db`` by class name, without the import's side effects on this process.

    torch.testing._internal.common_utils parses ``sys.argv`` at import (pytest's arguments
    are not its own), freezes ``torch.backends`` flags and wraps TorchScript calls; the
    argv is hidden during the import and the other two are undone after it.
    """
    frozen = torch.backends.flags_frozen()
    script_calls = (torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        from torch.testing._internal.common_optimizers import optim_db
    finally:
        sys.argv = argv
        if not frozen:
            setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
    return {info.name: info for info in optim_db}


TORCH_OPTIM_DB = _load_torch_optim_db()


# --------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSet:
    """Constructor kwargs of one row. ``source``: "torch" (from optim_db), "own" (this
    table's, for optimizers torch lacks) or "fusedclr" (extra combinations fusedclr's
    tests have always covered beyond torch's sets; fp32 parity only)."""

    desc: str
    kwargs: dict[str, Any]
    source: str

    @property
    def id(self) -> str:
        return f"{self.source}:{re.sub(r'[^0-9A-Za-z.=+-]+', '_', self.desc).strip('_')}"


@dataclass(frozen=True)
class ErrorCase:
    """A construction that raises ``error_type`` (a Warning subclass: warns) matching ``regex``.
    ``params``: None for a default parameter list."""

    desc: str
    kwargs: dict[str, Any]
    error_type: type
    regex: str
    params: Any = None


def _no_keys(options: dict[str, Any]) -> set[str]:
    return set()


@dataclass
class OptimInfo:
    name: str  # fusedclr's class name
    torch_cls: type | None  # None: no torch class; the reference is ``oracle``
    option_sets: list[OptionSet]
    error_cases: list[ErrorCase]
    # Per-group options of the three-group runs (group 1 also doubles the lr, see param_groups).
    group_overrides: tuple[dict, dict, dict] = ({}, {}, {})
    # The state keys torch keeps per parameter for an option set (checked against torch too).
    state_keys: Callable[[dict[str, Any]], set[str]] = _no_keys
    # Keys fusedclr may keep beyond those (Lion's "step"); ``state_superset``: any further keys,
    # and state for further parameters (a wrapper's own state, e.g. Lookahead's slow weights,
    # under a name not fixed here).
    optional_state_keys: frozenset[str] = frozenset()
    state_superset: bool = False
    supports_complex: bool = True
    # Builds the reference optimizer (float64 for an oracle): (param_groups, kwargs) -> optimizer.
    oracle: Callable[..., Any] | None = None
    default_lr: float = 1e-3
    tol: dict[torch.dtype, dict[str, float]] = field(default_factory=lambda: dict(TOL))
    bf16_factor: float = BF16_FACTOR
    # Builds fusedclr's optimizer when it is not ``cls(param_groups, **kwargs, backend=...)``.
    build: Callable[..., Any] | None = None

    @property
    def ref_dtype(self) -> torch.dtype | None:
        """The dtype the reference runs in for fp32 parity: float64 for an oracle, else the same."""
        return torch.float64 if self.torch_cls is None else None

    def ours_cls(self) -> type:
        return getattr(fusedclr, self.name)  # AttributeError while fusedclr lacks the class

    def ours(self, param_groups, kwargs: dict[str, Any], backend: str):
        kwargs = copy.deepcopy(kwargs)
        if self.build is not None:
            return self.build(param_groups, kwargs, backend)
        return self.ours_cls()(param_groups, **kwargs, backend=backend)

    def reference(self, param_groups, kwargs: dict[str, Any]):
        kwargs = copy.deepcopy(kwargs)
        if self.torch_cls is None:
            return self.oracle(param_groups, **kwargs)
        return self.torch_cls(param_groups, **kwargs)

    def base_lr(self, kwargs: dict[str, Any]):
        if self.name == "Lookahead":
            inner = INFO[kwargs["inner"]]
            return inner.base_lr(kwargs.get("inner_kwargs", {}))
        return kwargs.get("lr", self.default_lr)

    def param_groups(self, groups, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """The three param groups of a run: group 1 at twice the lr, group 2 with this entry's
        other per-group option."""
        out = []
        for i, ps in enumerate(groups):
            d = {"params": ps, **copy.deepcopy(self.group_overrides[i])}
            if i == 1:
                lr = self.base_lr(kwargs)
                d["lr"] = lr.clone() * 2 if isinstance(lr, torch.Tensor) else lr * 2
            out.append(d)
        return out


# --------------------------------------------------------------------------
# Option sets and errors from torch
# --------------------------------------------------------------------------


def _norm(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), tuple(v.flatten().tolist()))
    if isinstance(v, (tuple, list)):
        return tuple(_norm(x) for x in v)
    return v


def _key(kwargs: dict[str, Any]) -> tuple:
    return tuple(sorted((k, _norm(v)) for k, v in kwargs.items()))


def torch_option_sets(name: str) -> list[OptionSet]:
    """torch's option sets for ``name`` on CPU, without :data:`DROPPED` options (a set that
    then repeats an earlier one is left out)."""
    out, seen = [], set()
    for inp in TORCH_OPTIM_DB[name].optim_inputs_func(device="cpu"):
        kwargs = {k: v for k, v in inp.kwargs.items() if k not in DROPPED}
        if _key(kwargs) in seen:
            continue
        seen.add(_key(kwargs))
        out.append(OptionSet(inp.desc, kwargs, "torch"))
    return out


# Invalid values tried on every torch-backed class that takes the argument; a case is kept
# where torch's class raises ValueError, with torch's message.
_INVALID = [
    ("lr", -1.0), ("eps", -1.0), ("weight_decay", -1.0), ("momentum", -1.0), ("alpha", -1.0),
    ("betas", (-0.1, 0.9)), ("betas", (0.9, 1.0)), ("betas", (1.0, 0.9)), ("lr_decay", -1.0),
    ("initial_accumulator_value", -1.0), ("momentum_decay", -1.0), ("dampening", -1.0),
]


def _torch_message(torch_cls: type, kwargs: dict[str, Any], params=None) -> str | None:
    try:
        torch_cls([torch.nn.Parameter(torch.zeros(2))] if params is None else params, **kwargs)
    except ValueError as exc:
        return str(exc)
    return None


def torch_error_cases(name: str) -> list[ErrorCase]:
    """torch's construction errors for ``name`` on CPU (those not about :data:`DROPPED`
    options), then this table's invalid values, each with the message torch's class gives."""
    info = TORCH_OPTIM_DB[name]
    torch_cls = info.optim_cls
    out, seen = [], set()
    for e in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        inp = e.optimizer_error_input
        if e.error_on.name != "CONSTRUCTION_ERROR" or DROPPED & set(inp.kwargs):
            continue
        seen.add(_key(inp.kwargs))
        out.append(ErrorCase(f"torch:{inp.desc}", dict(inp.kwargs), e.error_type, e.error_regex, inp.params))
    takes = inspect.signature(torch_cls.__init__).parameters
    for arg, value in _INVALID:
        kwargs = {arg: value}
        if arg not in takes or _key(kwargs) in seen:
            continue
        message = _torch_message(torch_cls, kwargs)
        if message is not None:
            out.append(ErrorCase(f"own:{arg}={value}", kwargs, ValueError, re.escape(message)))
    if name == "SGD":
        kwargs = {"nesterov": True, "momentum": 0.0}
        out.append(ErrorCase("own:nesterov without momentum", kwargs, ValueError,
                             re.escape(_torch_message(torch_cls, kwargs))))
    return out


# --------------------------------------------------------------------------
# Float64 oracles for the optimizers torch lacks
# --------------------------------------------------------------------------


class LionOracle(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2),
    written as torch.optim's single-tensor loops: in the parameters' dtype (float64 for the
    parity reference), states ``exp_avg`` like the parameters, zero at the start.

        c = beta1 * m + (1 - beta1) * g;  p <- p * (1 - lr * wd) - lr * sign(c)
        m <- beta2 * m + (1 - beta2) * g

    ``sign(0) = 0`` (torch.sign). ``maximize`` negates the gradient. Parameters without a
    gradient are skipped, as torch.optim skips them.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                direction = torch.sign(m * beta1 + g * (1 - beta1))
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(direction, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)


class LookaheadOracle:
    """Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back",
    Algorithm 1) around any optimizer: the inner optimizer moves the fast weights (the
    parameters); after every ``k``-th step of a parameter (its own count: steps in which it
    had a gradient), ``slow <- slow + alpha * (fast - slow)`` and ``fast <- slow``. The slow
    weights start as the parameters' values at the first ``step()`` call. ``state_dict()`` is
    the inner optimizer's (the parity tests compare the inner states)."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"Invalid k: {k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha}")
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.slow: dict[torch.Tensor, torch.Tensor] = {}
        self.count: dict[torch.Tensor, int] = {}

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if p not in self.slow:
                self.slow[p] = p.detach().clone()
                self.count[p] = 0
        stepped = [p for p in params if p.grad is not None]
        loss = self.optimizer.step(closure)
        for p in stepped:
            self.count[p] += 1
            if self.count[p] % self.k == 0:
                slow = self.slow[p]
                slow.add_(p.detach() - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss

    def state_dict(self):
        return self.optimizer.state_dict()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


def _lookahead_reference(param_groups, inner, inner_kwargs=None, **kwargs):
    return LookaheadOracle(INFO[inner].torch_cls(param_groups, **(inner_kwargs or {})), **kwargs)


def _lookahead_ours(param_groups, kwargs, backend):
    lookahead = fusedclr.Lookahead  # first: its absence is what the row reports
    inner = INFO[kwargs.pop("inner")].ours_cls()(param_groups, **kwargs.pop("inner_kwargs", {}), backend=backend)
    return lookahead(inner, **kwargs)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def _own(desc: str, **kwargs) -> OptionSet:
    return OptionSet(desc, kwargs, "own")


def _fusedclr_extras(name: str, torch_sets: Iterable[OptionSet]) -> list[OptionSet]:
    """The option products test_optim_parity covered before the table (beyond torch's sets):
    every SGD momentum / dampening / Nesterov / weight decay / maximize combination and every
    Adam(W) amsgrad / maximize / weight decay one, each with a float and a tensor lr."""
    seen = {_key(s.kwargs) for s in torch_sets}
    out = []
    if name == "SGD":
        combos = itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.05), (False, True), (False, True))
        for momentum, dampening, nesterov, wd, maximize, tensor_lr in combos:
            if (nesterov and (momentum == 0 or dampening != 0)) or (momentum == 0 and dampening != 0):
                continue
            kwargs = dict(lr=torch.tensor(0.05) if tensor_lr else 0.05, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=wd, maximize=maximize)
            desc = f"m{momentum}-d{dampening}-nest{int(nesterov)}-wd{wd}-max{int(maximize)}-tlr{int(tensor_lr)}"
            if _key(kwargs) not in seen:
                out.append(OptionSet(desc, kwargs, "fusedclr"))
    else:
        for amsgrad, maximize, wd, tensor_lr in itertools.product((False, True), (False, True), (0.0, 0.1),
                                                                  (False, True)):
            kwargs = dict(lr=torch.tensor(0.01) if tensor_lr else 0.01, amsgrad=amsgrad, maximize=maximize,
                          weight_decay=wd)
            desc = f"ams{int(amsgrad)}-max{int(maximize)}-wd{wd}-tlr{int(tensor_lr)}"
            if _key(kwargs) not in seen:
                out.append(OptionSet(desc, kwargs, "fusedclr"))
    return out


def _torch_entry(name: str, *, group_overrides, state_keys, extras=False) -> OptimInfo:
    torch_info = TORCH_OPTIM_DB[name]
    sets = torch_option_sets(name)
    lr_default = inspect.signature(torch_info.optim_cls.__init__).parameters["lr"].default
    return OptimInfo(
        name=name,
        torch_cls=torch_info.optim_cls,
        option_sets=sets + (_fusedclr_extras(name, sets) if extras else []),
        error_cases=torch_error_cases(name),
        group_overrides=group_overrides,
        state_keys=state_keys,
        supports_complex=torch_info.supports_complex,
        default_lr=lr_default,
    )


def _adam_keys(o):
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if o.get("amsgrad") else set())


def _rmsprop_keys(o):
    return ({"step", "square_avg"} | ({"momentum_buffer"} if o.get("momentum", 0) > 0 else set())
            | ({"grad_avg"} if o.get("centered") else set()))


_ADAM_GROUPS = ({}, {"betas": (0.8, 0.99)}, {"eps": 1e-6, "weight_decay": 0.0})

TABLE: list[OptimInfo] = [
    _torch_entry("SGD", group_overrides=({}, {}, {"weight_decay": 0.0}), extras=True,
                 state_keys=lambda o: {"momentum_buffer"} if o.get("momentum", 0) != 0 else set()),
    _torch_entry("Adam", group_overrides=_ADAM_GROUPS, state_keys=_adam_keys, extras=True),
    _torch_entry("AdamW", group_overrides=_ADAM_GROUPS, state_keys=_adam_keys, extras=True),
    _torch_entry("RMSprop", group_overrides=({}, {"alpha": 0.9}, {"eps": 1e-6, "weight_decay": 0.0}),
                 state_keys=_rmsprop_keys),
    _torch_entry("Adagrad", group_overrides=({}, {}, {"lr_decay": 0.1, "eps": 1e-8, "weight_decay": 0.0}),
                 state_keys=lambda o: {"step", "sum"}),
    _torch_entry("RAdam", group_overrides=_ADAM_GROUPS, state_keys=lambda o: {"step", "exp_avg", "exp_avg_sq"}),
    _torch_entry("NAdam", group_overrides=({}, {"betas": (0.8, 0.99)}, {"momentum_decay": 5e-3, "weight_decay": 0.0}),
                 state_keys=lambda o: {"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    OptimInfo(
        name="Lion",
        torch_cls=None,
        oracle=LionOracle,
        default_lr=1e-4,
        option_sets=[
            _own("default"),
            _own("non-default lr", lr=1e-3),
            _own("non-default betas", lr=1e-3, betas=(0.95, 0.98)),
            _own("weight_decay", lr=1e-3, weight_decay=0.5),
            _own("maximize, weight_decay", lr=1e-3, weight_decay=0.1, maximize=True),
        ],
        error_cases=[
            ErrorCase("own:lr", {"lr": -1.0}, ValueError, "Invalid learning rate"),
            ErrorCase("own:beta1", {"betas": (1.0, 0.99)}, ValueError, "Invalid beta parameter at index 0"),
            ErrorCase("own:beta2", {"betas": (0.9, -0.5)}, ValueError, "Invalid beta parameter at index 1"),
            ErrorCase("own:weight_decay", {"weight_decay": -1.0}, ValueError, "Invalid weight_decay value"),
        ],
        group_overrides=({}, {"betas": (0.8, 0.95)}, {"weight_decay": 0.0}),
        state_keys=lambda o: {"exp_avg"},
        optional_state_keys=frozenset({"step"}),
        supports_complex=False,
    ),
    OptimInfo(
        name="Lookahead",
        torch_cls=None,
        oracle=_lookahead_reference,
        build=_lookahead_ours,
        option_sets=[
            _own("SGD momentum, default k and alpha", inner="SGD", inner_kwargs={"lr": 0.05, "momentum": 0.9}),
            _own("SGD, k=3, alpha=0.8", inner="SGD", inner_kwargs={"lr": 0.1}, k=3, alpha=0.8),
            _own("Adam weight_decay, k=3", inner="Adam", inner_kwargs={"lr": 0.01, "weight_decay": 0.1}, k=3,
                 alpha=0.5),
            _own("AdamW amsgrad, k=1, alpha=0.3", inner="AdamW", inner_kwargs={"lr": 0.01, "amsgrad": True}, k=1,
                 alpha=0.3),
            _own("Adam default, k=4", inner="Adam", k=4, alpha=0.5),
        ],
        error_cases=[
            ErrorCase("own:k=0", {"inner": "SGD", "inner_kwargs": {"lr": 0.1}, "k": 0}, ValueError, r"\bk\b"),
            ErrorCase("own:alpha=1.5", {"inner": "SGD", "inner_kwargs": {"lr": 0.1}, "alpha": 1.5}, ValueError,
                      "alpha"),
            ErrorCase("own:alpha=-0.1", {"inner": "SGD", "inner_kwargs": {"lr": 0.1}, "alpha": -0.1}, ValueError,
                      "alpha"),
        ],
        group_overrides=({}, {}, {"weight_decay": 0.0}),
        state_keys=lambda o: INFO[o["inner"]].state_keys(o.get("inner_kwargs", {})),
        state_superset=True,
    ),
]

INFO: dict[str, OptimInfo] = {info.name: info for info in TABLE}


def rows(sources: Iterable[str] = ("torch", "own", "fusedclr")) -> list[tuple[OptimInfo, OptionSet]]:
    """(entry, option set) for every option set whose source is in ``sources``."""
    return [(info, s) for info in TABLE for s in info.option_sets if s.source in sources]


__all__ = ["BF16_FACTOR", "DROPPED", "INFO", "TABLE", "ErrorCase", "LionOracle", "LookaheadOracle", "OptimInfo",
           "OptionSet", "rows", "torch_error_cases", "torch_option_sets"]
