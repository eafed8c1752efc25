"""Shared helpers of the optimizer parity tests: ragged parameter groups, gradients, runs.

Used by tests/test_optim_parity.py and tests/test_optim_table.py (and, through the
latter, tests/test_triton_table.py). Everything is deterministic: gradients come from
their own generator, independent of the optimizer under test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

STEPS = 10
# Three groups of ragged shapes (not multiples of the 16-element alignment or
# of the CPU chunk size), including a scalar and an empty parameter.
SHAPES = [[(3 * 16 + 5,), (7, 9)], [(1,), (33, 17), (0,)], [(16385,), (4, 4, 3)]]
# The same layout, smaller: for the bf16 runs (three runs each) and Triton's interpreter.
# (300 is over the interpreter's 256-element tile, so a parameter spans two programs.)
SMALL_SHAPES = [[(21,), (7, 9)], [(1,), (33, 17), (0,)], [(300,), (4, 4, 3)]]
NONE_GRAD = {(1, 1): {2, 5, 6}, (2, 0): {4}}  # (group, param) -> steps whose grad is None

Groups = list[list[torch.nn.Parameter]]


def make_params(dtype=torch.float32, complex_param=False, shapes=SHAPES) -> Groups:
    groups = []
    for gi, group_shapes in enumerate(shapes):
        # Drawn in float64 and rounded, so runs in different dtypes start from the same values.
        ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype)) for s in group_shapes]
        if complex_param and gi == 0:
            ps.append(torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64)))
        groups.append(ps)
    return groups


def clone_params(groups: Groups, dtype: torch.dtype | None = None) -> Groups:
    """Fresh leaf parameters with the same values (cast to ``dtype``; complex ones to its
    complex counterpart)."""
    def cast(p):
        if dtype is None:
            return p.detach().clone()
        if p.is_complex():
            return p.detach().to(torch.complex128 if dtype == torch.float64 else p.dtype)
        return p.detach().to(dtype)

    return [[torch.nn.Parameter(cast(p).clone()) for p in ps] for ps in groups]


def make_grads(groups: Groups, steps: int, dtype) -> list:
    """Deterministic gradients for every step, independent of the optimizer."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        step = []
        for ps in groups:
            step.append([torch.randn(p.shape, generator=gen, dtype=p.dtype if p.is_complex() else torch.float64).to(
                p.dtype if p.is_complex() else dtype) for p in ps])
        out.append(step)
    return out


def cast_grads(grads, groups: Groups) -> list:
    """``grads`` cast to the dtypes of ``groups`` (a reference run in another dtype)."""
    return [[[g.to(groups[gi][pi].dtype) for pi, g in enumerate(gs)] for gi, gs in enumerate(step)] for step in grads]


def set_grads(groups: Groups, grads, step: int, flat: bool) -> None:
    for gi, ps in enumerate(groups):
        for pi, p in enumerate(ps):
            if step in NONE_GRAD.get((gi, pi), ()):
                p.grad = None
            elif flat and p.grad is not None:
                p.grad.copy_(grads[gi][pi])  # accumulate into the flat view, as autograd does
            else:
                p.grad = grads[gi][pi].clone().to(p.dtype)


def group_dicts(groups: Groups, per_group: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"params": ps, **copy.deepcopy(per_group[i])} for i, ps in enumerate(groups)]


def run(opt: torch.optim.Optimizer, groups: Groups, grads, steps: range | int, flat: bool) -> None:
    """Steps ``opt`` through ``steps`` (indices into ``grads``). ``flat`` (a fusedclr
    optimizer): grads are copied into existing ``.grad`` tensors, and ``zero_grad()`` every
    third step drops them, so the next assignment is a fresh tensor."""
    for s in range(steps) if isinstance(steps, int) else steps:
        set_grads(groups, grads[s], s, flat=flat)
        opt.step()
        if flat and s % 3 == 2:
            opt.zero_grad()


def run_pair(make_ref: Callable[[Groups], torch.optim.Optimizer], make_ours: Callable[[Groups], torch.optim.Optimizer],
             steps=STEPS, dtype=torch.float32, complex_param=False, ref_dtype=None, shapes=SHAPES):
    """The reference optimizer and ours from the same start and gradients. ``ref_dtype``: the
    reference runs on parameters (and gradients) cast to it (a float64 oracle)."""
    fc_groups = make_params(dtype, complex_param, shapes)
    ref_groups = clone_params(fc_groups, ref_dtype)
    fc_groups = clone_params(fc_groups)
    ref, ours = make_ref(ref_groups), make_ours(fc_groups)
    grads = make_grads(fc_groups, steps, dtype)
    ref_grads = grads if ref_dtype is None else cast_grads(grads, ref_groups)
    for s in range(steps):
        set_grads(ref_groups, ref_grads[s], s, flat=False)
        set_grads(fc_groups, grads[s], s, flat=True)
        ref.step()
        ours.step()
        if s % 3 == 2:
            ours.zero_grad()  # re-attaches the flat views where a grad was None
    return ref_groups, fc_groups, ref, ours


def assert_same(ref_groups, fc_groups, ref, ours, *, optional_keys=frozenset(), superset=False, **tol) -> None:
    """Parameters and every state (``state_dict()`` and ``optimizer.state``) agree, in ours's
    dtypes. ``optional_keys``: state keys ours may have beyond the reference's; ``superset``:
    ours may have any further keys, and state for further parameters (a wrapper's own state);
    then only ``state_dict()`` is compared, as a wrapper's ``optimizer.state`` may be its own."""
    for ps_ref, ps_fc in zip(ref_groups, fc_groups):
        for p_ref, p_fc in zip(ps_ref, ps_fc):
            torch.testing.assert_close(p_fc.detach(), p_ref.detach().to(p_fc.dtype), **tol)
    ref_sd, fc_sd = ref.state_dict(), ours.state_dict()
    if superset:
        assert set(ref_sd["state"]) <= set(fc_sd["state"]), "parameters with state in the reference lack it"
    else:
        assert set(ref_sd["state"]) == set(fc_sd["state"]), "the same parameters must have state"
    pairs = [(pid, st, fc_sd["state"][pid]) for pid, st in ref_sd["state"].items()]
    # optimizer.state, keyed by the parameters themselves, in the same order.
    ref_ps = [p for ps in ref_groups for p in ps]
    fc_ps = [p for ps in fc_groups for p in ps]
    if not superset:
        pairs += [(f"state[{i}]", ref.state[p], ours.state[q]) for i, (p, q) in enumerate(zip(ref_ps, fc_ps))
                  if p in ref.state]
    for pid, st, mine in pairs:
        extra = set(mine) - set(st)
        assert set(st) <= set(mine), f"state keys missing for param {pid}: {set(st) - set(mine)}"
        assert superset or extra <= set(optional_keys), f"unexpected state keys for param {pid}: {extra}"
        for key, value in st.items():
            if key == "step":
                assert float(mine[key]) == float(value), f"step of param {pid}"
            else:
                torch.testing.assert_close(mine[key], value.to(mine[key].dtype), **tol,
                                           msg=lambda m, k=key, i=pid: f"state {k!r} of param {i}: {m}")
