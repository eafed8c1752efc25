"""``zero_grad(set_to_none=False)`` through the segment table, against torch.optim's, on every backend.

After a real backward, fusedclr's and torch's optimizers over the same parameters
zero the same gradients the same way: the same tensor objects (strides kept), all
zeros, ``None`` grads left ``None``, no gradient requiring grad and one with a
``grad_fn`` (``backward(create_graph=True)``) detached. Each bucket whose table can
stand for its gradients takes one ``grad_zero_`` launch (counted); the others
(a gradient with other strides than its parameter, a shadowed parameter, a gradient
that requires grad or shares copy-on-write storage, sparse or other-dtype gradients,
a parameter that changed dtype) are zeroed by torch's loop, and none is left
unzeroed. Training with ``zero_grad(set_to_none=False)`` matches torch's.

The backend is a parameter crossed with the module's ``BACKENDS`` [note: table
backends]: the CPU ones here; tests/test_triton_table.py (Triton under the
interpreter) and tests/test_emulated_table.py (the CUDA kernels under host
emulation) import these tests and run them on theirs.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import CPU_BACKENDS, TOL
from test_optim_table import Backend, pytest_generate_tests  # noqa: F401 - crosses BACKENDS with the tests

import fusedclr
import fusedclr.optim._base as base
from fusedclr import reference

BACKENDS: list[Backend] = [Backend(name) for name in CPU_BACKENDS]

OPTIONS = {"AdamW": {"lr": 0.01, "weight_decay": 0.01}, "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True}}


def _launches(monkeypatch) -> list:
    """Every ``grad_zero_`` call the optimizers make from now on, as the ``param_dtype`` it was given:
    wraps what they resolve for the op on any backend (a reference op still gets the table's tensors)."""
    calls = []
    resolve, is_reference = base.resolve_backend, base._is_reference

    def counting(backend, device, op="step_"):
        fn = resolve(backend, device, op)
        if op != "grad_zero_":
            return fn

        def wrapper(segments, param_dtype, chunks):
            calls.append(param_dtype)
            fn(segments, param_dtype, chunks)

        wrapper.__wrapped__ = fn
        return wrapper

    monkeypatch.setattr(base, "resolve_backend", counting)
    monkeypatch.setattr(base, "_is_reference", lambda fn: is_reference(inspect.unwrap(fn)))
    return calls


def _torch_loops(monkeypatch) -> list:
    """The buckets zeroed by torch's loop from now on (their parameter counts)."""
    loops = []
    torch_zero = base._zero_grads_as_torch

    def counting(params):
        loops.append(len(params))
        torch_zero(params)

    monkeypatch.setattr(base, "_zero_grads_as_torch", counting)
    return loops


# --------------------------------------------------------------------------
# The gradients after zero_grad(set_to_none=False), against torch's
# --------------------------------------------------------------------------


def _model(dtype: torch.dtype) -> list[list[torch.nn.Parameter]]:
    """Three groups: plain parameters of ragged shapes (an empty one, a one-element one, one
    that gets no gradient and, unless bf16, a complex one); a parameter whose gradient will have
    other strides; a parameter with gaps (a strided slice made a leaf: walked through a shadow)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64 if not dt.is_complex else dt).to(dt)

    plain = [randn(37), randn(5, 7), randn(0), randn(1), randn(4)]
    if dtype != torch.bfloat16:
        plain.append(randn(3, 2, dt=torch.complex128 if dtype == torch.float64 else torch.complex64))
    strided_grad = [randn(3, 4)]
    with_gaps = [randn(6, 8)[:, ::2]]
    return [[torch.nn.Parameter(t) for t in ts] for ts in (plain, strided_grad, with_gaps)]


def _clone(groups):
    out = []
    for ps in groups:
        clones = []
        for p in ps:
            if p.is_contiguous():
                clones.append(torch.nn.Parameter(p.detach().clone()))
            else:  # the same gaps
                base_ = torch.empty(p.shape[0], 2 * p.shape[1], dtype=p.dtype)
                base_[:, ::2] = p.detach()
                clones.append(torch.nn.Parameter(base_[:, ::2]))
        out.append(clones)
    return out


def _backward(groups, create_graph: bool) -> None:
    """A loss whose gradient is 2p (with a grad_fn under create_graph); group 0's fifth
    parameter is left out (its grad stays None); group 1's gradient gets other strides."""
    loss = 0
    for gi, ps in enumerate(groups):
        for pi, p in enumerate(ps):
            if (gi, pi) == (0, 4):
                continue
            loss = loss + (p * p.conj()).real.sum().float()
    loss.backward(create_graph=create_graph)
    q = groups[1][0]
    # Column-major (the kernels would read it through a copy), and no view: torch cannot detach a view in place.
    q.grad = torch.empty_strided(q.shape, (1, q.shape[0]), dtype=q.dtype).copy_(q.grad)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_zero_grad_in_place_is_torchs(backend, cls, dtype, create_graph):
    ours_params = _model(dtype)
    torch_params = _clone(ours_params)
    ours = getattr(fusedclr, cls)([{"params": ps} for ps in ours_params], backend=backend.name, **OPTIONS[cls])
    theirs = getattr(torch.optim, cls)([{"params": ps} for ps in torch_params], **OPTIONS[cls])
    for groups, opt in ((ours_params, ours), (torch_params, theirs)):
        _backward(groups, create_graph)
    before = [p.grad for ps in ours_params for p in ps]
    assert before[4] is None and before[2].numel() == 0
    assert all(g.grad_fn is not None for g in before if g is not None and g.numel()) == create_graph

    ours.zero_grad(set_to_none=False)
    theirs.zero_grad(set_to_none=False)

    for i, (p, q, g) in enumerate(zip([p for ps in ours_params for p in ps], [q for qs in torch_params for q in qs],
                                      before)):
        assert p.grad is g, f"parameter {i}: zero_grad replaced the gradient tensor"
        if q.grad is None:
            assert p.grad is None, f"parameter {i}: a None grad was materialised"
            continue
        assert (p.grad.dtype, p.grad.shape, p.grad.stride()) == (q.grad.dtype, q.grad.shape, q.grad.stride()), i
        assert torch.equal(p.grad, q.grad) and not p.grad.any(), f"parameter {i}: {p.grad}"
        assert not p.grad.requires_grad and p.grad.grad_fn is None and p.grad.is_leaf, i
        assert not q.grad.requires_grad and q.grad.grad_fn is None, i


# --------------------------------------------------------------------------
# One launch per bucket; torch's loop where the table cannot do it in place
# --------------------------------------------------------------------------


def _buckets_model(n_groups: int = 3):
    """Groups of fp32 and bf16 parameters: two buckets per group."""
    groups = [[torch.nn.Parameter(torch.randn(n, dtype=dt)) for n in (50, 3, 0, 17) for dt in
               (torch.float32, torch.bfloat16)] for _ in range(n_groups)]
    return groups, 2 * n_groups


def _fill_grads(groups, value: float = 1.0) -> None:
    for ps in groups:
        for p in ps:
            if p.grad is None:
                p.grad = torch.full_like(p, value)
            else:
                p.grad.fill_(value)


@pytest.mark.parametrize("wrapped", [False, True], ids=["optimizer", "lookahead"])
def test_one_launch_per_bucket(backend, monkeypatch, wrapped):
    """``zero_grad(set_to_none=False)`` launches ``grad_zero_`` once per bucket and runs no Python
    loop over the parameters of a bucket the table can zero; a bucket with a gradient the table
    cannot (other strides) goes to torch's loop, the others still take one launch each.
    Lookahead forwards zero_grad to the optimizer it wraps."""
    groups, n_buckets = _buckets_model()
    opt = fusedclr.AdamW([{"params": ps} for ps in groups], lr=0.01, backend=backend.name)
    if wrapped:
        opt = fusedclr.Lookahead(opt, k=2)
    launches, loops = _launches(monkeypatch), _torch_loops(monkeypatch)
    _fill_grads(groups)
    grads = [p.grad for ps in groups for p in ps]
    opt.zero_grad(set_to_none=False)
    assert sorted(map(str, launches)) == sorted(map(str, [torch.float32, torch.bfloat16] * (n_buckets // 2)))
    assert loops == []
    assert all(p.grad is g and not g.any() for p, g in zip([p for ps in groups for p in ps], grads))

    _fill_grads(groups, 2.0)
    opt.step()  # the table kept its addresses: nothing to refresh
    _fill_grads(groups, 3.0)
    groups[1][0].grad = torch.full((50, 2), 3.0)[:, 0]  # other strides than its parameter
    opt.zero_grad(set_to_none=False)
    assert len(launches) == 2 * n_buckets - 1 and loops == [len(groups[1]) // 2]
    assert not any(p.grad.any() for ps in groups for p in ps)


def test_zero_grad_writes_only_the_gradients(backend, monkeypatch):
    """Gradients that are views of one buffer (as DDP's gradient_as_bucket_view hands them), at odd
    offsets and with gaps: the launch zeroes exactly their elements, not the gaps, nor the
    padding of the state layout beyond each one; a None grad stays None."""
    sizes = [37, 1, 0, 300, 16, 5]
    ps = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = fusedclr.SGD(ps, lr=0.1, backend=backend.name)
    launches, loops = _launches(monkeypatch), _torch_loops(monkeypatch)
    buf = torch.full((sum(sizes) + 3 * len(sizes) + 1,), 7.0)
    pos, grads = 1, []
    for p, n in zip(ps, sizes):
        grads.append(buf[pos : pos + n])
        pos += n + 3
    grads[4] = None
    for p, g in zip(ps, grads):
        if g is not None:
            g.normal_()
        p.grad = g
    outside = torch.ones_like(buf, dtype=torch.bool)
    for g in grads:
        if g is not None and g.numel():
            outside[g.storage_offset() : g.storage_offset() + g.numel()] = False
    gaps = buf[outside].clone()
    assert gaps.numel() > len(sizes) and bool((gaps == 7.0).all())
    opt.zero_grad(set_to_none=False)
    assert len(launches) == 1 and loops == []
    assert torch.equal(buf[outside], gaps), "zero_grad wrote outside the gradients"
    assert not buf[~outside].any()
    assert ps[4].grad is None and all(p.grad is g for p, g in zip(ps, grads))


def test_zero_grad_takes_whatever_gradients_torch_takes(backend, monkeypatch):
    """Gradients the table must not zero in place, each in a bucket (param group) of its own, end
    as torch's do: a leaf gradient that requires grad (torch stops that), one that shares
    copy-on-write storage with another tensor (which must keep its values), a sparse one, one of
    another dtype than its parameter, and a parameter that changed dtype (re-bucketed by the
    next step). A bucket of plain gradients beside them still takes its launch."""
    ps = [torch.nn.Parameter(torch.randn(6)) for _ in range(6)]
    opt = fusedclr.AdamW([{"params": [p]} for p in ps], lr=0.01, backend=backend.name)
    launches, loops = _launches(monkeypatch), _torch_loops(monkeypatch)
    ps[0].grad = torch.randn(6)
    ps[1].grad = torch.randn(6, requires_grad=True)
    shared = torch.randn(6)
    kept = shared.clone()
    ps[2].grad = torch._lazy_clone(shared)
    assert torch._C._is_cow_tensor(ps[2].grad)
    ps[3].grad = torch.randn(6).to_sparse()
    ps[4].grad_dtype = None  # lets a gradient have another dtype than its parameter
    ps[4].grad = torch.randn(6, dtype=torch.float64)
    ps[5].data = ps[5].data.double()
    ps[5].grad = torch.randn(6, dtype=torch.float64)
    grads = [p.grad for p in ps]
    opt.zero_grad(set_to_none=False)
    assert len(launches) == 1 and loops == [1] * 5
    for i, (p, g) in enumerate(zip(ps, grads)):
        assert p.grad is g and not g.requires_grad, i
        assert not (g.to_dense() if g.is_sparse else g).any(), i
    assert torch.equal(shared, kept), "a copy-on-write gradient was zeroed through its shared storage"
    for p in ps:
        p.grad = None
    ps[0].grad = torch.ones(6)
    ps[5].grad = torch.ones(6, dtype=torch.float64)
    opt.step()
    assert ps[5].dtype == torch.float64 and opt._buckets[5][0].dtype == torch.float64


def test_zero_grad_after_a_step_that_raised(backend):
    """A step that raised after its refresh had read a gradient through a copy (other strides)
    leaves no trace: zero_grad then zeroes the gradient the parameter has, not that copy."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = fusedclr.SGD([p], lr=0.1, backend=backend.name)
    p.grad = torch.randn(4, 3).t()
    with pytest.raises(RuntimeError):
        opt.step(grad_scale=torch.ones(2))  # not GradScaler's one-element scale
    p.grad = g = torch.randn(3, 4)
    opt.zero_grad(set_to_none=False)
    assert p.grad is g and not g.any()


# --------------------------------------------------------------------------
# Training with zero_grad(set_to_none=False)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_training_with_zero_grad_in_place_matches_torch(backend, cls):
    """Five iterations of zero_grad(set_to_none=False), forward, backward, step: autograd accumulates
    into the zeroed gradients, and parameters and states end where torch's do."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    ours = getattr(fusedclr, cls)(model.parameters(), backend=backend.name, **OPTIONS[cls])
    theirs = getattr(torch.optim, cls)(twin.parameters(), **OPTIONS[cls])
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for _ in range(5):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float32])
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32])
    for a, b in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        for key in b:
            torch.testing.assert_close(a[key], b[key], **TOL[torch.float32])


# --------------------------------------------------------------------------
# Not backend-specific: set_to_none=True, differentiable=True, the profiler scope
# --------------------------------------------------------------------------


def test_set_to_none_and_differentiable_are_torchs(monkeypatch):
    """``set_to_none=True`` (the default) sets every grad to None without any launch, and an
    optimizer with ``differentiable=True`` (torch's own) zeroes in place as torch does."""
    launches = _launches(monkeypatch)
    p = torch.nn.Parameter(torch.randn(5))
    opt = fusedclr.AdamW([p], lr=0.01)
    p.grad = torch.randn(5)
    opt.zero_grad()
    assert p.grad is None and launches == []
    with pytest.warns(UserWarning, match="differentiable=True"):
        diff = fusedclr.AdamW([p], lr=0.01, differentiable=True)
    p.grad = g = torch.randn(5, requires_grad=True)
    diff.zero_grad(set_to_none=False)
    assert p.grad is g and not g.any() and not g.requires_grad and launches == []


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_keeps_torchs_profiler_scope(set_to_none):
    p = torch.nn.Parameter(torch.randn(5))
    opt = fusedclr.SGD([p], lr=0.1)
    p.grad = torch.randn(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad(set_to_none=set_to_none)
    names = [e.name for e in prof.events()]
    assert "Optimizer.zero_grad#SGD.zero_grad" in names, names


def test_reference_op_zeroes_the_active_gradients():
    """reference.grad_zero_ (the oracle of the op tests) zeroes the gradients it is given and leaves
    a segment without one alone."""
    params = [torch.randn(4), torch.randn(3, dtype=torch.complex64), torch.randn(2)]
    grads = [torch.randn(4), torch.randn(3, dtype=torch.complex64), None]
    reference.grad_zero_(reference.Segments(params, grads, [0, 16, 32], 48), torch.float32,
                         torch.tensor([[0, 0, 4], [1, 16, 22], [2, 32, 34]]))
    assert not grads[0].any() and not grads[1].any() and grads[2] is None


__all__ = [
    "test_one_launch_per_bucket", "test_training_with_zero_grad_in_place_matches_torch",
    "test_zero_grad_after_a_step_that_raised",
    "test_zero_grad_in_place_is_torchs", "test_zero_grad_takes_whatever_gradients_torch_takes",
    "test_zero_grad_writes_only_the_gradients",
]
