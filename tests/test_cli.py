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

    def nan_data():
        x, y = data()[0][0]
        return [(x * float("nan"), y)] * 4

    def dict_data():
        return [{"x": x, "y": y} for x, y in data()[0]]

    not_callable = 3
    instance = model()
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


# --------------------------------------------------------------------------
# A user's mistake: the subcommand's usage, one error line, exit status 2
# --------------------------------------------------------------------------


def _user_error(capsys, argv, usage="usage: fusedclr lr-find"):
    """Runs ``argv``; asserts the answer is a usage and one ``fusedclr: error:`` line, exit 2, no traceback."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out
    assert err.startswith(usage), err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fusedclr: error: "), err
    return errors[0]


@pytest.mark.parametrize("value", ["0", "-5", "1", "2.5", "many"])
def test_lr_find_num_iter_must_be_at_least_2(factories, capsys, value):
    line = _user_error(capsys, ["lr-find", "clifactories:model", "clifactories:data", "--num-iter", value])
    assert "--num-iter" in line and value in line


@pytest.mark.parametrize("extra, words", [
    (["--end-lr", "1e-8"], ["--end-lr (1e-08) must be larger than --start-lr (1e-07)"]),
    (["--end-lr", "1e-7"], ["--end-lr (1e-07) must be larger than --start-lr (1e-07)"]),
    (["--start-lr", "0"], ["--start-lr", "> 0"]),
    (["--end-lr", "inf"], ["--end-lr", "finite"]),
    (["--smooth", "1"], ["--smooth", "[0, 1)"]),
    (["--diverge-threshold", "0.5"], ["--diverge-threshold", "> 1"]),
    (["--accumulation-steps", "0"], ["--accumulation-steps", ">= 1"]),
])
def test_lr_find_bad_values_are_user_errors(factories, capsys, extra, words):
    line = _user_error(capsys, ["lr-find", "clifactories:model", "clifactories:data", "--no-progress", *extra])
    for word in words:
        assert word in line


def test_lr_find_loss_that_does_not_fit_the_targets(factories, capsys):
    """mse on class-index targets: one error line with both shapes and the way out, no traceback."""
    line = _user_error(capsys, ["lr-find", "clifactories:model", "clifactories:data", "--loss", "mse",
                                "--no-progress"])
    for words in ("--loss mse", "mse_loss", "output: float32 tensor of shape (16, 3)",
                  "target: int64 tensor of shape (16,)", "cross_entropy"):
        assert words in line, line


@pytest.mark.parametrize("data, words", [
    ("clifactories:nan_data", ["loss_fn returned nan on the very first step"]),
    ("clifactories:dict_data", ["train_loader must yield (inputs..., target) tuples or lists; got dict"]),
])
def test_lr_find_data_it_cannot_use_is_one_error_line(factories, capsys, data, words):
    line = _user_error(capsys, ["lr-find", "clifactories:model", data, "--no-progress"])
    for word in ["clifactories:model", data, *words]:
        assert word in line, line


def test_out_of_memory_in_the_loss_is_not_a_loss_error():
    """Callers that back off the batch size on OutOfMemoryError must see it as it is."""
    from fusedclr.lr_finder import lr_find

    def oom(output, target):
        raise torch.OutOfMemoryError("out of memory")

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(torch.OutOfMemoryError):
        lr_find(model, batches, oom, opt, num_iter=3, progress=False)


def test_range_test_input_errors_keep_their_builtin_types():
    """Callers that caught TypeError or FloatingPointError from lr_find still do."""
    from fusedclr.lr_finder import RangeTestInputError, lr_find

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError) as exc:
        lr_find(model, [{"x": x, "y": y}], torch.nn.functional.cross_entropy, opt, num_iter=3, progress=False)
    assert isinstance(exc.value, RangeTestInputError)
    with pytest.raises(FloatingPointError) as exc:
        lr_find(model, [(x * float("nan"), y)], torch.nn.functional.cross_entropy, opt, num_iter=3, progress=False)
    assert isinstance(exc.value, RangeTestInputError)


def test_lr_find_unwritable_out_and_model_instances_fail_before_the_test(factories, capsys, monkeypatch):
    import fusedclr.lr_finder

    monkeypatch.setattr(fusedclr.lr_finder, "lr_find", lambda *a, **k: pytest.fail("ran before checking"))
    (factories / "afile").write_text("")
    line = _user_error(capsys, ["lr-find", "clifactories:model", "clifactories:data", "--no-progress",
                                "--out", str(factories / "afile" / "sub")])
    assert "--out" in line and "cannot write there" in line
    line = _user_error(capsys, ["lr-find", "clifactories:instance", "clifactories:data", "--no-progress"])
    assert "MODEL 'clifactories:instance' is a Sequential instance, not a function" in line


@pytest.mark.parametrize("argv, words", [
    (["bench", "--threads", "0"], ["--threads", ">= 1"]),
    (["bench", "--quick", "--json", "{bad}/x.json"], ["--json", "cannot write there"]),
    (["bench", "--quick", "--markdown", "{bad}/x.md"], ["--markdown", "cannot write there"]),
])
def test_bench_mistakes_are_one_error_line_before_measuring(tmp_path, capsys, argv, words):
    (tmp_path / "afile").write_text("")
    argv = [a.replace("{bad}", str(tmp_path / "afile")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "error:" in x)
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("argv, words", [
    (["--threads", "0"], ["--threads", ">= 1"]),
    (["--device", "meta"], ["--device meta", "cpu or cuda"]),
    (["--device", "foo"], ["--device foo", "not a device"]),
    (["--json", "{bad}/x.json"], ["--json", "cannot write there"]),
])
def test_iteration_bench_mistakes_are_one_error_line_before_measuring(tmp_path, capsys, monkeypatch, argv, words):
    from fusedclr.bench import iteration

    monkeypatch.setattr(iteration, "run", lambda *a, **k: pytest.fail("measured before checking"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        iteration.main([a.replace("{bad}", str(tmp_path / "afile")) for a in argv])
    assert exc.value.code == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if "error:" in x)
    for word in words:
        assert word in line, line


def test_loss_errors_name_what_the_loss_was_given():
    """The library's lr_find and the tuning loops raise the same error; the model is left as it was."""
    import torch.nn.functional as F

    from fusedclr.lr_finder import LossFunctionError, lr_find
    from fusedclr.tuning import train_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LossFunctionError, match=r"l1_loss.*shape \(8, 3\).*shape \(8,\).*cross_entropy"):
        lr_find(model, batches, F.l1_loss, opt, num_iter=5, progress=False)
    with pytest.raises(LossFunctionError, match=r"l1_loss"):
        train_epoch(model, batches, F.l1_loss, opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a CUDA GPU")
def test_lr_find_cuda_device_without_a_gpu(factories, capsys):
    line = _user_error(capsys, ["lr-find", "clifactories:model", "clifactories:data", "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is visible" in line and "--device cpu" in line


def test_lr_find_device_that_is_not_a_device(factories, capsys):
    line = _user_error(capsys, ["lr-find", "clifactories:model", "clifactories:data", "--device", "gpu0"])
    assert "--device 'gpu0' is not a torch device" in line


@pytest.mark.parametrize("argv, usage", [
    (["lr-find", "clifactories:model", "clifactories:data", "--bogus"], "usage: fusedclr lr-find"),
    (["demo", "--quick", "--bogus", "3"], "usage: fusedclr demo"),
])
def test_unknown_option_after_a_subcommand_shows_that_subcommands_usage(factories, capsys, argv, usage):
    line = _user_error(capsys, argv, usage=usage)
    assert "unrecognized arguments: --bogus" in line


def test_demo_without_scikit_learn_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes the import fail
    line = _user_error(capsys, ["demo", "--quick", "--out", str(tmp_path)], usage="usage: fusedclr demo")
    assert "needs sklearn" in line and "pip install 'fusedclr[tune]'" in line
    assert not any(tmp_path.iterdir())  # nothing ran


def test_lr_find_out_without_matplotlib_names_the_extra_before_running(factories, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out_dir = factories / "out"
    line = _user_error(capsys, ["lr-find", "clifactories:model", "clifactories:data", "--num-iter", "5",
                                "--no-progress", "--out", str(out_dir)])
    assert "needs matplotlib" in line and "pip install 'fusedclr[tune]'" in line
    assert not out_dir.exists()


def test_lr_find_writes_its_json_before_the_plot(factories, monkeypatch, capsys):
    from fusedclr.lr_finder import LRFinderResult

    def broken_plot(self, path=None, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(LRFinderResult, "plot", broken_plot)
    out_dir = factories / "out"
    with pytest.raises(RuntimeError, match="plot failed"):
        cli.main(["lr-find", "clifactories:model", "clifactories:data", "--num-iter", "5", "--no-progress",
                  "--out", str(out_dir)])
    assert len(json.loads((out_dir / "lr_find.json").read_text())["lrs"]) == 5


def test_bench_from_json_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    line = _user_error(capsys, ["bench", "--from-json", str(missing)], usage="usage: fusedclr bench")
    assert f"--from-json {missing}" in line and "No such file" in line


def test_bench_from_json_not_a_report(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    line = _user_error(capsys, ["bench", "--from-json", str(bad)], usage="usage: fusedclr bench")
    assert f"--from-json {bad}" in line and "not a 'fusedclr bench --json' report" in line


def test_bench_unknown_option_shows_the_bench_usage(capsys):
    line = _user_error(capsys, ["bench", "--bogus"], usage="usage: fusedclr bench")
    assert "unrecognized arguments: --bogus" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a CUDA GPU")
def test_bench_cuda_device_without_a_gpu(capsys):
    line = _user_error(capsys, ["bench", "--device", "cuda", "--quick"], usage="usage: fusedclr bench")
    assert "--device cuda" in line and "no CUDA GPU" in line


def test_version(capsys):
    import fusedclr

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusedclr {fusedclr.__version__}"
