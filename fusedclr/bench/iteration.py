"""The headline benchmark: a whole training iteration, each library with its own defaults.

Users pay for zero_grad, forward, backward, the optimizer step and the
scheduler step, not for the step alone with gradients already where the
optimizer wants them. This module times exactly that loop for
``torch.optim.AdamW(fused=True)`` (torch's fastest AdamW) and
``fusedclr.AdamW`` (its defaults), each with its library's ``OneCycleLR``, on
model-shaped workloads, and the step alone with gradients replaced before every
step (what ``zero_grad(set_to_none=True)`` + backward hands the optimizer,
Hugging Face Trainer and accelerate included).

Timing: the providers take turns (one sample of each per round, in alternating
order), in one process, after a warm-up; a sample is several iterations ended
by a device synchronization. Ratios are per round (torch time / fusedclr time,
> 1 means fusedclr is faster), reported as the median with the inter-quartile
range of the rounds.

Run ``python -m fusedclr.bench.iteration --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import fusedclr
from fusedclr.bench.shapes import M, resnet50_shapes
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
    "2000x1024": [(1024,)] * 2000,
    "10000x64": [(64,)] * 10000,
}
ITERATION_WORKLOADS = ("transformer", "resnet50", "50x1M", "2000x1024", "10000x64")
STEP_WORKLOADS = ("200x1M", "2000x1024", "10000x64")
PROVIDERS = ("torch-fused", "fusedclr")
LR, TOTAL = 1e-3, 10**6


def _optimizer(provider: str, params) -> tuple[torch.optim.Optimizer, Any]:
    """The provider's AdamW with its own defaults, and its library's OneCycleLR."""
    if provider == "torch-fused":
        opt = torch.optim.AdamW(params, lr=LR, fused=True)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=TOTAL)
    opt = fusedclr.AdamW(params, lr=LR)
    return opt, fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=TOTAL)


def iteration_runner(name: str, provider: str, device: str) -> Callable[[], None]:
    """One training iteration of ``name`` with ``provider``: zero_grad, forward, backward, step, scheduler."""
    work = Workload(name, device)
    opt, sched = _optimizer(provider, work.model.parameters())

    def iteration() -> None:
        opt.zero_grad()
        work.loss().backward()
        opt.step()
        sched.step()

    iteration.keep = (work, opt, sched)  # type: ignore[attr-defined]
    iteration.numel = work.numel  # type: ignore[attr-defined]
    return iteration


def step_runner(name: str, provider: str, device: str) -> Callable[[], None]:
    """The step alone, its gradients replaced by fresh tensors before it (untimed: see ``prepare``)."""
    params = [nn.Parameter(torch.randn(s, device=device) * 0.02) for s in SHAPES[name]]
    opt, sched = _optimizer(provider, params)
    pools = [[torch.randn_like(p) for p in params] for _ in range(2)]
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
    return step


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
            warmup: int = 3) -> dict[str, Any]:
    """Paired timing of the providers: ``rounds`` rounds, one sample of each per round."""
    sync = synchronizer(device)
    fns = {p: make(p) for p in PROVIDERS}
    for fn in fns.values():
        for _ in range(warmup):
            _sample(fn, 1, sync)
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for r in range(rounds):
        order = PROVIDERS if r % 2 == 0 else tuple(reversed(PROVIDERS))
        for p in order:
            times[p].append(_sample(fns[p], inner, sync))
    base, ours = times["torch-fused"], times["fusedclr"]
    ratios = [b / o for b, o in zip(base, ours)]
    q1, q3 = ratio_quartiles(base, ours)
    return {
        "numel": fns["fusedclr"].numel,
        "ms": {p: statistics.median(t) * 1e3 for p, t in times.items()},
        "ratio": statistics.median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": rounds,
        "inner": inner,
    }


def run(device: str, workloads: Sequence[str], steps: Sequence[str], rounds: int, inner: int,
        threads: int | None, progress: Callable[[str], None]) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    report: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "iteration": {}, "step_replaced_grads": {}}
    for name in workloads:
        progress(f"whole iteration, {name} ...")
        report["iteration"][name] = compare(lambda p, name=name: iteration_runner(name, p, device), device,
                                            rounds, inner)
        progress(_line(name, report["iteration"][name]))
    for name in steps:
        progress(f"step with replaced grads, {name} ...")
        report["step_replaced_grads"][name] = compare(lambda p, name=name: step_runner(name, p, device), device,
                                                      rounds, inner)
        progress(_line(name, report["step_replaced_grads"][name]))
    return report


def _line(name: str, r: dict[str, Any]) -> str:
    return (f"  {name:<12} {r['numel'] / 1e6:7.1f}M  torch fused {r['ms']['torch-fused']:9.2f} ms  "
            f"fusedclr {r['ms']['fusedclr']:9.2f} ms  ratio {r['ratio']:6.2f}x "
            f"(IQR {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}, range {r['ratio_min']:.2f}-{r['ratio_max']:.2f})")


def markdown(report: dict[str, Any]) -> str:
    rows = ["| workload | params | torch.optim.AdamW(fused=True) | fusedclr.AdamW | ratio (IQR) |",
            "|---|---|---|---|---|"]
    for kind, title in (("iteration", "whole iteration"), ("step_replaced_grads", "step, grads replaced")):
        for name, r in report[kind].items():
            rows.append(f"| {title}, {name} | {r['numel'] / 1e6:.1f}M | {r['ms']['torch-fused']:.2f} ms | "
                        f"{r['ms']['fusedclr']:.2f} ms | **{r['ratio']:.2f}x** "
                        f"({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from fusedclr.cli import UsageParser

    ap = UsageParser(prog="python -m fusedclr.bench.iteration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to train on (default: cuda when available, else cpu)")
    ap.add_argument("--workloads", default=",".join(ITERATION_WORKLOADS),
                    help=f"whole-iteration workloads, comma-separated, of {','.join(ITERATION_WORKLOADS)}")
    ap.add_argument("--steps", default=",".join(STEP_WORKLOADS),
                    help=f"replaced-grads step workloads, comma-separated, of {','.join(SHAPES)}, or 'none'")
    ap.add_argument("--rounds", type=int, default=9, help="paired rounds (default 9)")
    ap.add_argument("--inner", type=int, default=3, help="iterations per sample (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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
    if args.rounds < 2 or args.inner < 1:
        ap.error("--rounds must be at least 2 and --inner at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda, but no CUDA device is available")
    report = run(args.device, workloads, steps, args.rounds, args.inner, args.threads,
                 lambda s: print(s, file=sys.stderr, flush=True))
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
