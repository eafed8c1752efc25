"""Swapping the import: torch.optim's documented behaviours that user code and torch's own suite rely on.

Per-parameter options given as generators, named parameters, duplicates,
``optimizer.state`` before and after steps, the dtype of ``step``, load hooks,
``differentiable=True`` and freeing an optimizer with a scheduler attached.
Each test compares with torch.optim itself where torch defines the answer.
"""

from __future__ import annotations

import collections
import copy
import gc
import io
import pickle
import warnings
import weakref

import pytest
import torch
from conftest import CPU_BACKENDS, TOL

import fusedclr
from fusedclr import lr_scheduler as S


def _model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _twins() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = _model()
    return ours, copy.deepcopy(ours)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# -- 1. generators in per-parameter options ---------------------------------------


@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_generator_param_groups_train_like_torch(cls):
    ours_m, torch_m = _twins()
    before = [p.detach().clone() for p in ours_m.parameters()]

    def groups(m):  # torch's documented per-parameter options, with generators
        return [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.02}]

    ours = getattr(fusedclr, cls)(groups(ours_m), lr=0.05)
    theirs = getattr(torch.optim, cls)(groups(torch_m), lr=0.05)
    assert [len(g["params"]) for g in ours.param_groups] == [2, 2]
    _train(ours_m, ours, 3)
    _train(torch_m, theirs, 3)
    for b, p, q in zip(before, ours_m.parameters(), torch_m.parameters()):
        assert not torch.equal(p.detach(), b), "a parameter given through a generator never moved"
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


def test_add_param_group_takes_a_generator():
    ours_m, torch_m = _twins()
    ours = fusedclr.SGD(ours_m[0].parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(torch_m[0].parameters(), lr=0.1, momentum=0.9)
    ours.add_param_group({"params": ours_m[2].parameters(), "lr": 0.01})
    theirs.add_param_group({"params": torch_m[2].parameters(), "lr": 0.01})
    last = ours_m[2].weight.detach().clone()
    _train(ours_m, ours, 2)
    _train(torch_m, theirs, 2)
    assert not torch.equal(ours_m[2].weight.detach(), last)
    for p, q in zip(ours_m.parameters(), torch_m.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


# -- 2. named parameters -----------------------------------------------------------


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_named_parameters_like_torch(cls):
    ours_m, torch_m = _twins()
    kwargs = {"lr": 0.05, "momentum": 0.9} if cls == "SGD" else {"lr": 0.05}
    ours = getattr(fusedclr, cls)(ours_m.named_parameters(), **kwargs)
    theirs = getattr(torch.optim, cls)(torch_m.named_parameters(), **kwargs)
    assert ours.param_groups[0]["param_names"] == theirs.param_groups[0]["param_names"] == [
        "0.weight", "0.bias", "2.weight", "2.bias"]
    start = [p.detach().clone() for p in ours_m.parameters()]
    _train(ours_m, ours, 2)
    _train(torch_m, theirs, 2)
    for s, p, q in zip(start, ours_m.parameters(), torch_m.parameters()):
        assert not torch.equal(p.detach(), s)
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
    sd = ours.state_dict()
    assert sd["param_groups"][0]["param_names"] == theirs.state_dict()["param_groups"][0]["param_names"]
    assert len(sd["state"]) == len(theirs.state_dict()["state"]) == 4

    # fusedclr -> torch and torch -> fusedclr, each then continuing like the original
    to_torch = getattr(torch.optim, cls)(copy.deepcopy(ours_m).named_parameters(), **kwargs)
    to_torch.load_state_dict(copy.deepcopy(sd))
    back_m = copy.deepcopy(torch_m)
    back = getattr(fusedclr, cls)(back_m.named_parameters(), **kwargs)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert back.param_groups[0]["param_names"] == theirs.param_groups[0]["param_names"]
    for a, b in zip(back.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], **TOL[torch.float32])
    for a, b in zip(to_torch.state_dict()["state"].values(), sd["state"].values()):
        for k in a:
            torch.testing.assert_close(a[k], b[k], **TOL[torch.float32])
    # Both loaded optimizers continue like the originals.
    _train(back_m, back, 1, seed=3)
    _train(torch_m, theirs, 1, seed=3)
    for p, q in zip(back_m.parameters(), torch_m.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


def test_mixed_named_and_unnamed_raise_torch_errors():
    m = _model()
    named = list(m.named_parameters())
    mixed = [named[0], named[1][1]]
    with pytest.raises(ValueError) as theirs:
        torch.optim.AdamW(mixed)
    with pytest.raises(ValueError) as ours:
        fusedclr.AdamW(mixed)
    assert str(ours.value) == str(theirs.value)
    opt, ref = fusedclr.AdamW(named[:2]), torch.optim.AdamW(named[:2])
    with pytest.raises(ValueError) as theirs:
        ref.add_param_group({"params": [p for _, p in named[2:]]})
    with pytest.raises(ValueError) as ours:
        opt.add_param_group({"params": [p for _, p in named[2:]]})
    assert str(ours.value) == str(theirs.value)


# -- 3. duplicates -----------------------------------------------------------------


def test_duplicate_parameter_warns_once_and_is_updated_once():
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = fusedclr.SGD([p, q, p], lr=0.1)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "a parameter group with duplicate parameters" in str(caught[0].message)
    assert "once per step" in str(caught[0].message)
    assert len(opt.param_groups[0]["params"]) == 3  # torch's layout: the group keeps the listing
    p.grad, q.grad = torch.full((4,), 2.0), torch.full((4,), 2.0)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4,), 0.8))
    assert torch.equal(q.detach(), torch.full((4,), 0.8))


# -- 4. load_state_dict hooks ----------------------------------------------------------


def _hooked_load(opt: torch.optim.Optimizer, sd: dict, p: torch.Tensor) -> None:
    def pre(o, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.003
        return state_dict

    def post(o):
        o.state["ran_post_hook"] = o.param_groups[0]["lr"] == 0.003
        o.state[p]["exp_avg"].fill_(0.5)
        o.state[p]["step"] = torch.tensor(7.0)

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)


def test_load_state_dict_post_hook_changes_stay_like_torch():
    ours_m, torch_m = _twins()
    ours, theirs = fusedclr.AdamW(ours_m.parameters(), lr=0.01), torch.optim.AdamW(torch_m.parameters(), lr=0.01)
    _train(ours_m, ours, 2)
    _train(torch_m, theirs, 2)
    sd = copy.deepcopy(ours.state_dict())
    _hooked_load(ours, sd, ours_m[0].weight)
    _hooked_load(theirs, sd, torch_m[0].weight)
    for opt, w in ((ours, ours_m[0].weight), (theirs, torch_m[0].weight)):
        assert opt.state["ran_post_hook"] is True
        assert torch.equal(opt.state[w]["exp_avg"], torch.full_like(w, 0.5))
        assert float(opt.state[w]["step"]) == 7.0
    assert ours.state_dict()["state"]["ran_post_hook"] is theirs.state_dict()["state"]["ran_post_hook"] is True
    _train(ours_m, ours, 1, seed=2)
    _train(torch_m, theirs, 1, seed=2)
    assert float(ours.state[ours_m[0].weight]["step"]) == float(theirs.state[torch_m[0].weight]["step"]) == 8.0
    for p, q in zip(ours_m.parameters(), torch_m.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
        torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], **TOL[torch.float32])


def test_state_dict_pre_hook_writes_to_the_live_state():
    m = _model()
    opt = fusedclr.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    assert opt.state_dict()["state"]["test"] == 1
    assert opt.state["test"] == 1


# -- 5. optimizer.state before and after steps --------------------------------------------


@pytest.mark.parametrize(("cls", "kwargs"), [("SGD", {"momentum": 0.9}), ("SGD", {}), ("Adam", {}),
                                             ("AdamW", {"amsgrad": True})])
def test_state_entries_appear_like_torch(cls, kwargs):
    ours_m, torch_m = _twins()
    ours = getattr(fusedclr, cls)(ours_m.parameters(), lr=0.01, **kwargs)
    theirs = getattr(torch.optim, cls)(torch_m.parameters(), lr=0.01, **kwargs)
    x = torch.randn(4, 7)
    for opt, m in ((ours, ours_m), (theirs, torch_m)):
        assert len(opt.state) == 0 and m[0].weight not in opt.state
        assert opt.state_dict()["state"] == {}
        # Only the last layer takes part: the first gets no gradient and no entry.
        opt.zero_grad(set_to_none=True)
        m[2](x).sum().backward()
        opt.step()
    names = lambda opt, m: [(n, sorted(opt.state[p])) for n, p in m.named_parameters() if p in opt.state]  # noqa: E731
    assert names(ours, ours_m) == names(theirs, torch_m)
    assert len(ours.state) == len(theirs.state) == (0 if kwargs == {} and cls == "SGD" else 2)
    assert ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()
    assert dict(ours.state[ours_m[0].weight]) == {}  # torch's defaultdict: an empty entry
    _train(ours_m, ours, 1)
    _train(torch_m, theirs, 1)
    assert names(ours, ours_m) == names(theirs, torch_m)
    for p, q in zip(ours_m.parameters(), torch_m.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
        for key in theirs.state.get(q, {}):
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], **TOL[torch.float32])


def test_the_step_never_reads_optimizer_state(monkeypatch):
    """Entries are read from the device step counts on access; the step path never asks [note: lazy state]."""
    from fusedclr.optim._state import ParamState

    m = _model()
    opt = fusedclr.AdamW(m.parameters(), lr=0.01)
    with monkeypatch.context() as patch:
        def refuse(self, bucket):
            raise AssertionError("the step path read the step counts")

        patch.setattr(ParamState, "stepped", refuse)
        _train(m, opt, 3)
    assert len(opt.state) == 4 and float(opt.state[m[0].weight]["step"]) == 3.0


def test_state_entries_write_through_and_reset():
    m = _model()
    opt = fusedclr.Adam(m.parameters(), lr=0.01)
    w = m[0].weight
    opt.state[w]["exp_avg"] = torch.full_like(w, 0.25)  # starts the entry, as assigning does in torch
    assert w in opt.state and len(opt.state) == 1 and float(opt.state[w]["step"]) == 0.0
    assert torch.equal(opt.state[w]["exp_avg_sq"], torch.zeros_like(w))
    with pytest.raises(KeyError, match="keeps only"):
        opt.state[w]["momentum_buffer"] = torch.zeros_like(w)
    with pytest.raises(ValueError, match="shape"):
        opt.state[w]["exp_avg"] = torch.zeros(3)
    _train(m, opt, 2)
    assert float(opt.state[w]["step"]) == 2.0
    del opt.state[w]
    assert w not in opt.state and len(opt.state) == 3
    _train(m, opt, 1)
    assert float(opt.state[w]["step"]) == 1.0


# -- 6. the dtype of step ----------------------------------------------------------------


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_step_has_torchs_dtype(default):
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        ours_m, torch_m = _twins()
        ours, theirs = fusedclr.AdamW(ours_m.parameters()), torch.optim.AdamW(torch_m.parameters())
        _train(ours_m, ours, 3)
        _train(torch_m, theirs, 3)
        for p, q in zip(ours_m.parameters(), torch_m.parameters()):
            got, want = ours.state[p]["step"], theirs.state[q]["step"]
            assert got.dtype == want.dtype == default
            assert torch.equal(got, want)
        for a, b in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
            assert a["step"].dtype == b["step"].dtype and torch.equal(a["step"], b["step"])
    finally:
        torch.set_default_dtype(old)


# -- 7. differentiable=True ----------------------------------------------------------------


@pytest.mark.parametrize(("cls", "kwargs"), [("SGD", {"momentum": 0.9}), ("Adam", {}), ("AdamW", {"amsgrad": True})])
def test_differentiable_runs_torchs_implementation(cls, kwargs, monkeypatch):
    monkeypatch.setattr("fusedclr.optim._base._WARNED_DIFFERENTIABLE", False)

    def run(module):
        torch.manual_seed(3)
        base = torch.randn(6, dtype=torch.float64, requires_grad=True)
        p = base * 1.0  # a non-leaf parameter, so the update is differentiable w.r.t. base
        opt = getattr(module, cls)([p], lr=0.1, differentiable=True, **kwargs)
        calls = []
        opt.register_step_post_hook(lambda *_: calls.append(1))
        for _ in range(2):
            p.grad = torch.randn(6, dtype=torch.float64)
            opt.step()
        assert len(calls) == 2, "step hooks must run once per step"
        (p * p).sum().backward()
        return p.detach(), base.grad, opt

    # torch wraps a class's step with the hooks once one of its instances exists: ours must not run them twice.
    getattr(torch.optim, cls)([torch.nn.Parameter(torch.ones(1))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_p, got_grad, ours = run(fusedclr)
        run(fusedclr)
    ours_warnings = [w for w in caught if "differentiable=True" in str(w.message)]
    assert len(ours_warnings) == 1, "the warning is one-time"
    want_p, want_grad, theirs = run(torch.optim)
    assert torch.equal(got_p, want_p)
    assert torch.equal(got_grad, want_grad)
    assert ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()


# -- 10. no reference cycle with a scheduler -----------------------------------------------


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_dropped_optimizer_with_scheduler_is_freed_without_gc(cls):
    m = _model()
    gc.collect()
    gc.disable()
    try:
        opt = getattr(fusedclr, cls)(m.parameters(), lr=0.1)
        sched = S.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        assert opt._scheduler is sched
        _train(m, opt, 1)
        sched.step()
        ref = weakref.ref(opt)
        del opt, sched
        assert ref() is None, "the optimizer outlived its last reference (a reference cycle)"
    finally:
        gc.enable()


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_dropped_scheduler_leaves_the_groups_lr_like_torch(cls):
    ours_m, torch_m = _twins()
    ours = getattr(fusedclr, cls)(ours_m.parameters(), lr=0.1)
    theirs = getattr(torch.optim, cls)(torch_m.parameters(), lr=0.1)
    scheds = [S.OneCycleLR(ours, max_lr=0.1, total_steps=10),
              torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.1, total_steps=10)]
    for _ in range(3):
        _train(ours_m, ours, 1)
        _train(torch_m, theirs, 1)
        for s in scheds:
            s.step()
    del scheds, s
    assert ours._scheduler is None
    for o in (ours, theirs):
        o.param_groups[0]["lr"] = 0.03  # nothing schedules any more: the group's lr applies
    _train(ours_m, ours, 2)
    _train(torch_m, theirs, 2)
    for p, q in zip(ours_m.parameters(), torch_m.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


def test_scheduler_survives_copies_of_the_optimizer():
    m = _model()
    opt = fusedclr.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    opt2, sched2 = copy.deepcopy((opt, sched))
    assert opt2._scheduler is sched2
    opt3, sched3 = pickle.loads(pickle.dumps((opt, sched)))
    assert opt3._scheduler is sched3
    # A copy of the optimizer alone keeps the schedule's tensors; nothing holds a copied scheduler.
    opt4 = copy.deepcopy(opt)
    assert opt4._scheduler is None


# -- 11. sparse gradients ------------------------------------------------------------------

SPARSE_CASES = [("SGD", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9}),
                ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
                ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
                ("Adagrad", {"lr": 0.1}), ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.2})]


def _sparse_run(mod, cls: str, kwargs: dict, backend: str | None, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(20, 3, sparse=True), torch.nn.Linear(3, 1)
    params = [*emb.parameters(), *head.parameters()]
    opt = getattr(mod, cls)(params, **kwargs, **({} if backend is None else {"backend": backend}))
    for s in range(steps):
        opt.zero_grad()
        head(emb(torch.tensor([[1, 2, 2, 5], [7, 1, 3, 3]][s % 2]))).square().sum().backward()
        assert emb.weight.grad.is_sparse
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("cls", "kwargs"), SPARSE_CASES, ids=[f"{c}-{'-'.join(k)}" for c, k in SPARSE_CASES])
def test_sparse_gradients_step_as_torch(backend, cls, kwargs):
    """torch's SGD and Adagrad take sparse gradients (nn.Embedding(sparse=True)); so do ours,
    through a dense copy [note: sparse gradients]. Rows no gradient touched stay bit-identical."""
    torch.manual_seed(0)
    start = torch.nn.Embedding(20, 3).weight.detach().clone()
    theirs = _sparse_run(torch.optim, cls, kwargs, None)
    ours = _sparse_run(fusedclr, cls, kwargs, backend)
    touched = [1, 2, 3, 5, 7]
    untouched = [r for r in range(20) if r not in touched]
    assert not torch.equal(ours[0][touched], start[touched]), "the embedding never moved"
    assert torch.equal(ours[0][untouched], start[untouched])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    ("SGD", {"weight_decay": 0.1}, "weight decay"), ("Adagrad", {"weight_decay": 0.1}, "weight_decay"),
    ("Adam", {}, "SparseAdam"), ("Lion", {}, "SparseAdam")])
def test_sparse_gradients_torch_refuses_raise_and_change_nothing(cls, kwargs, match):
    """Where torch's optimizer refuses a sparse gradient (weight decay; Adam's family), ours
    raises naming the parameter, before anything changes."""
    emb, dense = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Parameter(torch.ones(4))
    opt = getattr(fusedclr, cls)([dense, *emb.parameters()], lr=0.1, **kwargs)
    dense.grad = torch.ones(4)
    emb(torch.tensor([1, 2])).sum().backward()
    before = [dense.detach().clone(), emb.weight.detach().clone()]
    with pytest.raises(RuntimeError, match=rf"parameter 1 of its group has a sparse gradient.*{match}"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(emb.weight.detach(), before[1])


def test_sparse_gradient_fused_clipping_counts_its_values():
    """max_grad_norm over a sparse gradient: the norm is the dense gradient's (duplicates summed)."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fusedclr.SGD(emb.parameters(), lr=0.1, max_grad_norm=1e9)
    (emb(torch.tensor([1, 2, 2])) * torch.arange(9.0).reshape(3, 3)).sum().backward()
    want = emb.weight.grad.to_dense().double().norm()
    opt.step()
    torch.testing.assert_close(opt.last_grad_norm.double(), want, **TOL[torch.float32])


# -- 12. editing param_groups in place -------------------------------------------------------


def _assert_trained_alike(before, ours_m, torch_m, opts) -> None:
    """Both models moved from ``before``, agree, and their optimizers (``opts``: ours, torch's)
    count the same steps per parameter."""
    for b, p, q in zip(before, ours_m.parameters(), torch_m.parameters()):
        assert not torch.equal(p.detach(), b)
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    for p, q in zip(ours_m.parameters(), torch_m.parameters()):
        assert float(opts[0].state[p]["step"]) == float(opts[1].state[q]["step"])


@pytest.mark.parametrize("carry", [False, True], ids=["fresh", "state_moved"])
def test_parameter_replaced_in_place_in_its_group_is_trained_like_torch(carry):
    """A layer re-created and its parameters put where the old ones were (group["params"][i] = new),
    with or without ``opt.state[new] = opt.state.pop(old)``: torch steps the new parameters
    [note: followed groups]."""
    ours_m, torch_m = _twins()
    opts = []
    for m, cls in ((ours_m, fusedclr.AdamW), (torch_m, torch.optim.AdamW)):
        opt = cls([{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "lr": 0.02}], lr=0.05)
        _train(m, opt, 3)
        old = list(m[2].parameters())
        torch.manual_seed(5)
        m[2] = torch.nn.Linear(m[2].in_features, m[2].out_features)
        for i, new in enumerate(m[2].parameters()):
            assert opt.param_groups[1]["params"][i] is old[i]
            opt.param_groups[1]["params"][i] = new
            if carry:
                opt.state[new] = opt.state.pop(old[i])
        _train(m, opt, 3, seed=2)
        opts.append(opt)
    torch.manual_seed(5)
    fresh = torch.nn.Linear(ours_m[2].in_features, ours_m[2].out_features)  # where the new layer started
    for p, q, f in zip(ours_m[2].parameters(), torch_m[2].parameters(), fresh.parameters()):
        assert not torch.equal(p.detach(), f.detach())  # the new layer trained
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        assert float(opts[0].state[p]["step"]) == float(opts[1].state[q]["step"]) == (6 if carry else 3)
        torch.testing.assert_close(opts[0].state[p]["exp_avg"], opts[1].state[q]["exp_avg"], **TOL[torch.float32])
    for p, q in zip(ours_m[0].parameters(), torch_m[0].parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


@pytest.mark.parametrize("edit", ["replace_and_carry", "replace", "remove"])
def test_state_keys_after_group_edits_are_torchs(edit):
    """Each parameter shows once in optimizer.state (torch keeps the entries of parameters removed
    from their group, and so do we), whichever bucket now holds it."""
    keys = []
    for cls in (fusedclr.Adam, torch.optim.Adam):
        a, b, new = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
        names = {a: "a", b: "b", new: "new"}
        opt = cls([a, b], lr=0.1)
        for p in (a, b):
            p.grad = torch.ones_like(p)
        opt.step()
        params = opt.param_groups[0]["params"]
        if edit == "remove":
            params.pop()
        else:
            params[1] = new
            if edit == "replace_and_carry":
                opt.state[new] = opt.state.pop(b)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        keys.append(sorted(names[p] for p in opt.state))
    assert keys[0] == keys[1]


def test_state_pop_returns_the_values():
    """optimizer.state.pop(p) returns p's states (torch's dict.pop), not views zeroed by the pop."""
    ours_m, torch_m = _twins()
    got = []
    for m, cls in ((ours_m, fusedclr.Adam), (torch_m, torch.optim.Adam)):
        opt = cls(m.parameters(), lr=0.05)
        _train(m, opt, 2)
        p = next(m.parameters())
        got.append(opt.state.pop(p))
        assert p not in opt.state
        with pytest.raises(KeyError):
            opt.state.pop(p)
        assert opt.state.pop(p, "default") == "default"
    assert set(got[0]) == set(got[1])
    for k in got[1]:
        torch.testing.assert_close(got[0][k], got[1][k], **TOL[torch.float32])
    assert float(got[0]["exp_avg_sq"].abs().sum()) > 0


@pytest.mark.parametrize("edit", ["move", "reverse"])
def test_param_group_edits_keep_states_keyed_by_parameter(edit):
    """torch keys state by parameter: moving a parameter to another group, or reordering the
    groups, keeps its state (step count and moments) [note: followed groups]."""
    ours_m, torch_m = _twins()
    before = [p.detach().clone() for p in ours_m.parameters()]
    opts = []
    for m, cls in ((ours_m, fusedclr.AdamW), (torch_m, torch.optim.AdamW)):
        opt = cls([{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "lr": 0.02}], lr=0.05)
        _train(m, opt, 3)
        if edit == "move":
            opt.param_groups[1]["params"].append(opt.param_groups[0]["params"].pop())
        else:
            opt.param_groups.reverse()
        _train(m, opt, 3, seed=2)
        opts.append(opt)
    _assert_trained_alike(before, ours_m, torch_m, opts)
    for p, q in zip(ours_m.parameters(), torch_m.parameters()):
        assert float(opts[0].state[p]["step"]) == 6
        torch.testing.assert_close(opts[0].state[p]["exp_avg_sq"], opts[1].state[q]["exp_avg_sq"], **TOL[torch.float32])


# -- 13. replacing optimizer.state -------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
def test_assigning_a_fresh_state_restarts_as_torch(keep):
    """``opt.state = defaultdict(dict)`` (resetting the moments) starts every parameter afresh in
    torch; a mapping with entries restarts the others and loads those."""
    ours_m, torch_m = _twins()
    before = [p.detach().clone() for p in ours_m.parameters()]
    opts = []
    for m, cls in ((ours_m, fusedclr.AdamW), (torch_m, torch.optim.AdamW)):
        opt = cls(m.parameters(), lr=0.05)
        _train(m, opt, 3)
        fresh = collections.defaultdict(dict)
        if keep:
            w = m[0].weight
            fresh[w] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[w].items()}
        opt.state = fresh
        assert len(opt.state) == (1 if keep else 0)
        _train(m, opt, 2, seed=2)
        opts.append(opt)
    _assert_trained_alike(before, ours_m, torch_m, opts)


def test_assigning_a_bad_state_changes_nothing():
    model, _ = _twins()
    opt = fusedclr.AdamW(model.parameters(), lr=0.05)
    _train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="exp_avg"):
        opt.state = {model[0].weight: {"exp_avg": torch.zeros(3)}}
    torch.testing.assert_close(opt.state_dict(), saved)


# -- extra state keys [note: extra state keys] ------------------------------------------------------


def _sync_slow(opt, model):
    """timm's Lookahead pattern: slow weights (and a counter) kept in the wrapped optimizer's state[p]."""
    with torch.no_grad():
        for p in model.parameters():
            st = opt.state[p]
            if "slow" not in st:
                st["slow"] = p.detach().clone()
            st["syncs"] = st.get("syncs", 0) + 1
            st["slow"].add_(p - st["slow"], alpha=0.5)
            p.copy_(st["slow"])


def _lookahead_run(lib, cls, model, resume_from=None):
    """4 steps with a sync every 2, a torch.save round trip of the optimizer into a fresh one, 4 more."""
    opt = getattr(lib, cls)(model.parameters(), lr=0.05)
    if resume_from is not None:
        opt.load_state_dict(resume_from)
    for _ in range(2):
        _train(model, opt, 2)
        _sync_slow(opt, model)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = getattr(lib, cls)(model.parameters(), lr=0.05)
    fresh.load_state_dict(saved)
    for _ in range(2):
        _train(model, fresh, 2, seed=3)
        _sync_slow(fresh, model)
    return saved, fresh


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_extra_state_keys_are_kept_saved_and_loaded_like_torch(cls):
    """Keys of one's own in optimizer.state[p] (timm's Lookahead keeps its slow weights there): kept,
    saved, loaded back and trained with as in torch; the flat states' names are still checked."""
    ours_m, torch_m = _twins()
    saved_ours, ours = _lookahead_run(fusedclr, cls, ours_m)
    saved_torch, theirs = _lookahead_run(torch.optim, cls, torch_m)
    for a, b in zip(torch_m.parameters(), ours_m.parameters()):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
    for pid, st in saved_torch["state"].items():
        assert set(saved_ours["state"][pid]) >= {"slow", "syncs"}
        assert saved_ours["state"][pid]["syncs"] == st["syncs"] == 2
        torch.testing.assert_close(saved_ours["state"][pid]["slow"], st["slow"], **TOL[torch.float32])
    w = ours_m[0].weight
    assert ours.state[w]["syncs"] == theirs.state[torch_m[0].weight]["syncs"] == 4
    assert set(ours.state[w]) == set(theirs.state[torch_m[0].weight])
    with pytest.raises(KeyError, match="does not keep"):
        ours.state[w]["square_avg"] = torch.zeros_like(w)  # another optimizer's state: a mistake
    del ours.state[w]["syncs"]
    assert "syncs" not in ours.state[w] and "slow" in ours.state[w]
    del ours.state[w]  # the whole entry, extras included, as in torch
    assert w not in ours.state


def test_extra_state_keys_load_from_torchs_checkpoint():
    """A torch.optim checkpoint with a key of its own loads into fusedclr, cast to the parameter as torch casts it."""
    ours_m, torch_m = _twins()
    saved, _ = _lookahead_run(torch.optim, "AdamW", torch_m)
    opt = fusedclr.AdamW(ours_m.parameters(), lr=0.05)
    opt.load_state_dict(saved)
    w = ours_m[0].weight
    assert opt.state[w]["syncs"] == 2
    torch.testing.assert_close(opt.state[w]["slow"], saved["state"][0]["slow"], rtol=0, atol=0)
    assert opt.state_dict()["state"][0]["syncs"] == 2


@pytest.mark.parametrize("how", ["pop", "del"])
def test_sgd_momentum_reset_by_removing_the_buffer_is_torchs(how):
    """``state[p].pop("momentum_buffer", None)`` (a momentum reset): torch's SGD starts the buffer again from
    the next gradient, and so does fusedclr's; the states of other optimizers still refuse removal."""
    ours_m, torch_m = _twins()
    before = [p.detach().clone() for p in ours_m.parameters()]
    opts = []
    for model, lib in ((ours_m, fusedclr), (torch_m, torch.optim)):
        opt = lib.SGD(model.parameters(), lr=0.05, momentum=0.9)
        _train(model, opt, 3)
        for p in model.parameters():
            if how == "pop":
                assert opt.state[p].pop("momentum_buffer", None) is not None
            else:
                del opt.state[p]["momentum_buffer"]
        _train(model, opt, 2, seed=2)
        opts.append(opt)
    for a, b, b0 in zip(torch_m.parameters(), ours_m.parameters(), before):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
        assert not torch.equal(b.detach(), b0)
    adam_m, _ = _twins()
    adam = fusedclr.Adam(adam_m.parameters(), lr=0.05)
    _train(adam_m, adam, 1)
    with pytest.raises(TypeError, match="cannot delete 'exp_avg'"):
        del adam.state[adam_m[0].weight]["exp_avg"]


def test_extra_state_keys_follow_group_edits_and_load_any_shape():
    """Extras given to a parameter new to a group, carried by the replaced-parameter recipe, or of any shape
    (a scalar counter tensor) are kept through the re-bucketing and a load, as torch keeps them; a
    popped flat state is its value, not the zeroed view."""
    results = {}
    for lib in (torch.optim, fusedclr):
        torch.manual_seed(0)
        a, b, q = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
        opt = lib.SGD([a, b], lr=0.1, momentum=0.9)
        for p in (a, b):
            p.grad = torch.ones_like(p)
        opt.step()
        opt.state[a]["count"] = torch.tensor(3.0)  # not of the parameter's shape
        opt.load_state_dict(opt.state_dict())
        popped = opt.state[b].pop("momentum_buffer")
        opt.state[b]["tag"] = "b"
        opt.param_groups[0]["params"].append(q)  # new to the group, with a state of its own
        opt.state[q]["tag"] = "q"
        opt.param_groups[0]["params"][0] = r = torch.nn.Parameter(a.detach().clone())  # replaced in place
        opt.state[r] = opt.state.pop(a)
        for p in (r, b, q):
            p.grad = torch.ones_like(p)
        opt.step()
        results[lib] = (popped, float(opt.state[r]["count"]), opt.state[b]["tag"], opt.state[q]["tag"],
                        sorted(opt.state[r]), sorted(opt.state[q]))
    ours, theirs = results[fusedclr], results[torch.optim]
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    assert torch.equal(theirs[0], torch.ones(3))
    assert ours[1:] == theirs[1:] == (3.0, "b", "q", ["count", "momentum_buffer"], ["momentum_buffer", "tag"])


def test_tensor_lr_scheduler_steps_read_no_tensor_values(monkeypatch):
    """Looking for edited settings never converts a tensor lr to a number (a device sync on CUDA)."""
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(3)]
    opt = fusedclr.AdamW([{"params": [p]} for p in ps], lr=torch.tensor(0.01))
    sched = S.CosineAnnealingLR(opt, T_max=1000)
    for p in ps:
        p.grad = torch.randn(8)
    for _ in range(3):
        opt.step()
        sched.step()
    assert sched._fc_in_kernel
    calls = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: calls.append("float") or real_float(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append("item") or real_item(t))
    for _ in range(5):
        opt.step()
        sched.step()
    assert calls == [] and sched._fc_in_kernel
