"""The ``deepspeed-cpu-adam`` provider of both benchmarks (``fusedclr/bench/deepspeed_cpu_adam.py``).

Without deepspeed (CI does not install it), the provider must still be listed
and left out with its reason; those tests fake deepspeed's absence, or a
failed build of its op, so they run everywhere. With deepspeed, a short run
of the provider must end where torch's AdamW (Adam) ends, and both benchmarks
must time it and give fusedclr a ratio against it.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import TOL

from fusedclr import bench, ops
from fusedclr.bench import deepspeed_cpu_adam, iteration
from fusedclr.bench import check as bench_check
from fusedclr.bench import providers as bench_providers

NAME = deepspeed_cpu_adam.NAME
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason=f"deepspeed is not installed (CI does not install it; docs/benchmarks.md: {deepspeed_cpu_adam.INSTALL})")
needs_extension = pytest.mark.skipif(not ops.extension_available(), reason="fusedclr's C++ extension is not built")


@pytest.fixture
def fresh_probes(monkeypatch):
    """No provider probe or check remembered from other tests."""
    monkeypatch.setattr(bench_providers, "_PROBED", {})
    monkeypatch.setattr(bench_check, "_CHECKED", {})


@pytest.fixture
def no_deepspeed(monkeypatch, fresh_probes):
    """``import deepspeed`` fails as it does where deepspeed is not installed (a None in
    sys.modules halts the import, even when the real one was imported before)."""
    for module in ("deepspeed", "deepspeed.ops", "deepspeed.ops.adam"):
        monkeypatch.setitem(sys.modules, module, None)


def _case(optim="adamw", dtype="fp32", schedule="constant", device="cpu"):
    return bench.Case(optim, "128x64", dtype, schedule, device)


# --------------------------------------------------------------------------
# Listed everywhere; left out, with the reason, where it cannot run
# --------------------------------------------------------------------------


def test_it_is_a_provider_of_both_benchmarks():
    assert NAME in bench.PROVIDERS and bench.PROVIDERS[NAME].devices == ("cpu",)
    assert NAME in bench.COMPARED_PROVIDERS
    assert bench.parser().parse_args(["--providers", f"torch-fused,{NAME}"]).providers == ["torch-fused", NAME]
    assert NAME in iteration.ALL_PROVIDERS  # so in --providers all


def test_without_deepspeed_it_is_left_out_with_the_install_command(no_deepspeed):
    reason = bench.unavailable(NAME, _case())
    assert reason.startswith("ImportError: deepspeed is not importable")
    assert deepspeed_cpu_adam.INSTALL in reason
    assert deepspeed_cpu_adam.version() is None
    names, left_out = iteration.providers_for("adamw", "cpu", iteration.ALL_PROVIDERS)
    assert NAME not in names and left_out[NAME] == reason


@pytest.mark.parametrize("optim", ["sgd", "adamw-amsgrad", "lookahead", "lion", "rmsprop"])
def test_it_is_left_out_for_anything_but_adam_and_adamw(optim, fresh_probes):
    reason = bench.unavailable(NAME, _case(optim))
    assert reason == f"DeepSpeedCPUAdam is Adam or AdamW only (no amsgrad, no Lookahead), not {optim}"
    assert iteration.providers_for(optim, "cpu", [NAME, "fusedclr"])[1] == {NAME: reason}


def test_it_is_left_out_on_a_gpu(fresh_probes):
    assert bench.unavailable(NAME, _case(device="cuda")) == "runs on cpu only"
    assert iteration.providers_for("adamw", "cuda", [NAME, "fusedclr"])[1] == {NAME: "runs on cpu only"}


class _UnbuiltCPUAdam(torch.optim.Optimizer):
    """Raises what DeepSpeedCPUAdam raises when its cpu_adam op does not build."""

    def __init__(self, params, **kwargs):
        try:
            raise RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped: subcommand failed.")
        except RuntimeError as e:
            raise RuntimeError("DeepSpeedCPUAdam requires the cpu_adam op, which failed to build/load.") from e


def test_a_failed_build_is_a_reason_not_a_crash(monkeypatch, fresh_probes):
    monkeypatch.setattr(deepspeed_cpu_adam, "_cpu_adam_class", lambda: _UnbuiltCPUAdam)
    reason = bench.unavailable(NAME, _case())
    assert reason.startswith("RuntimeError: DeepSpeed's cpu_adam op did not build or load here "
                             "(RuntimeError: Error building extension 'cpu_adam')"), reason
    out = bench.run(device="cpu", optims=["adamw"], shapes=["128x64"], dtypes=["fp32"], schedules=["constant"],
                    providers=["torch-foreach", NAME], budget=bench.QUICK, log=lambda s: None)
    rows = {r["provider"]: r for r in out["results"]}
    assert rows["torch-foreach"]["status"] == "ok"
    assert rows[NAME]["status"] == "skipped" and rows[NAME]["reason"] == reason
    assert iteration.providers_for("adamw", "cpu", iteration.ALL_PROVIDERS)[1] == {NAME: reason}


def test_the_step_bench_reports_it_skipped_without_deepspeed(no_deepspeed, tmp_path, capsys):
    path = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--quick", "--shapes", "128x64", "--dtypes", "fp32", "--schedules",
                       "constant", "--providers", f"torch-foreach,{NAME}", "--json", str(path)]) == 0
    assert f"{NAME}  skipped: ImportError: deepspeed is not importable" in capsys.readouterr().out
    row = next(r for r in json.loads(path.read_text())["results"] if r["provider"] == NAME)
    assert row["status"] == "skipped" and deepspeed_cpu_adam.INSTALL in row["reason"]


@needs_extension
def test_the_iteration_bench_prints_and_records_it_left_out_without_deepspeed(no_deepspeed, tmp_path, capsys):
    path = tmp_path / "it.json"
    assert iteration.main(["--device", "cpu", "--providers", "all", "--workloads", "none", "--steps", "128x64",
                           "--rounds", "2", "--inner", "1", "--warmup", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert NAME not in report["providers"] and "deepspeed" not in report
    assert report["left_out"][NAME].startswith("ImportError: deepspeed is not importable")
    assert f"  {NAME}: left out (ImportError: deepspeed is not importable" in capsys.readouterr().err


# --------------------------------------------------------------------------
# With deepspeed: it steps where torch steps, and both benchmarks time it
# --------------------------------------------------------------------------

# Ragged sizes: the tails past DeepSpeed's SIMD blocks take its scalar path.
SHAPES = [(3 * 64 + 17,), (33, 7), (5,)]
STEPS = 7


def _run(provider, case, dtype):
    """``STEPS`` steps of ``provider`` on seeded parameters in ``dtype``, new random gradients
    every step (constant ones would hide wrong betas: Adam's step is then lr x sign(g))."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(s, dtype=torch.float64).uniform_(-1, 1, generator=gen).to(dtype))
              for s in SHAPES]
    stepper = bench.PROVIDERS[provider].build(params, case)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.empty(p.shape, dtype=torch.float64).uniform_(-1e-2, 1e-2, generator=gen).to(dtype)
        stepper.step()
    return [p.detach() for p in params], stepper.optimizer


def _max_error(got, want):
    return max(float((g.double() - w.double()).abs().max()) for g, w in zip(got, want))


# DeepSpeed forms 1 - beta2 in float32 from beta2 rounded to float32 (0.999 -> 0.99900001287), which
# is 1.3e-5 (relative) off torch's 1 - 0.999; the second moments carry that factor.
BETA2_ROUNDING = abs((1 - torch.tensor(0.999).item()) - (1 - 0.999)) / (1 - 0.999)


@needs_deepspeed
@pytest.mark.parametrize("schedule", bench.SCHEDULES)
@pytest.mark.parametrize("optim", ["adamw", "adam"])
def test_it_ends_where_torch_ends(optim, schedule, fresh_probes):
    """The provider against torch's for-loop step, both in fp32, and a float64 run of torch's.

    Its parameters are no further from the float64 run than twice torch's own fp32 error
    (measured over 20 seeds: at most 1.29x; DeepSpeed's decoupled decay is a fused
    multiply-add, torch's a multiply by 1 - lr x wd rounded to fp32, so its AdamW error is
    often the smaller). OneCycleLR changes lr and beta1 every step: a provider that did not
    read them from its param groups would end far off.
    """
    case = _case(optim, schedule=schedule)
    want, torch_opt = _run("torch-forloop", case, torch.float32)
    exact, _ = _run("torch-forloop", case, torch.float64)
    got, ds_opt = _run(NAME, case, torch.float32)
    torch_error, ds_error = _max_error(want, exact), _max_error(got, exact)
    assert 0 < ds_error <= 2 * torch_error, (ds_error, torch_error)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])
    for p_ds, p_torch in zip(ds_opt.param_groups[0]["params"], torch_opt.param_groups[0]["params"]):
        mine, theirs = ds_opt.state[p_ds], torch_opt.state[p_torch]
        assert mine["step"] == STEPS
        torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"], **TOL[torch.float32])
        rtol = 2 * BETA2_ROUNDING + TOL[torch.float32]["rtol"]
        torch.testing.assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"], rtol=rtol, atol=0.0)


@needs_deepspeed
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_pre_timing_check_passes_it(dtype, fresh_probes):
    for optim in ("adamw", "adam"):
        for schedule in bench.SCHEDULES:
            assert bench.unavailable(NAME, _case(optim, dtype, schedule)) is None
            assert bench.wrong(_case(optim, dtype, schedule), ["torch-forloop", NAME]) == {}


@needs_deepspeed
@needs_extension
def test_the_step_bench_times_it_and_gives_fusedclr_a_ratio_against_it(fresh_probes):
    out = bench.run(device="cpu", optims=["adamw"], shapes=["128x64"], dtypes=["bf16"], schedules=["onecycle"],
                    providers=["torch-fused", NAME, "fusedclr-cpu"], budget=bench.QUICK, log=lambda s: None)
    rows = {r["provider"]: r for r in out["results"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    ds = rows[NAME]
    assert ds["note"] == f"deepspeed {deepspeed_cpu_adam.version()}" and ds["state_dtype"] == "float32"
    assert ds["bytes_per_param"] == 22  # bf16 parameters and gradients, fp32 moments
    assert ds["ratio_vs_fused"] > 0 and 0 < ds["ratio_q1"] <= ds["ratio_q3"]
    vs = rows["fusedclr-cpu"]["vs_torch"]
    assert set(vs) == {"torch-fused", NAME} and vs[NAME]["ratio"] > 0
    assert f"| vs torch-fused | vs {NAME} |" in bench.markdown_vs_torch(out)


@needs_deepspeed
@needs_extension
def test_the_iteration_bench_times_and_checks_it(fresh_probes):
    report = iteration.run("cpu", ["128x64"], ["128x64"], 2, 1, None, lambda s: None, "adam",
                           ["torch-fused", NAME, "fusedclr"], warmup=3)
    assert report["providers"] == ["torch-fused", NAME, "fusedclr"] and report["left_out"] == {}
    assert report["deepspeed"] == deepspeed_cpu_adam.version()
    for kind in ("iteration", "step_replaced_grads"):
        r = report[kind]["128x64"]
        assert set(r["ratios"]) == {"torch-fused", NAME} and r["ratio"] == r["ratios"]["torch-fused"]["ratio"]
        assert r["check"]["ok"] and r["check"]["providers"][NAME]["moved"] > 0, r["check"]
    assert "DeepSpeedCPUAdam(adamw_mode=False)" in iteration.markdown(report)
