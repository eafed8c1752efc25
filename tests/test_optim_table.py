"""Every optimizer of tests/optim_table.py against its reference, on every backend of BACKENDS.

For each (backend, optimizer, option set): 10 steps over three param groups of ragged
shapes with a None grad on some steps, parameters and every state against torch's class
(Lion, Lookahead: the table's float64 oracle) at fp32 tolerance; bf16 parameters within
twice the reference's own bf16 error against a float64 run; a ``state_dict()`` taken at
step 5 and loaded into a fresh optimizer continues exactly as the uninterrupted run. Each
construction error raises torch's error with torch's message. Lion and Lookahead follow a
fusedclr scheduler: the lr (and Lion's beta1) they applied is read back from the updates.

[note: table backends]
The backend is a parameter, not a loop: ``pytest_generate_tests`` crosses the module's
``BACKENDS`` with the table's rows, so another module can run the same tests on another
backend by importing them and defining its own ``BACKENDS`` (tests/test_triton_table.py
runs them on Triton, in a process of its own with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import pytest
import torch
from conftest import CPU_BACKENDS
from optim_harness import (
    SHAPES,
    SMALL_SHAPES,
    STEPS,
    assert_same,
    cast_grads,
    clone_params,
    make_grads,
    make_params,
    run,
    run_pair,
)
from optim_table import TABLE, LionOracle, LookaheadOracle, rows

import fusedclr


@dataclass(frozen=True)
class Backend:
    """One ``backend=`` value and what its runs use. ``sources``: the option-set sources it
    runs (fusedclr's extra combinations are cheap on the CPU, not in an interpreter);
    ``sampled``: tests that run one option set per optimizer here (the first with state);
    ``steps``: steps per run (at least 7: the None grads fall on steps 2, 4, 5 and 6);
    ``skip``: why it cannot run here (an environment without it), or ""."""

    name: str
    shapes: list = tuple(SHAPES)
    small_shapes: list = tuple(SMALL_SHAPES)  # the bf16 runs
    sources: tuple[str, ...] = ("torch", "own", "fusedclr")
    sampled: tuple[str, ...] = ()
    steps: int = STEPS
    skip: str = ""


BACKENDS: list[Backend] = [Backend(name) for name in CPU_BACKENDS]
# [hook: emulated backend] The emulated-CUDA backend (the CUDA kernels run on the CPU under
# host emulation, tests/cuda_emulation.cpp) comes as backend="emulated", in tests only. Add it
# here, e.g. ``Backend("emulated", shapes=SMALL_SHAPES, sources=("torch", "own"))``, or, if it
# needs a fixture (the emulation library is compiled once per session), in a module of its
# own that imports these tests and sets its BACKENDS, as tests/test_triton_table.py does.

ALL_SOURCES = ("torch", "own", "fusedclr")


def table_sources(*sources: str, where=None, first_only: bool = False):
    """Restricts a row-driven test to option sets of these sources, for which ``where(info,
    option_set)`` holds (``first_only``: the first such set of each optimizer)."""
    def mark(fn):
        fn._table_sources = sources
        fn._table_where = where
        fn._table_first_only = first_only
        return fn
    return mark


def _param(values, backend: Backend, ident: str):
    marks = [pytest.mark.skip(reason=backend.skip)] if backend.skip else []
    return pytest.param(*values, id=ident, marks=marks)


def pytest_generate_tests(metafunc):
    """Crosses the calling module's BACKENDS with the table rows [note: table backends]."""
    if "backend" not in metafunc.fixturenames:
        return
    backends = metafunc.module.BACKENDS
    if "row" in metafunc.fixturenames:
        wanted = getattr(metafunc.function, "_table_sources", ALL_SOURCES)
        where = getattr(metafunc.function, "_table_where", None)
        chosen = [(info, s) for info, s in rows(wanted) if where is None or where(info, s)]
        if getattr(metafunc.function, "_table_first_only", False):
            chosen = [(info, s) for i, (info, s) in enumerate(chosen) if i == 0 or chosen[i - 1][0] is not info]
        sample = [(info, s) for i, (info, s) in enumerate(chosen) if info.state_keys(s.kwargs)
                  and not any(other is info for other, _ in chosen[:i] if other.state_keys(_.kwargs))]
        params = [_param((b, (info, s)), b, f"{b.name}-{info.name}-{s.id}") for b in backends
                  for info, s in (sample if metafunc.function.__name__ in b.sampled else chosen)
                  if s.source in b.sources]
        metafunc.parametrize(("backend", "row"), params)
    else:
        metafunc.parametrize("backend", [_param((b,), b, b.name) for b in backends])


def _makers(info, kwargs, backend: str):
    def ours(groups):
        return info.ours(info.param_groups(groups, kwargs), kwargs, backend)

    def ref(groups):
        return info.reference(info.param_groups(groups, kwargs), kwargs)

    return ref, ours


# --------------------------------------------------------------------------
# fp32: parameters and states against the reference
# --------------------------------------------------------------------------


def test_matches_reference(backend, row):
    info, options = row
    make_ref, make_ours = _makers(info, options.kwargs, backend.name)
    out = run_pair(make_ref, make_ours, steps=backend.steps, complex_param=info.supports_complex,
                   ref_dtype=info.ref_dtype, shapes=backend.shapes)
    _, _, ref, _ = out
    declared = info.state_keys(options.kwargs)
    for pid, st in ref.state_dict()["state"].items():
        assert set(st) == declared, f"the table's state keys for {info.name} are not torch's: {set(st)}"
    assert_same(*out, optional_keys=info.optional_state_keys, superset=info.state_superset,
                **info.tol[torch.float32])


# --------------------------------------------------------------------------
# bf16: no worse than twice the reference's own bf16 error against float64
# --------------------------------------------------------------------------


@table_sources("torch", "own")
def test_bf16_error_within_factor_of_reference(backend, row):
    info, options = row
    make_ref, make_ours = _makers(info, options.kwargs, backend.name)
    start = make_params(torch.bfloat16, shapes=backend.small_shapes)
    grads = make_grads(start, backend.steps, torch.bfloat16)
    runs = {}
    for name, dtype, make, flat in (("f64", torch.float64, make_ref, False), ("ref", None, make_ref, False),
                                    ("ours", None, make_ours, True)):
        groups = clone_params(start, dtype)
        run(make(groups), groups, cast_grads(grads, groups) if dtype else grads, backend.steps, flat=flat)
        runs[name] = [p.detach().double() for ps in groups for p in ps]
    start_values = [p.detach().double() for ps in start for p in ps]
    moved = max((a - b).abs().max().item() for a, b in zip(runs["f64"], start_values) if a.numel())
    assert moved > 0, "the float64 run did not move"
    # Over the whole model: on a one-element parameter the max error is the luck of a few roundings.
    err = {k: max((p - p64).abs().max().item() for p, p64 in zip(runs[k], runs["f64"]) if p.numel())
           for k in ("ref", "ours")}
    assert err["ours"] <= info.bf16_factor * err["ref"] + 1e-12, err


# --------------------------------------------------------------------------
# state_dict round trip mid-run
# --------------------------------------------------------------------------


@table_sources("torch", "own")
def test_state_dict_round_trip_mid_run(backend, row):
    """Saved after step 5 (torch.save / torch.load), loaded into a fresh optimizer over fresh
    parameters, the run continues exactly as the uninterrupted one: parameters and states."""
    info, options = row
    _, make_ours = _makers(info, options.kwargs, backend.name)
    # Real parameters only, as test_optim_parity's round trip had them.
    start = make_params(torch.float32, shapes=backend.shapes)
    grads = make_grads(start, backend.steps, torch.float32)
    whole = clone_params(start)
    uninterrupted = make_ours(whole)
    run(uninterrupted, whole, grads, backend.steps, flat=True)

    first = clone_params(start)
    opt = make_ours(first)
    run(opt, first, grads, range(5), flat=True)
    buf = io.BytesIO()
    torch.save({"params": [[p.detach() for p in ps] for ps in first], "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    resumed = [[torch.nn.Parameter(p.clone()) for p in ps] for ps in ckpt["params"]]
    opt2 = make_ours(resumed)
    opt2.load_state_dict(ckpt["optim"])
    run(opt2, resumed, grads, range(5, backend.steps), flat=True)

    for ps_a, ps_b in zip(whole, resumed):
        for a, b in zip(ps_a, ps_b):
            assert torch.equal(a.detach(), b.detach())
    sd_a, sd_b = uninterrupted.state_dict(), opt2.state_dict()
    assert set(sd_a["state"]) == set(sd_b["state"])
    for pid, st in sd_a["state"].items():
        assert set(st) == set(sd_b["state"][pid]), pid
        for key, value in st.items():
            other = sd_b["state"][pid][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(other, value), (pid, key)
            else:
                assert other == value, (pid, key)


@table_sources("torch", "own", first_only=True,
               where=lambda info, s: info.supports_complex and bool(info.state_keys(s.kwargs)))
def test_complex_state_dict_saves_and_resumes(backend, row):
    """A real and a complex parameter in one group: ``torch.save(optimizer.state_dict())``
    works (as it does for torch.optim) and the loaded run continues exactly. (The first option
    set with state of each optimizer that takes complex parameters.)"""
    info, options = row
    torch.manual_seed(0)
    start = [torch.randn(7), torch.randn(3, 2, dtype=torch.complex64)]
    grads = [[g.clone() for g in (torch.randn(7), torch.randn(3, 2, dtype=torch.complex64))] for _ in range(4)]

    def fresh(values):
        ps = [torch.nn.Parameter(v.clone()) for v in values]
        return ps, info.ours([{"params": ps}], options.kwargs, backend.name)

    def steps(ps, opt, which):
        for s in which:
            for p, g in zip(ps, grads[s]):
                p.grad = g.clone()
            opt.step()

    whole, opt = fresh(start)
    steps(whole, opt, range(4))
    first, opt1 = fresh(start)
    steps(first, opt1, range(2))
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    resumed, opt2 = fresh([p.detach() for p in first])
    opt2.load_state_dict(torch.load(buf))
    steps(resumed, opt2, range(2, 4))
    for a, b in zip(whole, resumed):
        assert torch.equal(a.detach(), b.detach())


# --------------------------------------------------------------------------
# Construction errors
# --------------------------------------------------------------------------

ERROR_CASES = [pytest.param(info, case, id=f"{info.name}-{case.desc}") for info in TABLE for case in info.error_cases]


@pytest.mark.parametrize(("info", "case"), ERROR_CASES)
def test_construction_error(backend, info, case):
    info.ours_cls()  # outside pytest.raises: a missing class is an AttributeError, not a pass
    params = [torch.nn.Parameter(torch.randn(2, 3))] if case.params is None else copy.deepcopy(case.params)
    if issubclass(case.error_type, Warning):
        with pytest.warns(case.error_type, match=case.regex):
            info.ours(params, case.kwargs, backend.name)
    else:
        with pytest.raises(case.error_type, match=case.regex):
            info.ours(params, case.kwargs, backend.name)


# --------------------------------------------------------------------------
# Schedules: what Lion and Lookahead applied, read back from their updates
# --------------------------------------------------------------------------

ONE_CYCLE = dict(max_lr=0.01, total_steps=8, pct_start=0.3, base_momentum=0.85, max_momentum=0.95)


def _torch_one_cycle(**kwargs):
    """(lr, beta1) of each step under torch's OneCycleLR, on a torch optimizer with betas."""
    dummy = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(dummy, **kwargs)
    out = []
    for _ in range(kwargs["total_steps"]):
        out.append((dummy.param_groups[0]["lr"], dummy.param_groups[0]["betas"][0]))
        dummy.step()
        sched.step()
    return out


def test_lion_applies_the_one_cycle_lr_and_beta1(backend):
    """With weight decay 0 every element with a nonzero direction moves by exactly lr. With
    exp_avg = 1 (loaded through load_state_dict) and g_i = -x_i over a grid of x, the direction
    sign(beta1 - (1 - beta1) x_i) flips at x = beta1 / (1 - beta1): the flip brackets beta1."""
    lion = fusedclr.Lion
    x = torch.linspace(0, 30, 30001)  # beta1 in [0.85, 0.95] flips at x in [5.7, 19]
    xs = x.double()
    p = torch.nn.Parameter(torch.zeros_like(x))
    opt = lion([p], lr=1e-3, betas=(0.9, 0.99), backend=backend.name)
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, cycle_momentum=True, **ONE_CYCLE)
    for t, (lr, beta1) in enumerate(_torch_one_cycle(cycle_momentum=True, **ONE_CYCLE)):
        if t > 0:
            sd = opt.state_dict()
            sd["state"][0]["exp_avg"] = torch.ones_like(x)
            opt.load_state_dict(sd)
        with torch.no_grad():
            p.zero_()
        p.grad = -x.clone()
        opt.step()
        moved = p.detach().double()
        nonzero = moved[moved != 0].abs()
        torch.testing.assert_close(nonzero, torch.full_like(nonzero, lr), rtol=1e-6, atol=0,
                                   msg=lambda m, t=t: f"step {t}: |dp| is not the scheduled lr: {m}")
        if t == 0:  # exp_avg = 0: the direction is sign(g), and sign(0) = 0
            assert moved[0] == 0 and bool((moved[1:] > 0).all()), f"step 0: {moved[:3]}"
        else:
            down, up = xs[moved < 0], xs[moved > 0]
            assert down.numel() and up.numel() and down.max() < up.min(), f"step {t}: no single flip"
            lo, hi = down.max().item(), up.min().item()
            step = (xs[1] - xs[0]).item()  # one grid step of slack for fp32 rounding at the flip
            b_lo, b_hi = (lo - step) / (1 + lo - step), (hi + step) / (1 + hi + step)
            assert b_lo <= beta1 <= b_hi, f"step {t}: beta1 {beta1} outside the bracket [{b_lo}, {b_hi}]"
        sched.step()


def test_lookahead_applies_the_scheduled_lr(backend):
    """Lookahead(fusedclr.SGD) with fusedclr's OneCycleLR on the Lookahead: on steps that do
    not synchronise, the fast weights move by -lr * g; on every k-th step they land on the
    slow weights, slow + alpha * (fast - slow)."""
    lookahead = fusedclr.Lookahead
    k, alpha, n = 3, 0.5, 64
    g = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = lookahead(fusedclr.SGD([p], lr=0.01, backend=backend.name), k=k, alpha=alpha)
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, cycle_momentum=False, **ONE_CYCLE)
    slow = p.detach().clone()
    for t, (lr, _) in enumerate(_torch_one_cycle(cycle_momentum=False, **ONE_CYCLE)):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        fast = before - lr * g
        if (t + 1) % k:
            applied = ((before - p.detach()) / g).mean().item()
            assert applied == pytest.approx(lr, rel=1e-9), f"step {t}: applied lr {applied}, scheduled {lr}"
            torch.testing.assert_close(p.detach(), fast)
        else:
            slow = slow + alpha * (fast - slow)
            torch.testing.assert_close(p.detach(), slow, msg=lambda m, t=t: f"sync step {t}: {m}")
        sched.step()


def test_lookahead_is_an_optimizer_over_the_inner_groups(backend):
    """Lookahead is a torch.optim.Optimizer whose param_groups are the inner optimizer's: a
    change to a group (a scheduler's lr) is the inner optimizer's."""
    p = torch.nn.Parameter(torch.randn(5))
    inner = fusedclr.AdamW([p], lr=0.01, backend=backend.name)
    opt = fusedclr.Lookahead(inner, k=2, alpha=0.5)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1 and opt.param_groups[0] is inner.param_groups[0]
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5


# --------------------------------------------------------------------------
# The oracles themselves (no fusedclr): the paper's algorithms, checked by hand
# --------------------------------------------------------------------------


def test_lion_oracle_follows_the_paper():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    opt = LionOracle([p], lr=0.1, betas=(0.5, 0.9), weight_decay=0.2)
    g1 = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    p.grad = g1.clone()
    opt.step()  # m = 0: direction sign(0.5 g); sign(0) = 0
    expect = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) * (1 - 0.02) - 0.1 * torch.sign(g1)
    torch.testing.assert_close(p.detach(), expect)
    m = 0.1 * g1
    torch.testing.assert_close(opt.state[p]["exp_avg"], m)
    g2 = torch.tensor([-0.5, -1.0, 1.0, -0.05], dtype=torch.float64)
    p.grad = g2.clone()
    opt.step()
    expect = expect * (1 - 0.02) - 0.1 * torch.sign(0.5 * m + 0.5 * g2)
    torch.testing.assert_close(p.detach(), expect)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * m + 0.1 * g2)


def test_lookahead_oracle_follows_the_paper():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    plain = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    opt = LookaheadOracle(torch.optim.SGD([p], lr=0.1, momentum=0.9), k=2, alpha=0.25)
    slow = p.detach().clone()
    for t in range(6):
        g = torch.randn(6, dtype=torch.float64)
        if t == 3:
            p.grad = None  # not a step of p: its count stays
        else:
            p.grad = g.clone()
        fast_start = p.detach().clone()
        q.data.copy_(fast_start)
        q.grad = None if p.grad is None else g.clone()
        plain.state[q] = copy.deepcopy(opt.state[p])  # the same momentum
        opt.step()
        plain.step()
        if t in (1, 4):  # second and fourth steps with a gradient
            slow = slow + 0.25 * (q.detach() - slow)
            torch.testing.assert_close(p.detach(), slow)
        else:
            torch.testing.assert_close(p.detach(), q.detach())


__all__ = [
    "BACKENDS", "Backend", "pytest_generate_tests", "test_bf16_error_within_factor_of_reference",
    "test_complex_state_dict_saves_and_resumes", "test_construction_error",
    "test_lion_applies_the_one_cycle_lr_and_beta1", "test_lookahead_applies_the_scheduled_lr",
    "test_lookahead_is_an_optimizer_over_the_inner_groups",
    "test_matches_reference", "test_state_dict_round_trip_mid_run",
]
