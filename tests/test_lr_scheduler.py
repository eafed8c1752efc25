"""fusedclr.lr_scheduler against torch.optim.lr_scheduler, on the host and in the kernel.

* host mode: our classes driving a stock torch optimizer give torch's numbers
  (``get_last_lr()``, ``group["lr"]``, momentum / ``betas[0]``) at every step;
* the C++ descriptor evaluator (``fusedclr::schedule_eval``) agrees with
  ``reference.schedule_value``;
* kernel mode: the lr and momentum a fusedclr optimizer actually applied,
  recovered from its updates, are torch's;
* checkpoints resume exactly mid-cycle; errors are torch's; the step path never
  reads a device value;
* several schedulers on one optimizer compose as torch's (in-kernel products of
  the multiplicative families, else torch's update on the host); a param group
  added later, a ``T_cur`` set by hand, an lr moved by something else and a
  ``state_dict`` round trip give what torch gives.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler as TS

import fusedclr
from fusedclr import lr_scheduler as FS
from fusedclr import reference

RTOL = 1e-6
LR0, LR1 = 0.1, 0.03  # the two param groups' learning rates


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


def _groups(dtype=torch.float32):
    a = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
    return [{"params": [a]}, {"params": [b], "lr": LR1}]


def make_optimizer(kind: str, backend: str = "cpu", dtype=torch.float32) -> torch.optim.Optimizer:
    """Two param groups with different lrs; SGD has momentum so that momentum can be scheduled."""
    if kind == "sgd":
        return torch.optim.SGD(_groups(dtype), lr=LR0, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(_groups(dtype), lr=LR0, betas=(0.9, 0.99))
    if kind == "fc_sgd":
        return fusedclr.SGD(_groups(dtype), lr=LR0, momentum=0.9, backend=backend)
    if kind == "fc_adam":
        return fusedclr.Adam(_groups(dtype), lr=LR0, betas=(0.9, 0.99), backend=backend)
    raise AssertionError(kind)


def momenta(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["betas"][0]) if "betas" in g else float(g["momentum"]) for g in opt.param_groups]


def host_row(sched, opt) -> list[float]:
    """What a scheduler tells the world: get_last_lr(), the groups' lr and momentum."""
    return [*map(float, sched.get_last_lr()), *(float(g["lr"]) for g in opt.param_groups), *momenta(opt)]


def _fused_available() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        fusedclr.SGD([p], lr=0.1, backend="reference")
        return hasattr(fusedclr, "SGD") and hasattr(fusedclr.SGD, "_attach_schedule")
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


requires_fused = pytest.mark.skipif(not _fused_available(), reason="fusedclr optimizer not available")
requires_extension = pytest.mark.skipif(
    not fusedclr.ops.extension_available(),
    reason=f"compiled extension (fusedclr._C) not built: {fusedclr.ops.extension_error()}",
)
BACKENDS = [
    pytest.param("cpu", marks=requires_extension),
    "reference",
]


# --------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """A schedule: ``build(module, optimizer)`` makes it from ``TS`` (torch) or ``FS`` (ours)."""

    id: str
    build: Callable
    steps: int
    # Oracle rows [lr0, lr1, mom0, mom1] per step for schedules torch lacks; None: torch's class.
    oracle: Callable | None = None
    atol: float = 0.0


def _seq(m, o, children, milestones):
    return m.SequentialLR(o, [c(m, o) for c in children], milestones=milestones)


CASES = [
    Case("step", lambda m, o: m.StepLR(o, step_size=7, gamma=0.5), 60),
    Case("multistep_repeated", lambda m, o: m.MultiStepLR(o, milestones=[30, 5, 20, 20, 50], gamma=0.5), 80),
    Case("constant", lambda m, o: m.ConstantLR(o, factor=0.25, total_iters=10), 40),
    Case("constant_default", lambda m, o: m.ConstantLR(o), 20),
    Case("linear", lambda m, o: m.LinearLR(o, start_factor=0.1, end_factor=0.9, total_iters=30), 60),
    Case("linear_default", lambda m, o: m.LinearLR(o), 20),
    Case("exponential", lambda m, o: m.ExponentialLR(o, gamma=0.99), 500),
    Case("cosine", lambda m, o: m.CosineAnnealingLR(o, T_max=40, eta_min=1e-3), 240),
    Case("polynomial", lambda m, o: m.PolynomialLR(o, total_iters=30, power=1.7), 50, atol=1e-15),
    Case("polynomial_default", lambda m, o: m.PolynomialLR(o), 12, atol=1e-15),
    Case("polynomial_power0", lambda m, o: m.PolynomialLR(o, total_iters=4, power=0.0), 8),
    Case("cosine_to_zero", lambda m, o: m.CosineAnnealingLR(o, T_max=25), 150, atol=1e-15),
    Case("sgdr", lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=13), 60),
    Case("sgdr_tmult2", lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=1e-3), 160),
    Case("sgdr_tmult3", lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=3), 60),
    Case("cyclic_triangular", lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=10), 80),
    Case(
        "cyclic_triangular2_4cycles",
        lambda m, o: m.CyclicLR(o, base_lr=[0.01, 0.005], max_lr=[0.1, 0.2], step_size_up=10, step_size_down=15,
                                mode="triangular2"),
        125,
    ),
    Case(
        "cyclic_exp_range",
        lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=8, step_size_down=12, mode="exp_range",
                                gamma=0.99),
        100,
    ),
    Case(
        "cyclic_momentum_lists",
        lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=6, base_momentum=[0.8, 0.7],
                                max_momentum=[0.95, 0.9]),
        60,
    ),
    Case(
        "cyclic_no_momentum",
        lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=5, cycle_momentum=False),
        40,
    ),
    Case("onecycle", lambda m, o: m.OneCycleLR(o, max_lr=[0.1, 0.3], total_steps=200), 200),
    Case("onecycle_three_phase", lambda m, o: m.OneCycleLR(o, max_lr=0.2, total_steps=150, three_phase=True), 150),
    Case(
        "onecycle_linear",
        lambda m, o: m.OneCycleLR(o, max_lr=[0.1, 0.3], total_steps=120, anneal_strategy="linear", pct_start=0.25),
        120,
    ),
    Case(
        "onecycle_linear_three_phase",
        lambda m, o: m.OneCycleLR(o, max_lr=0.2, epochs=6, steps_per_epoch=20, anneal_strategy="linear",
                                  three_phase=True, base_momentum=0.8, max_momentum=[0.9, 0.97]),
        120,
    ),
    Case(
        "onecycle_no_momentum",
        lambda m, o: m.OneCycleLR(o, max_lr=0.2, total_steps=500, cycle_momentum=False, div_factor=10.0,
                                  final_div_factor=100.0),
        500,
    ),
    Case(
        "seq_linear_cosine",
        lambda m, o: _seq(m, o, [lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=10),
                                 lambda m, o: m.CosineAnnealingLR(o, T_max=50)], [10]),
        200,
        atol=1e-15,
    ),
    Case(
        "seq_constant_exponential",
        lambda m, o: _seq(m, o, [lambda m, o: m.ConstantLR(o, factor=0.5, total_iters=5),
                                 lambda m, o: m.ExponentialLR(o, gamma=0.98)], [8]),
        100,
    ),
    Case(
        "seq_linear_multistep_multistep",
        lambda m, o: _seq(m, o, [lambda m, o: m.LinearLR(o, start_factor=0.2, total_iters=10),
                                 lambda m, o: m.MultiStepLR(o, milestones=[5, 15, 15], gamma=0.5),
                                 lambda m, o: m.MultiStepLR(o, milestones=[3, 6], gamma=0.7)], [10, 40]),
        70,
    ),
    Case(
        "seq_linear_sgdr",
        lambda m, o: _seq(m, o, [lambda m, o: m.LinearLR(o, start_factor=0.05, total_iters=6),
                                 lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=8, T_mult=2)], [6]),
        100,
    ),
    Case(
        "seq_warmup_cyclic_momentum",
        lambda m, o: _seq(m, o, [lambda m, o: m.LinearLR(o, start_factor=0.2, total_iters=10),
                                 lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=10)], [10]),
        90,
    ),
    Case(
        "seq_onecycle_exponential",
        lambda m, o: _seq(m, o, [lambda m, o: m.OneCycleLR(o, max_lr=0.2, total_steps=60, three_phase=True),
                                 lambda m, o: m.ExponentialLR(o, gamma=0.95)], [60]),
        90,
    ),
]


# Extensions of CosineAnnealingWarmRestarts, judged against torch's class (the
# oracle re-derives the schedule from torch's T_cur / T_i).


def _sgdr_oracle(kind, steps, *, T_0, T_mult, eta_min, decay=1.0, warmup=0, warm_start=(0.0, 0.0)):
    opt = make_optimizer(kind)
    sched = TS.CosineAnnealingWarmRestarts(opt, T_0=T_0, T_mult=T_mult, eta_min=eta_min)
    rows = []
    for t in range(steps + 1):
        if t < warmup:
            lrs = [s + (b - s) * t / warmup for b, s in zip(sched.base_lrs, warm_start)]
        else:
            if t > warmup:
                opt.step()
                sched.step()
            cycle = round(math.log(sched.T_i / T_0, T_mult)) if T_mult > 1 else (t - warmup) // T_0
            cos = (1 + math.cos(math.pi * sched.T_cur / sched.T_i)) / 2
            lrs = [eta_min + (b * decay**cycle - eta_min) * cos for b in sched.base_lrs]
        rows.append([*lrs, *momenta(opt)])
    return rows


CASES += [
    Case(
        "sgdr_cycle_decay",
        lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=10, eta_min=1e-3, cycle_decay=0.5),
        60,
        oracle=lambda kind, n: _sgdr_oracle(kind, n, T_0=10, T_mult=1, eta_min=1e-3, decay=0.5),
    ),
    Case(
        "sgdr_tmult2_decay_warmup",
        lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, cycle_decay=0.8, warmup_steps=7,
                                                   warmup_start_lr=[1e-3, 0.0]),
        120,
        oracle=lambda kind, n: _sgdr_oracle(kind, n, T_0=5, T_mult=2, eta_min=0.0, decay=0.8, warmup=7,
                                            warm_start=(1e-3, 0.0)),
    ),
    Case(
        "seq_constant_sgdr_warmup",
        lambda m, o: _seq(m, o, [lambda m, o: m.ConstantLR(o, factor=0.5, total_iters=4),
                                 lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=6, warmup_steps=3)], [4]),
        40,
        oracle=lambda kind, n: (
            [[LR0 * (0.5 if t < 4 else 1), LR1 * (0.5 if t < 4 else 1), 0.9, 0.9] for t in range(4)]
            + _sgdr_oracle(kind, n - 4, T_0=6, T_mult=1, eta_min=0.0, warmup=3)
        ),
    ),
]
CASE_IDS = [c.id for c in CASES]


def torch_rows(case: Case, kind: str) -> list[list[float]]:
    """[lr0, lr1, mom0, mom1] at every step from torch's scheduler on a torch optimizer."""
    if case.oracle is not None:
        return case.oracle(kind, case.steps)
    opt = make_optimizer(kind)
    sched = case.build(TS, opt)
    rows = []
    for t in range(case.steps + 1):
        if t:
            opt.step()
            sched.step()
        rows.append([*map(float, sched.get_last_lr()), *momenta(opt)])
    return rows


# --------------------------------------------------------------------------
# 1. Host mode: a stock torch optimizer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_host_mode_matches_torch(case, kind):
    expected = torch_rows(case, kind)
    opt = make_optimizer(kind)
    sched = case.build(FS, opt)
    got = []
    for t in range(case.steps + 1):
        if t:
            opt.step()
            sched.step()
        got.append(host_row(sched, opt))
    got_t = torch.tensor(got, dtype=torch.float64)
    exp_t = torch.tensor(expected, dtype=torch.float64)
    # get_last_lr() and group["lr"] against torch's lr, then the momenta.
    torch.testing.assert_close(got_t[:, 0:2], exp_t[:, 0:2], rtol=RTOL, atol=case.atol)
    torch.testing.assert_close(got_t[:, 2:4], exp_t[:, 0:2], rtol=RTOL, atol=case.atol)
    torch.testing.assert_close(got_t[:, 4:6], exp_t[:, 2:4], rtol=RTOL, atol=0.0)
    assert sched.last_epoch == case.steps or isinstance(sched, FS.SequentialLR)


def test_classes_are_torch_subclasses_with_torch_signatures():
    for name in FS.__all__:
        ours, theirs = getattr(FS, name), getattr(TS, name)
        assert issubclass(ours, theirs)
        p_ours = inspect.signature(ours).parameters
        p_theirs = inspect.signature(theirs).parameters
        shared = [(k, v.default, v.kind) for k, v in p_ours.items() if k in p_theirs]
        assert shared == [(k, v.default, v.kind) for k, v in p_theirs.items()], name
        extra = [k for k in p_ours if k not in p_theirs]
        assert all(p_ours[k].kind is inspect.Parameter.KEYWORD_ONLY for k in extra), name
    extras = set(inspect.signature(FS.CosineAnnealingWarmRestarts).parameters) - set(
        inspect.signature(TS.CosineAnnealingWarmRestarts).parameters
    )
    assert extras == {"cycle_decay", "warmup_steps", "warmup_start_lr"}


def test_step_with_explicit_epoch_matches_torch_closed_form():
    for build in (
        lambda m, o: m.StepLR(o, step_size=4, gamma=0.5),
        lambda m, o: m.MultiStepLR(o, milestones=[3, 9, 9], gamma=0.5),
        lambda m, o: m.CosineAnnealingLR(o, T_max=10, eta_min=0.01),
        lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=6, T_mult=2),
        lambda m, o: m.ExponentialLR(o, gamma=0.9),
    ):
        ot, of = make_optimizer("sgd"), make_optimizer("sgd")
        st, sf = build(TS, ot), build(FS, of)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for epoch in (5, 2, 17, 0, 30, 31):
                ot.step(), of.step()
                st.step(epoch)
                sf.step(epoch)
                assert sf.last_epoch == st.last_epoch == epoch
                torch.testing.assert_close(sf.get_last_lr(), st.get_last_lr(), rtol=RTOL, atol=0.0)


def test_fractional_epoch_on_host_matches_torch():
    ot, of = make_optimizer("sgd"), make_optimizer("sgd")
    st = TS.CosineAnnealingWarmRestarts(ot, T_0=4, T_mult=2, eta_min=0.01)
    sf = FS.CosineAnnealingWarmRestarts(of, T_0=4, T_mult=2, eta_min=0.01)
    for epoch in (0.5, 1.25, 3.75, None, None, 6.5, None, 13.0, None, 20.2):
        st.step(epoch)
        sf.step(epoch)
        assert sf.last_epoch == st.last_epoch
        torch.testing.assert_close(sf.get_last_lr(), st.get_last_lr(), rtol=RTOL, atol=0.0)
        torch.testing.assert_close([g["lr"] for g in of.param_groups], st.get_last_lr(), rtol=RTOL, atol=0.0)


def test_user_scale_fn_runs_torch_computation_on_host():
    def half_per_cycle(x):
        return 0.5 ** (x - 1)

    for scale_mode in ("cycle", "iterations"):
        ot, of = make_optimizer("adam"), make_optimizer("adam")
        kw = dict(base_lr=0.01, max_lr=0.1, step_size_up=5, scale_fn=half_per_cycle, scale_mode=scale_mode)
        st, sf = TS.CyclicLR(ot, **kw), FS.CyclicLR(of, **kw)
        for _ in range(30):
            ot.step(), of.step(), st.step(), sf.step()
            torch.testing.assert_close(host_row(sf, of), host_row(st, ot), rtol=RTOL, atol=0.0)


# --------------------------------------------------------------------------
# 2. The descriptor evaluators: C++ (schedule.h) against reference.py
# --------------------------------------------------------------------------


def _descriptors(case: Case) -> list[list[float]]:
    opt = make_optimizer("sgd")
    sched = case.build(FS, opt)
    return [sched._fc_descriptor(i) for i in range(len(opt.param_groups))]


def _compare_eval(desc: list[float], steps) -> None:
    d = torch.tensor(desc, dtype=torch.float64)
    got, want = [], []
    for t in steps:
        out = torch.ops.fusedclr.schedule_eval(d, torch.tensor(t, dtype=torch.int64)).tolist()
        lr, mom = reference.schedule_value(desc, t)
        assert out[2] == (lr is not None) and out[3] == (mom is not None), (t, out, lr, mom)
        got.append([out[0], out[1] if mom is not None else 0.0])
        want.append([lr, 0.0 if mom is None else mom])
    # Both evaluate the same double-precision formulas; allow a few ulps.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-12, atol=1e-300)


@requires_extension
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpp_evaluator_matches_reference(case):
    for desc in _descriptors(case):
        _compare_eval(desc, range(case.steps + 3))


@requires_extension
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpp_evaluator_matches_reference_at_huge_steps(case):
    # int64 counters: no 2**24 (float) or 2**31 (int32) limit on the step.
    for desc in _descriptors(case):
        _compare_eval(desc, [2**24 + 1, 2**31 + 7, 2**40 + 3, 2**53 + 12345])


def test_no_schedule_descriptor_leaves_values_to_the_group():
    assert reference.schedule_value(reference.no_schedule(), 5) == (None, None)


# --------------------------------------------------------------------------
# 3. Checkpoints: save mid-cycle, rebuild, load, continue
# --------------------------------------------------------------------------

RESUME_CASES = [c for c in CASES if c.id in {
    "multistep_repeated", "sgdr_tmult2", "cyclic_triangular2_4cycles", "cyclic_exp_range", "onecycle_three_phase",
    "seq_linear_cosine", "seq_linear_multistep_multistep", "seq_warmup_cyclic_momentum", "sgdr_tmult2_decay_warmup",
}]


def _run(case, opt, sched, steps, record):
    rows = []
    for _ in range(steps):
        opt.step()
        sched.step()
        rows.append(record(sched, opt))
    return rows


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", RESUME_CASES, ids=[c.id for c in RESUME_CASES])
def test_state_dict_resumes_mid_cycle(case, kind):
    split = case.steps // 2 + 3
    opt = make_optimizer(kind)
    sched = case.build(FS, opt)
    straight = _run(case, opt, sched, case.steps, host_row)

    opt = make_optimizer(kind)
    sched = case.build(FS, opt)
    first = _run(case, opt, sched, split, host_row)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    opt2 = make_optimizer(kind)
    sched2 = case.build(FS, opt2)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.last_epoch == sched.last_epoch
    rest = _run(case, opt2, sched2, case.steps - split, host_row)
    assert first + rest == straight


@pytest.mark.parametrize("case", RESUME_CASES[:3] + RESUME_CASES[-3:], ids=[c.id for c in RESUME_CASES[:3] + RESUME_CASES[-3:]])
def test_state_dict_is_plain_and_interoperates_with_torch(case):
    opt = make_optimizer("sgd")
    sched = case.build(FS, opt)
    for _ in range(case.steps // 3):
        opt.step()
        sched.step()

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                assert not (isinstance(k, str) and k in {"_fc_counters", "_fc_seen", "_fc_descs", "_fc_owned"}), k
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        else:
            assert not isinstance(obj, torch.Tensor), "device tensors must not be saved"

    state = sched.state_dict()
    walk(state)
    if case.oracle is not None:
        return
    # Torch's class continues from our checkpoint, and ours from torch's.
    opt_t = make_optimizer("sgd")
    sched_t = case.build(TS, opt_t)
    opt_t.load_state_dict(opt.state_dict())
    sched_t.load_state_dict(state)
    opt_f = make_optimizer("sgd")
    sched_f = case.build(FS, opt_f)
    opt_f.load_state_dict(opt_t.state_dict())
    sched_f.load_state_dict(sched_t.state_dict())
    for _ in range(case.steps // 3):
        for o, s in ((opt, sched), (opt_t, sched_t), (opt_f, sched_f)):
            o.step()
            s.step()
        torch.testing.assert_close(host_row(sched_t, opt_t), host_row(sched, opt), rtol=RTOL, atol=case.atol)
        torch.testing.assert_close(host_row(sched_f, opt_f), host_row(sched, opt), rtol=RTOL, atol=case.atol)


# --------------------------------------------------------------------------
# 4. Errors: torch's types and messages
# --------------------------------------------------------------------------


def _same_error(build, exc=ValueError):
    with pytest.raises(exc) as theirs:
        build(TS, make_optimizer("sgd"))
    with pytest.raises(exc) as ours:
        build(FS, make_optimizer("sgd"))
    assert str(ours.value) == str(theirs.value)
    assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize(
    "build",
    [
        lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=0),
        lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=2.5),
        lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=0),
        lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=5, eta_min="0"),
        lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, mode="bogus"),
        lambda m, o: m.CyclicLR(o, base_lr=[0.01], max_lr=0.1),
        lambda m, o: m.OneCycleLR(o, max_lr=0.1),
        lambda m, o: m.OneCycleLR(o, max_lr=0.1, total_steps=0),
        lambda m, o: m.OneCycleLR(o, max_lr=0.1, epochs=2, steps_per_epoch=-1),
        lambda m, o: m.OneCycleLR(o, max_lr=0.1, total_steps=10, pct_start=1.5),
        lambda m, o: m.OneCycleLR(o, max_lr=0.1, total_steps=10, anneal_strategy="cosine"),
        lambda m, o: m.LinearLR(o, start_factor=0.0),
        lambda m, o: m.LinearLR(o, end_factor=1.5),
        lambda m, o: m.ConstantLR(o, factor=2.0),
        lambda m, o: m.SequentialLR(o, [m.StepLR(o, 2), m.StepLR(o, 3)], milestones=[]),
        lambda m, o: m.SequentialLR(o, [], milestones=[]),
    ],
    ids=[
        "T_0_zero", "T_0_float", "T_mult_zero", "eta_min_str", "cyclic_mode", "cyclic_len", "onecycle_no_total",
        "onecycle_total_zero", "onecycle_spe", "onecycle_pct", "onecycle_anneal", "linear_start", "linear_end",
        "constant_factor", "seq_milestones", "seq_empty",
    ],
)
def test_constructor_errors_match_torch(build):
    _same_error(build)


def test_cycle_momentum_without_momentum_errors_like_torch():
    for build in (
        lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1),
        lambda m, o: m.OneCycleLR(o, max_lr=0.1, total_steps=10),
    ):
        msgs = []
        for m in (TS, FS):
            opt = torch.optim.Rprop([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
            with pytest.raises(ValueError) as err:
                build(m, opt)
            msgs.append(str(err.value))
        assert msgs[0] == msgs[1]


def test_not_an_optimizer_errors_like_torch():
    for name, args in (("StepLR", (3,)), ("CyclicLR", (0.01, 0.1)), ("OneCycleLR", (0.1, 10))):
        msgs = []
        for m in (TS, FS):
            with pytest.raises(TypeError) as err:
                getattr(m, name)(object(), *args)
            msgs.append(str(err.value))
        assert msgs[0] == msgs[1]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_onecycle_past_total_steps_raises_torch_error(kind):
    msgs = []
    for m in (TS, FS):
        opt = make_optimizer(kind)
        sched = m.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        for _ in range(10):
            opt.step()
            sched.step()
        with pytest.raises(ValueError) as err:
            sched.step()
        msgs.append(str(err.value))
        if m is FS:
            assert int(sched._fc_counter("cpu")) == sched.last_epoch  # the counter stays in step
    assert msgs[0] == msgs[1] == "Tried to step 11 times. The specified number of total steps is 10"


def test_negative_epoch_errors_like_torch():
    msgs = []
    for m in (TS, FS):
        sched = m.CosineAnnealingWarmRestarts(make_optimizer("sgd"), T_0=3)
        with pytest.raises(ValueError) as err:
            sched.step(-1)
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cycle_decay=0.0), "cycle_decay"),
        (dict(cycle_decay=-1.0), "cycle_decay"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=2.5), "warmup_steps"),
        (dict(warmup_start_lr=[0.0]), "warmup_start_lr"),
    ],
)
def test_extension_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FS.CosineAnnealingWarmRestarts(make_optimizer("sgd"), T_0=3, **kwargs)


# --------------------------------------------------------------------------
# The optimizer protocol (a stand-in optimizer that records attachments)
# --------------------------------------------------------------------------


class RecordingSGD(torch.optim.SGD):
    """torch.optim.SGD plus the fusedclr attach hook, which it records."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attached: list = []

    def _attach_schedule(self, scheduler):
        self.attached.append(scheduler)
        if scheduler is not None:
            for gi in range(len(self.param_groups)):
                scheduler._fc_descriptor(gi)
            scheduler._fc_counter("cpu")


def _recording():
    return RecordingSGD(_groups(), lr=LR0, momentum=0.9)


def test_attach_counter_and_step_protocol():
    opt = _recording()
    sched = FS.OneCycleLR(opt, max_lr=0.2, total_steps=50)
    assert opt.attached == [sched]
    counter = sched._fc_counter("cpu")
    assert counter.dtype == torch.int64 and counter.dim() == 0 and int(counter) == sched.last_epoch == 0
    assert sched._fc_counter(torch.device("cpu")) is counter  # one per device, kept
    for _ in range(7):
        opt.step()
        sched.step()
    assert int(counter) == 7
    desc = sched._fc_descriptor(1)
    assert desc[0] == 1 and int(desc[reference.HEADER_WORDS]) == reference.Kind.ONE_CYCLE
    assert reference.schedule_value(desc, 7)[0] == pytest.approx(sched.get_last_lr()[1], rel=1e-12)
    with pytest.warns(UserWarning):  # torch's deprecation of step(epoch)
        sched.step(3)
    assert int(counter) == 3


def test_sequential_owns_children_and_wins():
    opt = _recording()
    warm = FS.LinearLR(opt, start_factor=0.1, total_iters=5)
    cos = FS.CosineAnnealingLR(opt, T_max=20)
    seq = FS.SequentialLR(opt, [warm, cos], milestones=[5])
    # Building cos beside warm composed the two (host) until the SequentialLR took them over.
    assert opt.attached[0] is warm and opt.attached[-1] is seq
    desc = seq._fc_descriptor(0)
    assert desc[0] == 2 and desc[reference.HEADER_WORDS + reference.STAGE_WORDS + reference.S_T_BEGIN] == 5
    for _ in range(12):
        opt.step()
        seq.step()
    assert int(seq._fc_counter("cpu")) == 12 and not warm._fc_counters and not cos._fc_counters
    n = len(opt.attached)
    seq.load_state_dict(seq.state_dict())
    assert opt.attached[n:] == [seq]  # re-attached once, children stay quiet


def test_host_fallback_detaches_and_warns_once():
    opt = _recording()
    with pytest.warns(UserWarning, match="scale_fn") as record:
        sched = FS.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4, scale_fn=lambda x: 1.0)
    assert len(record) == 1 and record[0].filename == __file__  # points at the user's line
    assert opt.attached[-1] is None
    assert sched._fc_descriptor(0) == reference.no_schedule()

    opt = _recording()
    sched = FS.CosineAnnealingWarmRestarts(opt, T_0=4)
    assert opt.attached == [sched]
    with pytest.warns(UserWarning, match="fractional epoch") as record:
        sched.step(1.5)
    assert record[0].filename == __file__
    assert opt.attached[-1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step(2.5)  # no second warning
        sched.step(3)  # integral again: back in the kernel, counter refilled
    assert opt.attached[-1] is sched and int(sched._fc_counter("cpu")) == 3

    opt = _recording()
    seq_children = [TS.ConstantLR(opt, factor=0.5, total_iters=2), FS.ExponentialLR(opt, gamma=0.9)]
    with pytest.warns(UserWarning, match="not a fusedclr"):
        FS.SequentialLR(opt, seq_children, milestones=[2])
    assert opt.attached[-1] is None


def test_stock_optimizer_gets_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FS.CyclicLR(make_optimizer("sgd"), base_lr=0.01, max_lr=0.1, scale_fn=lambda x: 1.0)


# --------------------------------------------------------------------------
# 5. Kernel mode: the lr and momentum a fusedclr optimizer actually applied
# --------------------------------------------------------------------------


def _applied_sgd(opt) -> list[float]:
    """Recovers [lr0, lr1, mom0, mom1] from two SGD steps at the same schedule step.

    Params zeroed, momentum buffer 0 and grad 1: the update is -lr. Params
    zeroed, buffer 1 and grad 0: the buffer becomes momentum, the update -lr * momentum.
    """
    params = [g["params"][0] for g in opt.param_groups]
    with torch.no_grad():
        for p in params:
            p.zero_()
            opt.state[p]["momentum_buffer"].zero_()
            p.grad.fill_(1.0)
    opt.step()
    lrs = [-float(p.detach()[0]) for p in params]
    with torch.no_grad():
        for p in params:
            p.zero_()
            opt.state[p]["momentum_buffer"].fill_(1.0)
            p.grad.zero_()
    opt.step()
    moms = [float(opt.state[p]["momentum_buffer"][0]) for p in params]
    for p, lr, m in zip(params, lrs, moms):  # the update used that same momentum
        torch.testing.assert_close(-float(p.detach()[0]), lr * m, rtol=1e-6, atol=1e-30)
    return [*lrs, *moms]


def _fc_sgd(backend):
    opt = make_optimizer("fc_sgd", backend)
    for g in opt.param_groups:
        g["params"][0].grad = torch.zeros_like(g["params"][0])
    opt.step()  # allocates the state and passes every segment's first step
    return opt


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_applies_torch_lr_and_momentum(case, backend):
    expected = torch.tensor(torch_rows(case, "sgd"), dtype=torch.float64)
    opt = _fc_sgd(backend)
    sched = case.build(FS, opt)
    got = []
    for t in range(case.steps + 1):
        if t:
            sched.step()
        got.append(_applied_sgd(opt))
    got_t = torch.tensor(got, dtype=torch.float64)
    # fp32 parameters: the applied lr is exact to fp32 rounding.
    torch.testing.assert_close(got_t[:, :2], expected[:, :2], rtol=RTOL, atol=max(case.atol, 1e-30))
    torch.testing.assert_close(got_t[:, 2:], expected[:, 2:], rtol=RTOL, atol=0.0)


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["onecycle", "cyclic_momentum_lists", "onecycle_linear_three_phase"])
def test_kernel_applies_torch_beta1(case_id, backend):
    """fusedclr.Adam with exp_avg = exp_avg_sq = 1 and grad 0: the update pins lr and beta1 (bias-corrected)."""
    case = next(c for c in CASES if c.id == case_id)
    expected = torch_rows(case, "adam")
    opt = make_optimizer("fc_adam", backend, dtype=torch.float64)
    params = [g["params"][0] for g in opt.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    sched = case.build(FS, opt)
    eps, beta2 = opt.param_groups[0]["eps"], opt.param_groups[0]["betas"][1]
    for t in range(case.steps + 1):
        if t:
            sched.step()
        with torch.no_grad():
            for p in params:
                p.zero_()
                # Assigned: before the first step the entry is empty, as torch's (it starts at step 0).
                opt.state[p]["exp_avg"] = torch.ones_like(p)
                opt.state[p]["exp_avg_sq"] = torch.ones_like(p)
        opt.step()
        s = t + 1  # each parameter's own step count
        for gi, p in enumerate(params):
            lr, beta1 = expected[t][gi], expected[t][2 + gi]
            assert float(opt.state[p]["exp_avg"][0]) == pytest.approx(beta1, rel=1e-12)
            want = -lr * beta1 / (1 - beta1**s) / (math.sqrt(beta2) / math.sqrt(1 - beta2**s) + eps)
            torch.testing.assert_close(float(p.detach()[0]), want, rtol=RTOL, atol=0.0)


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_scheduler_still_drives_fusedclr_optimizer(backend):
    case = next(c for c in CASES if c.id == "onecycle_three_phase")
    expected = torch.tensor(torch_rows(case, "sgd"), dtype=torch.float64)
    opt = _fc_sgd(backend)
    sched = TS.OneCycleLR(opt, max_lr=0.2, total_steps=150, three_phase=True)
    got = []
    for t in range(case.steps + 1):
        if t:
            sched.step()
        got.append(_applied_sgd(opt))
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, rtol=RTOL, atol=0.0)


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
def test_host_fallbacks_still_apply_torch_values(backend):
    # A Python scale_fn: torch's computation on the host, read by the optimizer.
    kw = dict(base_lr=0.01, max_lr=0.1, step_size_up=5, scale_fn=lambda x: 0.5 ** (x - 1))
    opt_t = make_optimizer("sgd")
    sched_t = TS.CyclicLR(opt_t, **kw)
    opt = _fc_sgd(backend)
    with pytest.warns(UserWarning, match="scale_fn"):
        sched = FS.CyclicLR(opt, **kw)
    for t in range(30):
        if t:
            opt_t.step()
            sched_t.step()
            sched.step()
        torch.testing.assert_close(_applied_sgd(opt), [*sched_t.get_last_lr(), *momenta(opt_t)], rtol=RTOL, atol=0)

    # A fractional epoch: host until the epoch is an integer again, then the kernel.
    opt_t = make_optimizer("sgd")
    sched_t = TS.CosineAnnealingWarmRestarts(opt_t, T_0=4, T_mult=2, eta_min=0.01)
    opt = _fc_sgd(backend)
    sched = FS.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=0.01)
    with pytest.warns(UserWarning, match="fractional"):
        for epoch in (None, 1.5, None, 7, None, None, 16, None):
            sched_t.step(epoch)
            sched.step(epoch)
            torch.testing.assert_close(_applied_sgd(opt)[:2], sched_t.get_last_lr(), rtol=RTOL, atol=0)


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["cyclic_triangular2_4cycles", "seq_warmup_cyclic_momentum", "sgdr_tmult2_decay_warmup"])
def test_kernel_resume_mid_cycle(case_id, backend):
    case = next(c for c in CASES if c.id == case_id)
    expected = torch.tensor(torch_rows(case, "sgd"), dtype=torch.float64)
    split = case.steps // 2 + 1
    opt = _fc_sgd(backend)
    sched = case.build(FS, opt)
    got = [_applied_sgd(opt)]
    for _ in range(split):
        sched.step()
        got.append(_applied_sgd(opt))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    opt = _fc_sgd(backend)
    sched = case.build(FS, opt)
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert int(sched._fc_counter("cpu")) == split
    for _ in range(case.steps - split):
        sched.step()
        got.append(_applied_sgd(opt))
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, rtol=RTOL, atol=0.0)


@requires_fused
def test_param_group_added_later_is_left_to_its_own_lr():
    opt = _fc_sgd("reference")
    sched = FS.CosineAnnealingLR(opt, T_max=10)
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})  # re-attaches: the new group has no schedule
    assert sched._fc_descriptor(2) == reference.no_schedule()
    extra.grad = torch.ones(2)
    opt.step()
    assert float(extra.detach()[0]) == pytest.approx(-0.5)


# --------------------------------------------------------------------------
# 6. No host sync on the step path
# --------------------------------------------------------------------------


def _forbid(*_args, **_kwargs):
    raise AssertionError("the step path read a device value (sync)")


@requires_fused
@pytest.mark.parametrize("case_id", ["onecycle", "seq_linear_multistep_multistep", "sgdr_tmult2_decay_warmup",
                                     "cyclic_exp_range"])
def test_step_path_never_syncs(monkeypatch, case_id):
    case = next(c for c in CASES if c.id == case_id)
    backend = "cpu" if fusedclr.ops.extension_available() else "reference"
    opt = _fc_sgd(backend)
    sched = case.build(FS, opt)
    opt.step()
    sched.step()
    with monkeypatch.context() as mp:
        for name in ("item", "cpu", "tolist"):
            mp.setattr(torch.Tensor, name, _forbid)
        for _ in range(5):
            if backend == "cpu":
                opt.step()
            sched.step()
        # The scheduler alone touches no tensor value at all.
        for name in ("__float__", "__int__", "__bool__", "__index__", "numpy"):
            mp.setattr(torch.Tensor, name, _forbid)
        for _ in range(5):
            sched.step()
        sched.get_last_lr()
    assert int(sched._fc_counter("cpu")) == sched.last_epoch


def test_forbidden_methods_really_are_caught(monkeypatch):
    # The guard above must be able to fail.
    monkeypatch.setattr(torch.Tensor, "item", _forbid)
    with pytest.raises(AssertionError, match="sync"):
        torch.zeros(()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_counter_step_never_syncs():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4, device="cuda"))], lr=0.1, momentum=0.9)
    sched = FS.OneCycleLR(opt, max_lr=0.5, total_steps=100)
    counter = sched._fc_counter(torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(counter) == 10


# --------------------------------------------------------------------------
# 7. Several schedulers on one optimizer compose as torch's do
# --------------------------------------------------------------------------


def _plateau_and_step(m, o):
    """ReduceLROnPlateau (a metric that never improves after epoch 0) and StepLR, stepped together."""
    plateau = m.ReduceLROnPlateau(o, patience=1, factor=0.5)
    step = m.StepLR(o, step_size=3, gamma=0.1)
    metrics = iter([1.0] + [2.0] * 100)

    class Both:
        def step(self):
            plateau.step(next(metrics))
            step.step()

        def get_last_lr(self):
            return step.get_last_lr()

    return Both()


COMPOSED = [
    Case("step_and_exponential", lambda m, o: _both(m.StepLR(o, step_size=4, gamma=0.5), m.ExponentialLR(o, 0.9)), 20),
    Case("plateau_and_step", _plateau_and_step, 10),
    Case("linear_warmup_and_cosine",
         lambda m, o: _both(m.LinearLR(o, start_factor=0.1, total_iters=5), m.CosineAnnealingLR(o, T_max=12)), 30,
         atol=1e-15),
    Case("sgdr_and_multistep",
         lambda m, o: _both(m.CosineAnnealingWarmRestarts(o, T_0=5), m.MultiStepLR(o, [3, 8], gamma=0.5)), 20),
    Case("lambda_and_step", lambda m, o: _both(m.LambdaLR(o, lambda t: 1.0 / (t + 1)), m.StepLR(o, 3)), 12),
    Case("polynomial_and_constant",
         lambda m, o: _both(m.PolynomialLR(o, total_iters=10, power=2.0), m.ConstantLR(o, factor=0.5)), 14,
         atol=1e-15),
    Case("chained", lambda m, o: m.ChainedScheduler([m.ConstantLR(o, factor=0.5, total_iters=3),
                                                     m.ExponentialLR(o, gamma=0.9)]), 12),
    Case("seq_beside_step",
         lambda m, o: _both(m.StepLR(o, step_size=4, gamma=0.5),
                            _seq(m, o, [lambda m, o: m.LinearLR(o, start_factor=0.2, total_iters=3),
                                        lambda m, o: m.ExponentialLR(o, gamma=0.8)], [3])), 15),
]


def _both(a, b):
    class Both:
        def step(self):
            a.step()
            b.step()

        def get_last_lr(self):
            return b.get_last_lr()

    return Both()


@pytest.mark.parametrize("case", COMPOSED, ids=[c.id for c in COMPOSED])
def test_composed_schedulers_match_torch_on_a_torch_optimizer(case):
    expected = torch_rows(case, "sgd")
    opt = make_optimizer("sgd")
    sched = case.build(FS, opt)
    for t, want in enumerate(expected):
        if t:
            opt.step()
            sched.step()
        torch.testing.assert_close([*map(float, sched.get_last_lr()), *momenta(opt)], want, rtol=RTOL, atol=case.atol)


# Multiplicative families compose in-kernel (a PRODUCT descriptor); the others on the host.
IN_KERNEL = {"step_and_exponential", "polynomial_and_constant", "chained"}


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", COMPOSED, ids=[c.id for c in COMPOSED])
def test_composed_schedulers_apply_torch_lr(case, backend, caplog):
    expected = torch.tensor(torch_rows(case, "sgd"), dtype=torch.float64)
    opt = _fc_sgd(backend)
    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.WARNING, "fusedclr.lr_scheduler"):
        warnings.simplefilter("always")
        sched = case.build(FS, opt)
        got = []
        for t in range(case.steps + 1):
            if t:
                sched.step()
            got.append(_applied_sgd(opt))
    # The host fallback is logged (a logging warning, once per optimizer), not a warnings.warn:
    # torch composes schedulers without a warning, and torch's own tests count warnings.
    assert not [w for w in record if "shares the optimizer" in str(w.message)]
    composed = [r for r in caplog.records if "shares the optimizer" in r.getMessage()]
    if case.id in IN_KERNEL:
        assert not composed and type(opt._scheduler).__name__ == "_Product"
        assert opt._buckets[0][0].schedule_covers == (True, False)  # the kernel reads the lr from the descriptor
    else:
        assert len(composed) == 1 and opt._scheduler is None  # one warning per optimizer; group["lr"] read
    got_t = torch.tensor(got, dtype=torch.float64)
    torch.testing.assert_close(got_t[:, :2], expected[:, :2], rtol=RTOL, atol=max(case.atol, 1e-30))


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_product_dissolves_when_its_members_stop_stepping_together(backend, caplog):
    """A warmup stepped every iteration beside a decay stepped every 'epoch': torch's numbers, on the host."""
    rows = []
    for m in (TS, FS):
        opt = make_optimizer("sgd") if m is TS else _fc_sgd(backend)
        warm = m.LinearLR(opt, start_factor=0.1, total_iters=6)
        decay = m.ExponentialLR(opt, gamma=0.5)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "fusedclr.lr_scheduler"):
            for it in range(12):
                if m is FS:
                    rows.append(_applied_sgd(opt)[:2])
                else:
                    opt.step()
                    rows.append([float(g["lr"]) for g in opt.param_groups])
                warm.step()
                if it % 3 == 2:
                    decay.step()
        if m is FS:
            assert opt._scheduler is None
            assert sum("shares the optimizer" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(rows[12:], rows[:12], rtol=RTOL, atol=0.0)


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_product_resumes_from_a_checkpoint(backend):
    case = next(c for c in COMPOSED if c.id == "chained")
    expected = torch.tensor(torch_rows(case, "sgd"), dtype=torch.float64)
    opt = _fc_sgd(backend)
    sched = case.build(FS, opt)
    got = [_applied_sgd(opt)]
    for _ in range(5):
        sched.step()
        got.append(_applied_sgd(opt))
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt = _fc_sgd(backend)
    sched = case.build(FS, opt)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    for _ in range(case.steps - 5):
        sched.step()
        got.append(_applied_sgd(opt))
    assert type(opt._scheduler).__name__ == "_Product"
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64)[:, :2], expected[:, :2], rtol=RTOL, atol=0.0)


@requires_fused
def test_plateau_and_step_compose_to_torchs_value():
    # The example: ReduceLROnPlateau + StepLR gave 0.05 here and 0.005 in torch.
    rows = []
    for m in (TS, FS):
        opt = fusedclr.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5, backend="reference")
        plateau = m.ReduceLROnPlateau(opt, patience=0)
        step = m.StepLR(opt, step_size=1, gamma=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            plateau.step(1.0)
            plateau.step(2.0)  # a bad epoch: x 0.1
            step.step()  # x 0.1
        rows.append(opt.param_groups[0]["lr"])
    assert rows[0] == pytest.approx(0.005, rel=1e-12)
    assert rows[1] == pytest.approx(rows[0], rel=1e-12)


def test_one_scheduler_stays_in_the_kernel_and_sequential_children_do_not_compose():
    opt = _recording()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = FS.ExponentialLR(opt, gamma=0.9)
        opt.step()
        sched.step()
        assert opt.attached == [sched]
        opt2 = _recording()
        seq = _seq(FS, opt2, [lambda m, o: m.LinearLR(o, total_iters=3), lambda m, o: m.ExponentialLR(o, 0.9)], [3])
        for _ in range(5):
            opt2.step()
            seq.step()
    assert opt2.attached[-1] is seq and seq._fc_host_reason() is None
    assert FS.ChainedScheduler([FS.StepLR(_recording(), 3)])._schedulers[0]._fc_host_reason() is None


def test_registry_holds_schedulers_weakly():
    import gc
    import weakref

    opt = make_optimizer("sgd")
    first = FS.CyclicLR(opt, base_lr=0.01, max_lr=0.1)
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None
    second = FS.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # alone again: no composition
    assert second._fc_host_reason() is None


@pytest.mark.parametrize("kind", ["sgd", "fc_sgd"])
def test_lr_moved_by_a_torch_scheduler_or_by_hand_is_followed_like_torch(kind):
    """A torch scheduler beside ours, a replaced scheduler, a manual edit: torch continues from the group's lr."""
    rows = []
    for m in (TS, FS):
        opt = make_optimizer(kind, "reference") if kind == "fc_sgd" else make_optimizer(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            old = m.StepLR(opt, step_size=2, gamma=0.5)
            for _ in range(3):
                old.step()
            del old  # replaced: the lr it left is where torch's next scheduler starts
            ours = m.ExponentialLR(opt, gamma=0.9)
            beside = TS.MultiStepLR(opt, milestones=[2], gamma=0.1)
            for t in range(6):
                ours.step()
                beside.step()
                if t == 3:
                    opt.param_groups[0]["lr"] = 0.7  # by hand
                rows.append([float(g["lr"]) for g in opt.param_groups])
    n = len(rows) // 2
    torch.testing.assert_close(rows[n:], rows[:n], rtol=RTOL, atol=0.0)


# An edit between scheduler.step() and optimizer.step() is what that step uses [note: edits between steps]


def _set_lr(opt, lr):
    opt.param_groups[0]["lr"] = lr


def _set_momentum(opt, m):
    g = opt.param_groups[0]
    if "betas" in g:
        g["betas"] = (m, g["betas"][1])
    else:
        g["momentum"] = m


EDITS = {
    # name: (optimizer kind, tensor lr, build(module, opt) -> schedulers, edit(opt) after the step at t == 2)
    "float_lr_onecycle": ("sgd", False, lambda m, o: [m.OneCycleLR(o, max_lr=0.2, total_steps=12)],
                          lambda o: _set_lr(o, 1e-3)),
    "float_lr_exponential": ("adam", False, lambda m, o: [m.ExponentialLR(o, gamma=0.8)],
                             lambda o: _set_lr(o, 0.5)),
    "tensor_lr_mul_": ("sgd", True, lambda m, o: [m.ExponentialLR(o, gamma=0.8)],
                       lambda o: o.param_groups[0]["lr"].mul_(0.1)),
    "tensor_lr_torch_steplr_beside": ("adam", True, lambda m, o: [m.ExponentialLR(o, gamma=0.8),
                                                                  TS.StepLR(o, step_size=2, gamma=0.5)], None),
    "momentum_onecycle": ("sgd", False, lambda m, o: [m.OneCycleLR(o, max_lr=0.2, total_steps=12)],
                          lambda o: _set_momentum(o, 0.5)),
    "beta1_cyclic": ("adam", False, lambda m, o: [m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3,
                                                             base_momentum=0.8, max_momentum=0.95)],
                     lambda o: _set_momentum(o, 0.5)),
    "float_lr_in_kernel_product": ("sgd", False, lambda m, o: [m.ChainedScheduler([
        m.StepLR(o, step_size=2, gamma=0.5), m.ExponentialLR(o, gamma=0.9)])], lambda o: _set_lr(o, 0.05)),
}


def _edited_run(m, kind, tensor_lr, build, edit, backend, steps=8):
    """Parameters after every optimizer step, with the edit made between scheduler.step() and optimizer.step()."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    lr = torch.tensor(0.1, dtype=torch.float64) if tensor_lr else 0.1
    groups = [{"params": [a]}, {"params": [b], "lr": torch.tensor(0.03, dtype=torch.float64) if tensor_lr else 0.03}]
    if m is TS:
        opt = (torch.optim.SGD(groups, lr=lr, momentum=0.9) if kind == "sgd"
               else torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.99)))
    else:
        opt = (fusedclr.SGD(groups, lr=lr, momentum=0.9, backend=backend) if kind == "sgd"
               else fusedclr.Adam(groups, lr=lr, betas=(0.9, 0.99), backend=backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the legacy warnings of torch's own schedulers
        scheds = build(m, opt)
        rows = []
        for t in range(steps):
            g = torch.Generator().manual_seed(t)
            for p in (a, b):
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
            opt.step()
            rows.append(torch.cat([a.detach(), b.detach()]).clone())
            for sched in scheds:
                sched.step()
            if t == 2 and edit is not None:
                edit(opt)
    return torch.stack(rows), scheds


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EDITS))
def test_edit_between_scheduler_and_optimizer_steps_is_used_like_torch(name, backend):
    """The edited value drives the very next step, and torch's schedule continues from it."""
    kind, tensor_lr, build, edit = EDITS[name]
    want, _ = _edited_run(TS, kind, tensor_lr, build, edit, backend)
    got, scheds = _edited_run(FS, kind, tensor_lr, build, edit, backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert not torch.equal(want[3], want[2])  # the parameters move through the edit


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_unedited_schedule_stays_in_the_kernel(tensor_lr, backend):
    """No false alarm: the scheduler's own writes, and a checkpoint round trip, leave it in the kernel."""
    name = "tensor_lr_mul_" if tensor_lr else "float_lr_onecycle"
    kind, _, build, _ = EDITS[name]
    want, _ = _edited_run(TS, kind, tensor_lr, build, None, backend)
    got, (sched,) = _edited_run(FS, kind, tensor_lr, build, None, backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert sched._fc_in_kernel and not sched._fc_chained
    opt = sched.optimizer
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    sched.load_state_dict(saved_sched)
    if not tensor_lr:  # a float lr is compared by value: either order of the loads
        opt.load_state_dict(saved_opt)
    opt.step()
    sched.step()
    opt.step()
    assert sched._fc_in_kernel and not sched._fc_chained


def _sgd_pair(m, lr=0.1, **groups_kw):
    """A parameter and a plain SGD (torch's, or fusedclr's on the reference backend) at ``lr``."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": [p], **groups_kw}], lr=lr) if m is TS else fusedclr.SGD(
        [{"params": [p], **groups_kw}], lr=lr, backend="reference")
    return p, opt


def _applied_lrs(p, opt, scheds, steps):
    """The lr each optimizer step applied (SGD without momentum, grad 1), then every scheduler steps."""
    out = []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        out.append(float(before[0] - p.detach()[0]))
        for sched in scheds:
            sched.step()
    return out


def _warmup_cosine(m):
    class WarmupCosine(m.CosineAnnealingLR):
        """A user's warmup: get_lr overridden in a subclass."""

        def __init__(self, opt, warmup, T_max):
            self.warmup = warmup
            super().__init__(opt, T_max=T_max)

        def get_lr(self):
            if self.last_epoch < self.warmup:
                return [b * (self.last_epoch + 1) / self.warmup for b in self.base_lrs]
            return super().get_lr()

    return WarmupCosine


def _assert_applies_torchs_lrs(build, warning: str) -> list[float]:
    """``build(module, opt)`` from torch's classes and from ours: the lrs each step applied agree,
    and ours warned with ``warning`` when built. Returns torch's lrs."""
    rows = {}
    for m in (TS, FS):
        p, opt = _sgd_pair(m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sched = build(m, opt)
        rows[m] = _applied_lrs(p, opt, [sched], 8)
        if m is FS:
            assert any(warning in str(w.message) for w in caught)
    torch.testing.assert_close(rows[FS], rows[TS], rtol=1e-12, atol=0.0)
    return rows[TS]


@requires_fused
def test_subclass_overriding_get_lr_is_what_the_step_applies():
    """A user's get_lr() override cannot be a closed form: the scheduler runs on the host, and says so."""
    want = _assert_applies_torchs_lrs(lambda m, opt: _warmup_cosine(m)(opt, warmup=4, T_max=10),
                                      "WarmupCosine overrides get_lr()")
    assert want[0] == pytest.approx(0.025)  # the warmup: what a closed form would have skipped


COPIED = {
    "step": lambda m, o: m.StepLR(o, step_size=2, gamma=0.5),
    "onecycle": lambda m, o: m.OneCycleLR(o, max_lr=0.3, total_steps=12),
    "sgdr": lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=3),
    "cyclic": lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=False),
    "product": lambda m, o: m.ChainedScheduler([m.StepLR(o, step_size=2, gamma=0.5), m.ExponentialLR(o, 0.9)]),
}


@requires_fused
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", list(COPIED))
def test_copied_optimizer_and_scheduler_continue_the_schedule(name, how):
    """copy.deepcopy or torch.save/load of (params, optimizer, scheduler) mid-run: the copy's steps
    apply the copy's schedule, and the original's keep applying its own."""
    import copy

    rows = {}
    for m in (TS, FS):
        p, opt = _sgd_pair(m)
        sched = COPIED[name](m, opt)
        first = _applied_lrs(p, opt, [sched], 3)
        if how == "deepcopy":
            p2, opt2, sched2 = copy.deepcopy((p, opt, sched))
        else:
            buf = io.BytesIO()
            torch.save((p, opt, sched), buf)
            buf.seek(0)
            p2, opt2, sched2 = torch.load(buf, weights_only=False)
        rows[m] = first + _applied_lrs(p2, opt2, [sched2], 5) + _applied_lrs(p, opt, [sched], 5)
    torch.testing.assert_close(rows[FS], rows[TS], rtol=1e-12, atol=0.0)
    assert len(set(rows[TS][3:8])) > 1  # the copy's schedule moves


MOMENTUM_SCHEDULES = {
    "onecycle_sgd": ("sgd", lambda m, o: m.OneCycleLR(o, max_lr=0.3, total_steps=20)),
    "onecycle_adam": ("adam", lambda m, o: m.OneCycleLR(o, max_lr=0.3, total_steps=20)),
    "cyclic_sgd": ("sgd", lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3)),
    "seq_onecycle": ("sgd", lambda m, o: _seq(m, o, [lambda m, o: m.OneCycleLR(o, max_lr=0.3, total_steps=8),
                                                     lambda m, o: m.ExponentialLR(o, 0.9)], [8])),
}


def _momentum_pair(m, kind):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    if m is TS:
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.Adam([p], lr=0.1)
    else:
        opt = (fusedclr.SGD([p], lr=0.1, momentum=0.9, backend="reference") if kind == "sgd"
               else fusedclr.Adam([p], lr=0.1, backend="reference"))
    return p, opt


def _stepped(p, opt, sched, steps, edit_at=None):
    """Parameters after each step (grads vary), with ``edit_at``: momentum/beta1 set to 0.5 after that step."""
    rows = []
    for t in range(steps):
        p.grad = torch.full_like(p, 1.0 + 0.1 * t)
        opt.step()
        rows.append(p.detach().clone())
        sched.step()
        if t == edit_at:
            _set_momentum(opt, 0.5)
    return rows


@requires_fused
@pytest.mark.parametrize("name", list(MOMENTUM_SCHEDULES))
def test_resumed_cyclical_momentum_stays_in_the_kernel(name):
    """New optimizer and scheduler, both states loaded (either order): nothing was edited, so the
    schedule stays in the kernel, and the steps are torch's."""
    kind, build = MOMENTUM_SCHEDULES[name]
    for sched_first in (False, True):
        rows = {}
        for m in (TS, FS):
            p, opt = _momentum_pair(m, kind)
            sched = build(m, opt)
            _stepped(p, opt, sched, 4)
            saved_p, saved_opt, saved_sched = p.detach().clone(), opt.state_dict(), sched.state_dict()
            p2, opt2 = _momentum_pair(m, kind)
            with torch.no_grad():
                p2.copy_(saved_p)
            sched2 = build(m, opt2)
            if sched_first:
                sched2.load_state_dict(saved_sched)
                opt2.load_state_dict(saved_opt)
            else:
                opt2.load_state_dict(saved_opt)
                sched2.load_state_dict(saved_sched)
            rows[m] = _stepped(p2, opt2, sched2, 5)
            if m is FS:
                assert sched2._fc_in_kernel and not sched2._fc_chained, sched_first
        torch.testing.assert_close(rows[FS], rows[TS], rtol=1e-12, atol=1e-14)


@requires_fused
@pytest.mark.parametrize("copied", [False, True], ids=["same", "deepcopy"])
@pytest.mark.parametrize("name", list(MOMENTUM_SCHEDULES))
def test_momentum_edit_under_cyclical_momentum_is_used_like_torch(name, copied):
    """Momentum (or beta1) set by hand after scheduler.step(): the next step uses it, also under a
    SequentialLR and in a deep copy made just before the edit."""
    import copy

    kind, build = MOMENTUM_SCHEDULES[name]
    rows = {}
    for m in (TS, FS):
        p, opt = _momentum_pair(m, kind)
        sched = build(m, opt)
        first = _stepped(p, opt, sched, 3)
        if copied:
            p, opt, sched = copy.deepcopy((p, opt, sched))
        _set_momentum(opt, 0.5)
        rows[m] = first + _stepped(p, opt, sched, 4)
    torch.testing.assert_close(rows[FS], rows[TS], rtol=1e-12, atol=1e-14)


@requires_fused
def test_sequential_child_overriding_get_lr_is_what_the_step_applies():
    _assert_applies_torchs_lrs(
        lambda m, opt: m.SequentialLR(opt, [_warmup_cosine(m)(opt, warmup=4, T_max=6), m.ExponentialLR(opt, 0.9)],
                                      [4]),
        "WarmupCosine) overrides get_lr()")


RESUMED = {
    "step": lambda m, o, e: m.StepLR(o, step_size=2, gamma=0.5, last_epoch=e),
    "multistep": lambda m, o, e: m.MultiStepLR(o, milestones=[4, 6], gamma=0.5, last_epoch=e),
    "exponential": lambda m, o, e: m.ExponentialLR(o, gamma=0.9, last_epoch=e),
    "cosine": lambda m, o, e: m.CosineAnnealingLR(o, T_max=10, last_epoch=e),
    "linear": lambda m, o, e: m.LinearLR(o, start_factor=0.2, total_iters=6, last_epoch=e),
    "constant": lambda m, o, e: m.ConstantLR(o, factor=0.5, total_iters=4, last_epoch=e),
    "polynomial": lambda m, o, e: m.PolynomialLR(o, total_iters=8, power=2.0, last_epoch=e),
    "onecycle": lambda m, o, e: m.OneCycleLR(o, max_lr=0.3, total_steps=12, last_epoch=e),
}


@requires_fused
@pytest.mark.parametrize("name", list(RESUMED))
def test_scheduler_built_with_last_epoch_applies_torchs_lr(name):
    """The resume idiom Sched(opt, ..., last_epoch=k) on an optimizer restored from a checkpoint:
    torch's constructor keeps the group's lr and its update continues from there."""
    rows = {}
    for m in (TS, FS):
        p, opt = _sgd_pair(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sched = RESUMED[name](m, opt, -1)
            _applied_lrs(p, opt, [sched], 3)
            saved, k = opt.state_dict(), sched.last_epoch
            p2, opt2 = _sgd_pair(m)
            opt2.load_state_dict(saved)
            resumed = RESUMED[name](m, opt2, k)
            rows[m] = _applied_lrs(p2, opt2, [resumed], 6)
    torch.testing.assert_close(rows[FS], rows[TS], rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------------
# 8. A param group added after the scheduler: torch's values, or torch's error
# --------------------------------------------------------------------------


ADD_GROUP_BUILDS = {
    "step": lambda m, o: m.StepLR(o, step_size=2, gamma=0.5),
    "exponential": lambda m, o: m.ExponentialLR(o, gamma=0.9),
    "linear": lambda m, o: m.LinearLR(o, start_factor=0.2, total_iters=6),
    "polynomial": lambda m, o: m.PolynomialLR(o, total_iters=8, power=2.0),
    "cosine": lambda m, o: m.CosineAnnealingLR(o, T_max=3),
    "sgdr": lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=4),
    "cyclic": lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "onecycle": lambda m, o: m.OneCycleLR(o, max_lr=0.2, total_steps=20),
    "seq": lambda m, o: _seq(m, o, [lambda m, o: m.LinearLR(o, total_iters=2),
                                    lambda m, o: m.ExponentialLR(o, 0.9)], [2]),
    "in_kernel_product": lambda m, o: m.ChainedScheduler([m.StepLR(o, step_size=2, gamma=0.5),
                                                          m.ExponentialLR(o, gamma=0.9)]),
}


def _add_group_run(m, opt, build, steps=10):
    """Rows of get_last_lr() (or the exception torch raised) with a group added at step 3."""
    sched = build(m, opt)
    rows = []
    for t in range(steps):
        if t == 3:
            extra = torch.nn.Parameter(torch.zeros(2))
            extra.grad = torch.zeros(2)
            opt.add_param_group({"params": [extra], "lr": 0.5, "momentum": 0.9})
        opt.step()
        try:
            sched.step()
        except (ValueError, KeyError) as exc:
            rows.append((type(exc), str(exc)))
            break
        rows.append([float(g["lr"]) for g in opt.param_groups])
    return rows


@requires_fused
@pytest.mark.parametrize("name", list(ADD_GROUP_BUILDS))
def test_param_group_added_later_gets_torchs_schedule_or_error(name):
    build = ADD_GROUP_BUILDS[name]
    expected = _add_group_run(TS, make_optimizer("sgd"), build)
    opt = _fc_sgd("reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = _add_group_run(FS, opt, build)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, tuple):
            assert g == e
        else:
            torch.testing.assert_close(g, e, rtol=RTOL, atol=1e-15)
    if not isinstance(expected[-1], tuple):
        # ... and the optimizer applies it to the new group.
        extra = opt.param_groups[2]["params"][0]
        with torch.no_grad():
            extra.zero_()
            opt.state[extra]["momentum_buffer"].zero_()
        extra.grad.fill_(1.0)
        opt.step()
        assert -float(extra.detach()[0]) == pytest.approx(expected[-1][2], rel=1e-6)


# --------------------------------------------------------------------------
# 9. A T_cur set by the user
# --------------------------------------------------------------------------


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "T_mult, edits",
    [(1, {4: (1, None)}), (1, {9: (0, None), 14: (3, None)}), (2, {6: (2, None)}), (2, {3: (5, 12)}),
     (2, {5: (2.5, None)}), (1, {4: (8, None)}), (1, {4: (1, None), 9: "epoch"})],
    ids=["restart_early", "twice", "tmult2", "tmult2_next_cycle", "fractional_host", "beyond_T_i_host",
         "then_explicit_epoch"],
)
def test_user_set_T_cur_is_followed_like_torch(backend, T_mult, edits):
    kw = dict(T_0=6, T_mult=T_mult, eta_min=0.01)
    opt_t = make_optimizer("sgd")
    sched_t = TS.CosineAnnealingWarmRestarts(opt_t, **kw)
    opt = _fc_sgd(backend)
    sched = FS.CosineAnnealingWarmRestarts(opt, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for t in range(1, 30):
            epoch = t if edits.get(t) == "epoch" else None  # torch recomputes T_cur from an epoch
            for s in (sched_t, sched):
                if t in edits and epoch is None:
                    s.T_cur = edits[t][0]
                    if edits[t][1] is not None:
                        s.T_i = edits[t][1]
            opt_t.step()
            sched_t.step(epoch)
            sched.step(epoch)
            assert (sched.T_cur, sched.T_i) == pytest.approx((sched_t.T_cur, sched_t.T_i)), t
            torch.testing.assert_close(sched.get_last_lr(), sched_t.get_last_lr(), rtol=RTOL, atol=0.0)
            torch.testing.assert_close(_applied_sgd(opt)[:2], sched_t.get_last_lr(), rtol=RTOL, atol=0.0)


@requires_fused
def test_representable_T_cur_edit_stays_in_the_kernel():
    opt = _recording()
    sched = FS.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2)
    for _ in range(3):
        sched.step()
    sched.T_cur = 0  # a restart now
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()
    assert sched._fc_host_reason() is None and opt.attached[-1] is sched
    assert sched.T_cur == 1 and int(sched._fc_counter("cpu")) == sched.last_epoch == 4


# --------------------------------------------------------------------------
# 10. state_dict round trips leave equal __dict__s (torch's own test compares them)
# --------------------------------------------------------------------------


def _public_dict(sched) -> dict:
    # CyclicLR's _scale_fn_ref is a fresh functools.partial per object, in torch's class too.
    return {k: v for k, v in sched.__dict__.items() if k not in ("optimizer", "_schedulers", "_scale_fn_ref")}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_state_dict_gives_an_equal_dict(case):
    opt = make_optimizer("sgd")
    sched = case.build(FS, opt)
    for _ in range(3):
        opt.step()
        sched.step()
    copy = case.build(FS, make_optimizer("sgd"))
    copy.load_state_dict(sched.state_dict())
    assert _public_dict(copy) == _public_dict(sched)
    fresh = case.build(FS, make_optimizer("sgd"))
    assert _public_dict(fresh).keys() == _public_dict(sched).keys()
    assert fresh._fc_descs == case.build(FS, make_optimizer("sgd"))._fc_descs


# --------------------------------------------------------------------------
# 11. Python callables: torch's numbers on the host
# --------------------------------------------------------------------------

HOST_CASES = [
    Case("lambda", lambda m, o: m.LambdaLR(o, [lambda t: 0.95**t, lambda t: 1 / (1 + t)]), 20),
    Case("multiplicative", lambda m, o: m.MultiplicativeLR(o, lambda t: 0.9 if t % 2 else 1.0), 20),
]


@pytest.mark.parametrize("case", HOST_CASES, ids=[c.id for c in HOST_CASES])
def test_python_callables_give_torchs_numbers(case):
    expected = torch.tensor(torch_rows(case, "sgd"), dtype=torch.float64)
    opt = _fc_sgd("reference")
    with pytest.warns(UserWarning, match="lr_lambda is a Python function"):
        sched = case.build(FS, opt)
    got = []
    for t in range(case.steps + 1):
        if t:
            sched.step()
        got.append(_applied_sgd(opt))
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, rtol=RTOL, atol=0.0)
    state = sched.state_dict()
    assert "lr_lambdas" in state and not any(k.startswith("_fc_") for k in state)


def test_every_torch_scheduler_class_is_here():
    public = {n for n, c in vars(TS).items() if isinstance(c, type) and issubclass(c, TS.LRScheduler)
              and not n.startswith("_")}
    assert public <= set(FS.__all__)


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduler_built_after_the_optimizer_load_returns_to_the_kernel(backend):
    """torch's docs build the scheduler before loading the optimizer; the other order must give torch's numbers too."""
    def build(m, o):
        return m.MultiStepLR(o, milestones=[3, 7], gamma=0.5)

    def trained(m, opt):
        sched = build(m, opt)
        for _ in range(5):
            opt.step()
            sched.step()
        return opt.state_dict(), sched.state_dict()

    rows = []
    for m, opt_t, opt_r in ((TS, make_optimizer("sgd"), make_optimizer("sgd")), (FS, _fc_sgd(backend), _fc_sgd(backend))):
        opt_state, sched_state = trained(m, opt_t)
        opt_r.load_state_dict(opt_state)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no composition warning: it is alone again after the load
            sched = build(m, opt_r)
            sched.load_state_dict(sched_state)
            for _ in range(6):
                opt_r.step()
                sched.step()
                rows.append([float(g["lr"]) for g in opt_r.param_groups])
        if m is FS:
            assert sched._fc_host_reason() is None and opt_r._scheduler is sched
            torch.testing.assert_close(_applied_sgd(opt_r)[:2], rows[5], rtol=RTOL, atol=0.0)
    torch.testing.assert_close(rows[6:], rows[:6], rtol=RTOL, atol=0.0)


@requires_fused
def test_in_kernel_product_step_path_never_syncs(monkeypatch):
    backend = "cpu" if fusedclr.ops.extension_available() else "reference"
    opt = _fc_sgd(backend)
    chained = FS.ChainedScheduler([FS.LinearLR(opt, start_factor=0.5, total_iters=4), FS.StepLR(opt, 2, 0.5)])
    opt.step()
    chained.step()
    with monkeypatch.context() as mp:
        for name in ("item", "cpu", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"):
            mp.setattr(torch.Tensor, name, _forbid)
        for _ in range(5):
            if backend == "cpu":
                opt.step()
            chained.step()
    assert type(opt._scheduler).__name__ == "_Product"
    assert int(opt._buckets[0][0].schedule_step) == 6


@requires_extension
@requires_fused
@pytest.mark.parametrize("case_id", sorted(IN_KERNEL))
def test_cpp_evaluator_matches_reference_on_products(case_id):
    case = next(c for c in COMPOSED if c.id == case_id)
    opt = _fc_sgd("reference")
    sched = case.build(FS, opt)
    for _ in range(3):
        sched.step()  # the members' offsets stay 0; build one with an offset too
    product = opt._scheduler
    assert type(product).__name__ == "_Product"
    for gi in range(len(opt.param_groups)):
        desc = product._fc_descriptor(gi)
        assert desc[1] == 1.0  # PRODUCT
        _compare_eval(desc, range(case.steps + 3))
        shifted = list(desc)
        shifted[reference.HEADER_WORDS + reference.STAGE_WORDS + reference.S_T_BEGIN] = 4.0
        _compare_eval(shifted, range(4, case.steps + 7))


@requires_fused
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_scheduler_beside_an_absolute_schedule_is_followed(backend):
    """OneCycleLR writes absolute values; a torch StepLR beside it still scales them at its boundaries in torch."""
    expected = []
    opt_t = make_optimizer("sgd")
    one_t, step_t = TS.OneCycleLR(opt_t, max_lr=0.2, total_steps=30), TS.StepLR(opt_t, step_size=4, gamma=0.5)
    opt = _fc_sgd(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        one, step = FS.OneCycleLR(opt, max_lr=0.2, total_steps=30), TS.StepLR(opt, step_size=4, gamma=0.5)
        got = []
        for _ in range(20):
            opt_t.step()
            for s in (one_t, step_t, one, step):
                s.step()
            expected.append([*(g["lr"] for g in opt_t.param_groups), *momenta(opt_t)])
            got.append(_applied_sgd(opt))
    # StepLR's first change (row 3) reaches the kernel once our scheduler has seen it, at its
    # next step (the documented one-step lag); from then on, torch's values on the host.
    torch.testing.assert_close(got[:3], expected[:3], rtol=RTOL, atol=0.0)
    torch.testing.assert_close(got[4:], expected[4:], rtol=RTOL, atol=0.0)
    assert opt._scheduler is None


def test_classes_dropped_into_torchs_module_do_not_recurse(monkeypatch):
    """The drop-in pattern `torch.optim.lr_scheduler.X = fusedclr.lr_scheduler.X` must work:
    fusedclr calls torch's own classes, not whatever the module holds now."""
    for name in ("SequentialLR", "CosineAnnealingWarmRestarts", "StepLR", "LinearLR"):
        monkeypatch.setattr(torch.optim.lr_scheduler, name, getattr(FS, name))
    opt = _fc_sgd("cpu" if fusedclr.ops.extension_available() else "reference")
    seq = FS.SequentialLR(opt, [FS.LinearLR(opt, start_factor=0.5, total_iters=2), FS.StepLR(opt, step_size=2)],
                          milestones=[2])
    for _ in range(5):
        seq.step()
    sgdr = FS.CosineAnnealingWarmRestarts(_fc_sgd("cpu" if fusedclr.ops.extension_available() else "reference"),
                                          T_0=3)
    for epoch in (0.5, 1.5, 4.0):
        sgdr.step(epoch)  # fractional epochs go through torch's own update
    assert seq.last_epoch == 5 and sgdr.T_cur == 1.0



# -- [note: edited settings] -------------------------------------------------------------------------

# name -> (build(module, optimizer), edit(scheduler)): torch's schedulers read these settings at every
# step, so an edit mid-run changes the following lrs.
SETTING_EDITS: dict[str, tuple[Callable, Callable]] = {
    "cosine_T_max": (lambda m, o: m.CosineAnnealingLR(o, T_max=10), lambda s: setattr(s, "T_max", 40)),
    "cosine_eta_min": (lambda m, o: m.CosineAnnealingLR(o, T_max=10), lambda s: setattr(s, "eta_min", 0.02)),
    "step_gamma": (lambda m, o: m.StepLR(o, step_size=2, gamma=0.5), lambda s: setattr(s, "gamma", 0.9)),
    "step_size": (lambda m, o: m.StepLR(o, step_size=2, gamma=0.5), lambda s: setattr(s, "step_size", 3)),
    "exponential_gamma": (lambda m, o: m.ExponentialLR(o, gamma=0.9), lambda s: setattr(s, "gamma", 0.5)),
    "multistep_milestones": (lambda m, o: m.MultiStepLR(o, milestones=[6, 9]),
                             lambda s: setattr(s, "milestones", __import__("collections").Counter([5, 7]))),
    "linear_total_iters": (lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=8),
                           lambda s: setattr(s, "total_iters", 12)),
    "polynomial_power": (lambda m, o: m.PolynomialLR(o, total_iters=12, power=1.0), lambda s: setattr(s, "power", 2.0)),
    "onecycle_group_max_lr": (lambda m, o: m.OneCycleLR(o, max_lr=0.1, total_steps=16),
                              lambda s: s.optimizer.param_groups[0].__setitem__("max_lr", 0.02)),
    "cyclic_max_lrs": (lambda m, o: m.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
                       lambda s: setattr(s, "max_lrs", [0.05])),
    "warm_restarts_eta_min": (lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=4),
                              lambda s: setattr(s, "eta_min", 0.01)),
    "sequential_child_T_max": (
        lambda m, o: m.SequentialLR(o, [m.LinearLR(o, start_factor=0.5, total_iters=2),
                                        m.CosineAnnealingLR(o, T_max=10)], milestones=[2]),
        lambda s: setattr(s._schedulers[1], "T_max", 30)),
    "last_epoch_step": (lambda m, o: m.StepLR(o, step_size=3, gamma=0.5), lambda s: setattr(s, "last_epoch", 9)),
    "last_epoch_cosine": (lambda m, o: m.CosineAnnealingLR(o, T_max=20), lambda s: setattr(s, "last_epoch", 12)),
    "last_epoch_linear": (lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=20),
                          lambda s: setattr(s, "last_epoch", 9)),
    "last_epoch_exponential": (lambda m, o: m.ExponentialLR(o, gamma=0.9), lambda s: setattr(s, "last_epoch", 9)),
    "last_epoch_onecycle": (lambda m, o: m.OneCycleLR(o, max_lr=0.1, total_steps=20),
                            lambda s: setattr(s, "last_epoch", 9)),
    "last_epoch_warm_restarts": (lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=5),
                                 lambda s: setattr(s, "last_epoch", 9)),
}


def _settings_run(m, name, edit_at=4, steps=12):
    """lrs and parameters of every step of ``name``'s schedule with SGD, its setting edited after step ``edit_at``."""
    build, edit = SETTING_EDITS[name]
    p, opt = _sgd_pair(m)
    sched = build(m, opt)
    lrs, rows = [], []
    for t in range(steps):
        p.grad = torch.full_like(p, 1.0 + 0.1 * t)
        opt.step()
        rows.append(p.detach().clone())
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        if t == edit_at:
            edit(sched)
    return lrs, rows, sched


@requires_fused
@pytest.mark.parametrize("name", list(SETTING_EDITS))
def test_edited_scheduler_settings_take_effect_as_in_torch(name):
    """An attribute, a group's schedule key or last_epoch changed mid-run: the next lrs (and the steps)
    are torch's, which read them afresh, not the schedule as built [note: edited settings]."""
    want_lrs, want_rows, _ = _settings_run(TS, name)
    unedited, _, _ = _settings_run(TS, name, edit_at=-1)
    # The edit matters to torch, except last_epoch where its update does not read it (ExponentialLR
    # multiplies the group's lr, the warm restarts follow T_cur): fusedclr must not jump there either.
    assert (want_lrs == unedited) == (name in ("last_epoch_exponential", "last_epoch_warm_restarts"))
    got_lrs, got_rows, _ = _settings_run(FS, name)
    assert got_lrs == pytest.approx(want_lrs, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(got_rows, want_rows, rtol=1e-12, atol=1e-14)


@requires_fused
def test_unedited_settings_stay_in_the_kernel():
    """No false alarm: every schedule of the table left alone stays in the kernel."""
    for name in SETTING_EDITS:
        _, _, sched = _settings_run(FS, name, edit_at=-1)
        assert sched._fc_in_kernel and not sched._fc_chained, name


def _resume_with(m, edit_checkpoint):
    """5 steps of CosineAnnealingLR(T_max=10), a checkpoint, then 6 steps of a fresh optimizer and
    scheduler loaded from it (the scheduler's state edited by ``edit_checkpoint``)."""
    p, opt = _sgd_pair(m)
    sched = m.CosineAnnealingLR(opt, T_max=10)
    for t in range(5):
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"p": p.detach(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    edit_checkpoint(ck["sched"])
    p2, opt2 = _sgd_pair(m)
    sched2 = m.CosineAnnealingLR(opt2, T_max=10)
    with torch.no_grad():
        p2.copy_(ck["p"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    lrs = []
    for t in range(6):
        p2.grad = torch.ones_like(p2)
        opt2.step()
        sched2.step()
        lrs.append(opt2.param_groups[0]["lr"])
    return lrs, p2.detach().clone(), sched2


@requires_fused
@pytest.mark.parametrize("edited", [False, True], ids=["as_saved", "T_max_edited"])
def test_resume_from_an_edited_scheduler_checkpoint_continues_as_torch(edited):
    """A longer run resumed by editing the checkpoint's T_max continues from the saved lr, as torch's
    chainable update does, instead of jumping to the new closed form; an unedited one stays in-kernel."""
    def edit(state):
        if edited:
            state["T_max"] = 40
    want_lrs, want_p, _ = _resume_with(TS, edit)
    got_lrs, got_p, sched = _resume_with(FS, edit)
    assert got_lrs == pytest.approx(want_lrs, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-14)
    assert sched._fc_in_kernel != edited
