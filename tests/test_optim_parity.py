"""fusedclr.SGD / Adam / AdamW beside torch.optim: checkpoints across the two, flat buffers, copies,
closures, hooks, the profiler and garbage collection.

The option-by-option parity with torch (every option set, ragged groups, None grads, bf16) is
table-driven, for every optimizer: tests/test_optim_table.py over tests/optim_table.py.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import CPU_BACKENDS, TOL
from optim_harness import group_dicts, make_grads, make_params, set_grads

import fusedclr


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("direction", ["torch_to_fusedclr", "fusedclr_to_torch"])
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_state_dict_round_trip(backend, direction, cls):
    """A checkpoint taken mid-run moves across (torch.save / torch.load(map_location="cpu")) and
    continues exactly as an uninterrupted torch run."""
    options = {"lr": 0.02, "weight_decay": 0.01}
    if cls == "SGD":
        options.update(momentum=0.9, dampening=0.1)
    else:
        options.update(amsgrad=True)
    torch_cls, fc_cls = getattr(torch.optim, cls), getattr(fusedclr, cls)
    per_group = [{}, {"lr": 0.01}, {}]
    groups = make_params()
    grads = make_grads(groups, 8, torch.float32)

    def fresh(cls_, ps, **kw):
        return cls_(group_dicts(ps, per_group), **options, **kw)

    # Uninterrupted torch run: the ground truth.
    truth_groups = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in groups]
    truth = fresh(torch_cls, truth_groups)
    for s in range(8):
        set_grads(truth_groups, grads[s], s, flat=False)
        truth.step()

    first_cls, first_kw = (torch_cls, {}) if direction == "torch_to_fusedclr" else (fc_cls, {"backend": backend})
    second_cls, second_kw = (fc_cls, {"backend": backend}) if direction == "torch_to_fusedclr" else (torch_cls, {})
    a_groups = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in groups]
    a = fresh(first_cls, a_groups, **first_kw)
    for s in range(4):
        set_grads(a_groups, grads[s], s, flat=first_cls is fc_cls)
        a.step()
    buf = io.BytesIO()
    torch.save({"params": [[p.detach() for p in ps] for ps in a_groups], "optim": a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    b_groups = [[torch.nn.Parameter(p.clone()) for p in ps] for ps in ckpt["params"]]
    b = fresh(second_cls, b_groups, **second_kw)
    b.load_state_dict(ckpt["optim"])
    for s in range(4, 8):
        set_grads(b_groups, grads[s], s, flat=second_cls is fc_cls)
        b.step()
    for ps_t, ps_b in zip(truth_groups, b_groups):
        for pt, pb in zip(ps_t, ps_b):
            torch.testing.assert_close(pb.detach(), pt.detach(), **TOL[torch.float32])
    truth_sd, b_sd = truth.state_dict(), b.state_dict()
    for pid, st in truth_sd["state"].items():
        for key, value in st.items():
            got = b_sd["state"][pid][key]
            if key == "step":
                assert float(got) == float(value)
            else:
                torch.testing.assert_close(got.to(value.dtype), value, **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_low_precision_checkpoint_keeps_fp32_states(backend, cls):
    """bf16 parameters keep fp32 states; a fusedclr checkpoint reloads them unrounded
    (torch.optim's load_state_dict casts states to the parameter dtype) and the resumed
    run is bit for bit the uninterrupted one."""
    options = {"lr": 0.02, "weight_decay": 0.01} | ({"momentum": 0.9} if cls == "SGD" else {})
    groups = make_params(torch.bfloat16)
    grads = make_grads(groups, 6, torch.bfloat16)
    whole = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in groups]
    opt = getattr(fusedclr, cls)(group_dicts(whole, [{}, {}, {}]), backend=backend, **options)
    for s in range(3):
        set_grads(whole, grads[s], s, flat=True)
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [[p.detach() for p in ps] for ps in whole], "optim": opt.state_dict()}, buf)
    for s in range(3, 6):
        set_grads(whole, grads[s], s, flat=True)
        opt.step()
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    resumed = [[torch.nn.Parameter(p.clone()) for p in ps] for ps in ckpt["params"]]
    opt2 = getattr(fusedclr, cls)(group_dicts(resumed, [{}, {}, {}]), backend=backend, **options)
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.state_dict()["state"], "the checkpoint has no states to keep in fp32"
    assert all(v.dtype == torch.float32 for st in opt2.state_dict()["state"].values()
               for k, v in st.items() if k != "step")
    for s in range(3, 6):
        set_grads(resumed, grads[s], s, flat=True)
        opt2.step()
    for ps_a, ps_b, ps_c in zip(whole, resumed, ckpt["params"]):
        for pa, pb, pc in zip(ps_a, ps_b, ps_c):
            assert torch.equal(pa.detach(), pb.detach())
            assert pc.numel() == 0 or not torch.equal(pb.detach(), pc), "the resumed run did not train"


def test_state_is_live_view_of_flat_buffers():
    p = torch.nn.Parameter(torch.randn(10))
    opt = fusedclr.Adam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].data_ptr() == opt._buckets[0][0].states["exp_avg"].data_ptr()
    torch.testing.assert_close(st["exp_avg"], torch.full((10,), 0.1))
    assert int(st["step"]) == 1


@pytest.mark.parametrize("cls,kwargs", [(fusedclr.AdamW, {"amsgrad": True}), (fusedclr.SGD, {"momentum": 0.9})])
def test_cpu_flat_buffers_start_at_staggered_page_offsets(cls, kwargs):
    """[note: staggered buffers]: no two of a bucket's streams share their offset within a 4 KiB page."""
    from fusedclr.optim._flat import PAGE, TORCH_PAGE_OFFSET

    params = [torch.nn.Parameter(torch.randn(3000)) for _ in range(3)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(params, lr=0.1, **kwargs)
    ref = getattr(torch.optim, cls.__name__)(ref_params, lr=0.1, **kwargs)
    for _ in range(2):  # SGD allocates its momentum buffer in the first step
        for p, r in zip(params, ref_params):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r)
    b = opt._buckets[0][0]
    buffers = list(b.states.values())  # the parameters and gradients live where torch put them
    assert len(buffers) == (3 if cls is fusedclr.AdamW else 1)
    offsets = sorted(t.data_ptr() % PAGE for t in buffers)
    gaps = [hi - lo for lo, hi in zip(offsets, offsets[1:])] + [offsets[0] + PAGE - offsets[-1]]
    # Streams under ~512 bytes apart within a page still alias (measured: 256 bytes
    # apart ran 8% slower than 1 KiB apart at 200 x 1M).
    assert min(gaps) >= 512
    assert all(t.data_ptr() % 64 == 0 and t.numel() == b.total for t in buffers)
    # ... nor with where torch's first large (mmapped) tensors start: a large model's parameters.
    for t in buffers:
        apart = (t.data_ptr() - TORCH_PAGE_OFFSET) % PAGE
        assert min(apart, PAGE - apart) >= 512


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_keep_working(backend, how):
    """copy.deepcopy(optimizer) (used by some trainers) and a pickled optimizer are independent
    working optimizers: their parameters (which come without .grad, as torch's copies do) step
    exactly as the original's, in storage of their own."""
    model = torch.nn.Linear(3, 2)
    opt = fusedclr.AdamW(model.parameters(), lr=0.1, backend=backend)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    if how == "deepcopy":
        clone = copy.deepcopy(opt)
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert clone.state_dict()["state"][0]["step"] == 1
    mine, theirs = opt.param_groups[0]["params"], clone.param_groups[0]["params"]
    for p, q in zip(mine, theirs):
        assert q.grad is None
        q.grad = p.grad.clone()
    opt.step()
    clone.step()
    for p, q in zip(mine, theirs):
        assert torch.equal(p.detach(), q.detach()) and p.data_ptr() != q.data_ptr()
    before = [p.detach().clone() for p in mine]
    clone.step()  # the copy alone moves
    assert all(torch.equal(p.detach(), b) for p, b in zip(mine, before))
    assert not torch.equal(theirs[0].detach(), before[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_closure_add_param_group_and_replaced_grads(backend):
    """Closures, a group added later, and grads replaced by user code all behave as in torch."""
    torch.manual_seed(3)
    w_ref = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4))]
    w_fc = [torch.nn.Parameter(p.detach().clone()) for p in w_ref]
    extra_ref = torch.nn.Parameter(torch.randn(7))
    extra_fc = torch.nn.Parameter(extra_ref.detach().clone())
    x = torch.randn(8, 5)
    ref = torch.optim.AdamW(w_ref, lr=0.05)
    ours = fusedclr.AdamW(w_fc, lr=0.05, backend=backend)

    def closure(ws, extra, opt, g):
        def f():
            opt.zero_grad()
            loss = (x @ ws[0] + ws[1]).pow(2).mean()
            loss.backward()
            if g is not None:
                extra.grad = g.clone()  # a replaced (foreign) grad tensor: gathered, not lost
            return loss
        return f

    for s in range(6):
        if s == 2:
            ref.add_param_group({"params": [extra_ref], "lr": 0.1})
            ours.add_param_group({"params": [extra_fc], "lr": 0.1})
        g = torch.randn(7) if s >= 2 else None
        loss_ref = ref.step(closure(w_ref, extra_ref, ref, g))
        loss_fc = ours.step(closure(w_fc, extra_fc, ours, g))
        torch.testing.assert_close(loss_fc, loss_ref)
    for a, b in zip([*w_ref, extra_ref], [*w_fc, extra_fc]):
        torch.testing.assert_close(b.detach(), a.detach())


def test_zero_grad_is_torchs():
    """zero_grad() is torch's: set_to_none by default, in-place zeroing with False; a
    parameter without a grad is skipped by the next step [note: segment table]."""
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))
    opt = fusedclr.SGD([p, q], lr=0.1)
    assert p.grad is None and q.grad is None  # nothing is allocated for the gradients
    p.grad = torch.full((3,), 2.0)
    g = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is g and not g.any()
    opt.zero_grad()
    assert p.grad is None and q.grad is None
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))
    torch.testing.assert_close(q.detach(), torch.ones(2))


def test_attached_schedule_costs_no_per_step_hyper_copy():
    """With lr and beta1 from the in-kernel schedule, step() does not mirror the group's
    (scheduler-written) floats into the device hyper tensor: no H2D copy per step."""
    p = torch.nn.Parameter(torch.randn(40))
    opt = fusedclr.AdamW([p], lr=0.01)
    sched = fusedclr.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    hyper = opt._buckets[0][0].hyper
    p.grad = torch.randn_like(p)
    opt.step()
    version = hyper._version
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert hyper._version == version, "hyper was rewritten although the schedule provides lr and beta1"


def _hooked_step_trace(cls_torch: type, cls_ours: type):
    """Calls of every kind of step hook, for a torch optimizer and ours set up alike."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    traces = []
    for cls in (cls_torch, cls_ours):
        calls = []
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        opt = cls([p], lr=0.1)
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", type(o).__name__))),
            register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", sorted(k)))),
            opt.register_step_pre_hook(lambda o, a, k: (a, {"closure": lambda: 7.0})),
            opt.register_step_post_hook(lambda o, a, k: calls.append(("post", k["closure"]()))),
        ]
        try:
            loss = opt.step()
        finally:
            for h in handles:
                h.remove()
        traces.append((calls, loss, p.detach().clone()))
    return traces


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_step_hooks_run_as_torch_runs_them(cls):
    """The step wrapper [note: step wrapper] keeps torch's hooks: global and per-optimizer
    pre- and post-hooks in torch's order, a pre-hook replacing the arguments, and the error
    for a pre-hook that returns something else."""
    (torch_calls, torch_loss, torch_p), (calls, loss, p) = _hooked_step_trace(getattr(torch.optim, cls),
                                                                              getattr(fusedclr, cls))
    assert calls == torch_calls == [("global pre", cls), ("post", 7.0), ("global post", ["closure"])]
    assert loss == torch_loss == 7.0
    torch.testing.assert_close(p, torch_p)

    q = torch.nn.Parameter(torch.ones(2))
    q.grad = torch.ones(2)
    opt = getattr(fusedclr, cls)([q], lr=0.1)
    handle = opt.register_step_pre_hook(lambda o, a, k: "neither None nor (args, kwargs)")
    with pytest.raises(RuntimeError, match="must return None or a tuple of"):
        opt.step()
    handle.remove()
    torch.testing.assert_close(q.detach(), torch.ones(2))  # nothing stepped


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_profiler_sees_the_step_as_it_sees_torchs(cls):
    """One ``Optimizer.step#<class>.step`` user scope per step, as torch.optim records it,
    including a step that raised inside the scope, which is closed on the way out."""
    from torch.profiler import ProfilerActivity, profile

    q = torch.nn.Parameter(torch.ones(2))
    q.grad = torch.ones(2)
    names = {}
    for name, o in (("torch", getattr(torch.optim, cls)([q], lr=0.1)), ("fusedclr", getattr(fusedclr, cls)([q], lr=0.1))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            o.step()
            handle = o.register_step_pre_hook(lambda o, a, k: 1 / 0)
            # Keep the traceback (and with it the failed step's frame) alive over the next
            # step: an unclosed scope would otherwise end when its handle is freed.
            with pytest.raises(ZeroDivisionError) as failed:
                o.step()
            handle.remove()
            o.step()
            del failed
        # A scope left open by the failed step would swallow the last one (or lose itself).
        events = [e for e in prof.events() if e.name.startswith("Optimizer.step#")]
        names[name] = [e.name for e in events]
        assert all(a.time_range.end <= b.time_range.start for a, b in zip(events, events[1:])), name
    assert names["fusedclr"] == names["torch"] == [f"Optimizer.step#{cls}.step"] * 3


def test_optimizer_referenced_from_its_parameters_is_collected():
    """A parameter hook (or attribute) that refers to the optimizer makes a reference cycle
    through the buckets; after steps, the garbage collector must still free it all. (A grads
    check that held the parameters in C++ kept torch from traversing them: a leak.)"""
    import gc
    import weakref

    model = torch.nn.Linear(8, 8)
    opt = fusedclr.AdamW(model.parameters(), lr=0.1)
    for param in model.parameters():
        param.register_hook(lambda g, opt=opt: g)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    ref = weakref.ref(opt)
    del opt, model, param
    gc.collect()
    assert ref() is None
