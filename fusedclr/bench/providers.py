"""The providers a case is timed with: torch.optim's implementations, DeepSpeed's CPU Adam and fusedclr's backends."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import deepspeed_cpu_adam
from .cases import ONECYCLE_TOTAL_STEPS, OPTIMS, Case
from .foreach_impls import ForeachLion, ForeachLookahead


@dataclasses.dataclass
class Stepper:
    """A built provider: ``step()`` is one training-loop step (optimizer, then scheduler)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    state_dtype: torch.dtype
    run_step: Callable[[], Any]
    note: str = ""
    on_close: Callable[[], None] | None = None
    params: list[Tensor] | None = None  # the parameters it steps (set by :func:`build`)

    def step(self) -> None:
        self.run_step()
        if self.scheduler is not None:
            self.scheduler.step()

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
        self.optimizer = self.scheduler = self.run_step = self.params = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable[[list[Tensor], Case], Stepper]
    devices: tuple[str, ...] = ("cpu", "cuda")


def _make_params(case: Case, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator(device=case.device).manual_seed(seed)
    return [
        torch.nn.Parameter(torch.empty(s, dtype=case.torch_dtype, device=case.device).uniform_(-1, 1, generator=gen))
        for s in case.shapes
    ]


def _fill_grads(params: Sequence[Tensor], seed: int = 1) -> None:
    """Gives every parameter a gradient, in place where one exists (a fusedclr flat-buffer view)."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.uniform_(-1e-2, 1e-2, generator=gen)


def _scheduler(module: Any, opt: torch.optim.Optimizer, case: Case, cycle_momentum: bool | None = None) -> Any:
    if case.schedule == "constant":
        return None
    spec = OPTIMS[case.optim]
    return module.OneCycleLR(
        opt,
        max_lr=spec.lr,
        total_steps=ONECYCLE_TOTAL_STEPS,
        cycle_momentum=spec.momentum if cycle_momentum is None else cycle_momentum,
    )


# Optimizers torch.optim does not have: the bench's foreach implementation stands in (torch-foreach only).
BENCH_IMPLS: dict[str, type[torch.optim.Optimizer]] = {"Lion": ForeachLion}


def torch_optimizer(optim: str, params: Any, impl: dict[str, bool],
                    lr: float | Tensor | None = None) -> tuple[torch.optim.Optimizer, Any, str]:
    """torch's ``optim`` (``impl``: ``{"foreach": False}``, ``{"foreach": True}`` or ``{"fused": True}``).

    Returns the optimizer a torch scheduler attaches to, the object whose
    ``step()`` is the training step (the same optimizer, or a
    :class:`~.foreach_impls.ForeachLookahead` around it) and a note for the
    results. Lion is the bench's :class:`~.foreach_impls.ForeachLion` (foreach
    only: torch has no Lion).
    """
    spec = OPTIMS[optim]
    lr = spec.lr if lr is None else lr
    if spec.torch_class in BENCH_IMPLS:
        if impl != {"foreach": True}:
            raise ValueError(f"torch has no {spec.torch_class}: only the bench's foreach implementation runs it")
        opt = BENCH_IMPLS[spec.torch_class](params, lr=lr, **spec.kwargs)
        return opt, opt, f"the bench's foreach {spec.torch_class} (fusedclr/bench/foreach_impls.py)"
    opt = getattr(torch.optim, spec.torch_class)(params, lr=lr, **spec.kwargs, **impl)
    if spec.lookahead is not None:
        k, alpha = spec.lookahead
        return (opt, ForeachLookahead(opt, k, alpha),
                f"torch {spec.torch_class} + the bench's foreach Lookahead(k={k}, alpha={alpha})")
    return opt, opt, ""


def fusedclr_optimizer(optim: str, params: Any, backend: str | None = None,
                       lr: float | Tensor | None = None) -> torch.optim.Optimizer:
    """fusedclr's ``optim`` (``backend`` None: fusedclr's default), wrapped in ``fusedclr.Lookahead`` for lookahead."""
    import fusedclr

    spec = OPTIMS[optim]
    kw = {} if backend is None else {"backend": backend}
    opt = getattr(fusedclr, spec.torch_class)(params, lr=spec.lr if lr is None else lr, **spec.kwargs, **kw)
    if spec.lookahead is not None:
        opt = fusedclr.Lookahead(opt, *spec.lookahead)
    return opt


def _torch_builder(impl: dict[str, bool]) -> Callable[[list[Tensor], Case], Stepper]:
    def build_torch(params: list[Tensor], case: Case) -> Stepper:
        opt, stepped, note = torch_optimizer(case.optim, params, impl)
        sched = _scheduler(torch.optim.lr_scheduler, opt, case)
        return Stepper(opt, sched, case.torch_dtype, stepped.step, note)

    return build_torch


def _build_compiled(params: list[Tensor], case: Case) -> Stepper:
    """``torch.compile`` of torch's step with a tensor lr, as torch's compiled-optimizer tutorial does.

    A tensor lr lets torch's scheduler update it in place without a
    recompile. Its OneCycleLR would still write beta1 (or SGD's momentum) as a
    new Python float every step, and dynamo specializes on that float: measured
    here, 8 recompiles of ~60 s each and then eager fallback for 100 x 1K
    tensors. So this provider's schedule cycles the lr only, which is noted in
    the results.
    """
    spec = OPTIMS[case.optim]
    opt = getattr(torch.optim, spec.torch_class)(
        params, lr=torch.tensor(spec.lr, device=case.device), **spec.kwargs
    )
    sched = _scheduler(torch.optim.lr_scheduler, opt, case, cycle_momentum=False)

    @torch.compile(fullgraph=False)
    def compiled_step() -> None:
        opt.step()

    note = "lr cycled, momentum not (torch would recompile on every beta1 float)" if sched is not None else ""
    # Dynamo's caches hold the optimizer (and so gigabytes of state) until reset.
    return Stepper(opt, sched, case.torch_dtype, compiled_step, note, on_close=torch._dynamo.reset)


def _build_deepspeed(params: list[Tensor], case: Case) -> Stepper:
    """DeepSpeed's CPU Adam(W), configured as torch's, with torch's scheduler (it reads lr and betas
    from its param groups every step)."""
    opt = deepspeed_cpu_adam.optimizer(case.optim, params)
    sched = _scheduler(torch.optim.lr_scheduler, opt, case)
    return Stepper(opt, sched, torch.float32, opt.step, f"deepspeed {deepspeed_cpu_adam.version()}")


def _fusedclr_builder(backend: str) -> Callable[[list[Tensor], Case], Stepper]:
    def build_fusedclr(params: list[Tensor], case: Case) -> Stepper:
        import fusedclr.lr_scheduler

        opt = fusedclr_optimizer(case.optim, params, backend)
        sched = _scheduler(fusedclr.lr_scheduler, opt, case)
        # fp32 moments for bf16/fp16 parameters (docs/DESIGN.md section 3).
        state_dtype = torch.float64 if case.torch_dtype == torch.float64 else torch.float32
        return Stepper(opt, sched, state_dtype, opt.step)

    return build_fusedclr


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("torch-forloop", "torch.optim, foreach=False", _torch_builder({"foreach": False})),
        Provider("torch-foreach", "torch.optim, foreach=True", _torch_builder({"foreach": True})),
        Provider("torch-fused", "torch.optim, fused=True", _torch_builder({"fused": True})),
        Provider("torch-compile", "torch.compile(optimizer.step), tensor lr", _build_compiled),
        Provider(deepspeed_cpu_adam.NAME, "deepspeed.ops.adam.DeepSpeedCPUAdam (ZeRO-Offload's CPU Adam)",
                 _build_deepspeed, ("cpu",)),
        Provider("fusedclr-cpu", "fusedclr, C++ CPU kernel", _fusedclr_builder("cpu"), ("cpu",)),
        Provider("fusedclr-cuda", "fusedclr, CUDA kernel", _fusedclr_builder("cuda"), ("cuda",)),
        Provider("fusedclr-triton", "fusedclr, Triton kernel", _fusedclr_builder("triton"), ("cuda",)),
    )
}
BASELINE = "torch-fused"
# Torch's three implementations of an optimizer (for-loop, foreach, fused).
TORCH_PROVIDERS = ("torch-forloop", "torch-foreach", "torch-fused")
# What fusedclr's rows are compared with, one ratio each (their ``vs_torch``, a name kept from
# when torch's were the only ones): torch's three implementations and DeepSpeed's CPU Adam.
COMPARED_PROVIDERS = (*TORCH_PROVIDERS, deepspeed_cpu_adam.NAME)

# Compiling the optimizer step takes time that grows with the number of
# tensors (the graph unrolls over them): 100 x 1K AdamW took ~50 s on the
# 2-core dev machine under load, so longer lists are skipped, not compiled for
# many minutes.
COMPILE_MAX_TENSORS = 512

_PROBED: dict[tuple[str, str, str], str | None] = {}


def unavailable(provider: str, case: Case, *, compile_timeout: float | None = None) -> str | None:
    """Why ``provider`` cannot run ``case`` here (``None`` when it can).

    fusedclr providers and DeepSpeed's CPU Adam are probed once per (provider,
    optimizer, device, dtype) with a tiny optimizer, so a missing extension,
    kernel, Triton or deepspeed, or a cpu_adam op that did not build, reads as a
    reason instead of an error in the middle of a run.
    """
    prov = PROVIDERS[provider]
    if case.device not in prov.devices:
        return f"runs on {' or '.join(prov.devices)} only"
    if case.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    spec = OPTIMS[case.optim]
    if provider == "torch-compile":
        if spec.torch_class in BENCH_IMPLS or spec.lookahead is not None:
            return f"not wired for {case.optim} (the bench's own foreach code, not a torch.optim step)"
        if compile_timeout is not None and compile_timeout <= 0:
            return "not compiled (--quick, or --compile-timeout 0): compiling takes tens of seconds on a CPU"
        if len(case.shapes) > COMPILE_MAX_TENSORS:
            return f"compiling {len(case.shapes)} tensors takes too long here (limit {COMPILE_MAX_TENSORS})"
        return None
    if provider in TORCH_PROVIDERS and spec.torch_class in BENCH_IMPLS and provider != "torch-foreach":
        return (f"torch has no {spec.torch_class}; torch-foreach is the bench's foreach {spec.torch_class} "
                "(fusedclr/bench/foreach_impls.py)")
    if provider in TORCH_PROVIDERS:
        key = (provider, case.optim, case.device, case.dtype)
        if key not in _PROBED:
            _PROBED[key] = _probe(prov, case)
            if _PROBED[key] and provider == "torch-fused" and "fused" in _PROBED[key]:
                _PROBED[key] = f"torch.optim.{spec.torch_class} has no fused step here ({_PROBED[key]})"
        return _PROBED[key]
    if provider == deepspeed_cpu_adam.NAME:
        why = deepspeed_cpu_adam.unsupported(case.optim)
        if why is not None:
            return why
    if provider.startswith("fusedclr-") or provider == deepspeed_cpu_adam.NAME:
        key = (provider, case.optim, case.device, case.dtype)
        if key not in _PROBED:
            _PROBED[key] = _probe(prov, case)
        return _PROBED[key]
    return None


def _probe(prov: Provider, case: Case) -> str | None:
    try:
        params = [torch.nn.Parameter(torch.zeros(8, dtype=case.torch_dtype, device=case.device))]
        stepper = prov.build(params, dataclasses.replace(case, schedule="onecycle"))
        _fill_grads(params)
        stepper.step()
        stepper.close()
    except Exception as e:  # noqa: BLE001 - any failure is the reason to skip
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


def baseline(case: Case) -> str:
    """The provider every ratio of ``case`` is taken against: ``torch-fused`` where torch has a
    fused step for it (SGD, Adam, AdamW, Adagrad in torch 2.14: probed, not listed), else
    ``torch-foreach`` (for Lion, the bench's foreach Lion)."""
    return BASELINE if unavailable(BASELINE, case) is None else "torch-foreach"


def build(provider: str, case: Case, *, seed: int = 0) -> Stepper:
    """Fresh parameters, gradients and optimizer (+ scheduler) of ``provider`` for ``case``."""
    params = _make_params(case, seed)
    stepper = PROVIDERS[provider].build(params, case)
    _fill_grads(params, seed + 1)
    stepper.params = params
    return stepper
