"""CI smoke test of ``fusedclr bench --quick``: it runs and writes its report and plot.

It asserts that the benchmark works, never how fast anything is (CI machines
are shared and noisy; the timings are for people, see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import torch

from fusedclr import bench, ops
from fusedclr.bench import cli as bench_cli
from fusedclr.bench import steadiness

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TORCH_PROVIDERS = ("torch-forloop", "torch-foreach", "torch-fused")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "fusedclr", "bench", "--device", "cpu", "--quick",
           "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_prints_a_table_per_case(quick_run):
    _, stdout = quick_run
    for shape in bench.QUICK_SHAPES:
        assert f"adamw {shape} " in stdout
    assert "x fused" in stdout and "% copy" in stdout
    assert "wrote" in stdout


def test_writes_the_report(quick_run):
    out, _ = quick_run
    report = json.loads((out / "bench.json").read_text())
    assert report["schema"] == "fusedclr-bench/1"
    for key in ("cpu", "cores", "torch"):
        assert report["machine"][key]
    assert report["date"] and "git_commit" in report
    assert report["config"]["device"] == "cpu" and report["config"]["baseline"] == bench.BASELINE
    assert {c["shape"] for c in report["copy"]} == set(bench.QUICK_SHAPES)
    assert all(c["gbps"] > 0 for c in report["copy"])

    results = report["results"]
    cases = {(r["shape"], r["dtype"], r["schedule"]) for r in results}
    assert len(cases) == len(bench.QUICK_SHAPES) * len(bench.DTYPES) * len(bench.SCHEDULES)
    assert {r["provider"] for r in results} == set(bench.PROVIDERS)
    expected_ok = TORCH_PROVIDERS + (("fusedclr-cpu",) if ops.extension_available() else ())
    for r in results:
        assert r["status"] in ("ok", "skipped", "error")
        if r["provider"] in expected_ok:
            assert r["status"] == "ok", r
        if r["status"] != "ok":
            assert r["reason"]
            continue
        assert 0 < r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]
        assert r["samples"] >= bench.QUICK.min_samples
        assert r["bytes_per_step"] == r["bytes_per_param"] * r["numel"]
        assert r["gbps"] > 0 and r["pct_copy"] > 0 and r["cpu_s"] >= 0
        assert r["ratio_vs_fused"] > 0
        if r["provider"] == bench.BASELINE:
            assert r["ratio_vs_fused"] == 1.0 and r.get("ratio_q1") is None
        else:  # every ratio comes with its spread
            assert 0 < r["ratio_q1"] <= r["ratio_q3"]
            # The quick cases are small: all providers sample in turns, and each ratio's
            # spread is that of the ratios of samples taken in the same turn.
            assert r["mode"] == "interleaved" and r["ratio_spread_from"] == "turns"
        assert isinstance(r["noisy"], bool)


def test_writes_the_plot(quick_run):
    out, _ = quick_run
    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_bytes_match_the_design_table():
    f32, bf16 = bench.DTYPES["fp32"], bench.DTYPES["bf16"]
    assert bench.bytes_per_param("sgd-plain", f32, f32) == 12
    assert bench.bytes_per_param("sgd", f32, f32) == 20
    assert bench.bytes_per_param("adamw", f32, f32) == 28
    assert bench.bytes_per_param("adam", f32, f32) == 28
    assert bench.bytes_per_param("adamw-amsgrad", f32, f32) == 36
    assert bench.bytes_per_param("adamw", bf16, f32) == 22
    assert bench.bytes_per_param("adamw", bf16, bf16) == 14


def test_model_shape_lists_match_the_architectures():
    resnet, gpt2 = bench.SHAPES["resnet50"], bench.SHAPES["gpt2-small"]
    assert (len(resnet), bench.numel_of(resnet)) == (161, 25_557_032)
    assert (len(gpt2), bench.numel_of(gpt2)) == (148, 124_439_808)


def test_time_limit_stops_starting_cases_and_each_case_is_written_as_it_ends(tmp_path):
    """``--time-limit``: the run ends after the first case (its limit is spent when the second
    would start: the log sleeps past it), lists the rest under ``not_run``, and the report
    went out after the case that ran, which is how ``--json`` is rewritten as a run goes."""
    reports = []
    out = bench.run(device="cpu", optims=["sgd"], shapes=["128x64"], dtypes=["fp32", "bf16"],
                    schedules=["constant"], providers=["torch-foreach"], budget=bench.QUICK,
                    time_limit_s=0.5, on_case=reports.append, log=lambda s: time.sleep(0.6))
    assert len(reports) == 1 and [r["dtype"] for r in reports[0]["results"]] == ["fp32"]
    assert reports[0]["complete"] is False
    assert [(c["dtype"], c["reason"]) for c in reports[0]["not_run"]] == [
        ("bf16", "not reached: the run was still going when this was written")]
    assert [r["dtype"] for r in out["results"]] == ["fp32"] and out["complete"] is False
    assert out["not_run"] == [{"optim": "sgd", "shape": "128x64", "dtype": "bf16", "schedule": "constant",
                               "reason": "--time-limit 0.5 s reached"}]
    assert "Not run (--time-limit 0.5 s reached): sgd 128x64 bf16 constant." in bench.markdown_report(out)
    # A schedule that no case reached gets no (empty) table.
    planned = dict(out, config=dict(out["config"], schedules=["constant", "onecycle"]))
    md = bench.markdown_report(planned)
    assert "**sgd, constant lr**" in md and "OneCycleLR" not in md

    path = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--quick", "--optim", "sgd", "--shapes", "128x64", "--dtypes", "fp32",
                       "--schedules", "constant", "--providers", "torch-foreach", "--seconds", "0.05",
                       "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    assert written["config"]["budget"]["max_time_s"] == 0.05 and written["not_run"] == []
    assert written["complete"] is True
    assert not (tmp_path / "b.json.tmp").exists()


@pytest.mark.parametrize("flag", ["--seconds", "--time-limit"])
@pytest.mark.parametrize("value", ["0", "-1", "inf", "soon"])
def test_time_flags_reject_non_positive_values(flag, value, capsys):
    with pytest.raises(SystemExit):
        bench.parser().parse_args([flag, value])
    assert flag in capsys.readouterr().err


def test_cases_run_dtype_then_schedule_then_shape():
    """A run cut short has the fp32 rows of every shape (constant lr, then OneCycleLR) first."""
    out = bench.run(device="cpu", optims=["sgd"], shapes=["4x256K", "128x64"], dtypes=["fp32", "bf16"],
                    schedules=["constant", "onecycle"], providers=["torch-foreach"], budget=bench.QUICK,
                    log=lambda s: None)
    assert [(r["dtype"], r["schedule"], r["shape"]) for r in out["results"]] == [
        ("fp32", "constant", "4x256K"), ("fp32", "constant", "128x64"),
        ("fp32", "onecycle", "4x256K"), ("fp32", "onecycle", "128x64"),
        ("bf16", "constant", "4x256K"), ("bf16", "constant", "128x64"),
        ("bf16", "onecycle", "4x256K"), ("bf16", "onecycle", "128x64")]


def test_launch_counts_skip_cpu_and_user_annotations():
    """count_launches is GPU-only, and the profiler's ``Optimizer.step#...`` annotations,
    device-side events in recent torch, are not launches (method or attribute form)."""
    assert bench.count_launches(lambda: None, "cpu") is None

    class Method:
        def __init__(self, flag):
            self.flag = flag

        def is_user_annotation(self):
            return self.flag

    class Attribute:
        def __init__(self, flag):
            self.is_user_annotation = flag

    assert bench._is_user_annotation(Method(True)) and bench._is_user_annotation(Attribute(True))
    assert not bench._is_user_annotation(Method(False)) and not bench._is_user_annotation(Attribute(False))
    assert not bench._is_user_annotation(object())


def test_a_case_whose_every_provider_is_skipped_prints_its_reasons(capsys):
    """``--providers fusedclr-cuda`` on a CPU: nothing runs, and the table says why (it used to raise)."""
    assert bench.main(["--device", "cpu", "--quick", "--optim", "sgd", "--shapes", "128x64", "--dtypes", "fp32",
                       "--schedules", "constant", "--providers", "fusedclr-cuda"]) == 0
    out = capsys.readouterr().out
    assert "fusedclr-cuda  skipped: runs on cuda only" in out


def test_quick_never_compiles_unless_a_compile_timeout_is_given(capsys):
    argv = ["--device", "cpu", "--quick", "--optim", "sgd", "--shapes", "128x64", "--dtypes", "fp32",
            "--schedules", "constant", "--providers", "torch-compile"]
    assert bench.main(argv) == 0
    assert "torch-compile  skipped: not compiled (--quick" in capsys.readouterr().out
    assert bench.parser().parse_args(argv + ["--compile-timeout", "5"]).compile_timeout == 5


def test_every_option_has_help():
    for action in bench.parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


# --------------------------------------------------------------------------
# Noisy machines: the thread check and the ratios' spread
# --------------------------------------------------------------------------


def _timing(*ms):
    return bench.Timing([m / 1e3 for m in ms], [m / 1e3 for m in ms], 1)


def test_ratio_quartiles_are_those_of_the_per_round_ratios():
    base = [2.0, 2.0, 2.0, 2.0, 2.0]
    other = [1.0, 2.0, 0.5, 1.0, 4.0]  # ratios 2, 1, 4, 2, 0.5
    assert bench.ratio_quartiles(base, other) == (1.0, 2.0)
    assert bench.ratio_quartiles([3.0], [1.5]) == (2.0, 2.0)


def test_judge_calls_steady_threads_steady():
    v = steadiness.judge(_timing(4, 4.1, 4.2, 4.1, 4.0), _timing(2.2, 2.1, 2.3, 2.2, 2.2), 2)
    assert v["steady"] and v["prefer"] == 2 and v["reasons"] == []
    assert steadiness.describe(v, asked=False) is None


def test_judge_prefers_one_thread_when_more_are_slower_or_noisy():
    slower = steadiness.judge(_timing(4, 4.1, 4.2, 4.1, 4.0), _timing(100, 101, 99, 102, 100), 2)
    assert not slower["steady"] and slower["prefer"] == 1
    assert slower["reasons"] == ["2 threads were 24.4x slower than 1 (100 vs 4.1 ms per step)"]
    assert "measuring at 1 thread" in steadiness.describe(slower, asked=False)
    assert "measuring at 2 threads as asked" in steadiness.describe(slower, asked=True)
    noisy = steadiness.judge(_timing(4, 4.1, 4.2, 4.1, 4.0), _timing(2, 2.1, 9, 2.2, 2.1), 2)
    assert not noisy["steady"] and noisy["prefer"] == 1 and "max 4.5x min" in noisy["reasons"][0]


def test_judge_keeps_the_threads_when_one_thread_is_noisy_too():
    v = steadiness.judge(_timing(4, 4.1, 20, 4.1, 4.0), _timing(2, 2.1, 9, 2.2, 2.1), 2)
    assert not v["steady"] and v["one_thread_noisy"] and v["prefer"] == 2
    assert "this machine is busy" in steadiness.describe(v, asked=False)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_bench_measures_at_one_thread_when_the_check_finds_two_unsteady(monkeypatch, capsys, tmp_path, two_threads):
    unsteady = steadiness.judge(_timing(4, 4.1, 4.2, 4.1, 4.0), _timing(100, 101, 99, 102, 100), 2)
    monkeypatch.setattr(bench_cli, "check_threads", lambda n: unsteady)
    argv = ["--device", "cpu", "--quick", "--optim", "sgd", "--shapes", "128x64", "--dtypes", "fp32",
            "--schedules", "constant", "--providers", "torch-fused,torch-foreach",
            "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")]
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.startswith("note: torch at 2 threads is unsteady on this machine now")
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["thread_check"]["used"] == 1
    assert "Thread check: torch at 2 threads was unsteady here" in (tmp_path / "b.md").read_text()
    # Asked for by name, 2 threads are used, with the warning.
    torch.set_num_threads(2)
    assert bench.main(argv + ["--threads", "2"]) == 0
    assert "measuring at 2 threads as asked" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["torch_threads"] == 2


def test_the_table_flags_a_noisy_case():
    row = {"optim": "sgd", "shape": "128x64", "tensors": 128, "numel": 8192, "dtype": "fp32",
           "schedule": "constant", "status": "ok", "median_s": 1e-3, "iqr_rel": 0.1, "min_s": 9e-4,
           "max_s": 2e-3, "gbps": 1.0, "pct_copy": 1.0, "cpu_s": 1e-3, "copy_gbps": 100.0}
    steady = [dict(row, provider="torch-fused", ratio_vs_fused=1.0, noisy=False),
              dict(row, provider="fusedclr-cpu", ratio_vs_fused=2.0, ratio_q1=1.9, ratio_q3=2.1, noisy=False)]
    table = bench.format_table(steady, "cpu")
    assert "1.90-2.10x" in table and "noisy" not in table
    noisy = [steady[0], dict(steady[1], ratio_q1=0.9, ratio_q3=6.0, noisy=True)]
    assert "  noisy: fusedclr-cpu (a wide IQR" in bench.format_table(noisy, "cpu")
