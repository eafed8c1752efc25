"""CI smoke test of ``fusedclr bench --quick``: it runs and writes its report and plot.

It asserts that the benchmark works, never how fast anything is (CI machines
are shared and noisy; the timings are for people, see docs/benchmarks.md):
every optimizer's rows run, and a provider that does not step (or steps to
other parameters than torch) is caught, not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import torch
from conftest import interrupt_on_call

from fusedclr import bench, ops
from fusedclr.bench import check as bench_check
from fusedclr.bench import cli as bench_cli
from fusedclr.bench import iteration, steadiness
from fusedclr.bench import providers as bench_providers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TORCH_PROVIDERS = ("torch-forloop", "torch-foreach", "torch-fused")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Where deepspeed is installed the quick run times its CPU Adam too: load (on first use,
    # build: minutes) its op here, so that the run's timeout does not count a build.
    bench.unavailable("deepspeed-cpu-adam", bench.Case("adamw", "128x64", "fp32", "constant"))
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
        assert r["baseline"] == bench.BASELINE  # AdamW: torch has a fused step
        if r["provider"] == bench.BASELINE:
            assert r["ratio_vs_fused"] == 1.0 and r.get("ratio_q1") is None
        else:  # every ratio comes with its spread
            assert 0 < r["ratio_q1"] <= r["ratio_q3"]
            # The quick cases are small: all providers sample in turns, and each ratio's
            # spread is that of the ratios of samples taken in the same turn.
            assert r["mode"] == "interleaved" and r["ratio_spread_from"] == "turns"
            # ... and the ratio shown is those rounds' median, inside its own bracket.
            assert r["ratio_q1"] <= r["ratio_vs_fused"] <= r["ratio_q3"]
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


def test_bytes_of_the_new_optimizers_follow_their_state_counts():
    """2 p + g + 2 s x states; Lookahead adds (2 p + 2 s) / k for its slow weights every k steps."""
    f32, bf16 = bench.DTYPES["fp32"], bench.DTYPES["bf16"]
    expected = {"rmsprop": 20, "adagrad": 20, "radam": 28, "nadam": 28, "lion": 20, "lookahead": 28 + 16 / 5}
    for optim, fp32_bytes in expected.items():
        assert bench.bytes_per_param(optim, f32, f32) == pytest.approx(fp32_bytes), optim
        assert bench.BYTES_TABLE[optim]["fp32"] == pytest.approx(fp32_bytes)
    assert bench.bytes_per_param("lion", bf16, f32) == 14 and bench.bytes_per_param("lion", bf16, bf16) == 10
    assert bench.bytes_per_param("lookahead", bf16, f32) == pytest.approx(22 + 12 / 5)
    assert bench.BYTES_TABLE["lookahead"]["states"] == 3 and bench.BYTES_TABLE["adagrad"]["states"] == 1
    for optim, row in bench.BYTES_TABLE.items():
        spec = bench.OPTIMS[optim]
        assert row["states"] == spec.states + (spec.lookahead is not None)


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


# --------------------------------------------------------------------------
# The new optimizers' rows, and the check that catches a provider that does not step
# --------------------------------------------------------------------------

needs_extension = pytest.mark.skipif(not ops.extension_available(), reason="fusedclr's C++ extension is not built")

# The torch providers each optimizer has on a CPU (the others are skipped with a reason).
TORCH_ON_CPU = {
    "rmsprop": ("torch-forloop", "torch-foreach"),
    "adagrad": ("torch-forloop", "torch-foreach", "torch-fused"),
    "radam": ("torch-forloop", "torch-foreach"),
    "nadam": ("torch-forloop", "torch-foreach"),
    "lion": ("torch-foreach",),  # the bench's foreach Lion
    "lookahead": ("torch-forloop", "torch-foreach", "torch-fused"),  # torch AdamW + foreach sync
}
NEW_OPTIMS = list(TORCH_ON_CPU)
ALL_CPU = [*TORCH_PROVIDERS, "fusedclr-cpu"]


def test_optimizer_is_an_alias_of_optim():
    assert bench.parser().parse_args(["--optimizer", "lion,lookahead"]).optim == ["lion", "lookahead"]
    assert bench.parser().parse_args(["--optim", "radam"]).optim == ["radam"]
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--optimizer", "adamax"])


@needs_extension
@pytest.mark.parametrize("optim", NEW_OPTIMS)
def test_new_optimizer_step_rows(optim):
    out = bench.run(device="cpu", optims=[optim], shapes=["128x64"], dtypes=["fp32"],
                    schedules=["constant", "onecycle"], providers=ALL_CPU, budget=bench.QUICK, log=lambda s: None)
    expected_base = "torch-fused" if "torch-fused" in TORCH_ON_CPU[optim] else "torch-foreach"
    assert out["config"]["baselines"] == {optim: expected_base}
    assert len(out["results"]) == 2 * len(ALL_CPU)
    for r in out["results"]:
        assert r["optim"] == optim and r["baseline"] == expected_base
        if r["provider"] not in (*TORCH_ON_CPU[optim], "fusedclr-cpu"):
            assert r["status"] == "skipped" and r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["mode"] == "interleaved"
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["bytes_per_param"] == pytest.approx(bench.bytes_per_param(optim, torch.float32, torch.float32))
        assert r["gbps"] > 0 and r["ratio_vs_fused"] > 0
        if r["provider"] == expected_base:
            assert r["ratio_vs_fused"] == 1.0
        else:
            assert 0 < r["ratio_q1"] <= r["ratio_q3"]
        if r["provider"] == "fusedclr-cpu":
            assert set(r["vs_torch"]) == set(TORCH_ON_CPU[optim])
            for v in r["vs_torch"].values():
                assert 0 < v["min"] <= v["q1"] <= v["ratio"] <= v["q3"] <= v["max"] and v["rounds"] >= 3
    md = bench.markdown_report(out)
    assert f"**{optim}, constant lr**" in md and "fusedclr against each torch implementation" in md
    assert f"| {optim} | 128x64 | fp32 | onecycle |" in md
    table = bench.format_table([r for r in out["results"] if r["schedule"] == "constant"], "cpu")
    assert f"x {expected_base.removeprefix('torch-')}" in table


@needs_extension
@pytest.mark.parametrize("optim", NEW_OPTIMS)
def test_new_optimizer_iteration_rows(optim):
    report = iteration.run("cpu", ["128x64"], ["128x64"], 2, 1, None, lambda s: None, optim,
                           list(iteration.ALL_PROVIDERS), warmup=3)
    assert report["optimizer"] == optim
    assert report["providers"] == [*TORCH_ON_CPU[optim], "fusedclr"]
    # DeepSpeed's CPU Adam is Adam/AdamW only (tests/test_bench_deepspeed_cpu_adam.py).
    assert set(report["left_out"]) == set(TORCH_PROVIDERS) - set(TORCH_ON_CPU[optim]) | {"deepspeed-cpu-adam"}
    for kind in ("iteration", "step_replaced_grads"):
        r = report[kind]["128x64"]
        assert r["numel"] == 128 * 64 and set(r["ms"]) == set(report["providers"])
        assert set(r["ratios"]) == set(TORCH_ON_CPU[optim])
        assert all(v["q1"] <= v["q3"] and v["ratio"] > 0 for v in r["ratios"].values())
        assert r["ratio"] == r["ratios"][report["baseline"]]["ratio"]
        # 5 iterations from the same seeded start: everyone moved, and to the same place.
        assert r["check"]["ok"], r["check"]
        assert all(v["moved"] > 0 for v in r["check"]["providers"].values())
    md = iteration.markdown(report)
    assert md.count("\n") == 3 and "fusedclr." in md


def test_iteration_cli_takes_an_optimizer(tmp_path, capsys):
    if not ops.extension_available():
        pytest.skip("fusedclr's C++ extension is not built")
    path = tmp_path / "it.json"
    assert iteration.main(["--device", "cpu", "--optimizer", "lion", "--providers", "all", "--workloads", "128x64",
                           "--steps", "none", "--rounds", "2", "--inner", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["providers"] == ["torch-foreach", "fusedclr"] and report["baseline"] == "torch-foreach"
    assert report["date"] and "git_commit" in report and "loadavg_before" in report and "loadavg_after" in report
    assert "bench foreach Lion" in capsys.readouterr().out
    assert report["complete"] is True
    with pytest.raises(SystemExit):
        iteration.main(["--providers", "torch-fused"])  # fusedclr must be one of them


def test_iteration_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten after every workload: a run stopped in the second (a CI time limit)
    leaves the first one's row, marked incomplete."""
    if not ops.extension_available():
        pytest.skip("fusedclr's C++ extension is not built")
    monkeypatch.setattr(iteration, "compare", interrupt_on_call(iteration.compare, 2))
    path = tmp_path / "sub" / "it.json"
    with pytest.raises(KeyboardInterrupt):
        iteration.main(["--device", "cpu", "--workloads", "128x64,10000x64", "--steps", "none", "--rounds", "2",
                        "--inner", "1", "--warmup", "0", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["complete"] is False and list(report["iteration"]) == ["128x64"]
    assert report["iteration"]["128x64"]["ms"]["fusedclr"] > 0


@pytest.fixture
def fresh_checks(monkeypatch):
    """No provider check or probe remembered from other tests."""
    monkeypatch.setattr(bench_check, "_CHECKED", {})
    monkeypatch.setattr(bench_providers, "_PROBED", {})


def _fake_provider(monkeypatch, build):
    """Replaces fusedclr-cpu by ``build`` (it runs on a CPU and is probed like the real one)."""
    monkeypatch.setitem(bench.PROVIDERS, "fusedclr-cpu",
                        bench.Provider("fusedclr-cpu", "a fake under test", build, ("cpu",)))


def test_a_provider_that_does_not_step_is_caught_and_not_timed(monkeypatch, fresh_checks):
    def build_noop(params, case):
        opt = torch.optim.SGD(params, lr=0.0)
        return bench.Stepper(opt, None, case.torch_dtype, lambda: None)

    _fake_provider(monkeypatch, build_noop)
    out = bench.run(device="cpu", optims=["adamw"], shapes=["128x64"], dtypes=["fp32"], schedules=["constant"],
                    providers=["torch-foreach", "torch-fused", "fusedclr-cpu"], budget=bench.QUICK,
                    log=lambda s: None)
    rows = {r["provider"]: r for r in out["results"]}
    assert rows["torch-fused"]["status"] == rows["torch-foreach"]["status"] == "ok"
    assert rows["fusedclr-cpu"]["status"] == "error"
    assert "did not change the parameters" in rows["fusedclr-cpu"]["reason"]
    assert "median_s" not in rows["fusedclr-cpu"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_provider_that_steps_to_other_parameters_is_caught(monkeypatch, fresh_checks, dtype):
    """torch's AdamW with twice the lr steps, but not where torch's AdamW goes."""
    def build_wrong(params, case):
        opt = torch.optim.AdamW(params, lr=2 * bench.OPTIMS["adamw"].lr, weight_decay=1e-2)
        return bench.Stepper(opt, None, case.torch_dtype, opt.step)

    _fake_provider(monkeypatch, build_wrong)
    case = bench.Case("adamw", "4x256K", dtype, "constant")
    reasons = bench.wrong(case, ["torch-forloop", "torch-fused", "fusedclr-cpu"])
    assert list(reasons) == ["fusedclr-cpu"]
    assert "differ from torch-forloop's" in reasons["fusedclr-cpu"]


def test_a_bf16_provider_that_does_not_step_in_bf16_is_caught(monkeypatch, fresh_checks):
    def build_fp32_only(params, case):
        opt = torch.optim.AdamW(params, lr=bench.OPTIMS["adamw"].lr, weight_decay=1e-2)
        step = opt.step if case.torch_dtype == torch.float32 else (lambda: None)
        return bench.Stepper(opt, None, case.torch_dtype, step)

    _fake_provider(monkeypatch, build_fp32_only)
    reasons = bench.wrong(bench.Case("adamw", "128x64", "bf16", "constant"), ["torch-foreach", "fusedclr-cpu"])
    assert list(reasons) == ["fusedclr-cpu"] and "(128x64 bf16)" in reasons["fusedclr-cpu"]


@needs_extension
@pytest.mark.parametrize("optim", [*NEW_OPTIMS, "adamw", "sgd"])
def test_every_provider_agrees_with_torch(optim, fresh_checks):
    for schedule in bench.SCHEDULES:
        assert bench.wrong(bench.Case(optim, "128x64", "fp32", schedule), ALL_CPU) == {}


def test_the_iteration_check_catches_a_provider_that_did_not_move():
    start = [torch.zeros(4)]

    def fn(values):
        f = lambda: None  # noqa: E731
        f.params = [torch.tensor(values)]
        return f

    good = iteration._check({"torch-fused": fn([1.0, 0, 0, 0]), "fusedclr": fn([1.0, 0, 0, 0])}, start)
    assert good["ok"] and good["reference"] == "torch-fused"
    still = iteration._check({"torch-fused": fn([1.0, 0, 0, 0]), "fusedclr": fn([0.0, 0, 0, 0])}, start)
    assert not still["ok"] and not still["providers"]["fusedclr"]["ok"]
    elsewhere = iteration._check({"torch-fused": fn([1.0, 0, 0, 0]), "fusedclr": fn([1.0, 0.5, 0, 0])}, start)
    assert not elsewhere["ok"]


def test_foreach_lion_is_the_papers_update():
    torch.manual_seed(0)
    p0, g = torch.randn(100), torch.randn(100)
    p = torch.nn.Parameter(p0.clone())
    p.grad = g.clone()
    lr, (b1, b2), wd = 1e-2, (0.9, 0.99), 0.1
    opt = bench.ForeachLion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    opt.step()
    opt.step()
    m1 = (1 - b2) * g
    p1 = p0 * (1 - lr * wd) - lr * torch.sign((1 - b1) * g)
    p2 = p1 * (1 - lr * wd) - lr * torch.sign(b1 * m1 + (1 - b1) * g)
    torch.testing.assert_close(p.detach(), p2)
    torch.testing.assert_close(opt.state[p]["exp_avg"], b2 * m1 + (1 - b2) * g)


def test_foreach_lookahead_syncs_every_k_steps():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), -1.0)
    la = bench.ForeachLookahead(torch.optim.SGD([p], lr=1.0), k=2, alpha=0.5)
    la.step()
    assert torch.equal(p.detach(), torch.full((3,), 1.0))  # fast weights only
    la.step()
    assert torch.equal(p.detach(), torch.full((3,), 1.0))  # at 2: slow 0 + 0.5 (2 - 0) = 1, fast = slow
    la.step()
    la.step()
    assert torch.equal(p.detach(), torch.full((3,), 2.0))  # slow 1 + 0.5 (3 - 1)
    assert la.param_groups is la.optimizer.param_groups
