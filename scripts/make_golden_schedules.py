"""Writes tests/golden_schedules.json: torch's own schedule values, the spec every evaluator is tested against.

Every schedule family fusedclr evaluates in its kernels (csrc/include/fusedclr/schedule.h
[note: schedule descriptor]) is run here through torch.optim.lr_scheduler's own class on a
torch optimizer with a dummy parameter, and ``param_groups[i]["lr"]`` and the momentum
(SGD's ``momentum``, Adam's ``betas[0]``) are recorded at every step. The descriptor of
each param group is built by fusedclr's class of the same name on the fusedclr optimizer
of the same settings (what the kernels are handed), so that the table can be evaluated in
any language without fusedclr's Python. tests/test_golden_schedules.py (C++, the CUDA
kernel's copy under host emulation, reference.py, the schedulers' host values) and
tests/test_triton.py (Triton) test every evaluator against it; a bug shared by the
copies of the evaluator then still shows, since the values are torch's.

Two ways to get torch's values:

* ``stepped``: ``optimizer.step(); scheduler.step()`` ``stepped`` times, recording at
  steps 0..stepped (torch's usual, mostly recursive "chainable" update);
* ``epochs``: steps beyond what stepping can reach (2**31 + 7, ...), each from a fresh
  scheduler through ``scheduler.step(epoch)``, which is torch's closed form
  (``_get_closed_form_lr``, or ``get_lr`` for CyclicLR and OneCycleLR, whose updates
  are closed forms of the step anyway, or CosineAnnealingWarmRestarts' own epoch
  arithmetic). SequentialLR and ChainedScheduler take no epoch, so they are stepped.

Usage (from the repository root; the table's cases are CASES below)::

    .venv/bin/python scripts/make_golden_schedules.py            # rewrites the table
    .venv/bin/python scripts/make_golden_schedules.py --check    # exit 1 if it is stale

The table records torch's version; regenerate it when torch changes a scheduler (and
look at the diff: a change of torch's values is a change of the spec).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "golden_schedules.json"
# This checkout's fusedclr, not whichever one the interpreter has installed.
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.optim import lr_scheduler as torch_sched  # noqa: E402

# --------------------------------------------------------------------------
# Cases: JSON-able recipes, built with torch's classes (the values) and with
# fusedclr's (the descriptors); tests rebuild fusedclr's from the same recipes.
# --------------------------------------------------------------------------

SGD = {"class": "SGD", "kwargs": {"lr": 0.1, "momentum": 0.9}}
ADAM = {"class": "Adam", "kwargs": {"lr": 0.1, "betas": [0.9, 0.99]}}
# Two param groups: per-group lists (base_lr, max_lr, momenta) and a second base lr.
SGD2 = {**SGD, "groups": [{}, {"lr": 0.03}]}
ADAM2 = {**ADAM, "groups": [{}, {"lr": 0.03}]}


def sched(cls: str, **kwargs: Any) -> dict:
    return {"class": cls, "kwargs": kwargs}


def seq(children: list[dict], milestones: list[int]) -> dict:
    return {"class": "SequentialLR", "schedulers": children, "kwargs": {"milestones": milestones}}


def chained(children: list[dict]) -> dict:
    return {"class": "ChainedScheduler", "schedulers": children}


def case(id: str, optimizer: dict, scheduler: dict | None, *, stepped: int | None = None,
         epochs: list[int] | None = None) -> dict:
    assert (stepped is None) != (epochs is None), id
    out = {"id": id, "optimizer": optimizer, "scheduler": scheduler}
    if stepped is not None:
        out["stepped"] = stepped
    else:
        out["epochs"] = epochs
    return out


HUGE = [2**24 + 1, 2**31 - 1, 2**31 + 7, 2**32 + 5, 2**40 + 3]

CASES = [
    # Constant: no scheduler (the descriptor of "no schedule": the group's values),
    # and the CONSTANT stage of ConstantLR / LinearLR with total_iters=0.
    case("constant_no_scheduler", SGD2, None, stepped=5),
    case("constant_constantlr_total_iters_0", SGD2, sched("ConstantLR", factor=0.5, total_iters=0), stepped=5),
    case("constant_linearlr_total_iters_0", ADAM, sched("LinearLR", start_factor=0.25, total_iters=0), stepped=5),
    # StepLR, MultiStepLR (unsorted, repeated milestones), ExponentialLR.
    case("step", SGD2, sched("StepLR", step_size=7, gamma=0.5), stepped=60),
    case("step_huge", SGD, sched("StepLR", step_size=2**20 + 1, gamma=0.999), epochs=[0, 2**20, 2**20 + 1, *HUGE]),
    case("multistep", SGD2, sched("MultiStepLR", milestones=[30, 5, 20, 20, 50], gamma=0.5), stepped=80),
    case("multistep_huge", SGD, sched("MultiStepLR", milestones=[10, 2**31, 2**31 + 7, 2**31 + 7], gamma=0.5),
         epochs=[9, 10, 2**31 - 1, 2**31, 2**31 + 6, 2**31 + 7, 2**40]),
    case("exponential", ADAM2, sched("ExponentialLR", gamma=0.99), stepped=300),
    case("exponential_huge", SGD, sched("ExponentialLR", gamma=1 - 1e-9), epochs=HUGE[:4]),
    # LinearLR and ConstantLR warmups.
    case("linear", SGD2, sched("LinearLR", start_factor=0.1, end_factor=0.9, total_iters=30), stepped=45),
    case("linear_default", ADAM, sched("LinearLR"), stepped=10),
    case("linear_decay", SGD, sched("LinearLR", start_factor=1.0, end_factor=0.05, total_iters=17), stepped=25),
    case("linear_huge", SGD, sched("LinearLR", start_factor=0.01, total_iters=2**31 + 7), epochs=HUGE),
    case("constantlr", SGD2, sched("ConstantLR", factor=0.25, total_iters=10), stepped=20),
    case("constantlr_default", ADAM, sched("ConstantLR"), stepped=10),
    case("constantlr_huge", SGD, sched("ConstantLR", factor=0.5, total_iters=2**31 + 7), epochs=HUGE),
    # CosineAnnealingLR (beyond T_max it rises again, as torch's).
    case("cosine", SGD2, sched("CosineAnnealingLR", T_max=40, eta_min=1e-3), stepped=200),
    case("cosine_to_zero", ADAM, sched("CosineAnnealingLR", T_max=25), stepped=60),
    case("cosine_huge", SGD, sched("CosineAnnealingLR", T_max=2**32 + 1, eta_min=1e-4), epochs=HUGE),
    # CosineAnnealingWarmRestarts, T_mult 1 and 2 (and 3).
    case("sgdr_tmult1", SGD2, sched("CosineAnnealingWarmRestarts", T_0=13, eta_min=1e-3), stepped=60),
    case("sgdr_tmult2", ADAM, sched("CosineAnnealingWarmRestarts", T_0=5, T_mult=2, eta_min=1e-3), stepped=160),
    case("sgdr_tmult3", SGD, sched("CosineAnnealingWarmRestarts", T_0=4, T_mult=3), stepped=60),
    case("sgdr_tmult1_huge", SGD, sched("CosineAnnealingWarmRestarts", T_0=1000, eta_min=1e-3), epochs=HUGE),
    # Not at restarts: torch's epoch arithmetic for T_mult > 1 goes through a float log.
    case("sgdr_tmult2_huge", SGD, sched("CosineAnnealingWarmRestarts", T_0=3, T_mult=2),
         epochs=[2**24 + 1, 2**31 + 7, 2**32 + 5, 2**40 + 3]),
    # CyclicLR: the three modes, momentum cycled on SGD and on Adam's beta1, per-group lists.
    case("cyclic_triangular", SGD, sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=10), stepped=80),
    case("cyclic_triangular2", SGD2,
         sched("CyclicLR", base_lr=[0.01, 0.005], max_lr=[0.1, 0.2], step_size_up=10, step_size_down=15,
               mode="triangular2"), stepped=125),
    case("cyclic_exp_range", SGD,
         sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=8, step_size_down=12, mode="exp_range",
               gamma=0.99), stepped=100),
    case("cyclic_momentum_lists", SGD2,
         sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=6, base_momentum=[0.8, 0.7],
               max_momentum=[0.95, 0.9]), stepped=40),
    case("cyclic_adam_beta1", ADAM2,
         sched("CyclicLR", base_lr=[0.001, 0.002], max_lr=0.01, step_size_up=7, step_size_down=5,
               mode="triangular2", base_momentum=0.8, max_momentum=0.95), stepped=50),
    case("cyclic_no_momentum", ADAM, sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=5,
                                           cycle_momentum=False), stepped=30),
    case("cyclic_exp_range_huge", SGD,
         sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=2**20 + 3, mode="exp_range", gamma=1 - 1e-9),
         epochs=HUGE[:4]),
    case("cyclic_triangular_huge", ADAM,
         sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=2**21 + 1, step_size_down=2**20 + 7,
               base_momentum=0.8, max_momentum=0.9), epochs=HUGE),
    # OneCycleLR: cos and linear, two and three phases, momentum on SGD and on Adam's beta1.
    case("onecycle_cos", SGD2, sched("OneCycleLR", max_lr=[0.1, 0.3], total_steps=200), stepped=200),
    case("onecycle_linear", SGD2,
         sched("OneCycleLR", max_lr=[0.1, 0.3], total_steps=120, anneal_strategy="linear", pct_start=0.25),
         stepped=120),
    case("onecycle_cos_three_phase", SGD, sched("OneCycleLR", max_lr=0.2, total_steps=150, three_phase=True),
         stepped=150),
    case("onecycle_linear_three_phase", SGD2,
         sched("OneCycleLR", max_lr=0.2, epochs=6, steps_per_epoch=20, anneal_strategy="linear", three_phase=True,
               base_momentum=0.8, max_momentum=[0.9, 0.97]), stepped=120),
    case("onecycle_adam_beta1_cos", ADAM2, sched("OneCycleLR", max_lr=[0.01, 0.02], total_steps=100), stepped=100),
    case("onecycle_adam_beta1_linear_three_phase", ADAM,
         sched("OneCycleLR", max_lr=0.01, total_steps=90, anneal_strategy="linear", three_phase=True,
               base_momentum=0.85, max_momentum=0.95, div_factor=10.0), stepped=90),
    case("onecycle_no_momentum", SGD,
         sched("OneCycleLR", max_lr=0.2, total_steps=80, cycle_momentum=False, div_factor=10.0,
               final_div_factor=100.0), stepped=80),
    case("onecycle_huge", ADAM, sched("OneCycleLR", max_lr=0.01, total_steps=2**41, three_phase=True),
         epochs=[*HUGE, 2**41 - 5, 2**41 - 1, 2**41]),
    # PolynomialLR.
    case("polynomial", SGD2, sched("PolynomialLR", total_iters=30, power=1.7), stepped=40),
    case("polynomial_default", ADAM, sched("PolynomialLR"), stepped=8),
    case("polynomial_power0", SGD, sched("PolynomialLR", total_iters=4, power=0.0), stepped=8),
    case("polynomial_huge", SGD, sched("PolynomialLR", total_iters=2**32 + 5, power=2.0), epochs=HUGE),
    # SequentialLR chains (one descriptor of several stages).
    case("seq_linear_cosine", SGD2,
         seq([sched("LinearLR", start_factor=0.1, total_iters=10), sched("CosineAnnealingLR", T_max=50)], [10]),
         stepped=100),
    case("seq_constant_exponential", ADAM,
         seq([sched("ConstantLR", factor=0.5, total_iters=5), sched("ExponentialLR", gamma=0.98)], [8]),
         stepped=60),
    case("seq_linear_multistep_multistep", SGD2,
         seq([sched("LinearLR", start_factor=0.2, total_iters=10),
              sched("MultiStepLR", milestones=[5, 15, 15], gamma=0.5),
              sched("MultiStepLR", milestones=[3, 6], gamma=0.7)], [10, 40]), stepped=70),
    case("seq_linear_sgdr_tmult2", SGD,
         seq([sched("LinearLR", start_factor=0.05, total_iters=6),
              sched("CosineAnnealingWarmRestarts", T_0=8, T_mult=2)], [6]), stepped=100),
    case("seq_warmup_cyclic_momentum", SGD,
         seq([sched("LinearLR", start_factor=0.2, total_iters=10),
              sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=10)], [10]), stepped=60),
    case("seq_onecycle_exponential", ADAM,
         seq([sched("OneCycleLR", max_lr=0.2, total_steps=60, three_phase=True),
              sched("ExponentialLR", gamma=0.95)], [60]), stepped=90),
    case("seq_step_polynomial_constantlr", SGD,
         seq([sched("StepLR", step_size=3, gamma=0.5), sched("PolynomialLR", total_iters=9, power=2.0),
              sched("ConstantLR", factor=0.1, total_iters=4)], [7, 20]), stepped=40),
    # ChainedScheduler: multiplicative families stepping together, one PRODUCT descriptor.
    case("chained_constantlr_exponential", SGD2,
         chained([sched("ConstantLR", factor=0.5, total_iters=3), sched("ExponentialLR", gamma=0.9)]), stepped=20),
    case("chained_step_multistep_polynomial", ADAM,
         chained([sched("StepLR", step_size=4, gamma=0.5), sched("MultiStepLR", milestones=[3, 7, 7], gamma=0.7),
                  sched("PolynomialLR", total_iters=15, power=1.5)]), stepped=20),
    case("chained_linear_step", SGD,
         chained([sched("LinearLR", start_factor=0.5, total_iters=4), sched("StepLR", step_size=2, gamma=0.5)]),
         stepped=12),
]


# --------------------------------------------------------------------------
# Building from recipes (also used by the tests)
# --------------------------------------------------------------------------


def make_optimizer(module: Any, spec: dict, **extra: Any) -> torch.optim.Optimizer:
    """``spec``'s optimizer from ``module`` (``torch.optim`` or ``fusedclr``), one dummy parameter per group."""
    kwargs = dict(spec["kwargs"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], **g}
              for g in spec.get("groups", [{}])]
    return getattr(module, spec["class"])(groups, **kwargs, **extra)


def make_scheduler(module: Any, optimizer: torch.optim.Optimizer, spec: dict | None) -> Any:
    """``spec``'s scheduler from ``module`` (``torch.optim.lr_scheduler`` or ``fusedclr.lr_scheduler``)."""
    if spec is None:
        return None
    cls = getattr(module, spec["class"])
    kwargs = spec.get("kwargs", {})
    if spec["class"] == "SequentialLR":
        return cls(optimizer, [make_scheduler(module, optimizer, c) for c in spec["schedulers"]], **kwargs)
    if spec["class"] == "ChainedScheduler":
        return cls([make_scheduler(module, optimizer, c) for c in spec["schedulers"]], optimizer)
    return cls(optimizer, **kwargs)


def momenta(optimizer: torch.optim.Optimizer) -> list[float]:
    """Every group's momentum: SGD's ``momentum``, Adam's ``betas[0]``."""
    return [float(g["betas"][0]) if "betas" in g else float(g["momentum"]) for g in optimizer.param_groups]


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def steps_of(c: dict) -> list[int]:
    return list(range(c["stepped"] + 1)) if "stepped" in c else list(c["epochs"])


def run(module_optim: Any, module_sched: Any, c: dict, **extra: Any) -> tuple[list[list[float]], list[list[float]]]:
    """(lr, momentum) per step (rows) and group (columns) of case ``c`` built from the two modules."""
    lr_rows, mom_rows = [], []
    with warnings.catch_warnings():
        # step(epoch) is deprecated (and the only way to torch's closed form at huge steps).
        warnings.filterwarnings("ignore", message="The epoch parameter in `scheduler.step\\(\\)`", category=UserWarning)
        if "stepped" in c:
            opt = make_optimizer(module_optim, c["optimizer"], **extra)
            s = make_scheduler(module_sched, opt, c["scheduler"])
            for t in range(c["stepped"] + 1):
                if t:
                    opt.step()
                    if s is not None:
                        s.step()
                lr_rows.append(lrs(opt))
                mom_rows.append(momenta(opt))
        else:
            for epoch in c["epochs"]:
                opt = make_optimizer(module_optim, c["optimizer"], **extra)
                s = make_scheduler(module_sched, opt, c["scheduler"])
                opt.step()
                s.step(epoch)
                lr_rows.append(lrs(opt))
                mom_rows.append(momenta(opt))
    return lr_rows, mom_rows


def descriptors(c: dict) -> list[list[float]]:
    """The schedule descriptor of every group, as fusedclr's classes attach it to a fusedclr optimizer."""
    import fusedclr
    from fusedclr import lr_scheduler as fc_sched
    from fusedclr import reference

    opt = make_optimizer(fusedclr, c["optimizer"], backend="reference")
    s = make_scheduler(fc_sched, opt, c["scheduler"])
    attached = opt._scheduler  # what the kernels evaluate (the SequentialLR, a ChainedScheduler's product)
    if s is None:
        assert attached is None, c["id"]
        return [reference.no_schedule() for _ in opt.param_groups]
    assert attached is not None, f"{c['id']}: fusedclr did not attach an in-kernel schedule"
    out = [list(map(float, attached._fc_descriptor(i))) for i in range(len(opt.param_groups))]
    assert all(d[0] > 0 for d in out), f"{c['id']}: fusedclr runs this schedule on the host"
    return out


def golden_case(c: dict) -> dict:
    opt = make_optimizer(torch.optim, c["optimizer"])
    hyper = list(zip(lrs(opt), momenta(opt)))  # the groups' own values: what a kernel falls back to
    lr_rows, mom_rows = run(torch.optim, torch_sched, c)
    groups = [
        {
            "descriptor": d,
            "hyper": list(hyper[i]),
            "lr": [row[i] for row in lr_rows],
            "momentum": [row[i] for row in mom_rows],
        }
        for i, d in enumerate(descriptors(c))
    ]
    return {**c, "steps": steps_of(c), "groups": groups}


def table() -> dict:
    return {
        "about": "torch.optim.lr_scheduler's values per case, step and param group, with fusedclr's descriptors; "
                 "written by scripts/make_golden_schedules.py, read by tests/test_golden_schedules.py and "
                 "tests/test_triton.py",
        "torch_version": torch.__version__.split("+")[0],
        "cases": [golden_case(c) for c in CASES],
    }


def dumps(t: dict) -> str:
    """JSON with one line per key of a case (floats as repr: exact float64 round trips)."""
    lines = ["{"]
    lines.append(f'  "about": {json.dumps(t["about"])},')
    lines.append(f'  "torch_version": {json.dumps(t["torch_version"])},')
    lines.append('  "cases": [')
    for k, c in enumerate(t["cases"]):
        body = [f"    {json.dumps(key)}: {json.dumps(value)}" for key, value in c.items() if key != "groups"]
        groups = ",\n".join(
            "      {\n" + ",\n".join(f"        {json.dumps(key)}: {json.dumps(value)}" for key, value in g.items())
            + "\n      }"
            for g in c["groups"]
        )
        body.append(f'    "groups": [\n{groups}\n    ]')
        lines.append("   {\n" + ",\n".join(body) + "\n   }" + ("," if k < len(t["cases"]) - 1 else ""))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the table differs from a fresh one")
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args()
    text = dumps(table())
    assert json.loads(text)["cases"][0]["id"] == CASES[0]["id"]
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'STALE: rerun scripts/make_golden_schedules.py'}")
        return 0 if same else 1
    args.out.write_text(text)
    n = sum(len(c["steps"]) * len(c["groups"]) for c in json.loads(text)["cases"])
    print(f"wrote {args.out}: {len(CASES)} cases, {n} (step, group) values, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
