"""The ``fusedclr`` command (also ``python -m fusedclr``).

Subcommands: ``demo`` (the tuning workflow on sklearn's digits, then the
optimizer step-time table), ``lr-find`` (a range test on your own model and
data factories) and ``bench`` (handed to :mod:`fusedclr.bench`). Heavy imports
happen inside the subcommands, so ``--help`` stays fast.

A user's mistake (a bad value, an unknown option, a missing file, a device or
an optional package that is not there) is answered with the subcommand's usage
and one ``fusedclr: error: ...`` line, exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "UsageParser", "build_parser", "load_object", "main"]

LOSSES = {
    "cross_entropy": "cross_entropy",
    "nll": "nll_loss",
    "mse": "mse_loss",
    "l1": "l1_loss",
    "smooth_l1": "smooth_l1_loss",
    "bce_with_logits": "binary_cross_entropy_with_logits",
}

EPILOG_DEMO = """\
Runs offline on scikit-learn's digits: an LR range test, then the same MLP
trained for the same epochs with the one-cycle policy peaking at the test's
one-cycle peak and with the test's suggested LR held constant (several seeds),
an accuracy/time table, plots in
--out (lr_find.png, schedules.png, training_curves.png, results.json), and
finally a step-time table of fusedclr.AdamW vs torch.optim.AdamW(fused=True).
"""

EPILOG_LR_FIND = """\
MODEL and DATA are factories called with no arguments, written
"package.module:function" (importable) or "path/to/file.py:function".
MODEL returns a torch.nn.Module; DATA returns a train loader, or a
(train_loader, val_loader) pair. Batches must be (inputs..., target).

example:
  fusedclr lr-find mypkg.models:resnet18 mypkg.data:loaders --end-lr 1 --out lr-out
"""


TUNE_EXTRA = "pip install 'fusedclr[tune]'"


class CLIError(Exception):
    """A user-facing error: printed as ``fusedclr: error: ...`` with exit status 2."""


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose errors read ``fusedclr: error: ...`` after its own usage.

    argparse prefixes errors with the parser's ``prog`` (``fusedclr lr-find``);
    one prefix for every command is what scripts and users can grep for.
    """

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"fusedclr: error: {message}\n")


def _require(module: str, what: str) -> None:
    """Raises :class:`CLIError` naming the extra to install when ``module`` cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise CLIError(f"{what} needs {module}, which is not installed ({exc}); install it with {TUNE_EXTRA}") from None


def _device(text: str):
    """``--device``: a torch device that exists here."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {text!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                           "leave --device out or pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_object(spec: str, what: str) -> Any:
    """Resolve ``"module:attr"`` or ``"path/file.py:attr"`` (``what`` names the argument in errors)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{what} must look like 'package.module:function' or 'path/to/file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise CLIError(f"{what}: file {module_name!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise CLIError(f"{what}: cannot load {module_name!r} as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # console scripts do not put the working directory on sys.path
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CLIError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise CLIError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise CLIError(f"{what}: {spec!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def _loss(name: str) -> Callable:
    if name in LOSSES:
        import torch.nn.functional as F

        return getattr(F, LOSSES[name])
    if ":" in name:
        return load_object(name, "--loss")
    raise CLIError(f"--loss must be one of {sorted(LOSSES)} or 'module:function', got {name!r}")


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    # Checked before anything runs: the demo's data ship with scikit-learn, its plots need matplotlib.
    _require("sklearn", "'fusedclr demo'")
    _require("matplotlib", "'fusedclr demo'")
    check_output_path(Path(args.out) / "results.json", "--out")
    from fusedclr.demo import run_demo

    run_demo(
        args.out,
        epochs=args.epochs,
        seeds=args.seeds,
        batch_size=args.batch_size,
        num_iter=args.num_iter,
        step_time=not args.no_step_time,
        quick=args.quick,
        threads=args.threads,
        progress=not args.no_progress,
    )
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    import torch

    from fusedclr.lr_finder import LossFunctionError, RangeTestInputError, lr_find
    from fusedclr.tuning import optimizer_classes

    # Every check that needs no user code comes first, so a mistake costs no run.
    if not args.end_lr > args.start_lr:
        raise CLIError(f"--end-lr ({args.end_lr:g}) must be larger than --start-lr ({args.start_lr:g}): "
                       "the range test sweeps upwards")
    if args.out is not None:
        _require("matplotlib", "'fusedclr lr-find --out' (its plot)")
        check_output_path(Path(args.out) / "lr_find.json", "--out")
    device = _device(args.device) if args.device is not None else None
    model_fn = load_object(args.model, "MODEL")
    data_fn = load_object(args.data, "DATA")
    loss_fn = _loss(args.loss)
    if isinstance(model_fn, torch.nn.Module):
        raise CLIError(f"MODEL {args.model!r} is a {type(model_fn).__name__} instance, not a function that "
                       "returns a model: point it at a function (each run builds its own model)")
    model = model_fn()
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"MODEL {args.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
    data = data_fn()
    train_loader, val_loader = (data if isinstance(data, tuple) and len(data) == 2 else (data, None))
    if args.use_val and val_loader is None:
        raise CLIError(f"--use-val needs DATA {args.data!r} to return (train_loader, val_loader)")
    if device is not None:
        model = model.to(device)
    SGD, AdamW, _, _ = optimizer_classes()
    if args.optimizer == "sgd":
        opt = SGD(model.parameters(), lr=args.start_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = AdamW(model.parameters(), lr=args.start_lr, weight_decay=args.weight_decay)
    try:
        result = lr_find(
            model, train_loader, loss_fn, opt,
            start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter, mode=args.mode,
            smooth=args.smooth, diverge_threshold=args.diverge_threshold,
            accumulation_steps=args.accumulation_steps, val_loader=val_loader if args.use_val else None,
            device=device, amp=args.amp, progress=not args.no_progress,
        )
    except LossFunctionError as exc:
        raise CLIError(f"--loss {args.loss}: {exc}") from exc
    except RangeTestInputError as exc:  # the data, the model or the loss's value: one line, no traceback
        raise CLIError(f"lr-find {args.model} {args.data}: {exc}") from exc
    print(result.summary())
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # The JSON first: it holds the measurement, which a failed plot must not lose.
        (out / "lr_find.json").write_text(json.dumps(result.to_dict(), indent=1))
        print(f"wrote {out / 'lr_find.json'}")
        result.plot(out / "lr_find.png")
        print(f"wrote {out / 'lr_find.png'}")
    return 0


def _cmd_bench(argv: Sequence[str]) -> int:
    try:
        bench = importlib.import_module("fusedclr.bench")
    except ImportError as exc:
        if getattr(exc, "name", None) not in ("fusedclr.bench", None) and "fusedclr.bench" not in str(exc):
            raise  # fusedclr.bench exists but one of its own imports failed: show that
        print(
            "fusedclr: error: 'fusedclr bench' needs the fusedclr.bench module, which is not part of this "
            f"installation ({exc}); reinstall fusedclr from a checkout that has fusedclr/bench/",
            file=sys.stderr,
        )
        return 2
    status = bench.main(list(argv))
    return int(status or 0)


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------


def check_output_path(path: str | os.PathLike[str], flag: str) -> None:
    """Raises :class:`CLIError` when ``path`` (a file to write at the end of a run) cannot be written:
    its folder is made, and the file opened for appending and left as it was, before any measuring,
    so that a mistake costs no run."""
    from fusedclr._io import ensure_writable

    try:
        ensure_writable(path)
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    parse.__name__ = f"integer >= {low}"  # what argparse names in its own messages
    return parse


_positive_int = _int_at_least(1)


def _float_in(what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


_positive_lr = _float_in("a finite number > 0", lambda v: 0 < v < math.inf)


def build_parser() -> argparse.ArgumentParser:
    from fusedclr.demo import DEFAULT_OUT

    import fusedclr

    parser = UsageParser(
        prog="fusedclr",
        description="fusedclr: fused optimizer steps with in-kernel LR/momentum schedules, and Leslie Smith's "
        "tuning workflow (LR range test, one-cycle).",
        epilog="Start with 'fusedclr demo'. 'fusedclr COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"fusedclr {fusedclr.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="range test + one-cycle vs constant LR on sklearn digits, plots, step-time table",
        description="The tuning workflow end to end on real data that ships with scikit-learn (no download).",
        epilog=EPILOG_DEMO, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", default=DEFAULT_OUT, help="output folder for plots and results.json "
                      f"(default: ./{DEFAULT_OUT})")
    demo.add_argument("--epochs", type=_positive_int, default=8, help="epochs per training run (default: 8)")
    demo.add_argument("--seeds", type=_positive_int, default=5, help="seeds per schedule (default: 5)")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    demo.add_argument("--num-iter", type=_positive_int, default=100, help="range-test iterations (default: 100)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="torch threads for the range test and trainings (default: 1; the step-time table "
                      "uses torch's default)")
    demo.add_argument("--quick", action="store_true",
                      help="a few-second smoke run: 2 epochs, 1 seed, 40-step range test, small step-time table")
    demo.add_argument("--no-step-time", action="store_true", help="skip the optimizer step-time table")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo, parser=demo)

    lrf = sub.add_parser(
        "lr-find", help="LR range test on your model/data factories ('module:function')",
        description="Run an LR range test and print the suggested learning rates.",
        epilog=EPILOG_LR_FIND, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lrf.add_argument("model", metavar="MODEL", help="'module:function' returning a torch.nn.Module")
    lrf.add_argument("data", metavar="DATA", help="'module:function' returning train_loader or (train, val)")
    lrf.add_argument("--loss", default="cross_entropy",
                     help=f"one of {', '.join(sorted(LOSSES))}, or 'module:function' (default: cross_entropy)")
    lrf.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                     help="fusedclr's (torch's when unavailable) SGD or AdamW (default: sgd)")
    lrf.add_argument("--momentum", type=_float_in("in [0, 1)", lambda v: 0 <= v < 1), default=0.9,
                     help="SGD momentum (default: 0.9)")
    lrf.add_argument("--weight-decay", type=_float_in("a finite number >= 0", lambda v: 0 <= v < math.inf),
                     default=0.0, help="weight decay (default: 0, as Smith recommends while searching the LR)")
    lrf.add_argument("--start-lr", type=_positive_lr, default=1e-7, help="first learning rate (default: 1e-7)")
    lrf.add_argument("--end-lr", type=_positive_lr, default=10.0,
                     help="last learning rate, larger than --start-lr (default: 10)")
    lrf.add_argument("--num-iter", type=_int_at_least(2), default=100,
                     help="iterations, at least 2 (default: 100)")
    lrf.add_argument("--mode", choices=("exp", "linear"), default="exp", help="LR spacing (default: exp)")
    lrf.add_argument("--smooth", type=_float_in("in [0, 1)", lambda v: 0 <= v < 1), default=0.98,
                     help="EMA factor of the stopping rule, 0 disables smoothing (default: 0.98)")
    lrf.add_argument("--diverge-threshold", type=_float_in("> 1", lambda v: v > 1), default=4.0,
                     help="stop when the smoothed loss exceeds this times its best (default: 4)")
    lrf.add_argument("--accumulation-steps", type=_positive_int, default=1, help="batches per step (default: 1)")
    lrf.add_argument("--use-val", action="store_true", help="record the validation loss (DATA returns a pair)")
    lrf.add_argument("--device", default=None,
                     help="move the model and batches there, e.g. cpu or cuda (default: stay put)")
    lrf.add_argument("--amp", action="store_true", help="autocast (fp16 + GradScaler on CUDA, bf16 on CPU)")
    lrf.add_argument("--out", default=None, help="folder for lr_find.png and lr_find.json")
    lrf.add_argument("--no-progress", action="store_true", help="no progress bar")
    lrf.set_defaults(func=_cmd_lr_find, parser=lrf)

    sub.add_parser(
        "bench", help="optimizer benchmarks (fusedclr.bench; 'fusedclr bench --help' for its options)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusedclr`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # Everything after "bench" belongs to fusedclr.bench's own parser, --help included.
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # argparse hands a subcommand's unknown options up to the top-level parser,
    # whose usage says nothing about them: the subcommand's own parser answers.
    owner = getattr(args, "parser", parser)
    if unknown:
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CLIError as exc:
        owner.error(str(exc))
    return 0  # unreachable: error() raises SystemExit
