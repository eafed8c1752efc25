"""Bad input: torch's exception types and messages, clear errors, and failed calls change nothing.

Inputs that torch accepts (mixed dtypes in a group, non-contiguous, zero-size or
frozen parameters) must give torch's numbers instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CPU_BACKENDS, TOL

import fusedclr

BAD = [
    ("SGD", {"lr": -0.1}),
    ("SGD", {"lr": 0.1, "momentum": -0.5}),
    ("SGD", {"lr": 0.1, "weight_decay": -1.0}),
    ("SGD", {"lr": 0.1, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}),
    ("SGD", {"lr": torch.tensor([0.1, 0.2])}),
    ("Adam", {"lr": -1e-3}),
    ("Adam", {"eps": -1.0}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, -0.1)}),
    ("Adam", {"weight_decay": -0.1}),
    ("AdamW", {"lr": torch.tensor([1e-3, 1e-3])}),
    ("AdamW", {"betas": (0.9, torch.tensor(0.99))}),
    ("AdamW", {"lr": torch.tensor(1e-3), "foreach": True}),
]


@pytest.mark.parametrize(("cls", "kwargs"), BAD, ids=[f"{c}-{sorted(k)}" for c, k in BAD])
def test_invalid_arguments_raise_like_torch(cls, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, cls)([torch.nn.Parameter(torch.ones(2))], **kwargs)
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(type(theirs.value)) as ours:
        getattr(fusedclr, cls)([p], **kwargs)
    assert str(ours.value) == str(theirs.value)
    assert p.grad is None and torch.equal(p.detach(), torch.ones(2)), "a failed constructor touched the parameter"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend"):
        fusedclr.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, backend="gpu")


@pytest.mark.parametrize("option", [{"max_grad_norm": 1.0}, {"backend": "reference"}, {"skip_nonfinite": True}])
def test_differentiable_refuses_fusedclr_options(option):
    # differentiable=True runs torch's implementation (tests/test_torch_dropin.py), which has none of them.
    with pytest.raises(ValueError, match=f"differentiable=True.*{next(iter(option))}"):
        fusedclr.Adam([torch.nn.Parameter(torch.ones(2))], differentiable=True, **option)


def test_same_parameter_in_two_groups():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        fusedclr.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)


@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_non_leaf_is_refused_like_torch(cls):
    leaf = torch.nn.Parameter(torch.ones(2))
    x = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, cls)([leaf, x], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf") as ours:
        getattr(fusedclr, cls)([leaf, x], lr=0.1)
    assert str(ours.value) == str(theirs.value)
    assert leaf.grad is None and torch.equal(leaf.detach(), torch.ones(2)), "a failed constructor touched a leaf"


BAD_FUSED_OPTIONS = [
    ({"max_grad_norm": 0.0}, ValueError),
    ({"max_grad_norm": -1.0}, ValueError),
    ({"max_grad_norm": math.nan}, ValueError),
    ({"max_grad_norm": math.inf}, ValueError),
    ({"max_grad_norm": "1.0"}, TypeError),
    ({"max_grad_norm": True}, TypeError),
    ({"skip_nonfinite": 1}, TypeError),
]


@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize(("kwargs", "error"), BAD_FUSED_OPTIONS, ids=[str(k) for k, _ in BAD_FUSED_OPTIONS])
def test_invalid_clip_and_skip_options_are_named(cls, kwargs, error):
    p = torch.nn.Parameter(torch.ones(2))
    ptr = p.data_ptr()
    with pytest.raises(error, match=next(iter(kwargs))):
        getattr(fusedclr, cls)([p], lr=0.1, **kwargs)
    assert p.grad is None and p.data_ptr() == ptr, "a failed constructor re-pointed the parameter"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_grad_points_to_sparse_adam_and_changes_nothing(backend):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.randn(4))
    opt = fusedclr.Adam([dense, *emb.parameters()], lr=0.1, backend=backend)
    opt.zero_grad(set_to_none=True)  # else autograd accumulates into the dense flat view
    dense.grad = torch.ones(4)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = [dense.detach().clone(), emb.weight.detach().clone()]
    with pytest.raises(RuntimeError, match="SparseAdam"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(emb.weight.detach(), before[1])
    assert opt.state_dict()["state"] == {}, "a failed step must not create or advance state"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_dtype_mismatch_is_refused(backend):
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedclr.SGD([p], lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="dtype"):
        p.grad = torch.ones(3, dtype=torch.float64)  # torch's own guard
    if not hasattr(p, "grad_dtype"):
        pytest.skip("this torch has no grad_dtype override")
    p.grad_dtype = None  # a user deliberately diverging the dtypes
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["sparse", "dtype"])
def test_failed_step_with_clipping_changes_nothing(backend, case):
    """Grads are validated before the norm, the clip and any launch: a refused step leaves
    parameters, states, step counts and last_grad_norm as they were."""
    dense = torch.nn.Parameter(torch.randn(4))
    emb = torch.nn.Embedding(10, 3, sparse=case == "sparse")
    opt = fusedclr.AdamW([dense, *emb.parameters()], lr=0.1, backend=backend, max_grad_norm=1.0,
                         skip_nonfinite=True)
    dense.grad = torch.ones_like(dense)
    emb.weight.grad = torch.ones_like(emb.weight)
    opt.step()
    norm = opt.last_grad_norm.clone()
    before = [dense.detach().clone(), emb.weight.detach().clone()]
    state = {k: v.clone() for k, v in opt.state[dense].items()}
    if case == "sparse":
        opt.zero_grad(set_to_none=True)
        dense.grad = torch.ones(4)
        emb(torch.tensor([1, 2])).sum().backward()
        match = "sparse"
    else:
        if not hasattr(dense, "grad_dtype"):
            pytest.skip("this torch has no grad_dtype override")
        dense.grad_dtype = None
        dense.grad = torch.ones(4, dtype=torch.float64)
        match = "dtype"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(emb.weight.detach(), before[1])
    assert all(torch.equal(opt.state[dense][k], v) for k, v in state.items())
    assert torch.equal(opt.last_grad_norm, norm)


def _twins(make):
    """Identical parameters (same values and strides) for torch and for fusedclr; ``make`` seeds itself."""
    return [torch.nn.Parameter(t) for t in make()], [torch.nn.Parameter(t) for t in make()]


def _assert_optimizers_agree(ref_opt, fc_opt, ref_params, fc_params) -> None:
    for a, b in zip(ref_params, fc_params, strict=True):
        tol = TOL[torch.float64 if a.dtype in (torch.float64, torch.complex128) else torch.float32]
        torch.testing.assert_close(b.detach(), a.detach(), **tol)
    ref_sd, fc_sd = ref_opt.state_dict()["state"], fc_opt.state_dict()["state"]
    assert set(ref_sd) == set(fc_sd), "the same parameters must have state"
    for pid, st in ref_sd.items():
        assert set(st) == set(fc_sd[pid])
        for key, value in st.items():
            if key == "step":
                assert float(fc_sd[pid][key]) == float(value)
            else:
                torch.testing.assert_close(fc_sd[pid][key].to(value.dtype), value, **TOL[torch.float32])


def _step_both(ref_opt, fc_opt, ref_params, fc_params, steps=5, clip=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(ref_params, fc_params):
            if not a.requires_grad:
                continue
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(device=a.device, dtype=a.dtype)
            a.grad = g.clone()
            if b.grad is not None:
                b.grad.copy_(g)  # into the flat view, as autograd accumulates: the fast path
            else:
                b.grad = g.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref_params, clip)
        ref_opt.step()
        fc_opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_mixed_dtypes_in_one_group_match_torch(backend, cls):
    """One group of float32, float64 and complex64 parameters: two buckets (a complex
    parameter is its float32 real view), torch's numbers, one global clip across them."""
    def make():
        torch.manual_seed(0)
        return [torch.randn(7, 3), torch.randn(11, dtype=torch.float64), torch.randn(5, dtype=torch.complex64),
                torch.randn(4, dtype=torch.float64)]

    ref_ps, fc_ps = _twins(make)
    options = {"lr": 0.05, "weight_decay": 0.01, **({"momentum": 0.9} if cls == "SGD" else {})}
    ref = getattr(torch.optim, cls)(ref_ps, **options)
    ours = getattr(fusedclr, cls)(fc_ps, **options, backend=backend, max_grad_norm=2.0)
    assert len(ours._buckets[0]) == 2
    _step_both(ref, ours, ref_ps, fc_ps, clip=2.0)
    _assert_optimizers_agree(ref, ours, ref_ps, fc_ps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_mixed_devices_in_one_group_match_torch(cls):
    """CPU and CUDA parameters in one group: one bucket per device, torch's numbers."""
    def make():
        torch.manual_seed(0)
        return [torch.randn(7, 3), torch.randn(11, device="cuda"), torch.randn(5, device="cuda")]

    ref_ps, fc_ps = _twins(make)
    options = {"lr": 0.05, **({"momentum": 0.9} if cls == "SGD" else {})}
    ref = getattr(torch.optim, cls)(ref_ps, **options, foreach=False)
    ours = getattr(fusedclr, cls)(fc_ps, **options)
    assert {b.device.type for b in ours._buckets[0]} == {"cpu", "cuda"}
    _step_both(ref, ours, ref_ps, fc_ps)
    _assert_optimizers_agree(ref, ours, ref_ps, fc_ps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_non_contiguous_params_match_torch(backend, cls):
    """A transposed weight and a channels_last conv weight (dense in another order, stepped
    where they are, states in the same layout) and a strided slice (gaps: stepped through a
    dense shadow, [note: shadowed parameters]): all as torch steps them."""
    def make():
        torch.manual_seed(0)
        return [torch.randn(5, 3).t(), torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last),
                torch.randn(10, 6)[:, ::2]]

    ref_ps, fc_ps = _twins(make)
    assert not any(p.is_contiguous() for p in fc_ps)
    values = [p.detach().clone() for p in fc_ps]
    options = {"lr": 0.05, "weight_decay": 0.01, **({"momentum": 0.9} if cls == "SGD" else {})}
    ref = getattr(torch.optim, cls)(ref_ps, **options)
    ours = getattr(fusedclr, cls)(fc_ps, **options, backend=backend)
    for p, v in zip(fc_ps, values):
        assert torch.equal(p.detach(), v), "building the buckets changed a value"
    _step_both(ref, ours, ref_ps, fc_ps)
    _assert_optimizers_agree(ref, ours, ref_ps, fc_ps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_zero_size_params_match_torch(backend, cls):
    """A group of zero-size parameters only (an empty bucket: no chunks) next to a normal one,
    with clipping (their norm is 0) and a state_dict round trip."""
    def make():
        torch.manual_seed(0)
        return [torch.randn(0), torch.randn(3, 0), torch.randn(6)]

    ref_ps, fc_ps = _twins(make)
    options = {"lr": 0.05, **({"momentum": 0.9} if cls == "SGD" else {})}
    ref = getattr(torch.optim, cls)([{"params": ref_ps[:2]}, {"params": ref_ps[2:]}], **options)
    ours = getattr(fusedclr, cls)([{"params": fc_ps[:2]}, {"params": fc_ps[2:]}], **options, backend=backend,
                                  max_grad_norm=1.0)
    _step_both(ref, ours, ref_ps, fc_ps, clip=1.0)
    _assert_optimizers_agree(ref, ours, ref_ps, fc_ps)
    ours.load_state_dict(ours.state_dict())
    ref.load_state_dict(ref.state_dict())
    _step_both(ref, ours, ref_ps, fc_ps, steps=2, clip=1.0, seed=1)
    _assert_optimizers_agree(ref, ours, ref_ps, fc_ps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_frozen_params_are_never_stepped_like_torch(backend, cls):
    """requires_grad=False parameters get no state and never move (weight decay included),
    under both zero_grad modes; unfrozen later, they train from then on, as in torch."""
    def make():
        torch.manual_seed(0)
        return [torch.randn(6), torch.randn(3, 4), torch.randn(5)]

    ref_ps, fc_ps = _twins(make)
    for ps in (ref_ps, fc_ps):
        ps[1].requires_grad_(False)
    options = {"lr": 0.05, "weight_decay": 0.1, **({"momentum": 0.9} if cls == "SGD" else {})}
    ref = getattr(torch.optim, cls)(ref_ps, **options)
    ours = getattr(fusedclr, cls)(fc_ps, **options, backend=backend, max_grad_norm=10.0)
    frozen = fc_ps[1].detach().clone()
    assert fc_ps[1].grad is None
    _step_both(ref, ours, ref_ps, fc_ps, steps=2)
    ours.zero_grad(set_to_none=True)
    _step_both(ref, ours, ref_ps, fc_ps, steps=2, seed=1)
    assert torch.equal(fc_ps[1].detach(), frozen)
    assert 1 not in ours.state_dict()["state"]
    _assert_optimizers_agree(ref, ours, ref_ps, fc_ps)
    for ps in (ref_ps, fc_ps):
        ps[1].requires_grad_(True)
    _step_both(ref, ours, ref_ps, fc_ps, steps=3, seed=2)
    ours.zero_grad()
    _step_both(ref, ours, ref_ps, fc_ps, steps=1, seed=3)
    assert not torch.equal(fc_ps[1].detach(), frozen)
    _assert_optimizers_agree(ref, ours, ref_ps, fc_ps)


def _one_cycle_pair(total_steps):
    pairs = []
    for opt_cls, sched_cls in ((torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR),
                               (fusedclr.SGD, fusedclr.lr_scheduler.OneCycleLR)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = opt_cls([p], lr=0.1, momentum=0.9)
        pairs.append((p, opt, sched_cls(opt, max_lr=0.5, total_steps=total_steps)))
    return pairs


def test_scheduler_stepped_past_its_end_raises_torchs_error():
    """OneCycleLR stepped past total_steps raises torch's ValueError, and the failed call
    changes no parameter or optimizer state."""
    (p_ref, opt_ref, sched_ref), (p, opt, sched) = _one_cycle_pair(total_steps=3)
    for _ in range(4):
        for q, o in ((p_ref, opt_ref), (p, opt)):
            q.grad = torch.ones(3)
            o.step()
        if sched_ref.last_epoch < 3:
            sched_ref.step()
            sched.step()
    with pytest.raises(ValueError) as theirs:
        sched_ref.step()
    params, state = p.detach().clone(), opt.state_dict()
    with pytest.raises(ValueError) as ours:
        sched.step()
    assert str(ours.value) == str(theirs.value)
    assert torch.equal(p.detach(), params)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])
    torch.testing.assert_close(p.detach(), p_ref.detach())


def test_optimizer_step_after_a_failed_scheduler_step_uses_torchs_lr():
    (p_ref, opt_ref, sched_ref), (p, opt, sched) = _one_cycle_pair(total_steps=3)
    for _ in range(6):
        for q, o, s in ((p_ref, opt_ref, sched_ref), (p, opt, sched)):
            q.grad = torch.ones(3)
            o.step()
            if s.last_epoch < 3:
                s.step()
            else:
                with pytest.raises(ValueError):
                    s.step()
    torch.testing.assert_close(p.detach(), p_ref.detach())


def test_load_state_dict_validates_before_changing_anything():
    p = torch.nn.Parameter(torch.ones(4))
    opt = fusedclr.Adam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    good = {k: v for k, v in opt.state_dict().items()}
    exp_avg = opt.state[p]["exp_avg"].clone()

    wrong_shape = {"state": {0: {**good["state"][0], "exp_avg": torch.zeros(7)}},
                   "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(wrong_shape)
    wrong_key = {"state": {0: {**good["state"][0], "momentum_buffer": torch.zeros(4)}},
                 "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match="unknown key"):
        opt.load_state_dict(wrong_key)
    with pytest.raises(ValueError, match="number of parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": good["param_groups"] * 2})
    assert torch.equal(opt.state[p]["exp_avg"], exp_avg)
    assert opt.state_dict()["state"][0]["step"] == 1


def test_load_state_dict_refusals_leave_everything_as_it_was():
    """Wrong group sizes, missing keys, another optimizer's states: refused with a clear
    error; parameters, states, step counts and hyperparameters stay as they were."""
    ps = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
    opt = fusedclr.SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.2}], lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    good = opt.state_dict()
    params = [p.detach().clone() for p in ps]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in ps]
    adam_ps = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
    adam = fusedclr.Adam(adam_ps, lr=0.5)
    for p in adam_ps:
        p.grad = torch.ones_like(p)
    adam.step()
    adam_sd = adam.state_dict()
    adam_sd["param_groups"] = good["param_groups"]
    bad_groups = [dict(good["param_groups"][0], lr=9.0), dict(good["param_groups"][1], params=[1, 2])]
    cases = [
        ({"param_groups": good["param_groups"]}, ValueError, "keys 'state' and 'param_groups'"),
        ({"state": good["state"], "param_groups": bad_groups}, ValueError, "size of optimizer's group"),
        ({"state": good["state"], "param_groups": good["param_groups"][:1]}, ValueError, "number of parameter groups"),
        (adam_sd, ValueError, "unknown key"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            opt.load_state_dict(bad)
    for p, value, buf in zip(ps, params, bufs):
        assert torch.equal(p.detach(), value) and torch.equal(opt.state[p]["momentum_buffer"], buf)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    opt.step()  # and it still works
    assert not torch.equal(ps[0].detach(), params[0])


def _beta1_one_case(lib, cls, backend, how):
    """A two-group Adam after one step whose second group then has beta1 == 1: by an edit, or by a
    OneCycleLR whose max_momentum is 1 (its first value). Returns the optimizer and its parameters."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    kw = {"backend": backend} if lib is fusedclr else {}
    opt = getattr(lib, cls)([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=0.1, **kw)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    if how == "edit":
        opt.param_groups[1]["betas"] = (1.0, 0.999)
    else:
        sched_lib = fusedclr.lr_scheduler if lib is fusedclr else torch.optim.lr_scheduler
        opt.scheduler = sched_lib.OneCycleLR(opt, max_lr=0.1, total_steps=10, base_momentum=[0.85, 0.85],
                                             max_momentum=[0.95, 1.0])
    return opt, ps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["edit", "one_cycle"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_beta1_of_one_raises_like_torch_and_changes_nothing(backend, cls, how):
    """beta1 == 1 zeroes Adam's bias correction: torch's default step raises ZeroDivisionError (after
    moving its states); fusedclr's raises it with the group named, before anything changes."""
    theirs, _ = _beta1_one_case(torch.optim, cls, None, how)
    with pytest.raises(ZeroDivisionError):
        theirs.step()
    opt, ps = _beta1_one_case(fusedclr, cls, backend, how)
    before = [p.detach().clone() for p in ps]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    match = "param group 1 .*max_momentum=1.0" if how == "one_cycle" else r"betas\[0\] of param group 1"
    with pytest.raises(ZeroDivisionError, match=match):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    for p, st in zip(ps, states):
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    opt.param_groups[1]["betas"] = (0.9, 0.999)  # fixed, the run goes on
    opt.step()
    assert not torch.equal(ps[1].detach(), before[1])


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_beta1_of_one_without_grads_steps_like_torch(cls):
    """torch skips a group whose parameters have no gradient, and so never divides: no error either."""
    results = []
    for lib in (torch.optim, fusedclr):
        opt, ps = _beta1_one_case(lib, cls, "cpu" if lib is fusedclr else None, "edit")
        ps[1].grad = None
        ps[0].grad = torch.full_like(ps[0], 2.0)
        opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
