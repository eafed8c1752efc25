"""Every schedule evaluator against one golden table of torch's own values.

tests/golden_schedules.json (written by scripts/make_golden_schedules.py) holds, for
every schedule family fusedclr evaluates in-kernel, the lr and momentum / beta1 that
torch.optim.lr_scheduler's own classes give at each step, and the descriptor fusedclr
builds for the same schedule. Each evaluator is judged against torch's values, not
against another copy of the evaluator, so a mistake the copies share still shows:

* C++ ``fusedclr::sched::evaluate`` (``torch.ops.fusedclr.schedule_eval``), which the
  CPU kernels use;
* the CUDA kernel's evaluation, compiled as host C++ (conftest.py's ``emulated``);
* ``fusedclr.reference.schedule_value``, which the schedulers' host values use;
* the schedulers' host side: ``get_last_lr()``, ``group["lr"]`` and the momentum a
  fusedclr.lr_scheduler class writes, on a fusedclr optimizer (kernel mode) and on a
  torch one (host mode);
* Triton's evaluator: tests/test_triton.py (it needs an interpreter process of its
  own), on the helpers below.

The section at the end checks that the descriptor's layout constants, which C++
(schedule.h) necessarily restates, are the ones reference.py defines and the rest of
the Python code imports.

An evaluator gets (descriptor, step) and answers an lr and a momentum, or "the group's"
for either (``has_lr`` / ``has_momentum`` false, ``None`` in the reference). The
group's value is what the previous step left in the group, which is torch's value at
the previous step (the group's own value before the first step and at every
``epochs`` step, each from a fresh scheduler), so a schedule that leaves a value to
the group is right exactly when torch did not move it either.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import requires_extension

import fusedclr
from fusedclr import lr_scheduler as FS
from fusedclr import reference

ROOT = Path(__file__).resolve().parents[1]
TABLE = json.loads((ROOT / "tests" / "golden_schedules.json").read_text())
CASES = TABLE["cases"]
IDS = [c["id"] for c in CASES]

# Relative tolerance for every evaluator against torch: a few ulp of float64, plus
# what torch's own recursive ("chainable") updates drift from the closed forms the
# evaluators compute. The widest of those, measured with torch 2.14.1, is
# CosineAnnealingLR's update over 5 periods (case "cosine", 200 steps): 3.5e-14 (~160
# ulp); every other case is within 4.2e-15 (~20 ulp). No value is 0 where an
# evaluator's is not, so there is no absolute term.
RTOL = 1e-13


def _generator():
    """scripts/make_golden_schedules.py as a module: the cases' recipes and builders."""
    path = ROOT / "scripts" / "make_golden_schedules.py"
    spec = importlib.util.spec_from_file_location("make_golden_schedules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def group_values(case: dict, group: dict) -> tuple[list[float], list[float]]:
    """Per step, the group's (lr, momentum) an evaluator falls back to (see the module notes)."""
    n = len(case["steps"])
    lr0, mom0 = group["hyper"]
    if "stepped" in case:
        return [lr0, *group["lr"][: n - 1]], [mom0, *group["momentum"][: n - 1]]
    return [lr0] * n, [mom0] * n


def resolve(value: float | None, has: bool, fallback: float) -> float:
    return value if has else fallback


def check(who: str, case: dict, gi: int, what: str, got: list[float]) -> None:
    """``got`` (one value per step) against torch's ``what`` ("lr" / "momentum") of group ``gi``."""
    want = case["groups"][gi][what]
    assert len(got) == len(want)
    bad = [(t, g, w) for t, g, w in zip(case["steps"], got, want) if not (g == w or abs(g - w) <= RTOL * abs(w))]
    if bad:
        shown = "; ".join(f"step {t}: {g!r}, torch {w!r} (rel {abs(g - w) / abs(w) if w else math.inf:.2e})"
                          for t, g, w in bad[:4])
        pytest.fail(f"{who}, case {case['id']}, group {gi}: {what} differs from torch.optim.lr_scheduler's at "
                    f"{len(bad)} of {len(want)} steps: {shown}")


def check_op(who: str, case: dict, op) -> None:
    """An op with ``fusedclr::schedule_eval``'s signature: ``[lr, momentum, has_lr, has_momentum]``."""
    steps = case["steps"]
    for gi, group in enumerate(case["groups"]):
        d = torch.tensor(group["descriptor"], dtype=torch.float64)
        fb_lr, fb_mom = group_values(case, group)
        outs = [op(d, torch.tensor(t, dtype=torch.int64)).tolist() for t in steps]
        check(who, case, gi, "lr", [resolve(o[0], o[2], f) for o, f in zip(outs, fb_lr)])
        check(who, case, gi, "momentum", [resolve(o[1], o[3], f) for o, f in zip(outs, fb_mom)])


# --------------------------------------------------------------------------
# The descriptor evaluators
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_evaluator(case):
    for gi, group in enumerate(case["groups"]):
        fb_lr, fb_mom = group_values(case, group)
        values = [reference.schedule_value(group["descriptor"], t) for t in case["steps"]]
        check("reference.schedule_value", case, gi, "lr",
              [resolve(lr, lr is not None, f) for (lr, _), f in zip(values, fb_lr)])
        check("reference.schedule_value", case, gi, "momentum",
              [resolve(m, m is not None, f) for (_, m), f in zip(values, fb_mom)])


@requires_extension()
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpp_evaluator(case):
    check_op("C++ fusedclr::schedule_eval", case, torch.ops.fusedclr.schedule_eval)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_evaluator_under_host_emulation(case, emulated):
    check_op("CUDA schedule_eval_kernel (host emulation)", case, emulated.schedule_eval)


# --------------------------------------------------------------------------
# The schedulers' host values
# --------------------------------------------------------------------------


def _host_rows(case: dict, fused: bool) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """fusedclr's scheduler of ``case``: get_last_lr(), group lrs and momenta per step."""
    optim_module = fusedclr if fused else torch.optim
    extra = {"backend": "reference"} if fused else {}
    last, lrs, moms = [], [], []

    def record(opt, s):
        lrs.append(GEN.lrs(opt))
        moms.append(GEN.momenta(opt))
        last.append([float(x) for x in s.get_last_lr()] if s is not None else GEN.lrs(opt))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The epoch parameter in `scheduler.step\\(\\)`", category=UserWarning)
        if "stepped" in case:
            opt = GEN.make_optimizer(optim_module, case["optimizer"], **extra)
            s = GEN.make_scheduler(FS, opt, case["scheduler"])
            for t in case["steps"]:
                if t:
                    opt.step()
                    if s is not None:
                        s.step()
                record(opt, s)
        else:
            for epoch in case["epochs"]:
                opt = GEN.make_optimizer(optim_module, case["optimizer"], **extra)
                s = GEN.make_scheduler(FS, opt, case["scheduler"])
                opt.step()
                s.step(epoch)
                record(opt, s)
    return last, lrs, moms


@pytest.mark.parametrize("fused", [True, False], ids=["fusedclr_optimizer", "torch_optimizer"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scheduler_host_values(case, fused):
    last, lrs, moms = _host_rows(case, fused)
    who = f"fusedclr.lr_scheduler on a {'fusedclr' if fused else 'torch'} optimizer"
    for gi in range(len(case["groups"])):
        check(f"{who}, get_last_lr()", case, gi, "lr", [row[gi] for row in last])
        check(f"{who}, group['lr']", case, gi, "lr", [row[gi] for row in lrs])
        check(f"{who}, group momentum", case, gi, "momentum", [row[gi] for row in moms])


# --------------------------------------------------------------------------
# The table itself
# --------------------------------------------------------------------------


def test_table_is_current():
    """The table is what the script writes today: same cases, steps, descriptors; torch's values.

    A failure here means: rerun scripts/make_golden_schedules.py (after a change of its
    cases, of fusedclr's descriptors, or of torch's values, which is worth a look).
    """
    fresh = GEN.table()
    assert [c["id"] for c in fresh["cases"]] == IDS
    for new, old in zip(fresh["cases"], CASES):
        for key in ("optimizer", "scheduler", "stepped", "epochs", "steps"):
            assert new.get(key) == old.get(key), (old["id"], key)
        assert len(new["groups"]) == len(old["groups"]), old["id"]
        for gi, (g_new, g_old) in enumerate(zip(new["groups"], old["groups"])):
            assert g_new["descriptor"] == g_old["descriptor"], f"{old['id']} group {gi}: fusedclr's descriptor changed"
            assert g_new["hyper"] == g_old["hyper"], old["id"]
            for what in ("lr", "momentum"):
                check(f"torch {torch.__version__} (the table has {TABLE['torch_version']})", old, gi, what,
                      g_new[what])


def test_table_covers_every_kind_and_combination():
    kinds, combines, modes, anneals, momentum_kinds = set(), set(), set(), set(), set()
    for c in CASES:
        for g in c["groups"]:
            d = g["descriptor"]
            combines.add(int(d[reference.H_COMBINE]) if d[0] > 1 else None)
            for i in range(int(d[0])):
                st = d[reference.HEADER_WORDS + i * reference.STAGE_WORDS:][: reference.STAGE_WORDS]
                kind = int(st[reference.S_KIND])
                kinds.add(kind)
                p = st[reference.S_P0:]
                if kind == reference.Kind.CYCLIC:
                    modes.add(int(p[4]))
                if kind == reference.Kind.ONE_CYCLE:
                    anneals.add((int(p[9]), int(p[5])))
                if st[reference.S_HAS_MOM]:
                    momentum_kinds.add((kind, c["optimizer"]["class"]))
    all_kinds = {v for k, v in vars(reference.Kind).items() if not k.startswith("_")}
    assert kinds == all_kinds
    assert combines == {None, reference.SEQUENCE, reference.PRODUCT}
    assert modes == set(reference.CYCLIC_MODES.values())
    assert anneals == {(a, n) for a in reference.ANNEAL.values() for n in (2, 3)}
    cyclical = (reference.Kind.CYCLIC, reference.Kind.ONE_CYCLE)
    assert momentum_kinds == {(k, o) for k in cyclical for o in ("SGD", "Adam")}
    assert any(t >= 2**31 for c in CASES for t in c["steps"])

# --------------------------------------------------------------------------
# One descriptor layout: schedule.h's constants are reference.py's
# --------------------------------------------------------------------------

HEADER = ROOT / "csrc" / "include" / "fusedclr" / "schedule.h"


def _header_constants() -> dict[str, float]:
    """``constexpr`` values and enumerators of schedule.h, by name."""
    text = re.sub(r"//[^\n]*", "", HEADER.read_text())
    out: dict[str, float] = {}
    for name, value in re.findall(r"constexpr\s+(?:int|double)\s+(\w+)\s*=\s*([0-9.]+)\s*;", text):
        out[name] = float(value)
    for body in re.findall(r"enum\s+\w+\s*:\s*int\s*\{([^}]*)\}", text):
        for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body):
            out[name] = int(value)
    return out


@pytest.mark.skipif(not HEADER.exists(), reason="needs the source checkout (csrc/)")
def test_cpp_layout_constants_are_references():
    h = _header_constants()
    for name in ("HEADER_WORDS", "H_COMBINE", "STAGE_WORDS", "S_KIND", "S_T_BEGIN", "S_P0", "S_HAS_MOM"):
        assert h.pop(name) == getattr(reference, name), name
    # "[2..13] P0..P11" in the header's layout note.
    assert reference.STAGE_PARAMS == 12 and reference.S_P0 + reference.STAGE_PARAMS == reference.S_HAS_MOM
    for name in ("SEQUENCE", "PRODUCT"):
        assert h.pop(name) == getattr(reference, name), name
    kinds = {k: v for k, v in vars(reference.Kind).items() if not k.startswith("_")}
    assert {k: h.pop(k) for k in kinds} == kinds
    assert {m: h.pop(m.upper()) for m in reference.CYCLIC_MODES} == reference.CYCLIC_MODES
    assert {a: h.pop(f"ANNEAL_{a.upper()}") for a in reference.ANNEAL} == reference.ANNEAL
    assert h.pop("kPi") == math.pi
    assert h == {}, f"schedule.h constants this test does not know: {h}"


def test_python_evaluators_import_the_layout():
    """The Triton evaluator and the schedulers restate no layout constant: they import reference's."""
    triton_src = (ROOT / "fusedclr" / "triton" / "_schedule.py").read_text()
    # Every tl.constexpr of the evaluator is made from an imported name, never a literal.
    literals = re.findall(r"^(_\w+): tl\.constexpr = tl\.constexpr\(([-0-9.]+)\)", triton_src, re.M)
    assert literals == []
    sched_src = (ROOT / "fusedclr" / "lr_scheduler.py").read_text()
    assert re.findall(r"\bKind\s*=|CYCLIC_MODES\s*=|ANNEAL\s*=|_WORDS\s*=", sched_src) == []
