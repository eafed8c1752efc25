"""Shared machinery of the fusedclr optimizers.

[note: optimizer layers]
Like torch.optim, three layers: the class (subclassing torch's own, so the
constructor, defaults, validation messages and ``param_groups`` layout are
torch's) builds flat buckets when a param group is added; ``step()`` picks the
backend implementation once per bucket; every backend implements the op
signatures of csrc/ops.cpp (``fusedclr.ops``, ``fusedclr.triton``,
``fusedclr.reference``). The step path has no host syncs and no Python loop
over parameters, only over buckets.

[note: step anatomy]
``step()`` is two halves. ``_prepare_step`` is the host-side bookkeeping:
gathering replaced gradients, validating them, mirroring float hyperparameters
into the buckets' device tensors and picking the implementation. It reads
Python values that change from step to step (``group["lr"]`` written by a
scheduler, grad identities, caches), so it is disabled for Dynamo (as is
``zero_grad``, like torch.optim's): under ``torch.compile`` it runs eagerly and
Dynamo never guards on those values (guarding on them recompiled the step
whenever a scheduler moved the lr, and ``map(attrgetter("grad"))`` was a graph
break). The other half, the gradient guard (global norm, clip coefficient,
non-finite check) and one op call per bucket, touches only tensors and per-run
constants, so Dynamo traces it once and never recompiles.

[note: fused clipping]
With ``max_grad_norm`` the step computes the global L2 norm of the gradients
(one reduction over each bucket's flat gradient buffer, combined on the
device) and the coefficient of ``torch.nn.utils.clip_grad_norm_``,
``min(1, max_norm / (norm + 1e-6))``. Instead of scaling the gradients in
place, it folds ``1 / coef`` into the ``grad_scale`` tensor that the kernels
already divide by, so the clip costs one extra read of the gradients and no
write, where clip-then-step reads them twice more and writes them once. With a
GradScaler, ``grad_scale`` holds the loss scale and the norm is that of the
unscaled gradients. Nothing leaves the device: no ``.item()``, no sync.
``skip_nonfinite`` turns a non-finite norm into ``found_inf`` (or-ed with a
GradScaler's), which makes the kernels change nothing at all.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from torch.optim.optimizer import _global_optimizer_post_hooks as _global_step_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_step_pre_hooks
from torch.optim.optimizer import _get_scalar_dtype

from fusedclr import ops, reference
from fusedclr.optim._flat import Bucket, ParamChanged, ShardBucket, is_dtensor, real_dtype
from fusedclr.optim._state import FLAT_STATE_NAMES, ParamState, StateEntry, step_value

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_NO_SCHEDULE: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _no_schedule(device: torch.device) -> tuple[Tensor, Tensor]:
    if device not in _NO_SCHEDULE:
        _NO_SCHEDULE[device] = (
            torch.tensor(reference.no_schedule(), dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )
    return _NO_SCHEDULE[device]


def _covers(desc: list[float] | None) -> tuple[bool, bool]:
    """Whether every stage of a descriptor provides the lr / the momentum (beta1)."""
    if desc is None or int(desc[0]) <= 0:
        return False, False
    stages = [desc[reference.HEADER_WORDS + i * reference.STAGE_WORDS:][: reference.STAGE_WORDS]
              for i in range(int(desc[0]))]
    cyclical = (reference.Kind.CYCLIC, reference.Kind.ONE_CYCLE)
    mom = all(st[reference.S_HAS_MOM] and int(st[reference.S_KIND]) in cyclical for st in stages)
    return True, mom


def resolve_backend(backend: str, device: torch.device, op: str = "step_") -> Callable[..., None]:
    """The implementation of ``op`` (``"step_"``, csrc/ops.cpp) for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kind = device.type
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        from fusedclr import triton as fc_triton

        # Imports and registers now (a first import inside a compiled step cannot be traced).
        return fc_triton.for_buckets(op)
    if backend in ("cpu", "cuda"):
        if backend != kind:
            raise ValueError(f"backend={backend!r} cannot update parameters on {device}; use backend='auto'")
        if not ops.extension_available():
            raise RuntimeError(
                f"backend={backend!r} needs the compiled fusedclr extension, which did not load: "
                f"{ops.extension_error()}; rebuild it or use backend='reference'"
            )
        if kind == "cuda" and not ops.cuda_kernels_registered():
            raise RuntimeError("backend='cuda': fusedclr was built without its CUDA kernels; use backend='triton'")
        return getattr(ops, op)
    # auto
    if ops.extension_available() and (kind == "cpu" or (kind == "cuda" and ops.cuda_kernels_registered())):
        return getattr(ops, op)
    if kind == "cuda":
        from fusedclr import triton as fc_triton

        if fc_triton.available():
            return fc_triton.for_buckets(op)
    ops.warn_missing_extension()
    return getattr(reference, op)


class FlatOptimizerMixin:
    """Flat-bucket storage, gradient handling, state_dict and schedules for fusedclr optimizers.

    [note: optimizer entry]
    An optimizer is one entry: its kernel policy (csrc/include/fusedclr/
    optimizers/<name>.h, and its twins in fusedclr/reference.py and
    fusedclr/triton/_policies.py) and its class, which subclasses torch's (for
    the constructor, defaults, validation and ``param_groups``) and this mixin,
    and says:

    * ``_KERNEL``: the policy's name (the ``optimizer`` argument of ``step_``);
    * ``_KERNEL_STATES``: its state buffers in the policy's order, named as
      torch's ``state_dict`` names them;
    * ``_state_names(group)``: those a group keeps (amsgrad's maximum, ...);
    * ``_options(group)``: the policy's float options, in its order;
    * ``_momentum(group)``: the group's momentum or beta1 (what a schedule
      may cycle), or 0.0;
    * ``_STEP_IN_STATE``: whether torch keeps a per-parameter ``step``;
    * optionally ``_state_init(group)`` (states that do not start at 0),
      ``_SEG_SCALAR`` (a per-parameter scalar state and its start, as
      NAdam's ``mu_product``) and ``_before_launch(bucket, group)``.

    docs/adding-an-optimizer.md walks through adding one.
    """

    _KERNEL: str
    _KERNEL_STATES: tuple[str, ...]
    _STEP_IN_STATE: bool  # whether torch keeps a per-parameter "step" (Adam) or not (SGD)
    _SEG_SCALAR: tuple[str, float] | None = None
    _step_supports_amp_scaling = True

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._KERNEL_STATES

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {}

    def _options(self, group: dict[str, Any]) -> list[float]:
        raise NotImplementedError

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        return 0.0

    def _sparse_error(self, group: dict[str, Any]) -> str | None:
        """Why ``group`` may not have sparse gradients, or None where torch's optimizer takes them
        (they are then stepped through a dense copy [note: sparse gradients])."""
        return (f"{type(self).__name__} does not support sparse gradients: use "
                "torch.optim.SparseAdam (or torch.optim.SGD / Adagrad) for the sparse parameters")

    def _check_groups(self) -> None:
        """Hook: refuses, before anything changes, group values that torch's step refuses
        (Adam's beta1 of 1). One test per group; the groups' values are host floats."""

    def _before_launch(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """Hook: runs on the host before each launch (SGD allocates a buffer when momentum appears)."""

    def _state_keys(self) -> set[str]:
        keys = set(self._KERNEL_STATES) | ({"step"} if self._STEP_IN_STATE else set())
        return keys | ({self._SEG_SCALAR[0]} if self._SEG_SCALAR else set())

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch.optim.Optimizer's wrapper of ``step`` at a quarter of its host cost.

        [note: step wrapper]
        ``torch.optim.Optimizer.__init__`` wraps every optimizer's ``step`` once
        (``_patch_step_function``): a profiler scope named
        ``Optimizer.step#<class>.step`` around the global and per-optimizer step
        pre-hooks, the step, ``_optimizer_step_code`` and the post-hooks. Its
        scope, ``torch.autograd.profiler.record_function``, goes through the
        dispatcher on entry and exit: 4.5 us per step on the 2-vCPU dev machine,
        where fusedclr's whole host side is about 10. This wrapper does the
        same, in the same order, with the same scope (a ``RecordFunction`` of user
        scope, which the profiler and any other observer see as before) opened
        and closed through torch's direct bindings: 1.2 us. Under
        ``torch.compile`` it defers to torch's wrapper, which Dynamo knows.
        """
        torch_wrapped = torch.optim.Optimizer.profile_hook_step(func)
        enter = torch._C._autograd._record_function_with_args_enter
        leave = torch._C._autograd._record_function_with_args_exit

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return torch_wrapped(*args, **kwargs)
            self = args[0]
            scope = enter(f"Optimizer.step#{type(self).__name__}.step")
            try:
                for pre_hook in itertools.chain(_global_step_pre_hooks.values(),
                                                self._optimizer_step_pre_hooks.values()):
                    result = pre_hook(self, args, kwargs)
                    if result is not None:
                        if isinstance(result, tuple) and len(result) == 2:
                            args, kwargs = result
                        else:
                            raise RuntimeError(
                                f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                            )
                out = func(*args, **kwargs)
                self._optimizer_step_code()
                for post_hook in itertools.chain(self._optimizer_step_post_hooks.values(),
                                                 _global_step_post_hooks.values()):
                    post_hook(self, args, kwargs)
                return out
            finally:
                leave(scope)

        return wrapper

    def _init_flat(self, backend: str, max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                   state_dtype: torch.dtype | None = None, master_weights: bool = False,
                   stochastic_rounding: bool = False, differentiable: bool = False) -> None:
        self._torch_impl = bool(differentiable)
        if self._torch_impl:
            self._init_torch_impl(backend, max_grad_norm, skip_nonfinite, state_dtype, master_weights,
                                  stochastic_rounding)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
                raise TypeError(f"max_grad_norm must be a float or None, got {type(max_grad_norm).__name__}")
            if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
                raise ValueError(
                    f"Invalid max_grad_norm value: {max_grad_norm}; pass a positive finite norm, or None not to clip"
                )
        for name, flag in (("skip_nonfinite", skip_nonfinite), ("master_weights", master_weights),
                           ("stochastic_rounding", stochastic_rounding)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if state_dtype is not None and not isinstance(state_dtype, torch.dtype):
            raise TypeError(f"state_dtype must be a torch.dtype or None, got {type(state_dtype).__name__}")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                f"state_dtype must be None (float32 states), torch.float32 or torch.bfloat16, got {state_dtype}"
            )
        if master_weights and stochastic_rounding:
            raise ValueError(
                "pass master_weights=True or stochastic_rounding=True, not both: with master weights the "
                "parameters are their fp32 masters rounded to nearest, and nothing is left to round stochastically"
            )
        self.backend = backend
        # [note: precision opt-ins] (csrc/include/fusedclr/precision.h)
        self.state_dtype = state_dtype
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self._sr_buckets = 0
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.last_grad_norm: Tensor | None = None
        # Whether each step was skipped (found_inf), for a wrapper acting after it (Lookahead), which
        # opts in with _report_skips(): one persistent 0-dim tensor, written in place.
        self._skip_flag: Tensor | None = None
        self._buckets: list[list[Bucket]] = []
        # Per group, the ``params`` list its buckets were built from and its length [note: followed groups].
        self._bucketed: list[tuple[list[Tensor], tuple[Tensor, ...]]] = []  # [note: followed groups]
        self._impl: dict[tuple[str, torch.device], Callable[..., None]] = {}
        self._scheduler_ref: weakref.ref | None = None

    def _init_torch_impl(self, backend: str, max_grad_norm: float | None, skip_nonfinite: bool,
                         state_dtype: torch.dtype | None, master_weights: bool, stochastic_rounding: bool) -> None:
        """``differentiable=True``: this optimizer runs torch's own implementation [note: torch implementation].

        [note: torch implementation]
        A differentiable step has to be traced by autograd through every
        update, which fused kernels over flat buffers cannot offer. The class
        subclasses torch's, so with ``differentiable=True`` it is torch's
        optimizer: no buckets, torch's ``step``, ``zero_grad``, ``state`` and
        ``state_dict``. fusedclr's own options cannot apply and raise.
        """
        ours = {"backend": backend != "auto", "max_grad_norm": max_grad_norm is not None,
                "skip_nonfinite": skip_nonfinite, "state_dtype": state_dtype is not None,
                "master_weights": master_weights, "stochastic_rounding": stochastic_rounding}
        given = [name for name, set_ in ours.items() if set_]
        if given:
            raise ValueError(
                f"differentiable=True runs torch.optim's own implementation, which has no {', '.join(given)}; "
                "leave those at their defaults or pass differentiable=False"
            )
        global _WARNED_DIFFERENTIABLE
        if not _WARNED_DIFFERENTIABLE:
            _WARNED_DIFFERENTIABLE = True
            warnings.warn(
                f"fusedclr.{type(self).__name__}(differentiable=True) runs torch.optim.{type(self).__name__}'s own "
                "(unfused) implementation: fusedclr's fused kernels, in-kernel schedules and flat buffers do not "
                "apply to it",
                UserWarning,
                stacklevel=4,
            )
        self._step_supports_amp_scaling = False  # torch's differentiable step takes no grad_scale/found_inf

    @property
    def _scheduler(self) -> Any:
        """The attached fusedclr scheduler, or ``None``.

        Held by a weak reference: the scheduler holds the optimizer, so a strong
        one both ways would keep a dropped optimizer, and its buffers, alive
        until a garbage-collector pass. A scheduler that is dropped detaches
        itself: the kernel then reads the group's lr and momentum, which the
        scheduler last set, as torch's optimizer does once its scheduler is gone.
        """
        ref = self.__dict__.get("_scheduler_ref")
        return None if ref is None else ref()

    def _hold_scheduler(self, scheduler: Any) -> None:
        self._scheduler_ref = None if scheduler is None else weakref.ref(
            scheduler, functools.partial(_scheduler_dropped, weakref.ref(self)))

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups; the buckets must travel
        # too (deepcopy, pickling), and views stay views of the copied buffers.
        # The scheduler travels as a strong reference (a weakref cannot be pickled,
        # and a deep copy must point at the copied scheduler, if any).
        # A torch scheduler's wrapper of this instance's ``step`` (which counts
        # calls for its warnings) stays behind, as torch's own __getstate__ leaves it.
        state = dict(self.__dict__)
        state["_impl"] = {}
        state.pop("_last_found_inf", None)  # (pickled by versions that reported skips so)
        state["_scheduler_ref"] = self._scheduler
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also torch's load_state_dict, with only state and param_groups
        d = self.__dict__
        d.setdefault("_torch_impl", False)
        if "_scheduler" in d:  # pickled when the optimizer held its scheduler strongly
            d.setdefault("_scheduler_ref", d.pop("_scheduler"))
        sched = d.get("_scheduler_ref")
        if sched is not None and not isinstance(sched, weakref.ref):
            self._hold_scheduler(sched)
        if "_buckets" in state and not self._torch_impl and not isinstance(self.state, ParamState):
            # Pickled when every parameter had an entry from the start: read them from the step counts.
            live = ParamState(self._STEP_IN_STATE)
            for buckets in self._buckets:
                live.add_buckets(buckets)
            self.state = live

    # -- optimizer.state ----------------------------------------------------------

    @property
    def state(self) -> Any:
        """torch's ``optimizer.state``, keyed by parameter, whose entries are live views of the flat
        state buffers (:class:`ParamState`) [note: lazy state]."""
        return self.__dict__["state"]

    @state.setter
    def state(self, value: Any) -> None:
        live = self.__dict__.get("state")
        if isinstance(value, ParamState) or not isinstance(live, ParamState) or self.__dict__.get("_torch_impl"):
            self.__dict__["state"] = value  # torch's constructor and loads, or fusedclr's own bookkeeping
            return
        # A user replacing the state (``opt.state = defaultdict(dict)``, to reset the moments): as in
        # torch, every parameter starts afresh, from what the new mapping holds.
        if not isinstance(value, Mapping):
            raise TypeError(f"optimizer.state must be a mapping keyed by parameter, got {type(value).__name__}")
        entries = dict(value)
        for key, entry in entries.items():  # every entry is checked before anything is reset
            if isinstance(key, Tensor) and key in live._where:
                if not isinstance(entry, Mapping):
                    raise TypeError(f"optimizer.state[param] must be a mapping of state names to values, got "
                                    f"{type(entry).__name__}")
                StateEntry(live, *live._where[key]).check(entry)
        live.clear()
        for key, entry in entries.items():
            live[key] = entry

    # -- param groups --------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "_buckets"):
            raise RuntimeError("fusedclr optimizer used before its constructor finished")
        if self._torch_impl or not isinstance(param_group, dict) or isinstance(param_group.get("params"), set):
            super().add_param_group(param_group)  # torch's implementation, or torch's error
            return
        params = param_group["params"]
        # Materialised once and handed on: a generator (model.parameters()) is spent after one pass.
        params = param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        # (name, tensor) pairs as torch >= 2.6 takes them; torch checks the names themselves.
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        for i, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but param {i} is a {torch.typename(p)}")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"fusedclr: parameter {i} has layout {p.layout}; only dense (strided) tensors")
        duplicates = len(set(tensors)) != len(tensors)
        with warnings.catch_warnings():
            # torch's own duplicate warning, replaced by ours below, which says what fusedclr does.
            warnings.filterwarnings("ignore", message=".*parameter group with duplicate parameters",
                                    category=UserWarning)
            super().add_param_group(param_group)  # torch's validation: names, leaves, groups overlap, defaults
        if duplicates:
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters (torch will make this an error); "
                "fusedclr updates each parameter once per step, where torch.optim's for-loop and foreach "
                "implementations apply the update once per listing",
                UserWarning,
                stacklevel=3,
            )
        group = self.param_groups[-1]
        buckets = self._make_buckets(group)
        self._buckets.append(buckets)
        self._bucketed.append((group["params"], tuple(group["params"])))
        if not isinstance(self.state, ParamState):
            self.state = ParamState(self._STEP_IN_STATE, self.state)
        self.state.add_buckets(buckets)
        self._alloc_grad_norm()
        if self._scheduler is not None:
            self._attach_schedule(self._scheduler)

    def _report_skips(self) -> Tensor:
        """Opts in to ``_skip_flag``: after every step, 1 where the step was skipped (``found_inf``), else 0."""
        buckets = [b for bs in self._buckets for b in bs]
        device = buckets[0].device if buckets else torch.device("cpu")
        flag = self.__dict__.get("_skip_flag")
        if flag is None or flag.device != device:
            flag = self._skip_flag = torch.zeros((), dtype=torch.float32, device=device)
        return flag

    def _alloc_grad_norm(self) -> None:
        """``last_grad_norm``: one persistent 0-dim tensor on the first bucket's device, updated in place.

        In place, so a reference to it stays current, CUDA graphs see a static
        address, and torch.compile keeps the write (an attribute assigned in
        the traced step was lost under torch.compile, torch 2.14). The same for
        ``_skip_flag`` where a wrapper asked for it.
        """
        if self.__dict__.get("_skip_flag") is not None:
            self._report_skips()  # follows the buckets' device
        buckets = [b for bs in self._buckets for b in bs]
        if (self.max_grad_norm is None and not self.skip_nonfinite) or not buckets:
            return
        dtype = functools.reduce(torch.promote_types, [b.grad_norm_dtype for b in buckets])
        old = self.last_grad_norm
        if old is None or old.dtype != dtype or old.device != buckets[0].device:
            self.last_grad_norm = torch.zeros((), dtype=dtype, device=buckets[0].device)

    def _make_buckets(self, group: dict[str, Any]) -> list[Bucket]:
        by_key: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
        for p in dict.fromkeys(group["params"]):  # a duplicate gets one segment (see add_param_group)
            # DTensors go to ShardBuckets [note: shard buckets], one per mesh and sharded mesh dims.
            shard_key = (p.device_mesh, tuple(pl.is_shard() for pl in p.placements)) if is_dtensor(p) else None
            by_key[(p.device, real_dtype(p), shard_key)].append(p)
        buckets = []
        for (_, dtype, shard_key), params in by_key.items():
            if self.stochastic_rounding and dtype == torch.float16:
                raise ValueError(
                    f"fusedclr: stochastic_rounding=True rounds bfloat16 parameters, and parameter "
                    f"{_index_of(group['params'], params[0])} of this param group is float16, whose sub-ulp "
                    "updates would be lost silently: use master_weights=True for float16 parameters"
                )
            cls = Bucket if shard_key is None else ShardBucket
            buckets.append(cls(params, self._state_names(group), self._bucket_state_dtype(dtype),
                               master=self.master_weights and dtype in (torch.bfloat16, torch.float16),
                               sr_seed=self._next_sr_seed() if self.stochastic_rounding and dtype == torch.bfloat16
                               else None, state_init=self._state_init(group), seg_scalar=self._SEG_SCALAR))
        return buckets

    def _bucket_state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """State dtype of a bucket of ``dtype`` parameters: bf16 only where asked and the parameters are bf16."""
        if self.state_dtype == torch.bfloat16 and dtype == torch.bfloat16:
            return torch.bfloat16
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _next_sr_seed(self) -> int:
        """A stochastic-rounding seed per bucket, from torch's initial seed: reproducible under
        ``torch.manual_seed`` (so a resumed run draws the same bits) and without consuming
        random numbers, which would shift the caller's random stream."""
        self._sr_buckets += 1
        return (torch.initial_seed() + 0x9E3779B97F4A7C15 * self._sr_buckets) % 2**63

    def _impl_for(self, device: torch.device, op: str = "step_") -> Callable[..., None]:
        key = (op, device)
        fn = self._impl.get(key)
        if fn is None:
            fn = self._impl[key] = resolve_backend(self.backend, device, op)
        return fn

    # -- schedules -------------------------------------------------------------

    def _attach_schedule(self, scheduler: Any) -> None:
        """Evaluate ``scheduler``'s schedule in-kernel from now on (``None`` detaches).

        See docs/CONTRACTS.md: the scheduler provides ``_fc_descriptor(group_index)``
        and ``_fc_counter(device)``, and optionally ``_fc_step_check()``, which
        every step calls before it reads the groups' values (it may re-attach).
        """
        self._hold_scheduler(scheduler)
        for gi, buckets in enumerate(self._buckets):
            desc = None if scheduler is None else scheduler._fc_descriptor(gi)
            for b in buckets:
                if desc is None:
                    b.schedule, b.schedule_step = _no_schedule(b.device)
                else:
                    b.schedule = torch.tensor(desc, dtype=torch.float64).to(b.device)
                    b.schedule_step = scheduler._fc_counter(b.device)
                b.schedule_covers = _covers(desc)
                b.hyper_cache = None
                self._on_schedule(b, desc)

    def _on_schedule(self, bucket: Bucket, desc: list[float] | None) -> None:
        """Hook for optimizers that allocate state when a schedule moves momentum."""

    # -- the step --------------------------------------------------------------

    def _sync_hyper(self, bucket: Bucket, group: dict[str, Any]) -> bool:
        """Mirrors the group's lr and momentum into the bucket's device ``hyper`` tensor.

        A float only costs a copy when it changed; a tensor lr (which a torch
        scheduler updates in place) is copied device-side every step, no sync.

        Returns True when the group's lr is a float 0 although the attached
        schedule provides the lr: that step runs without the schedule, at lr 0,
        as torch's would. ``torch.distributed.checkpoint`` initialises an empty
        optimizer state with such a step (zero grads, every lr set to 0); a
        schedule that reached 0 itself mirrored that 0 into the group anyway.
        """
        covers_lr, covers_mom = getattr(bucket, "schedule_covers", (False, False))
        zero_lr = covers_lr and _is_zero_float(group["lr"])
        if covers_lr and covers_mom and not zero_lr:
            return False  # the kernel takes both from the schedule: no per-step copy
        # The scheduler mirrors its values into group["lr"] every step; when the
        # kernel reads them from the descriptor, watching them would cost a
        # host-to-device copy per step (and break CUDA-graph replay).
        lr = 0.0 if covers_lr else group["lr"]
        mom = 0.0 if covers_mom and not zero_lr else self._momentum(group)
        if isinstance(lr, Tensor):
            if lr.device.type == "cpu" and bucket.device.type == "cuda":
                # A pageable host-to-device copy_ waits for the stream (a host sync per step): pinned, async.
                bucket.hyper[:1].copy_(lr.detach().reshape(1).to(torch.float64).pin_memory(), non_blocking=True)
            else:
                bucket.hyper[0].copy_(lr.reshape(()))
            key = ("tensor", mom)
            if bucket.hyper_cache != key:
                bucket.hyper[1].fill_(float(mom))
                bucket.hyper_cache = key
            return False
        key = (lr, mom)
        if bucket.hyper_cache != key:
            # Off the CPU, from pinned memory and asynchronous: a pageable copy_ would wait for the
            # stream, a host sync on every step of a host-side scheduler (torch's LambdaLR, which
            # Hugging Face's schedules are, changes the lr every step).
            pinned = bucket.device.type == "cuda"
            bucket.hyper.copy_(torch.tensor([float(lr), float(mom)], dtype=torch.float64, pin_memory=pinned),
                               non_blocking=pinned)
            bucket.hyper_cache = key
        return zero_lr

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None) -> Any:
        """Performs one optimization step over every bucket.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            grad_scale, found_inf: GradScaler's fused protocol (the scaler may
                also set them as attributes of the optimizer, as
                ``torch.amp.GradScaler.step`` does): grads are divided by
                ``grad_scale`` in-kernel, and when ``found_inf`` is non-zero
                nothing changes at all (parameters, states, step counts).
        """
        if self._torch_impl:  # [note: torch implementation]
            if grad_scale is not None or found_inf is not None:
                raise TypeError("grad_scale and found_inf are not supported with differentiable=True")
            return _torch_step(type(self))(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        launches = self._prepare_step()
        grad_scale, found_inf = self._guard_grads(grad_scale, found_inf)
        flag = self.__dict__.get("_skip_flag")  # (absent from optimizers pickled before it)
        if flag is not None:
            # What decided whether this step was skipped, for a wrapper that acts after it (Lookahead):
            # written in place, as an attribute assigned in a step traced by torch.compile was lost.
            if found_inf is None:
                flag.zero_()
            else:
                flag.copy_(found_inf.reshape(()), non_blocking=True)
        for fn, bucket, args in launches:
            fn(**args, grad_scale=_on(grad_scale, bucket.device), found_inf=_on(found_inf, bucket.device),
               master_param=bucket.master, sr_seed=bucket.sr_seed)
            bucket.finish_step()
        return loss

    # torch.optim's own lazy torch.compiler.disable: imports torch._dynamo on first call, not at import.
    @torch._disable_dynamo
    def _prepare_step(self) -> list[tuple[Callable[..., None], Bucket, dict[str, Any]]]:
        """The host-side half of a step [note: step anatomy]: ``(implementation, bucket, op args)`` per bucket.

        Refreshes every bucket's segment table (and validates every gradient)
        before returning, so that a failed step changes nothing.
        """
        self._follow_groups()
        for gi in range(len(self._buckets)):
            sparse_error = self._sparse_error(self.param_groups[gi])
            try:
                for b in self._buckets[gi]:
                    b.sparse_error = sparse_error
                    b.prepare()
            except ParamChanged:
                self._rebucket(gi)
                for b in self._buckets[gi]:
                    b.sparse_error = sparse_error
                    b.prepare()
        self.state.steps_taken += 1  # optimizer.state reads the step counts again [note: lazy state]
        # The attached schedule: still what the groups say? An edit since the scheduler's step moves
        # it to the host before the values are read (host values only) [note: edits between steps].
        check = getattr(self._scheduler, "_fc_step_check", None)
        if check is not None:
            check()
        self._check_groups()
        launches = []
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                if b.device.type == "meta":
                    raise RuntimeError(
                        f"fusedclr: parameter {_index_of(group['params'], b.params[0])} of param group "
                        f"{_index_of(self.param_groups, group)} is on the meta device and holds no values. "
                        "model.to_empty() replaces meta parameters with new Parameter objects, which an "
                        "optimizer built before it never sees (torch.optim would silently skip them): "
                        "build the optimizer after to_empty() and the weight initialisation"
                    )
                if b.schedule is None:
                    b.schedule, b.schedule_step = _no_schedule(b.device)
                zero_lr = self._sync_hyper(b, group)
                self._before_launch(b, group)
                schedule, counter = _no_schedule(b.device) if zero_lr else (b.schedule, b.schedule_step)
                fn = self._impl_for(b.device)
                segments = b.reference_segments() if _is_reference(fn) else b.table
                # step_'s arguments but the AMP and precision ones (csrc/ops.cpp [note: step contract]).
                launches.append((fn, b, dict(
                    optimizer=self._KERNEL, segments=segments, param_dtype=b.dtype,
                    states=[b.states.get(n) for n in self._KERNEL_STATES], seg_steps=b.seg_steps,
                    seg_scalars=b.seg_scalars, chunks=b.chunks, hyper=b.hyper, schedule=schedule,
                    schedule_step=counter, options=self._options(group), maximize=bool(group.get("maximize", False)),
                )))
        return launches

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients of every parameter, as torch.optim's ``zero_grad``.

        ``set_to_none=True`` (the default) is torch's own: every ``.grad``
        becomes ``None``. With ``set_to_none=False`` the gradients stay the same
        tensors and are zeroed in place, with torch's semantics: ``None`` stays
        ``None``, a gradient with a ``grad_fn`` (``backward(create_graph=True)``)
        is detached, any other stops requiring grad. Each bucket's gradients are
        zeroed by one ``grad_zero_`` launch over its segment table, with no
        Python loop over its parameters and no host sync; the gradients of a
        bucket the table cannot zero in place are zeroed by torch's loop
        [note: zero_grad through the table]. Like the step, the kernels write
        the gradients without bumping their version counters. The profiler
        scope is torch's, ``Optimizer.zero_grad#<class>.zero_grad``.

        [note: zero_grad through the table]
        ``zero_grad(set_to_none=False)`` refreshes each bucket's segment table
        (``Bucket.prepare_zero``, the step's C refresh [note: segment
        refresh]) and hands it to ``grad_zero_`` (csrc/ops.cpp [note: zeroing
        through the table]) on the step's backend. DTensor buckets (FSDP2)
        are zeroed through their gradients' local shards, which zeroes the
        gradients whatever their placements. Where the table cannot stand for
        the gradients themselves, the bucket goes to torch's loop (so no
        gradient is left unzeroed): a gradient the kernels read through a
        temporary copy (other strides than its parameter, the slow path), a
        parameter walked through a shadow [note: shadowed parameters] or that
        changed, a gradient that requires grad (torch detaches it first) or
        shares copy-on-write storage, and the meta device. No such case
        raises: zero_grad takes whatever gradients torch's takes (sparse ones,
        other dtypes), and a parameter that changed is re-bucketed by the next
        step, as before.
        """
        if set_to_none or self._torch_impl:
            super().zero_grad(set_to_none)
            return
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        # torch's scope, through the direct bindings that the step wrapper uses [note: step wrapper].
        scope = torch._C._autograd._record_function_with_args_enter(self._zero_grad_profile_name)
        try:
            self._follow_groups()  # a parameter appended to a group is zeroed too [note: followed groups]
            for buckets in self._buckets:
                for b in buckets:
                    if b.prepare_zero():
                        fn = self._impl_for(b.device, "grad_zero_")
                        fn(b.reference_segments() if _is_reference(fn) else b.table, b.dtype, b.chunks)
                    else:
                        _zero_grads_as_torch(b.params)
        finally:
            torch._C._autograd._record_function_with_args_exit(scope)

    def _follow_groups(self) -> None:
        """Re-buckets a group whose ``params`` list was appended to, shortened or replaced since
        its buckets were built; raises for groups added other than by ``add_param_group``.

        [note: followed groups]
        torch's step reads ``group["params"]`` afresh every time, so code that
        appends a parameter to a group (or assigns the group a new list) trains
        it with torch. fusedclr's kernels walk buckets built from the list, so
        a step first compares each group's list with the one its buckets were
        built from: the same list object, holding the same parameter objects
        (one C loop of pointer compares per group, ``ops.same_items``; no
        Python loop over the parameters), and re-buckets the groups that
        changed, carrying every
        parameter's state wherever it was before (a parameter moved from
        another group, groups reordered: torch keys state by parameter)
        (:meth:`_rebucket`); parameters new to the optimizer start fresh, as
        they do in torch, or with the state assigned to them
        (``opt.state[q] = opt.state.pop(p)``). A parameter replaced in place
        (``group["params"][i] = q``) is followed too.
        """
        if len(self.param_groups) != len(self._buckets):
            raise RuntimeError(
                f"fusedclr: the optimizer has {len(self.param_groups)} param groups but built buckets for "
                f"{len(self._buckets)}: a group was added to or removed from optimizer.param_groups directly. "
                "Add groups with optimizer.add_param_group(...), which fills in the defaults and builds the "
                "group's buckets, and build a new optimizer to drop one"
            )
        bucketed = getattr(self, "_bucketed", None)
        if bucketed is None or len(bucketed) != len(self.param_groups) or not all(
                isinstance(built, tuple) for _, built in bucketed):  # an optimizer pickled before this form
            bucketed = self._bucketed = [(g["params"], tuple(g["params"])) for g in self.param_groups]
        changed = [gi for gi, group in enumerate(self.param_groups)
                   if not (group["params"] is bucketed[gi][0] and ops.same_items(group["params"], bucketed[gi][1]))]
        if not changed:
            return
        for gi in changed:
            group = self.param_groups[gi]
            if not isinstance(group["params"], list):
                group["params"] = list(group["params"])
            for i, p in enumerate(group["params"]):
                if not isinstance(p, Tensor) or p.is_sparse or p.layout != torch.strided:
                    raise TypeError(
                        f"fusedclr: parameter {i} of param group {gi} is "
                        f"{torch.typename(p) if not isinstance(p, Tensor) else f'a tensor with layout {p.layout}'}"
                        "; an optimizer steps dense (strided) tensors only"
                    )
        # A parameter moved between groups, or groups reordered, keeps its state as in torch
        # (keyed by the parameter): every changed group's states are saved before any is rebuilt.
        carried: tuple[dict[Tensor, dict[str, Any]], dict[Tensor, int]] = ({}, {})
        for gi in changed:
            built_from = next((g for g in self.param_groups if g["params"] is bucketed[gi][0]),
                              self.param_groups[gi])
            self._save_states(built_from, self._buckets[gi], *carried)
        for gi in changed:
            self._rebucket(gi, carried)

    def _save_states(self, group: dict[str, Any], buckets: list[Bucket], saved: dict[Tensor, dict[str, Any]],
                     counts: dict[Tensor, int]) -> None:
        """Copies the states of ``buckets`` (built from ``group``) into ``saved`` and their exact step
        counts into ``counts`` (SGD's state_dict keeps none), keyed by parameter, for :meth:`_rebucket`."""
        for b in buckets:
            if b.device.type == "meta":
                continue
            steps = b.seg_steps.cpu().tolist()  # host sync: a conversion, not a step
            for i, p in enumerate(b.params):
                counts[p] = steps[i]
                entry = self._export_state(group, b, i, steps[i]) if steps[i] > 0 else {}
                entry = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in entry.items()}
                if entry and b.master is not None:
                    entry["master_param"] = b.master_view(i).clone()
                saved[p] = entry

    def _rebucket(self, group_index: int,
                  carried: tuple[dict[Tensor, dict[str, Any]], dict[Tensor, int]] | None = None) -> None:
        """Rebuilds a group's buckets after parameters changed dtype or device, or the group's list
        changed [note: flat buckets].

        The states move with their parameters as torch's ``load_state_dict``
        moves them (values kept, cast to the new bucket's state dtype and
        device); buckets that were on the meta device, which hold no values,
        start fresh (``param.data`` moved off meta; a torch optimizer built on meta
        parameters has no state). ``carried``: states saved by :meth:`_save_states`
        (of several groups), instead of this group's own.
        """
        group = self.param_groups[group_index]
        if carried is None:
            carried = ({}, {})
            self._save_states(group, self._buckets[group_index], *carried)
        saved, counts = carried
        self._buckets[group_index] = self._make_buckets(group)
        self._bucketed[group_index] = (group["params"], tuple(group["params"]))
        for b in self._buckets[group_index]:
            steps = []
            for i, p in enumerate(b.params):
                # A parameter new to the optimizer starts fresh, or from a state assigned to it
                # (opt.state[new] = opt.state.pop(old)), as in torch.
                entry = saved.get(p)
                if entry is None:
                    entry = self.state.assigned(p) if isinstance(self.state, ParamState) else None
                state = {k: (v.to(b.device) if isinstance(v, Tensor) and k != "step" else v)
                         for k, v in (entry or {}).items()}
                imported = self._import_state(group, b, i, state)
                steps.append(counts.get(p, imported))
                if b.master is not None and "master_param" in state:
                    b.master_view(i).copy_(state["master_param"].reshape(b.master_view(i).shape))
            b.seg_steps.copy_(torch.tensor(steps, dtype=torch.int64))
        self.state.add_buckets(self._buckets[group_index])
        self._alloc_grad_norm()
        if self._scheduler is not None:
            self._attach_schedule(self._scheduler)

    def _guard_grads(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Folds clipping into ``grad_scale`` and the non-finite check into ``found_inf`` [note: fused clipping]."""
        if self.max_grad_norm is None and not self.skip_nonfinite:
            return grad_scale, found_inf
        norms = [b.grad_norm() for buckets in self._buckets for b in buckets]
        if not norms:
            return grad_scale, found_inf
        device = norms[0].device
        norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        if grad_scale is not None:
            norm = norm / grad_scale.to(device, non_blocking=True).reshape(())  # the norm of the unscaled grads
        self.last_grad_norm.copy_(norm)
        if self.max_grad_norm is not None:
            # 1 / clip_grad_norm_'s coefficient; NaN and inf norms propagate as they do in torch's clip.
            inv_coef = torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)
            grad_scale = inv_coef if grad_scale is None else grad_scale.to(device, non_blocking=True) * inv_coef
        if self.skip_nonfinite:
            bad = torch.logical_not(torch.isfinite(norm)).to(torch.float32)
            found_inf = bad if found_inf is None else found_inf.to(device, torch.float32, non_blocking=True) + bad
        return grad_scale, found_inf

    # -- state_dict ------------------------------------------------------------

    def _stepped_state(self) -> dict[Tensor, dict[str, Any]]:
        """torch-layout per-parameter state of every parameter that ``optimizer.state`` shows [note: lazy state].

        DTensor parameters (ShardBuckets) export their state from construction
        on, stepped or not: torch.distributed.checkpoint loads into the tensors
        of a fresh optimizer's state_dict, which torch.optim materialises with a
        zero-lr step (``_init_optim_state``). That step does not run when the
        optimizer already has state, and could not work anyway (an in-kernel
        schedule does not read the group's lr). A never-stepped entry (step 0,
        zero states) resumes like no entry.
        """
        out: dict[Tensor, dict[str, Any]] = {}
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                if not self.state._has_states(b):
                    continue
                shown = self.state.stepped(b)
                if not any(shown):
                    continue
                steps = b.seg_steps.cpu().tolist()  # one device-to-host copy per bucket, not on the step path
                for i, p in enumerate(b.params):
                    entry = self._export_state(group, b, i, steps[i]) if shown[i] else {}
                    if p.is_complex():
                        # A complex view and the real views beside it would share one storage in two
                        # dtypes, which torch.save refuses: a complex parameter's states are copies.
                        entry = {k: v.clone() if isinstance(v, Tensor) and v.is_complex() else v
                                 for k, v in entry.items()}
                    if shown[i] and b.master is not None:  # also for SGD without momentum: its only state
                        entry["master_param"] = b.master_tensor(i)
                    if entry:
                        out[p] = entry
        for group in self.param_groups:  # [note: extra state keys]
            for p in group["params"]:
                extras = self.state.extras(p)
                if extras:
                    out[p] = {**out.get(p, {}), **extras}
        return out

    @staticmethod
    def _step_tensor(step: int) -> Tensor:
        # torch's dtype for step counts (float32, float64 under a float64 default);
        # beyond 2**24 float32 is not exact, so larger counts are float64.
        dtype = _get_scalar_dtype() if step < 2**24 else torch.float64
        return torch.tensor(float(step), dtype=dtype)

    @contextlib.contextmanager
    def _hooks_run_here(self, name: str) -> Iterator[OrderedDict]:
        """Hands torch's hooks ``name`` to the caller and hides them from torch's own method meanwhile."""
        hooks = getattr(self, name)
        setattr(self, name, OrderedDict())
        try:
            yield hooks
        finally:
            setattr(self, name, hooks)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict layout, so checkpoints move both ways.

        Only parameters that have stepped have state (as in torch), except
        DTensor parameters, whose states are DTensors with the parameters'
        placements from the start (for torch.distributed.checkpoint). State
        tensors are live views of the flat buffers, as torch returns its own
        state tensors by reference; ``torch.save`` copies them.
        """
        if self._torch_impl:
            return super().state_dict()
        with self._hooks_run_here("_optimizer_state_dict_pre_hooks") as pre_hooks:
            for hook in list(pre_hooks.values()):
                hook(self)  # they see (and may write to) the live optimizer.state, as in torch
            live = self.state
            packed = defaultdict(dict, {k: v for k, v in live._other.items() if k not in live._where})
            packed.update(self._stepped_state())
            self.__dict__["state"] = packed
            try:
                return super().state_dict()  # runs the post-hooks on the result
            finally:
                self.__dict__["state"] = live

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a fusedclr or torch.optim state_dict (``map_location="cpu"`` works).

        Everything is validated before anything changes. The hooks run as in
        torch: pre-hooks first (their result is what loads), post-hooks last,
        on the loaded ``optimizer.state``, and what they change there stays.
        """
        if self._torch_impl:
            super().load_state_dict(state_dict)
            return
        with (self._hooks_run_here("_optimizer_load_state_dict_pre_hooks") as pre_hooks,
              self._hooks_run_here("_optimizer_load_state_dict_post_hooks") as post_hooks):
            if isinstance(state_dict, dict):
                state_dict = state_dict.copy()  # shallow, as torch: a pre-hook may replace entries
                for hook in list(pre_hooks.values()):
                    result = hook(self, state_dict)
                    if result is not None:
                        state_dict = result
            self._load_flat(state_dict)
        for hook in list(post_hooks.values()):
            hook(self)

    def _load_flat(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        saved_state = state_dict["state"]
        # Masters of any optimizer load (or are dropped), and so does a step count where this one
        # keeps none (SGD's, saved for stochastic rounding).
        known = self._state_keys() | {"master_param", "step"}
        scalar_keys = {"step"} | ({self._SEG_SCALAR[0]} if self._SEG_SCALAR else set())
        for gi, (group, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(sg["params"]) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            for pi, (p, pid) in enumerate(zip(group["params"], sg["params"])):
                for key, value in saved_state.get(pid, {}).items():
                    if (isinstance(value, Tensor) and key in FLAT_STATE_NAMES and key not in scalar_keys
                            and value.numel() != p.numel()):
                        raise ValueError(
                            f"loaded state {key!r} of parameter {pi} in group {gi} has shape "
                            f"{tuple(value.shape)}, the parameter has {tuple(p.shape)}"
                        )
                    if key not in known and key in FLAT_STATE_NAMES:  # else kept [note: extra state keys]
                        raise ValueError(
                            f"loaded state of parameter {pi} in group {gi} has unknown key {key!r}; "
                            f"{type(self).__name__} keeps {sorted(known)}"
                        )
        # The saved tensors as they are: torch.optim's load_state_dict casts every
        # floating state to its parameter's dtype, which for bf16/fp16 parameters
        # would round fp32 states and masters on the way in.
        pids = {pid for sg in saved_groups for pid in sg["params"]}
        loaded = {
            p: saved_state.get(pid, {})
            for group, sg in zip(self.param_groups, saved_groups)
            for p, pid in zip(group["params"], sg["params"])
        }
        live = self.state
        # torch's own load for the groups (param_names included) and any state keyed by
        # something other than a parameter; it leaves self.state a plain defaultdict.
        super().load_state_dict({**state_dict, "state": {k: v for k, v in saved_state.items() if k not in pids}})
        live._other = self.state
        self.state = live
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                steps = []
                for i, p in enumerate(b.params):
                    state = loaded.get(p, {})
                    steps.append(self._import_state(group, b, i, state))
                    if b.master is not None:
                        # Without a saved master (a torch.optim checkpoint), start from the parameter.
                        saved = state.get("master_param")
                        value = b.locals[i] if saved is None else b.local_value(saved, i)
                        b.master_view(i).copy_(value)
                b.seg_steps.copy_(torch.tensor(steps, dtype=torch.int64))
                b.hyper_cache = None
                for p in b.params:
                    live.clear_extras(p)
                    for key, value in loaded.get(p, {}).items():
                        if key not in known:
                            live.set_extra(p, key, _as_torch_loads(value, p))
                # An entry saved with step 0 (torch's after a skipped first step) is shown as in torch.
                # (keys of the user's own alone show no flat states [note: extra state keys])
                shown = [any(k in known for k in loaded.get(p, ())) or (isinstance(b, ShardBucket) and p.requires_grad)
                         for p in b.params]
                live.forget(b, shown)
        if self._scheduler is not None:
            self._attach_schedule(self._scheduler)

    # -- state of one parameter ------------------------------------------------

    def _export_state(self, group: dict[str, Any], bucket: Bucket, index: int, step: int) -> dict[str, Any]:
        """The torch-layout state of a parameter that ``optimizer.state`` shows (empty: none to save)."""
        # SGD keeps no step in torch's layout; with stochastic rounding it does, since the bits
        # are drawn by step count: a resumed run continues them instead of replaying them.
        keeps_step = self._STEP_IN_STATE or bucket.sr_seed is not None
        out: dict[str, Any] = {"step": self._step_tensor(step)} if keeps_step else {}
        if bucket.seg_scalar is not None:  # a host copy: state_dict is not on the step path
            out[bucket.seg_scalar[0]] = torch.tensor(float(bucket.seg_scalars[index]), dtype=_get_scalar_dtype())
        for name in self._state_names(group):
            if name in bucket.states:
                out[name] = bucket.state_tensor(name, index)
        return out

    def _import_state(self, group: dict[str, Any], bucket: Bucket, index: int, state: dict[str, Any]) -> int:
        """Loads one parameter's torch-layout state into the buckets; returns its step count."""
        if not state:
            bucket.reset_state(index)
            return 0
        # The saved values may be live views of these very buffers (opt.load_state_dict(opt.state_dict())):
        # each state is copied in or started afresh, never cleared before it is read.
        for name in bucket.states:
            view = bucket.state_view(name, index)
            if name in state:
                view.copy_(bucket.local_value(state[name], index))
            else:  # e.g. amsgrad turned on when resuming: the state starts afresh, as in torch
                view.fill_(bucket.state_init.get(name, 0.0))
        if bucket.seg_scalar is not None:
            name, start = bucket.seg_scalar
            bucket.seg_scalars[index] = float(state[name]) if name in state else start
        return step_value(state["step"]) if "step" in state else 0


def _as_torch_loads(value: Any, param: Tensor) -> Any:
    """A loaded extra state value as torch's load_state_dict casts it [note: extra state keys]:
    tensors to the parameter's device (and dtype, for a floating parameter), containers through."""
    if isinstance(value, Tensor):
        return value.to(dtype=param.dtype, device=param.device) if param.is_floating_point() else value.to(param.device)
    if isinstance(value, dict):
        return {k: _as_torch_loads(v, param) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_torch_loads(v, param) for v in value)
    return value


def _index_of(items: list[Any], item: Any) -> int:
    """``items.index(item)`` by identity (``list.index`` would call ``Tensor.__eq__`` on the others)."""
    return next(i for i, x in enumerate(items) if x is item)


def _is_zero_float(lr: Any) -> bool:
    """Whether ``lr`` is a Python number equal to 0 (a tensor lr is never read on the host)."""
    return not isinstance(lr, Tensor) and lr == 0


def _is_reference(fn: Callable[..., None]) -> bool:
    """Whether ``fn`` is a reference op, which takes the table's tensors instead of its addresses."""
    return fn is reference.step_ or fn is reference.grad_zero_


def _zero_grads_as_torch(params: list[Tensor]) -> None:
    """torch.optim's ``zero_grad(set_to_none=False)`` for ``params``: a gradient with a grad_fn is
    detached in place, any other stops requiring grad; then it is zeroed."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.grad_fn is not None:
            g.detach_()
        else:
            g.requires_grad_(False)
        g.zero_()


_WARNED_DIFFERENTIABLE = False


def _scheduler_dropped(optimizer_ref: weakref.ref, scheduler_ref: weakref.ref) -> None:
    """Detaches a garbage scheduler's schedule from its optimizer, if both the optimizer and that attachment live."""
    opt = optimizer_ref()
    if opt is not None and opt.__dict__.get("_scheduler_ref") is scheduler_ref:
        opt._attach_schedule(None)


def _torch_step(cls: type) -> Callable[..., Any]:
    """``step`` of the torch.optim class that ``cls`` subclasses, without torch's profiler wrapper.

    ``torch.optim.Optimizer`` wraps a class's ``step`` with its hooks the first
    time an instance is built; our own wrapper already ran them.
    """
    base = next(c for c in cls.__mro__ if c.__module__.startswith("torch.optim") and "step" in vars(c))
    fn = vars(base)["step"]
    while getattr(fn, "hooked", False):  # wrapped again for each torch class whose instance was built
        fn = fn.__wrapped__
    return fn


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)
