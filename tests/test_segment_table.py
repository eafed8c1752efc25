"""Parameters and gradients stay where the model keeps them [note: segment table].

The optimizers own flat state buffers only; these tests pin what that means for
users: conversions after construction, checkpoints of the model, parameters in
two optimizers, gradients of any layout, and torch's behaviour as the spec.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from conftest import CPU_BACKENDS, TOL

import fusedclr

PAIRS = {"SGD": (torch.optim.SGD, fusedclr.SGD, {"lr": 0.05, "momentum": 0.9}),
         "AdamW": (torch.optim.AdamW, fusedclr.AdamW, {"lr": 0.01, "weight_decay": 0.1})}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(5, 6, generator=gen).to(dtype)
        model(x).square().mean().backward()
        opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_moved(before: list[torch.Tensor], model: torch.nn.Module) -> None:
    assert all((b != a).any() for b, a in zip(before, model.parameters())), "every parameter must have moved"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("convert", ["bfloat16", "half", "double"])
def test_dtype_conversion_before_the_first_step_trains_like_torch(backend, name, convert):
    """model.to(dtype) after the optimizer exists: the weights keep changing, exactly as torch's."""
    torch_cls, fc_cls, kw = PAIRS[name]
    ref, ours = _model(), _model()
    opt_ref, opt = torch_cls(ref.parameters(), **kw), fc_cls(ours.parameters(), **kw, backend=backend)
    getattr(ours, convert)()
    # torch's own low-precision states (fp16 AdamW underflows into inf/NaN here) make a poor
    # reference: low-precision runs are compared with torch in float32, double with double.
    getattr(ref, convert if convert == "double" else "float")()
    before = _params(ours)
    _train(ref, opt_ref, 4)
    _train(ours, opt, 4)
    _assert_moved(before, ours)
    dtype = getattr(torch, "float16" if convert == "half" else convert)
    for p_ref, p in zip(ref.parameters(), ours.parameters()):
        assert p.dtype == dtype
        tol = TOL[dtype] if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(p, p_ref.to(dtype), **tol)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_dtype_conversion_after_steps_keeps_states_and_counts(name):
    """After steps, a conversion re-buckets: states keep their values (as load_state_dict
    would convert them), step counts continue, and training goes on."""
    _, fc_cls, kw = PAIRS[name]
    model = _model()
    opt = fc_cls(model.parameters(), **kw)
    _train(model, opt, 3)
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    saved = [opt.state[p][key].clone() for p in model.parameters()]
    model.double()
    for p, s in zip(model.parameters(), saved):
        assert opt.state[p][key].dtype == torch.float32  # not yet converted: nothing stepped
    before = _params(model)
    _train(model, opt, 1, seed=7)
    _assert_moved(before, model)
    for p, s in zip(model.parameters(), saved):
        assert opt.state[p][key].dtype == torch.float64
        assert not torch.equal(opt.state[p][key], s.double())  # the step used and moved the converted state
    if name == "AdamW":
        assert all(float(opt.state[p]["step"]) == 4 for p in model.parameters())
    # The converted states are the saved ones: replaying the step from them gives the same parameters.
    replay = _model()
    replay.double()
    replay.load_state_dict({k: v.double() for k, v in zip(replay.state_dict(), before)})
    opt2 = fc_cls(replay.parameters(), **kw)
    sd = opt.state_dict()
    for pid, s in enumerate(saved):
        sd["state"][pid][key] = s.double()
        if "step" in sd["state"][pid]:
            sd["state"][pid]["step"] = torch.tensor(3.0)
        if name == "AdamW":
            sd["state"][pid]["exp_avg_sq"] = None
    if name == "AdamW":
        return  # exp_avg_sq was not saved above; the step count and values are checked
    opt2.load_state_dict(sd)
    _train(replay, opt2, 1, seed=7)
    for a, b in zip(model.parameters(), replay.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "Lion"])
def test_optimizer_built_before_to_empty_raises_instead_of_silently_not_training(name):
    """to_empty() replaces meta parameters with new objects: torch's optimizer then silently
    steps nothing; ours names the problem and what to do. Building on meta parameters works,
    as torch's does (Adagrad writes every parameter's state in its constructor)."""
    with torch.device("meta"):
        model = _model()
    opt = getattr(fusedclr, name)(model.parameters(), lr=0.01)
    model.to_empty(device="cpu")
    model(torch.randn(2, 6)).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 is on the meta device.*after to_empty"):
        opt.step()


def test_load_state_dict_assign_behaves_like_torch():
    """assign=True swaps in new Parameter objects: torch's optimizer keeps the old ones, and so do we."""
    ref, ours = _model(), _model()
    opt_ref, opt = torch.optim.SGD(ref.parameters(), lr=0.1), fusedclr.SGD(ours.parameters(), lr=0.1)
    fresh = _model(seed=3).state_dict()
    ref.load_state_dict({k: v.clone() for k, v in fresh.items()}, assign=True)
    ours.load_state_dict({k: v.clone() for k, v in fresh.items()}, assign=True)
    _train(ref, opt_ref, 2)
    _train(ours, opt, 2)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def test_parameter_in_two_optimizers_is_updated_by_both_like_torch():
    ref, ours = _model(), _model()
    opts_ref = [torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(ref[0].parameters(), lr=0.05)]
    opts = [fusedclr.SGD(ours.parameters(), lr=0.1), fusedclr.SGD(ours[0].parameters(), lr=0.05)]
    gen = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    before = _params(ours)
    for m, os_, g in ((ref, opts_ref, gen[0]), (ours, opts, gen[1])):
        for _ in range(3):
            for o in os_:
                o.zero_grad()
            m(torch.randn(5, 6, generator=g)).square().mean().backward()
            for o in os_:
                o.step()
    _assert_moved(before, ours)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def test_parameters_keep_their_own_storage():
    model = _model()
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    opt = fusedclr.AdamW(model.parameters())
    _train(model, opt, 2)
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == storages
    assert len(set(storages)) == len(storages)


def test_submodule_state_dict_is_the_size_of_its_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 10))
    opt = fusedclr.AdamW(model.parameters())
    _train_big = torch.randn(2, 1000)
    model(_train_big).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model[1].state_dict(), buf)
    payload = sum(p.numel() * p.element_size() for p in model[1].parameters())
    assert payload <= buf.getbuffer().nbytes < payload + 4096


def test_safetensors_round_trip_of_a_model_whose_optimizer_exists(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model()
    opt = fusedclr.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    path = os.fspath(tmp_path / "model.safetensors")
    safetensors_torch.save_model(model, path)
    loaded = safetensors_torch.load_file(path)
    assert set(loaded) == set(model.state_dict())  # nothing dropped as a "shared tensor"
    other = _model(seed=9)
    missing, unexpected = safetensors_torch.load_model(other, path)
    assert not missing and not unexpected
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_gradient_with_other_strides_is_used_like_torch():
    """A gradient whose strides differ from its parameter's (a channels_last conv weight given a
    contiguous grad) is read correctly (copied into the parameter's layout for the step)."""
    torch.manual_seed(0)
    w_ref = torch.nn.Parameter(torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last))
    w = torch.nn.Parameter(w_ref.detach().clone(memory_format=torch.channels_last))
    opt_ref, opt = torch.optim.AdamW([w_ref], lr=0.1), fusedclr.AdamW([w], lr=0.1)
    for step in range(3):
        g = torch.randn(4, 3, 2, 2)  # contiguous
        w_ref.grad, w.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    torch.testing.assert_close(w, w_ref, **TOL[torch.float32])
    torch.testing.assert_close(opt.state[w]["exp_avg"], opt_ref.state[w_ref]["exp_avg"], **TOL[torch.float32])
    assert opt.state[w]["exp_avg"].stride() == w.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_parameter_with_gaps_trains_like_torch_through_a_shadow(backend, name):
    """A strided slice made a leaf has gaps the kernels cannot walk: a dense shadow is stepped
    and copied back [note: shadowed parameters]; the parameter keeps its own storage and
    strides, the result is torch's."""
    torch_cls, fc_cls, kw = PAIRS[name]
    base = torch.randn(8, 10)
    p = torch.nn.Parameter(base[:, ::2])
    q = torch.nn.Parameter(base.clone()[:, ::2])
    dense = torch.nn.Parameter(torch.randn(7))  # a dense neighbour in the same bucket
    dense_ref = torch.nn.Parameter(dense.detach().clone())
    assert not p.is_contiguous() and p.stride() == (10, 2)
    storage = p.untyped_storage().data_ptr()
    opt = fc_cls([p, dense], **kw, backend=backend)
    opt_ref = torch_cls([q, dense_ref], **kw)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        for a, b in ((p, q), (dense, dense_ref)):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        if step == 2:
            p.grad = q.grad = None  # skipped like torch
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(p, q, **TOL[torch.float32])
    torch.testing.assert_close(dense, dense_ref, **TOL[torch.float32])
    assert p.untyped_storage().data_ptr() == storage and p.stride() == (10, 2)
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    torch.testing.assert_close(opt.state[p][key], opt_ref.state[q][key], **TOL[torch.float32])


def test_resized_parameter_is_refused_by_name():
    model = _model()
    opt = fusedclr.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 1)
    model[2].bias.data = torch.zeros(7)
    model[2].bias.grad = torch.zeros(7)
    with pytest.raises(RuntimeError, match=r"parameter 3 of its group .* has 7 elements, but had 3"):
        opt.step()


def test_unchanged_table_is_not_rewritten_and_replaced_grads_are_followed():
    model = _model()
    opt = fusedclr.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    b = opt._buckets[0][0]
    table = b.host_table.clone()
    assert b._refresh() == 0  # nothing changed: no rewrite, no upload
    assert torch.equal(b.host_table, table)
    opt.zero_grad()  # torch's default: set_to_none
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(2, 6)).sum().backward()
    b.prepare()
    assert b.host_table[:, 1].tolist() == [p.grad.data_ptr() for p in model.parameters()]


def test_deepcopied_optimizer_steps_its_own_model():
    model = _model()
    opt = fusedclr.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    before, before2 = _params(model), _params(model2)
    _train(model2, opt2, 1)
    _assert_moved(before2, model2)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b), "the original must not move when its copy steps"


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_checkpoint_state_initialisation_step_changes_nothing_like_torch(name):
    """torch.distributed.checkpoint fills an empty optimizer state with one step at lr 0 and
    zero grads; with an in-kernel schedule attached, that step must not move the weights
    (weight decay at the schedule's lr would), as it does not in torch."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    torch_cls, fc_cls, kw = PAIRS[name]
    kw = {**kw, "weight_decay": 0.1}
    model, ref = _model(), _model()
    opt = fc_cls(model.parameters(), **kw)
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    opt_ref = torch_cls(ref.parameters(), **kw)
    sched_ref = torch.optim.lr_scheduler.OneCycleLR(opt_ref, max_lr=0.1, total_steps=100)
    before = _params(model)
    _init_optim_state(opt)
    _init_optim_state(opt_ref)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p), "the initialisation step moved a weight"
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_ref.param_groups]
    # and the schedule is back in charge afterwards: training goes on exactly like torch's
    for m, o, s in ((model, opt, sched), (ref, opt_ref, sched_ref)):
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            o.zero_grad()
            m(torch.randn(5, 6, generator=gen)).square().mean().backward()
            o.step()
            s.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("change", ["append", "new list", "shorter list"])
def test_group_params_changed_in_place_are_followed_like_torch(backend, name, change):
    """torch's step reads group["params"] afresh, so a parameter appended to a group (how some
    unfreezing code adds layers) trains from the next step, and one dropped stops; fusedclr
    re-buckets such a group [note: followed groups], keeping the kept parameters' states."""
    torch_cls, ours_cls, kw = PAIRS[name]
    models, opts = {}, {}
    for lib, cls, extra in (("torch", torch_cls, {}), ("ours", ours_cls, {"backend": backend})):
        models[lib] = _model()
        models[lib][2].requires_grad_(False)  # frozen at first: not in the optimizer
        opts[lib] = cls(models[lib][0].parameters(), **kw, **extra)
        _train(models[lib], opts[lib], 3)
        group = opts[lib].param_groups[0]
        models[lib][2].requires_grad_(True)
        if change == "append":
            group["params"].append(models[lib][2].weight)
            group["params"].append(models[lib][2].bias)
        elif change == "new list":
            group["params"] = [*group["params"], *models[lib][2].parameters()]
        else:
            group["params"] = group["params"][:1]  # the first layer's bias stops training
        before = _params(models[lib])
        _train(models[lib], opts[lib], 3, seed=2)
        if change != "shorter list":
            assert (models[lib][2].weight != before[2]).any(), f"{lib}: the appended parameter did not train"
        else:
            assert torch.equal(models[lib][0].bias, before[1]), f"{lib}: a dropped parameter trained"
    for a, b in zip(models["torch"].parameters(), models["ours"].parameters()):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def test_group_params_appended_are_zeroed_in_place_like_torch():
    model = _model()
    opt = fusedclr.AdamW(model[0].parameters(), lr=0.01)
    _train(model, opt, 1)
    opt.param_groups[0]["params"].append(model[2].weight)
    model(torch.randn(5, 6)).sum().backward()
    grad = model[2].weight.grad
    opt.zero_grad(set_to_none=False)
    assert model[2].weight.grad is grad and not grad.any()


def test_group_added_to_param_groups_directly_is_refused_with_the_fix():
    model = _model()
    opt = fusedclr.AdamW(model[0].parameters(), lr=0.01)
    opt.param_groups.append({**opt.defaults, "params": list(model[2].parameters())})
    model(torch.randn(5, 6)).sum().backward()
    with pytest.raises(RuntimeError, match=r"2 param groups but built buckets for 1.*add_param_group"):
        opt.step()
    opt.param_groups[0]["params"].append("not a tensor")
    opt.param_groups.pop()
    with pytest.raises(TypeError, match="parameter 2 of param group 0 is str"):
        opt.step()


# -- the device table follows the host table [note: table upload] ---------------------------
# On the CPU the kernels read the host table itself; these tests give a bucket a separate
# "device" table (a copy the upload writes) to pin the upload logic that CUDA buckets run.


def _split_bucket(n: int = 3):
    from fusedclr.optim._flat import Bucket

    ps = [torch.nn.Parameter(torch.randn(40)) for _ in range(n)]
    b = Bucket(ps, ["exp_avg"], torch.float32)
    b.table = b.host_table.clone()
    return ps, b


def _points_at_grads(b, ps) -> bool:
    from fusedclr.optim._flat import GRAD

    return torch.equal(b.table, b.host_table) and all(
        int(b.table[i, GRAD]) == p.grad.data_ptr() for i, p in enumerate(ps))


def test_refused_gradient_then_the_same_addresses_still_uploads():
    """A refresh that wrote rows and then refused a gradient must not leave the device table
    behind: the next step may find the same addresses again and would upload nothing."""
    ps, b = _split_bucket()
    for p in ps:
        p.grad = torch.randn(40)
    b.prepare()
    assert _points_at_grads(b, ps)
    kept = ps[1].grad
    ps[0].grad = torch.randn(40)
    ps[1].grad = torch.randn(40).to_sparse()  # refused: this bucket's optimizer takes no sparse gradient
    with pytest.raises(RuntimeError, match="sparse"):
        b.prepare()
    ps[1].grad = kept  # the user recovers; row 0's new address is already in the host table
    b.prepare()
    assert _points_at_grads(b, ps)


def test_captured_step_keeps_its_table_and_eager_steps_upload_theirs(monkeypatch):
    """A step captured in a CUDA graph captures an upload of its table even when nothing changed,
    and keeps its staging buffer; after it, every eager step uploads (a replay may have
    overwritten the device table with the captured one)."""
    from fusedclr.optim import _flat

    ps, b = _split_bucket()
    for p in ps:
        p.grad = torch.randn(40)
    b.prepare()
    uploads = []
    real = _flat.Bucket._upload
    monkeypatch.setattr(_flat.Bucket, "_upload", lambda self, capturing=False: (uploads.append(capturing),
                                                                               real(self, capturing)))
    b.prepare()
    assert uploads == [], "an unchanged table was uploaded"
    monkeypatch.setattr(_flat, "_capturing", lambda device: True)
    b.prepare()
    assert uploads == [True] and len(b._captured_staging) == 1
    monkeypatch.setattr(_flat, "_capturing", lambda device: False)
    b.table.zero_()  # what a replay's upload of another table would leave
    b.prepare()
    assert uploads == [True, False] and _points_at_grads(b, ps)
    assert copy.deepcopy(b)._captured_staging == []
