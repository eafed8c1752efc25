"""Bad input: torch's exception types and messages, clear errors, and failed calls change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS

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


def test_differentiable_is_refused():
    with pytest.raises(ValueError, match="differentiable"):
        fusedclr.Adam([torch.nn.Parameter(torch.ones(2))], differentiable=True)


def test_same_parameter_in_two_groups():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        fusedclr.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        fusedclr.SGD([p, p], lr=0.1)


def test_non_leaf_is_refused_like_torch():
    x = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(ValueError, match="non-leaf"):
        fusedclr.AdamW([x])


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


def test_load_state_dict_validates_before_changing_anything():
    p = torch.nn.Parameter(torch.ones(4))
    opt = fusedclr.Adam([p], lr=0.1)
    p.grad.fill_(1.0)
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
