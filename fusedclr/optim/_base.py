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

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torch.optim.optimizer import _global_optimizer_post_hooks as _global_step_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_step_pre_hooks

from fusedclr import ops, reference
from fusedclr.optim._flat import Bucket, ShardBucket, is_dtensor, real_dtype

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


def resolve_backend(backend: str, device: torch.device, op: str) -> Callable[..., None]:
    """The implementation of ``op`` (``"sgd_step_"`` / ``"adam_step_"``) for tensors on ``device``."""
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

    Subclasses define ``_OP`` (the op name), ``_state_names(group)``,
    ``_momentum(group)`` and ``_launch_args(bucket, group, active)`` (the op's
    arguments up to, not including, ``grad_scale`` and ``found_inf``).
    """

    _OP: str
    _STEP_IN_STATE: bool  # whether torch keeps a per-parameter "step" (Adam) or not (SGD)
    _step_supports_amp_scaling = True

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
                   stochastic_rounding: bool = False) -> None:
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
        self._buckets: list[list[Bucket]] = []
        self._impl: dict[torch.device, Callable[..., None]] = {}
        self._scheduler: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups; the buckets must travel
        # too (deepcopy, pickling), and views stay views of the copied buffers.
        state = dict(self.__dict__)
        state["_impl"] = {}
        return state

    # -- param groups --------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "_buckets"):
            raise RuntimeError("fusedclr optimizer used before its constructor finished")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but param {i} is a {torch.typename(p)}")
            if id(p) in seen:
                raise ValueError(
                    f"parameter {i} appears twice in one parameter group; each parameter may appear only once"
                )
            seen.add(id(p))
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"fusedclr: parameter {i} has layout {p.layout}; only dense (strided) tensors")
        super().add_param_group(param_group)  # torch's validation: leaves, duplicates across groups, defaults
        group = self.param_groups[-1]
        self._buckets.append(self._make_buckets(group))
        self._bind_state()
        self._alloc_grad_norm()
        if self._scheduler is not None:
            self._attach_schedule(self._scheduler)

    def _alloc_grad_norm(self) -> None:
        """``last_grad_norm``: one persistent 0-dim tensor on the first bucket's device, updated in place.

        In place, so a reference to it stays current, CUDA graphs see a static
        address, and torch.compile keeps the write (an attribute assigned in
        the traced step was lost under torch.compile, torch 2.14).
        """
        buckets = [b for bs in self._buckets for b in bs]
        if (self.max_grad_norm is None and not self.skip_nonfinite) or not buckets:
            return
        dtype = functools.reduce(torch.promote_types, [b.grad_norm_dtype for b in buckets])
        old = self.last_grad_norm
        if old is None or old.dtype != dtype or old.device != buckets[0].device:
            self.last_grad_norm = torch.zeros((), dtype=dtype, device=buckets[0].device)

    def _make_buckets(self, group: dict[str, Any]) -> list[Bucket]:
        by_key: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            # DTensors go to ShardBuckets [note: shard buckets], one per mesh and sharded mesh dims.
            shard_key = (p.device_mesh, tuple(pl.is_shard() for pl in p.placements)) if is_dtensor(p) else None
            by_key[(p.device, real_dtype(p), shard_key)].append(p)
        buckets = []
        for (_, dtype, shard_key), params in by_key.items():
            cls = Bucket if shard_key is None else ShardBucket
            buckets.append(cls(params, self._state_names(group), self._bucket_state_dtype(dtype),
                               master=self.master_weights and dtype in (torch.bfloat16, torch.float16),
                               sr_seed=self._next_sr_seed() if self.stochastic_rounding and dtype == torch.bfloat16
                               else None))
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

    def _impl_for(self, device: torch.device) -> Callable[..., None]:
        fn = self._impl.get(device)
        if fn is None:
            fn = self._impl[device] = resolve_backend(self.backend, device, self._OP)
        return fn

    # -- schedules -------------------------------------------------------------

    def _attach_schedule(self, scheduler: Any) -> None:
        """Evaluate ``scheduler``'s schedule in-kernel from now on (``None`` detaches).

        See docs/CONTRACTS.md: the scheduler provides ``_fc_descriptor(group_index)``
        and ``_fc_counter(device)``, and optionally ``_fc_step_check()``, which
        the step calls first (it may re-attach).
        """
        self._scheduler = scheduler
        check = getattr(scheduler, "_fc_step_check", None)
        for gi, buckets in enumerate(self._buckets):
            desc = None if scheduler is None else scheduler._fc_descriptor(gi)
            for b in buckets:
                if desc is None:
                    b.schedule, b.schedule_step = _no_schedule(b.device)
                else:
                    b.schedule = torch.tensor(desc, dtype=torch.float64).to(b.device)
                    b.schedule_step = scheduler._fc_counter(b.device)
                b.schedule_covers = _covers(desc)
                b.schedule_check = check
                b.hyper_cache = None
                self._on_schedule(b, desc)

    def _on_schedule(self, bucket: Bucket, desc: list[float] | None) -> None:
        """Hook for optimizers that allocate state when a schedule moves momentum."""

    # -- the step --------------------------------------------------------------

    def _sync_hyper(self, bucket: Bucket, group: dict[str, Any]) -> None:
        """Mirrors the group's lr and momentum into the bucket's device ``hyper`` tensor.

        A float only costs a copy when it changed; a tensor lr (which a torch
        scheduler updates in place) is copied device-side every step, no sync.
        """
        check = getattr(bucket, "schedule_check", None)
        if check is not None:
            check()  # schedulers composed in-kernel: still in step? (host values only, no sync)
        covers_lr, covers_mom = getattr(bucket, "schedule_covers", (False, False))
        if covers_lr and covers_mom:
            return  # the kernel takes both from the schedule: no per-step copy
        # The scheduler mirrors its values into group["lr"] every step; when the
        # kernel reads them from the descriptor, watching them would cost a
        # host-to-device copy per step (and break CUDA-graph replay).
        lr = 0.0 if covers_lr else group["lr"]
        mom = 0.0 if covers_mom else self._momentum(group)
        if isinstance(lr, Tensor):
            bucket.hyper[0].copy_(lr.reshape(()))
            key = ("tensor", mom)
            if bucket.hyper_cache != key:
                bucket.hyper[1].fill_(float(mom))
                bucket.hyper_cache = key
            return
        key = (lr, mom)
        if bucket.hyper_cache != key:
            bucket.hyper.copy_(torch.tensor([float(lr), float(mom)], dtype=torch.float64))
            bucket.hyper_cache = key

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
        for fn, bucket, args in launches:
            fn(*args, _on(grad_scale, bucket.device), _on(found_inf, bucket.device), bucket.master, bucket.sr_seed)
            bucket.finish_step()
        return loss

    # torch.optim's own lazy torch.compiler.disable: imports torch._dynamo on first call, not at import.
    @torch._disable_dynamo
    def _prepare_step(self) -> list[tuple[Callable[..., None], Bucket, tuple[Any, ...]]]:
        """The host-side half of a step [note: step anatomy]: ``(implementation, bucket, op args)`` per bucket.

        Validates every bucket's grads before returning, so that a failed step changes nothing.
        """
        actives = [[b.gather() for b in buckets] for buckets in self._buckets]
        launches = []
        for group, buckets, acts in zip(self.param_groups, self._buckets, actives):
            for b, active in zip(buckets, acts):
                if b.schedule is None:
                    b.schedule, b.schedule_step = _no_schedule(b.device)
                self._sync_hyper(b, group)
                launches.append((self._impl_for(b.device), b, self._launch_args(b, group, active)))
        return launches

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

    @torch._disable_dynamo  # host-side bookkeeping, as torch.optim's own zero_grad [note: step anatomy]
    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Zeroes the gradients: one fill per bucket.

        Args:
            set_to_none: ``None`` (default) or ``False`` zero the flat gradient
                buffer and keep every ``.grad`` a view into it (re-attaching it
                where something set a grad to ``None``). ``True`` sets every
                ``.grad`` to ``None`` as torch does; parameters that get no
                gradient in the next backward are then skipped by the next step,
                at the cost of gathering the fresh gradients into the flat buffer.

        Note: with the default, a parameter that takes no part in the next
        backward keeps a zero gradient and is stepped with it (Adam's moments
        still move it), where torch would skip it. Pass ``set_to_none=True``
        for torch's exact behaviour in models with unused parameters.
        """
        for buckets in self._buckets:
            for b in buckets:
                b.zero_grad(set_to_none)

    # -- state_dict ------------------------------------------------------------

    def _stepped_state(self) -> dict[Tensor, dict[str, Any]]:
        """torch-layout per-parameter state of every parameter that has stepped.

        DTensor parameters (ShardBuckets) export their state from construction
        on, stepped or not: torch.distributed.checkpoint loads into the tensors
        of a fresh optimizer's state_dict, which torch.optim materialises with a
        zero-lr step (``_init_optim_state``). That step never runs for a fusedclr
        optimizer (its ``state`` is bound from the start) and could not work
        anyway (an in-kernel schedule does not read the group's lr). A
        never-stepped entry (step 0, zero states) resumes like no entry.
        """
        out: dict[Tensor, dict[str, Any]] = {}
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                steps = b.seg_steps.cpu().tolist()  # one device-to-host copy per bucket, not on the step path
                for i, p in enumerate(b.params):
                    placeholder = isinstance(b, ShardBucket) and p.requires_grad
                    entry = self._export_state(group, b, i, steps[i], placeholder)
                    if entry and b.master is not None:
                        entry["master_param"] = b.master_tensor(i)
                    if entry:
                        out[p] = entry
        return out

    @staticmethod
    def _step_tensor(step: int) -> Tensor:
        # torch keeps float32 step counts on the host; beyond 2**24 float32 is not exact.
        dtype = torch.float32 if step < 2**24 else torch.float64
        return torch.tensor(float(step), dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict layout, so checkpoints move both ways.

        Only parameters that have stepped have state (as in torch), except
        DTensor parameters, whose states are DTensors with the parameters'
        placements from the start (for torch.distributed.checkpoint). State
        tensors are live views of the flat buffers, as torch returns its own
        state tensors by reference; ``torch.save`` copies them.
        """
        live = self.state
        self.state = defaultdict(dict, self._stepped_state())
        try:
            return super().state_dict()
        finally:
            self.state = live

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a fusedclr or torch.optim state_dict (``map_location="cpu"`` works).

        Everything is validated before anything changes.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        saved_state = state_dict["state"]
        known = self._state_keys() | {"master_param"}  # masters of any optimizer load (or are dropped)
        for gi, (group, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(sg["params"]) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            for pi, (p, pid) in enumerate(zip(group["params"], sg["params"])):
                for key, value in saved_state.get(pid, {}).items():
                    if isinstance(value, Tensor) and key != "step" and value.numel() != p.numel():
                        raise ValueError(
                            f"loaded state {key!r} of parameter {pi} in group {gi} has shape "
                            f"{tuple(value.shape)}, the parameter has {tuple(p.shape)}"
                        )
                    if key not in known:
                        raise ValueError(
                            f"loaded state of parameter {pi} in group {gi} has unknown key {key!r}; "
                            f"{type(self).__name__} keeps {sorted(known)}"
                        )
        # The saved tensors as they are: torch.optim's load_state_dict casts every
        # floating state to its parameter's dtype, which for bf16/fp16 parameters
        # would round fp32 states and masters on the way in.
        loaded = {
            p: saved_state.get(pid, {})
            for group, sg in zip(self.param_groups, saved_groups)
            for p, pid in zip(group["params"], sg["params"])
        }
        super().load_state_dict(state_dict)
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                steps = []
                for i, p in enumerate(b.params):
                    state = loaded.get(p, {})
                    steps.append(self._import_state(group, b, i, state))
                    if b.master is not None:
                        # Without a saved master (a torch.optim checkpoint), start from the parameter.
                        saved = state.get("master_param")
                        value = b.param_views[i] if saved is None else b.local_value(saved, i)
                        b.master_view(i).copy_(value)
                b.seg_steps.copy_(torch.tensor(steps, dtype=torch.int64))
                b.hyper_cache = None
        self.state = defaultdict(dict)
        self._bind_state()
        if self._scheduler is not None:
            self._attach_schedule(self._scheduler)

    def _bind_state(self) -> None:
        """``self.state[p]`` holds live views of the flat state buffers."""
        for buckets in self._buckets:
            for b in buckets:
                for i, p in enumerate(b.params):
                    live = {name: b.state_tensor(name, i) for name in b.states}
                    if b.master is not None:
                        live["master_param"] = b.master_tensor(i)
                    if self._STEP_IN_STATE:
                        live["step"] = b.seg_steps[i]
                    self.state[p] = live

    # -- subclass hooks --------------------------------------------------------

    def _state_keys(self) -> set[str]:
        raise NotImplementedError

    def _export_state(self, group: dict[str, Any], bucket: Bucket, index: int, step: int,
                      placeholder: bool) -> dict[str, Any]:
        """The torch-layout state of one parameter; empty when it never stepped, unless ``placeholder``."""
        raise NotImplementedError

    def _import_state(self, group: dict[str, Any], bucket: Bucket, index: int, state: dict[str, Any]) -> int:
        raise NotImplementedError


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def step_value(step: Any) -> int:
    """A loaded ``step`` entry (tensor or number) as an int."""
    value = float(step)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"loaded state has an invalid step count {value}")
    return int(value)
