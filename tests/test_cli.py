"""The ``fusedclr`` command: help, a quick demo, lr-find on user factories, bench delegation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest
import torch

from fusedclr import cli
from fusedclr.demo import step_time_table

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "lr-find", "bench"):
        assert command in out


@pytest.mark.parametrize("command, flags", [("demo", ["--quick", "--epochs", "--out", "--seeds"]),
                                            ("lr-find", ["MODEL", "DATA", "--end-lr", "--num-iter", "--loss"])])
def test_subcommand_help(capsys, command, flags):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_python_dash_m_and_the_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fusedclr", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fusedclr")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["fusedclr"].split(":")
    assert (module, func) == ("fusedclr.cli", "main") and callable(getattr(cli, func))


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------


def test_quick_demo_prints_measured_tables_and_writes_plots(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    for name in ("lr_find.png", "schedules.png", "training_curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    results = json.loads((tmp_path / "results.json").read_text())
    # One-cycle at the range test's peak, constant at its suggestion.
    assert results["constant_lr"] == results["lr_find"]["suggestion"] > 0
    assert results["one_cycle_peak"] == results["lr_find"]["peak"] > results["constant_lr"]
    assert results["epochs"] == 2 and results["seeds"] == 1
    # The printed table is the measured one, for both schedules.
    for name in ("one-cycle", "constant"):
        acc = results["summary"][name]["val_accuracy_final"][0]
        assert 10.0 < acc <= 100.0
        row = re.search(rf"^{name}\s+([\d.]+)\s", out, re.M)
        assert row is not None and float(row.group(1)) == pytest.approx(acc, abs=0.006)
        runs = results["runs"][name]
        assert len(runs[0]["lrs"]) == len(runs[0]["momentums"]) == 2 * (1347 // 64)
    one_cycle = results["runs"]["one-cycle"][0]
    peak = results["one_cycle_peak"]
    assert max(one_cycle["lrs"]) == pytest.approx(peak, rel=0.01) and one_cycle["lrs"][0] == pytest.approx(peak / 25)
    assert min(one_cycle["momentums"]) == pytest.approx(0.85, abs=1e-3)
    assert set(results["runs"]["constant"][0]["lrs"]) == {results["constant_lr"]}
    # One seed: no noise estimate, so no winner is named.
    assert results["verdict"].startswith("no verdict from one seed") and "=> verdict: no verdict" in out
    # ...and it ends with the step-time table.
    assert out.index("Optimizer step time") > out.index("=> verdict:")
    rows = results["step_time"]
    threads = sorted({1, torch.get_num_threads()})
    cases = ["digits MLP (this demo)", "500 x 64 (many small tensors)"]
    assert [(r["parameters"], r["threads"]) for r in rows] == [(c, t) for c in cases for t in threads]
    for r in rows:
        assert r["torch_fused_ms"] > 0 and r["fusedclr_ms"] > 0
        assert r["speedup"] == pytest.approx(r["torch_fused_ms"] / r["fusedclr_ms"])
        line = next(line for line in out.splitlines() if line.startswith(r["parameters"]))
        assert f" {r['torch_fused_ms']:.3f} " in line and f" {r['fusedclr_ms']:.3f} " in line


def test_step_time_table_on_custom_shapes():
    lines = []
    threads = torch.get_num_threads()
    rows = step_time_table({"two tensors": [(3, 5), (7,)]}, threads=[1], reps=3, warmup=1, echo=lines.append)
    assert len(rows) == 1 and rows[0]["threads"] == 1
    assert rows[0]["tensors"] == 2 and rows[0]["elements"] == 22 and rows[0]["reps"] == 3
    assert any(line.startswith("two tensors") for line in lines)
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------
# lr-find
# --------------------------------------------------------------------------

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]
        return batches, batches[:2]

    not_callable = 3
    """
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "clifactories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_lr_find_runs_on_user_factories(factories, capsys):
    out_dir = factories / "out"
    argv = ["lr-find", "clifactories:model", "clifactories:data", "--num-iter", "30", "--end-lr", "100",
            "--out", str(out_dir), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out_dir / "lr_find.json").read_text())
    assert len(report["lrs"]) <= 30 and report["lrs"][0] == pytest.approx(1e-7)
    assert f"valley   {report['suggestion']:.3g}" in printed
    assert (out_dir / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_find_accepts_a_file_path_and_the_validation_loader(factories, capsys):
    spec = str(factories / "clifactories.py")
    argv = ["lr-find", f"{spec}:model", f"{spec}:data", "--num-iter", "10", "--use-val", "--optimizer", "adamw",
            "--no-progress"]
    assert cli.main(argv) == 0
    assert "LR range test: 10 iterations" in capsys.readouterr().out


@pytest.mark.parametrize(
    "model, data, extra, message",
    [
        ("clifactories.model", "clifactories:data", [], "MODEL must look like 'package.module:function'"),
        ("clifactories:nope", "clifactories:data", [], "MODEL: module 'clifactories' has no attribute 'nope'"),
        ("no_such_module_xyz:model", "clifactories:data", [], "MODEL: cannot import module 'no_such_module_xyz'"),
        ("clifactories:model", "clifactories:not_callable", [], "DATA: 'clifactories:not_callable' is a int"),
        ("clifactories:model", "clifactories:data", ["--loss", "hinge"], "--loss must be one of"),
    ],
)
def test_lr_find_errors_name_the_argument(factories, capsys, model, data, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["lr-find", model, data, "--num-iter", "5", "--no-progress", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------


def test_bench_delegates_every_argument(monkeypatch):
    seen = []
    fake = types.ModuleType("fusedclr.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fusedclr.bench", fake)
    assert cli.main(["bench", "--quick", "--help", "--json", "x.json"]) == 3
    assert seen == [["--quick", "--help", "--json", "x.json"]]


def test_bench_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fusedclr.bench", None)  # makes the import fail
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "fusedclr bench" in err and "fusedclr.bench" in err
