"""``fusedclr bench``: the command line of the benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fusedclr.cli import CLIError, UsageParser, _int_at_least, check_output_path

from .cases import DTYPES, OPTIMS, SCHEDULES
from .providers import PROVIDERS
from .report import format_table, markdown_report, plot
from .runner import run
from .shapes import BIG_SHAPES, EXTRA_SHAPES, QUICK_SHAPES, SHAPES
from .steadiness import check_threads, describe
from .timing import FULL, QUICK


def _names(value: str, choices: Sequence[str], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or value!r}; choose from {', '.join(choices)}")
    return names


def parser() -> argparse.ArgumentParser:
    ap = UsageParser(
        prog="fusedclr bench",
        description="Time fusedclr's optimizer step against torch.optim (for-loop, foreach, fused, compiled) "
        "and, where deepspeed is installed, DeepSpeed's CPU Adam, and report ratios vs torch fused, GB/s and "
        "% of copy bandwidth.",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the parameters live and the steps run (default: cuda when a GPU is visible, "
                    "else cpu)")
    ap.add_argument("--quick", action="store_true",
                    help="small shapes, short budget, torch-compile not compiled unless --compile-timeout is "
                    "given: finishes in seconds")
    ap.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a log-log plot (PNG) of time per step")
    ap.add_argument("--markdown", metavar="PATH", help="write markdown tables (constant lr and OneCycleLR)")
    ap.add_argument("--optim", "--optimizer", dest="optim", default="adamw",
                    type=lambda v: _names(v, list(OPTIMS), "optimizer"),
                    help=f"comma-separated, from {', '.join(OPTIMS)} (default adamw). Lion's torch side is the "
                    "bench's foreach Lion; lookahead is Lookahead(k=5, alpha=0.5) around AdamW, against torch's "
                    "AdamW with a foreach synchronisation")
    ap.add_argument("--shapes", type=lambda v: _names(v, [*SHAPES, *QUICK_SHAPES, *EXTRA_SHAPES], "shape"),
                    help=f"comma-separated, from {', '.join([*SHAPES, *QUICK_SHAPES, *EXTRA_SHAPES])} "
                    "(default: all of docs/DESIGN.md's, or the quick ones with --quick)")
    ap.add_argument("--dtypes", default="fp32,bf16", type=lambda v: _names(v, list(DTYPES), "dtype"),
                    help="parameter and gradient dtypes, comma-separated, from "
                    f"{', '.join(DTYPES)} (default: fp32,bf16)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), type=lambda v: _names(v, SCHEDULES, "schedule"),
                    help="comma-separated: constant (no scheduler) and/or onecycle (OneCycleLR stepped after "
                    f"every optimizer step) (default: {','.join(SCHEDULES)})")
    ap.add_argument("--providers", type=lambda v: _names(v, list(PROVIDERS), "provider"),
                    help=f"comma-separated, from {', '.join(PROVIDERS)} (default: all)")
    ap.add_argument("--compile-timeout", type=float, default=None, metavar="S",
                    help="give up compiling torch-compile after S seconds (0: skip it; default 300, "
                    "and 0 with --quick)")
    ap.add_argument("--from-json", metavar="PATH",
                    help="measure nothing: print, plot and tabulate the report in PATH (from --json)")
    ap.add_argument("--threads", type=_int_at_least(1), metavar="N",
                    help="torch.set_num_threads(N) first (default: torch's)")
    ap.add_argument("--no-big", action="store_true", help=f"skip the big shapes ({', '.join(sorted(BIG_SHAPES))})")
    ap.add_argument("--seconds", type=_positive_float, metavar="S",
                    help=f"time each provider of a case for about S seconds once its minimum samples are in "
                    f"(default {FULL.max_time_s:g}; --quick: {QUICK.max_time_s:g})")
    ap.add_argument("--time-limit", type=_positive_float, metavar="S",
                    help="start no case after S seconds; the cases left out are listed in the report. "
                    "With --json, the report is rewritten after every case")
    return ap


def _positive_float(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not out > 0 or math.isinf(out):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``fusedclr bench``: run, print the tables, write JSON and plot; returns the exit status."""
    ap = parser()
    args = ap.parse_args(argv)
    if args.from_json:
        report = _read_report(ap, args.from_json)
        for key in dict.fromkeys((r["optim"], r["shape"], r["dtype"], r["schedule"]) for r in report["results"]):
            rows = [r for r in report["results"] if (r["optim"], r["shape"], r["dtype"], r["schedule"]) == key]
            print(format_table(rows, report["config"]["device"]))
        _write(report, args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                 "pass --device cpu")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path:
            try:  # before measuring: a mistake costs no run
                check_output_path(path, flag)
            except CLIError as exc:
                ap.error(str(exc))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    thread_check = None
    if args.device == "cpu" and torch.get_num_threads() > 1:
        thread_check = check_threads(torch.get_num_threads())
        if args.threads is None:
            torch.set_num_threads(thread_check["prefer"])
        note = describe(thread_check, asked=args.threads is not None)
        if note:
            print(note, flush=True)
        thread_check = {**thread_check, "used": torch.get_num_threads()}
    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else list(SHAPES))
    if args.no_big:
        shapes = [s for s in shapes if s not in BIG_SHAPES]
    providers = args.providers or list(PROVIDERS)
    compile_timeout = args.compile_timeout
    if compile_timeout is None:
        # Compiling alone takes tens of seconds on a CPU: --quick leaves it out
        # even when torch-compile is asked for by name (it is then listed as skipped).
        compile_timeout = 0.0 if args.quick else 300.0
    budget = QUICK if args.quick else FULL
    if args.seconds is not None:
        budget = dataclasses.replace(budget, max_time_s=args.seconds)
    report = run(
        device=args.device,
        optims=args.optim,
        shapes=shapes,
        dtypes=args.dtypes,
        schedules=args.schedules,
        providers=providers,
        budget=budget,
        compile_timeout=compile_timeout,
        time_limit_s=args.time_limit,
        thread_check=thread_check,
        on_case=lambda partial: _write_partial(partial, args),
        log=lambda s: print(s, flush=True),
    )
    _write(report, args)
    return 0


def _read_report(ap: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The report in ``path`` (written by ``--json``); a missing or foreign file is a usage error."""
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as exc:
        ap.error(f"--from-json {path}: {exc.strerror or exc}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        ap.error(f"--from-json {path}: not a 'fusedclr bench --json' report ({exc})")
    if not isinstance(report, dict) or not {"results", "config", "machine"} <= set(report):
        ap.error(f"--from-json {path}: not a 'fusedclr bench --json' report (no results, config and machine)")
    return report


def _write_partial(report: dict[str, Any], args: argparse.Namespace) -> None:
    """After every case: the JSON report and the markdown tables so far (the plot waits for the end)."""
    if args.json:
        _dump_json(report, args.json)
    if args.markdown:
        _dump_text(markdown_report(report), args.markdown)


def _dump_text(text: str, path: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, so the file is always whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _dump_json(report: dict[str, Any], path: str) -> None:
    _dump_text(json.dumps(report, indent=1), path)


def _write(report: dict[str, Any], args: argparse.Namespace) -> None:
    m = report["machine"]
    print(f"\n{m.get('gpu') or m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
          f"torch {m['torch']}, {report['date']}, commit {report['git_commit']}, {report['elapsed_s']:.0f} s, "
          f"load average {m.get('loadavg_before')} -> {m.get('loadavg_after')}")
    if args.json and args.json != args.from_json:
        _dump_json(report, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        _dump_text(markdown_report(report), args.markdown)
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(report, args.plot)
        except ImportError as exc:  # matplotlib is an optional dependency
            print(f"no plot: {exc} (pip install matplotlib)", file=sys.stderr)
        else:
            print(f"wrote {args.plot}")
