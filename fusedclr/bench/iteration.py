"""The headline benchmark: a whole training iteration, each library with its own defaults.

Users pay for zero_grad, forward, backward, the optimizer step and the
scheduler step, not for the step alone with gradients already where the
optimizer wants them. This module times exactly that loop for
``torch.optim.AdamW(fused=True)`` (torch's fastest AdamW) and
``fusedclr.AdamW`` (its defaults), each with its library's ``OneCycleLR``, on
model-shaped workloads, and the step alone with gradients replaced before every
step (what ``zero_grad(set_to_none=True)`` + backward hands the optimizer,
Hugging Face Trainer and accelerate included).

``--optimizer`` picks another optimizer of :data:`fusedclr.bench.OPTIMS`
(rmsprop, adagrad, radam, nadam, lion, lookahead, ...), with the same
configuration as ``fusedclr bench``; the torch side is then torch's fused
step where torch has one, else its foreach step (Lion: the bench's foreach
Lion; lookahead: torch's AdamW with a foreach Lookahead sync).
``--providers all`` adds torch's for-loop and foreach steps and, for Adam
and AdamW on a CPU where deepspeed is installed, DeepSpeed's
``DeepSpeedCPUAdam`` (``deepspeed-cpu-adam``, driven by torch's OneCycleLR;
see :mod:`fusedclr.bench.deepspeed_cpu_adam`). A provider that cannot run is
left out with its reason (printed, and under ``left_out`` in the report).

Timing: the providers take turns (one sample of each per round, in alternating
order), in one process, after a warm-up; a sample is several iterations ended
by a device synchronization. Ratios are per round (torch time / fusedclr time,
> 1 means fusedclr is faster), reported as the median with the inter-quartile
range of the rounds, against every other provider (torch's and DeepSpeed's).

Check: every provider starts from the same seeded model (or parameters and
gradient pools) and runs the same number of iterations, so their parameters
must end equal up to rounding; ``check`` in each result says whether they
changed and how far each ended from the first torch provider's (L2 distance
over the reference's L2 update, at most :data:`CHECK_REL`; the largest
elementwise difference is kept too).

Run ``python -m fusedclr.bench.iteration --help``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fusedclr.bench import deepspeed_cpu_adam
from fusedclr.bench.cases import OPTIMS, Case
from fusedclr.bench.machine import _loadavg, git_commit
from fusedclr.bench.providers import TORCH_PROVIDERS, baseline, fusedclr_optimizer, torch_optimizer, unavailable
from fusedclr.bench.shapes import K, M, resnet50_shapes
from fusedclr.bench.timing import ratio_quartiles, synchronizer


class TinyGPT(nn.Module):
    """A GPT-shaped decoder: token and position embeddings, pre-LN blocks, a tied LM head.

    The defaults (vocabulary 32000, width 512, 8 blocks) have 41.6M parameters
    in 102 tensors.
    """

    def __init__(self, vocab: int = 32000, d: int = 512, layers: int = 8, heads: int = 8, ctx: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.mask = nn.Transformer.generate_square_subsequent_mask(ctx)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.wte(tokens) + self.wpe.weight[:t]
        x = self.ln_f(self.blocks(x, mask=self.mask[:t, :t].to(x.device), is_causal=True))
        return x @ self.wte.weight.t()


class Elementwise(nn.Module):
    """Parameters of the given shapes and a loss that touches every element once
    (``sum(p * c)``), so forward and backward cost little beside the optimizer."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes])
        self.cs = [torch.randn(s, generator=gen) for s in shapes]

    def forward(self) -> torch.Tensor:
        return torch.stack([(p * c).sum() for p, c in zip(self.ps, self.cs)]).sum()


class Workload:
    """A model and one training loss for it, on ``device``."""

    def __init__(self, name: str, device: str, tokens: int = 16) -> None:
        self.name = name
        torch.manual_seed(0)
        if name == "transformer":
            self.model = TinyGPT().to(device)
            gen = torch.Generator().manual_seed(1)
            self.x = torch.randint(0, 32000, (1, tokens + 1), generator=gen).to(device)
            self.loss = lambda: nn.functional.cross_entropy(
                self.model(self.x[:, :-1]).flatten(0, 1), self.x[0, 1:])
        else:
            self.model = Elementwise(SHAPES[name]).to(device)
            self.model.cs = [c.to(device) for c in self.model.cs]
            self.loss = self.model

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


SHAPES = {
    "resnet50": resnet50_shapes(),
    "50x1M": [(M,)] * 50,
    "200x1M": [(M,)] * 200,
    "100x256K": [(256 * K,)] * 100,
    "2000x1024": [(1024,)] * 2000,
    "10000x64": [(64,)] * 10000,
    "128x64": [(64,)] * 128,  # seconds: for the smoke tests
}
ITERATION_WORKLOADS = ("transformer", "resnet50", "50x1M", "100x256K", "2000x1024", "10000x64", "128x64")
DEFAULT_WORKLOADS = ("transformer", "resnet50", "50x1M", "2000x1024", "10000x64")
STEP_WORKLOADS = ("200x1M", "2000x1024", "10000x64")
PROVIDERS = ("torch-fused", "fusedclr")  # the default for AdamW: torch's fastest against fusedclr's defaults
ALL_PROVIDERS = (*TORCH_PROVIDERS, deepspeed_cpu_adam.NAME, "fusedclr")
LR, TOTAL = 1e-3, 10**6


def _optimizer(provider: str, params, optim: str = "adamw") -> tuple[Any, Any]:
    """The provider's ``optim`` (the configuration of :data:`fusedclr.bench.OPTIMS`; AdamW: lr 1e-3 and
    torch's defaults) and its library's OneCycleLR. The first has ``step()`` and ``zero_grad()``."""
    spec = OPTIMS[optim]
    if provider in TORCH_PROVIDERS:
        impl = {"torch-forloop": {"foreach": False}, "torch-foreach": {"foreach": True},
                "torch-fused": {"fused": True}}[provider]
        opt, stepped, _ = torch_optimizer(optim, params, impl)
        return stepped, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=TOTAL,
                                                            cycle_momentum=spec.momentum)
    if provider == deepspeed_cpu_adam.NAME:
        # Constructing it loads (first use: builds) its op; every runner is made before any timing.
        opt = deepspeed_cpu_adam.optimizer(optim, params)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=TOTAL,
                                                        cycle_momentum=spec.momentum)
    import fusedclr.lr_scheduler

    opt = fusedclr_optimizer(optim, params)
    return opt, fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=TOTAL,
                                                 cycle_momentum=spec.momentum)


def iteration_runner(name: str, provider: str, device: str, optim: str = "adamw") -> Callable[[], None]:
    """One training iteration of ``name`` with ``provider``: zero_grad, forward, backward, step, scheduler."""
    work = Workload(name, device)
    opt, sched = _optimizer(provider, work.model.parameters(), optim)

    def iteration() -> None:
        opt.zero_grad()
        work.loss().backward()
        opt.step()
        sched.step()

    iteration.keep = (work, opt, sched)  # type: ignore[attr-defined]
    iteration.numel = work.numel  # type: ignore[attr-defined]
    iteration.params = list(work.model.parameters())  # type: ignore[attr-defined]
    return iteration


def step_runner(name: str, provider: str, device: str, optim: str = "adamw") -> Callable[[], None]:
    """The step alone, its gradients replaced by fresh tensors before it (untimed: see ``prepare``)."""
    torch.manual_seed(0)  # the same parameters and gradient pools for every provider
    params = [nn.Parameter(torch.randn(s, device=device) * 0.02) for s in SHAPES[name]]
    pools = [[torch.randn_like(p) for p in params] for _ in range(2)]
    opt, sched = _optimizer(provider, params, optim)
    turn = [0]

    def prepare() -> None:
        turn[0] ^= 1
        for p, g in zip(params, pools[turn[0]]):
            p.grad = g  # as set_to_none + backward: a tensor the optimizer has not seen last step

    def step() -> None:
        opt.step()
        sched.step()

    step.prepare = prepare  # type: ignore[attr-defined]
    step.keep = (params, opt, sched, pools)  # type: ignore[attr-defined]
    step.numel = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    step.params = params  # type: ignore[attr-defined]
    return step


def providers_for(optim: str, device: str, asked: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The providers to run for ``optim`` on ``device`` and the reasons of those left out.

    ``asked`` None: the baseline (torch-fused, or torch-foreach where torch has
    no fused step) and fusedclr. A provider that cannot run ``optim`` here (no
    fused RMSprop, no for-loop Lion, DeepSpeed's CPU Adam for anything but Adam
    and AdamW on a CPU, or without deepspeed, ...) is left out with its reason.
    """
    probe = Case(optim, "128x64", "fp32", "onecycle", "cuda" if device.startswith("cuda") else "cpu")
    names = list(asked) if asked is not None else [baseline(probe), "fusedclr"]
    run, left_out = [], {}
    for name in names:
        reason = unavailable(name, probe) if name != "fusedclr" else None
        if reason is None:
            run.append(name)
        else:
            left_out[name] = reason
    return run, left_out


# Every provider's parameters must end within this fraction of the reference's update, in L2 norm
# over all parameters (a provider that does not step reads 1.0). Not elementwise: on a real model
# Adam-type steps of elements whose gradients are about zero (embedding rows of tokens not in the
# batch) amplify rounding to a sizable part of the step, and torch's own fused AdamW ends 0.3 x the
# largest update away from its for-loop AdamW there, in some elements, after 30 iterations.
CHECK_REL = 0.1


def _check(fns: dict[str, Callable[[], None]], initial: list[torch.Tensor]) -> dict[str, Any]:
    """Whether every provider changed its parameters and ended where the first torch provider did."""
    ref_name = next((p for p in fns if p in TORCH_PROVIDERS), next(iter(fns)))
    ref = [p.detach() for p in fns[ref_name].params]  # type: ignore[attr-defined]
    update = max(float((r - i).abs().max()) for r, i in zip(ref, initial))
    update_l2 = math.sqrt(sum(float((r.double() - i.double()).square().sum()) for r, i in zip(ref, initial)))
    out: dict[str, Any] = {"reference": ref_name, "update": update, "update_l2": update_l2, "providers": {}}
    for name, fn in fns.items():
        mine = [p.detach() for p in fn.params]  # type: ignore[attr-defined]
        moved = max(float((m - i).abs().max()) for m, i in zip(mine, initial))
        diff = max(float((m - r).abs().max()) for m, r in zip(mine, ref))
        rel = math.sqrt(sum(float((m.double() - r.double()).square().sum()) for m, r in zip(mine, ref)))
        rel = rel / update_l2 if update_l2 > 0 else math.inf
        ok = moved > 0 and rel <= CHECK_REL
        out["providers"][name] = {"moved": moved, "max_diff": diff, "rel_l2": rel, "ok": ok}
    out["ok"] = all(v["ok"] for v in out["providers"].values())
    return out


def _sample(fn: Callable[[], None], inner: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``fn`` over ``inner`` calls (untimed ``fn.prepare`` before each)."""
    prepare = getattr(fn, "prepare", None)
    total = 0.0
    for _ in range(inner):
        if prepare is not None:
            prepare()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        total += time.perf_counter() - t0
    return total / inner


def compare(make: Callable[[str], Callable[[], None]], device: str, rounds: int, inner: int,
            warmup: int = 3, providers: Sequence[str] = PROVIDERS, base: str | None = None) -> dict[str, Any]:
    """Paired timing of the providers: ``rounds`` rounds, one sample of each per round.

    ``ratios`` holds, for every torch provider, the per-round ratios torch time /
    fusedclr time (median, quartiles, range); ``ratio`` and its ``ratio_*``
    fields are those against ``base`` (default: the first torch provider).
    ``check``: see :func:`_check`.
    """
    providers = tuple(providers)
    sync = synchronizer(device)
    fns = {}
    initial = None
    for p in providers:
        fns[p] = make(p)
        if initial is None:  # every provider starts from the same seeded parameters
            initial = [t.detach().clone() for t in fns[p].params]  # type: ignore[attr-defined]
    for fn in fns.values():
        for _ in range(warmup):
            _sample(fn, 1, sync)
    times: dict[str, list[float]] = {p: [] for p in providers}
    for r in range(rounds):
        order = providers if r % 2 == 0 else tuple(reversed(providers))
        for p in order:
            times[p].append(_sample(fns[p], inner, sync))
    ratios: dict[str, dict[str, float]] = {}
    for t in providers:
        if t == "fusedclr" or "fusedclr" not in times:
            continue
        per_round = [b / o for b, o in zip(times[t], times["fusedclr"])]
        q1, q3 = ratio_quartiles(times[t], times["fusedclr"])
        ratios[t] = {"ratio": statistics.median(per_round), "q1": q1, "q3": q3,
                     "min": min(per_round), "max": max(per_round)}
    out: dict[str, Any] = {
        "numel": next(iter(fns.values())).numel,  # type: ignore[attr-defined]
        "ms": {p: statistics.median(t) * 1e3 for p, t in times.items()},
        "ratios": ratios,
        "rounds": rounds,
        "inner": inner,
        "check": _check(fns, initial),  # type: ignore[arg-type]
    }
    if ratios:
        first = ratios.get(base) if base in ratios else next(iter(ratios.values()))
        out.update(ratio=first["ratio"], ratio_q1=first["q1"], ratio_q3=first["q3"], ratio_min=first["min"],
                   ratio_max=first["max"])
    return out


def run(device: str, workloads: Sequence[str], steps: Sequence[str], rounds: int, inner: int,
        threads: int | None, progress: Callable[[str], None], optim: str = "adamw",
        providers: Sequence[str] | None = None, warmup: int = 3,
        on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measures every workload; ``on_result(report)`` after each one (``report["complete"]`` is False
    until the last), so that a run cut short keeps what it measured."""
    if threads is not None:
        torch.set_num_threads(threads)
    names, left_out = providers_for(optim, device, providers)
    base = baseline(Case(optim, "128x64", "fp32", "onecycle", "cuda" if device.startswith("cuda") else "cpu"))
    report: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "git_commit": git_commit(), "loadavg_before": _loadavg(),
                              "optimizer": optim, "providers": names, "baseline": base, "left_out": left_out,
                              "iteration": {}, "step_replaced_grads": {}, "complete": False}
    if deepspeed_cpu_adam.NAME in names:
        report["deepspeed"] = deepspeed_cpu_adam.version()
    for name, reason in left_out.items():
        progress(f"  {name}: left out ({reason})")
    for name in workloads:
        progress(f"whole iteration, {optim}, {name} ...")
        report["iteration"][name] = compare(lambda p, name=name: iteration_runner(name, p, device, optim), device,
                                            rounds, inner, warmup, names, base)
        progress(_line(name, report["iteration"][name]))
        if on_result is not None:
            on_result(report)
    for name in steps:
        progress(f"step with replaced grads, {optim}, {name} ...")
        report["step_replaced_grads"][name] = compare(lambda p, name=name: step_runner(name, p, device, optim),
                                                      device, rounds, inner, warmup, names, base)
        progress(_line(name, report["step_replaced_grads"][name]))
        if on_result is not None:
            on_result(report)
    report["loadavg_after"] = _loadavg()
    report["complete"] = True
    return report


def _short(provider: str) -> str:
    return provider.removeprefix("torch-")


def _line(name: str, r: dict[str, Any]) -> str:
    ms = "  ".join(f"{_short(p)} {t:9.2f} ms" for p, t in r["ms"].items())
    vs = "  ".join(f"vs {_short(t)} {v['ratio']:6.2f}x (IQR {v['q1']:.2f}-{v['q3']:.2f}, "
                   f"range {v['min']:.2f}-{v['max']:.2f})" for t, v in r["ratios"].items())
    check = "" if r["check"]["ok"] else f"  CHECK FAILED: {r['check']['providers']}"
    return f"  {name:<12} {r['numel'] / 1e6:7.1f}M  {ms}  {vs}{check}"


def _label(provider: str, optim: str) -> str:
    """A column title: what the provider runs."""
    spec = OPTIMS[optim]
    cls = spec.torch_class
    if provider == "fusedclr":
        return f"fusedclr.Lookahead({cls})" if spec.lookahead else f"fusedclr.{cls}"
    if provider == deepspeed_cpu_adam.NAME:
        return f"DeepSpeedCPUAdam(adamw_mode={cls == 'AdamW'})"
    if cls == "Lion":
        return "bench foreach Lion"
    arg = {"torch-forloop": "foreach=False", "torch-foreach": "foreach=True", "torch-fused": "fused=True"}[provider]
    return f"torch.optim.{cls}({arg})" + (" + foreach Lookahead" if spec.lookahead else "")


def markdown(report: dict[str, Any]) -> str:
    optim = report.get("optimizer", "adamw")
    providers = report.get("providers", list(PROVIDERS))
    torch_names = [p for p in providers if p != "fusedclr"]
    ratio_cols = (["ratio (IQR)"] if len(torch_names) == 1
                  else [f"vs {_short(t)} (IQR)" for t in torch_names])
    rows = ["| workload | params | " + " | ".join(_label(p, optim) for p in providers) + " | "
            + " | ".join(ratio_cols) + " |",
            "|---|---|" + "---|" * (len(providers) + len(ratio_cols))]
    for kind, title in (("iteration", "whole iteration"), ("step_replaced_grads", "step, grads replaced")):
        for name, r in report[kind].items():
            cells = [f"{r['ms'][p]:.2f} ms" for p in providers]
            cells += [f"**{r['ratios'][t]['ratio']:.2f}x** ({r['ratios'][t]['q1']:.2f}-{r['ratios'][t]['q3']:.2f})"
                      for t in torch_names]
            rows.append(f"| {title}, {name} | {r['numel'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from fusedclr.cli import CLIError, UsageParser, _int_at_least, check_output_path

    ap = UsageParser(prog="python -m fusedclr.bench.iteration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to train on (default: cuda when available, else cpu)")
    ap.add_argument("--optimizer", default="adamw", choices=list(OPTIMS),
                    help="the optimizer, configured as in 'fusedclr bench' (default adamw)")
    ap.add_argument("--providers", default=None,
                    help=f"comma-separated, of {','.join(ALL_PROVIDERS)}, or 'all' (default: torch-fused, "
                    f"or torch-foreach where torch has no fused step, and fusedclr). {deepspeed_cpu_adam.NAME} "
                    "runs Adam and AdamW on a CPU where deepspeed is installed (docs/benchmarks.md); elsewhere "
                    "it is left out with the reason")
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help=f"whole-iteration workloads, comma-separated, of {','.join(ITERATION_WORKLOADS)}")
    ap.add_argument("--steps", default=",".join(STEP_WORKLOADS),
                    help=f"replaced-grads step workloads, comma-separated, of {','.join(SHAPES)}, or 'none'")
    ap.add_argument("--rounds", type=int, default=9, help="paired rounds (default 9)")
    ap.add_argument("--inner", type=int, default=3, help="iterations per sample (default 3)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per provider first (default 3)")
    ap.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w and w != "none"]
    steps = [w for w in args.steps.split(",") if w and w != "none"]
    for w in workloads:
        if w not in ITERATION_WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(ITERATION_WORKLOADS)}")
    for w in steps:
        if w not in SHAPES:
            ap.error(f"unknown step workload {w!r}; choose from {', '.join(SHAPES)}")
    if args.rounds < 2 or args.inner < 1 or args.warmup < 0:
        ap.error("--rounds must be at least 2, --inner at least 1 and --warmup at least 0")
    providers = None
    if args.providers is not None:
        providers = list(ALL_PROVIDERS) if args.providers == "all" else [
            p for p in args.providers.split(",") if p]
        bad = [p for p in providers if p not in ALL_PROVIDERS]
        if bad or "fusedclr" not in providers or len(providers) < 2:
            ap.error(f"--providers {args.providers}: choose fusedclr and at least one of "
                     f"{', '.join(p for p in ALL_PROVIDERS if p != 'fusedclr')} (or 'all')")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device}: not a device; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: the benchmark trains on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but no CUDA device is available")
    if args.json:
        try:
            check_output_path(args.json, "--json")
        except CLIError as exc:
            ap.error(str(exc))
    def write_json(report: dict[str, Any]) -> None:
        if args.json:  # rewritten after every workload: a run cut short (a CI time limit) keeps what it measured
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, args.json)

    report = run(args.device, workloads, steps, args.rounds, args.inner, args.threads,
                 lambda s: print(s, file=sys.stderr, flush=True), args.optimizer, providers, args.warmup,
                 on_result=write_json)
    if len(report["providers"]) < 2:
        ap.error(f"--optimizer {args.optimizer}: no provider to compare fusedclr with can run here "
                 f"({report['left_out']})")
    print(markdown(report))
    write_json(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
