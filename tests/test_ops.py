"""The op registry: schemas, fake kernels (opcheck), the C++ CPU kernel against the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TOL, requires_extension

from fusedclr import ops, reference
from fusedclr.reference import Kind, descriptor, stage

pytestmark = requires_extension()

ALIGN = 16


def _params(sizes, dtype, gen):
    """Separate tensors as a model holds them: ragged sizes, every other one a view at an
    odd element offset of one shared tensor (unaligned segment starts), 2-D ones
    transposed where the size allows (dense, not contiguous)."""
    shared = torch.zeros(sum(sizes) + 2 * len(sizes) + 2, dtype=dtype)
    out, pos = [], 1
    for i, n in enumerate(sizes):
        if i % 2 == 1:
            out.append(shared[pos : pos + n])
            pos += n + (2 if (pos + n) % 2 else 1)  # the next view starts at an odd offset too
        elif n == 130:
            out.append(torch.zeros(13, 10, dtype=dtype).t())
        else:
            out.append(torch.zeros(n, dtype=dtype))
    for t in out:
        reference.memory_image(t).copy_(torch.randn(t.numel(), generator=gen, dtype=torch.float64))
    return out


def _bucket(sizes, dtype=torch.float32, chunk=64, amsgrad=False, momentum=True, seed=0):
    """A hand-built bucket following the contract in csrc/ops.cpp: the parameters and their
    gradients (same strides) behind a segment table, flat states with each segment at an
    ALIGN-aligned offset, chunk rows covering each segment's elements (not the padding)."""
    offsets, rows, off = [], [], 0
    for seg, n in enumerate(sizes):
        offsets.append(off)
        rows += [(seg, b, min(b + chunk, off + n)) for b in range(off, off + n, chunk)]
        off += -(-n // ALIGN) * ALIGN
    total = off
    state = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    params = _params(sizes, dtype, gen)
    grads = [torch.empty_like(p) for p in params]
    for g in grads:
        reference.memory_image(g).copy_(torch.randn(g.numel(), generator=gen, dtype=torch.float64))
    return {
        "params": params,
        "grads": grads,
        "offsets": offsets,
        "total": total,
        "dtype": dtype,
        "exp_avg": torch.zeros(total, dtype=state),
        "exp_avg_sq": torch.zeros(total, dtype=state),
        "max_exp_avg_sq": torch.zeros(total, dtype=state) if amsgrad else None,
        "momentum_buffer": torch.zeros(total, dtype=state) if momentum else None,
        "seg_steps": torch.zeros(len(sizes), dtype=torch.int64),
        "chunks": torch.tensor(rows, dtype=torch.int64).reshape(-1, 3),
        "hyper": torch.tensor([0.01, 0.9], dtype=torch.float64),
        "schedule": torch.tensor(reference.no_schedule(), dtype=torch.float64),
        "schedule_step": torch.zeros((), dtype=torch.int64),
    }


def _segments(b, active=None):
    """The bucket's Segments; ``active[i]`` False: segment i has no gradient this step."""
    grads = [g if active is None or active[i] else None for i, g in enumerate(b["grads"])]
    return reference.Segments(b["params"], grads, b["offsets"], b["total"])


def _flat_params(b):
    """The parameters gathered into the state layout (zero padding)."""
    flat = torch.zeros(b["total"], dtype=b["dtype"])
    for p, o in zip(b["params"], b["offsets"]):
        flat[o : o + p.numel()] = reference.memory_image(p)
    return flat


def _adam_args(b, seg, decoupled=True, maximize=False, wd=0.01, grad_scale=None, found_inf=None, param_dtype=None):
    return (seg, param_dtype or b["dtype"], b["exp_avg"], b["exp_avg_sq"], b["max_exp_avg_sq"], b["seg_steps"],
            b["chunks"], b["hyper"], b["schedule"], b["schedule_step"], 0.999, 1e-8, wd, decoupled, maximize,
            grad_scale, found_inf)


def _sgd_args(b, seg, nesterov=False, maximize=False, wd=0.01, grad_scale=None, found_inf=None):
    return (seg, b["dtype"], b["momentum_buffer"], b["seg_steps"], b["chunks"], b["hyper"], b["schedule"],
            b["schedule_step"], 0.0, wd, nesterov, maximize, grad_scale, found_inf)


def _clone(b):
    """An identical copy: its own parameter and gradient tensors (same strides) and states."""
    out = {}
    for k, v in b.items():
        if k in ("params", "grads"):
            out[k] = [t.clone() for t in v]
        else:
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def _table(b, active=None):
    return _segments(b, active).table()


def _assert_buckets_close(b, r, keys, tol):
    """Parameters, the named states and the step counts of the op's bucket and the reference's."""
    for p, q in zip(b["params"], r["params"]):
        assert p.stride() == q.stride()
    torch.testing.assert_close(_flat_params(b), _flat_params(r), **tol, msg=lambda m: f"params: {m}")
    torch.testing.assert_close(b["seg_steps"], r["seg_steps"], rtol=0, atol=0)
    for key in keys:
        if b[key] is not None:
            torch.testing.assert_close(b[key], r[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


# Ragged: unaligned sizes, an empty parameter (its empty gradient still counts a step),
# views at odd offsets and a transposed one (see _params).
SIZES = [3 * 64 + 17, 77, 130, 5, 0]


SCHEDULES = {
    "none": reference.no_schedule(),
    "onecycle": descriptor([stage(Kind.ONE_CYCLE, [0.004, 0.1, 4e-6, 0.85, 0.95, 2, 2.0, 9.0, 0, 0],
                                  has_momentum=True)]),
    "warmup_then_cosine": descriptor([
        stage(Kind.LINEAR, [0.05, 0.1, 1.0, 3]),
        stage(Kind.COSINE, [0.05, 0.0, 6], t_begin=3),
    ]),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_kernel_matches_reference(schedule, amsgrad, decoupled, maximize):
    b = _bucket(SIZES, amsgrad=amsgrad)
    b["schedule"] = torch.tensor(SCHEDULES[schedule], dtype=torch.float64)
    r = _clone(b)
    active = [True, False, True, False, False]  # None grads: the empty parameter too
    for step in range(8):
        act = active if step % 3 == 1 else None
        ops.adam_step_(*_adam_args(b, _table(b, act), decoupled, maximize))
        reference.adam_step_(*_adam_args(r, _segments(r, act), decoupled, maximize))
        b["schedule_step"].add_(1)
        r["schedule_step"].add_(1)
    assert b["seg_steps"].tolist() == [8, 5, 8, 5, 5]
    _assert_buckets_close(b, r, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), TOL[torch.float32])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_kernel_matches_reference(schedule, nesterov, momentum, maximize):
    if nesterov and not momentum:
        pytest.skip("nesterov needs momentum")
    b = _bucket(SIZES, momentum=momentum)
    b["schedule"] = torch.tensor(SCHEDULES[schedule], dtype=torch.float64)
    r = _clone(b)
    for step in range(8):
        act = [True, True, False, True, False] if step == 2 else None
        ops.sgd_step_(*_sgd_args(b, _table(b, act), nesterov, maximize))
        reference.sgd_step_(*_sgd_args(r, _segments(r, act), nesterov, maximize))
        b["schedule_step"].add_(1)
        r["schedule_step"].add_(1)
    assert b["seg_steps"].tolist() == [8, 8, 7, 8, 7]
    _assert_buckets_close(b, r, ("momentum_buffer",), TOL[torch.float32])


def test_inactive_segments_change_nothing():
    """A segment whose gradient is None keeps its parameter, states and step count bit for bit."""
    b = _bucket(SIZES, amsgrad=True)
    ops.adam_step_(*_adam_args(b, _table(b)))
    params, states = [p.clone() for p in b["params"]], {k: b[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    active = [False, True, False, True, True]
    ops.adam_step_(*_adam_args(b, _table(b, active)))
    assert b["seg_steps"].tolist() == [1, 2, 1, 2, 2]
    for i, (p, before, o) in enumerate(zip(b["params"], params, b["offsets"])):
        assert torch.equal(p, before) != active[i] or p.numel() == 0, i
        for key, value in states.items():
            n = p.numel()
            assert torch.equal(b[key][o : o + n], value[o : o + n]) != active[i] or n == 0, (key, i)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_kernel_dtypes_match_reference(dtype):
    b = _bucket([100, 37, 130], dtype=dtype)
    r = _clone(b)
    for _ in range(7):
        ops.adam_step_(*_adam_args(b, _table(b)))
        reference.adam_step_(*_adam_args(r, _segments(r)))
    assert b["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(p.dtype == dtype for p in b["params"])
    # Same fp32 math on both sides: the stored parameters agree to the dtype's own
    # assert_close defaults (one rounding of the final store).
    torch.testing.assert_close(_flat_params(b), _flat_params(r), **TOL.get(dtype, {}))
    torch.testing.assert_close(b["exp_avg"], r["exp_avg"], **TOL[b["exp_avg"].dtype])
    torch.testing.assert_close(b["exp_avg_sq"], r["exp_avg_sq"], **TOL[b["exp_avg_sq"].dtype])
    assert torch.equal(b["seg_steps"], r["seg_steps"])


def test_found_inf_changes_nothing_and_grad_scale_unscales():
    b = _bucket([50, 20, 130], amsgrad=True)
    ops.adam_step_(*_adam_args(b, _table(b)))
    before = _clone(b)
    ops.adam_step_(*_adam_args(b, _table(b), found_inf=torch.tensor(1.0)))
    for key, value in before.items():
        if key in ("params", "grads"):
            assert all(torch.equal(x, y) for x, y in zip(b[key], value)), f"{key} changed on a skipped step"
        elif isinstance(value, torch.Tensor):
            assert torch.equal(b[key], value), f"{key} changed on a skipped step"
    # grad_scale: scaled grads + scale == unscaled grads.
    scaled = _clone(b)
    for g in scaled["grads"]:
        g.mul_(1024)
    ops.adam_step_(*_adam_args(scaled, _table(scaled), grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0)))
    ops.adam_step_(*_adam_args(b, _table(b)))
    _assert_buckets_close(scaled, b, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_grad_sumsq_matches_reference_and_norm(dtype):
    """The active gradients' sum of squares in float64: the CPU op, the reference and
    torch.linalg.vector_norm of the gradients, squared (the emulated CUDA op:
    tests/test_cuda_emulated.py)."""
    b = _bucket(SIZES, dtype=dtype, chunk=50)
    for active in (None, [True, False, True, True, False], [False] * len(SIZES)):
        segs = _segments(b, active)
        got = ops.grad_sumsq(segs.table(), dtype, b["chunks"])
        assert got.dtype == torch.float64 and got.dim() == 0
        want = sum((torch.linalg.vector_norm(g.double()) ** 2).item() for g in segs.grads if g is not None)
        torch.testing.assert_close(got.item(), float(want), **TOL[torch.float64])
        ref = reference.grad_sumsq(segs, dtype, b["chunks"])
        torch.testing.assert_close(got.item(), ref.item(), **TOL[torch.float64])


def test_schedule_eval_matches_reference():
    for desc in SCHEDULES.values():
        d = torch.tensor(desc, dtype=torch.float64)
        for t in range(12):
            out = ops.schedule_eval(d, torch.tensor(t)).tolist()
            lr, mom = reference.schedule_value(desc, t)
            assert bool(out[2]) == (lr is not None) and bool(out[3]) == (mom is not None)
            if lr is not None:
                assert out[0] == pytest.approx(lr, rel=1e-12)
            if mom is not None:
                assert out[1] == pytest.approx(mom, rel=1e-12)


def test_opcheck_every_op():
    b = _bucket([40, 9], amsgrad=True)
    c = _clone(b)
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default, _adam_args(c, _table(c)))
    c = _clone(b)
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default,
                          _adam_args(c, _table(c, [True, False]), grad_scale=torch.tensor(2.0),
                                     found_inf=torch.tensor(0.0)))
    c = _clone(b)
    torch.library.opcheck(torch.ops.fusedclr.sgd_step_.default, _sgd_args(c, _table(c)))
    torch.library.opcheck(torch.ops.fusedclr.grad_sumsq.default, (_table(b), torch.float32, b["chunks"]))
    # The precision opt-ins [note: precision opt-ins]: a mutated fp32 master, a seed with bf16 states.
    low = _bucket([40, 9], dtype=torch.bfloat16, amsgrad=True)
    master = _flat_params(low).float()
    c = _clone(low)
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default, (*_adam_args(c, _table(c)), master))
    c = _clone(low)
    torch.library.opcheck(torch.ops.fusedclr.sgd_step_.default, (*_sgd_args(c, _table(c)), master.clone()))
    bf16_states = {k: v.bfloat16() if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and v is not None else v
                   for k, v in _clone(low).items()}
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default,
                          (*_adam_args(bf16_states, _table(bf16_states)), None, 7))
    c = _clone(low)
    torch.library.opcheck(torch.ops.fusedclr.sgd_step_.default, _sgd_args(c, _table(c)), {"sr_seed": 2**40})
    torch.library.opcheck(torch.ops.fusedclr.schedule_eval.default,
                          (torch.tensor(SCHEDULES["onecycle"], dtype=torch.float64), torch.tensor(3)))


def test_bad_arguments_are_named():
    b = _bucket([10, 20])
    table = _table(b)
    bad = _clone(b)
    bad["exp_avg"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match="exp_avg"):
        ops.adam_step_(*_adam_args(bad, _table(bad)))
    # A dtype no kernel updates is refused before the step counters move.
    with pytest.raises(RuntimeError, match="param_dtype is Int"):
        ops.adam_step_(*_adam_args(b, table, param_dtype=torch.int32))
    with pytest.raises(RuntimeError, match="segments must be"):
        ops.adam_step_(*_adam_args(b, table.int()))
    with pytest.raises(RuntimeError, match="segments must be"):
        ops.adam_step_(*_adam_args(b, table[:, :3].contiguous()))
    with pytest.raises(RuntimeError, match="seg_steps must be"):
        ops.adam_step_(*_adam_args(dict(b, seg_steps=b["seg_steps"][:1]), table))
    assert int(b["seg_steps"].sum()) == 0
    # Chunk rows must stay inside their segment's elements (not its padding) and name a segment.
    for row, match in (((0, 0, 11), "lies outside segment 0"), ((1, 15, 20), "lies outside segment 1"),
                       ((2, 0, 1), "names segment 2 of 2")):
        with pytest.raises(RuntimeError, match=match):
            ops.adam_step_(*_adam_args(dict(b, chunks=torch.tensor([row])), table))
    with pytest.raises(RuntimeError, match="names segment 2 of 2"):
        ops.grad_sumsq(table, torch.float32, torch.tensor([(2, 0, 1)]))


def test_cuda_kernels_compiled_when_nvcc_present():
    """CI builds the CUDA kernels on its GPU-less machine: they must be registered."""
    if os.environ.get("CI") != "true":
        pytest.skip("checked in CI, where the build must include CUDA")
    import shutil

    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("no nvcc or a CPU-only torch: CUDA kernels are not expected")
    assert ops.cuda_kernels_registered(), "nvcc is present but the CUDA kernels were not built"


def test_package_works_without_extension():
    """With the compiled library missing, the package imports, warns once and uses the reference."""
    code = (
        "import sys, warnings; sys.modules['fusedclr._C'] = None\n"
        "import torch, fusedclr\n"
        "assert not fusedclr.extension_available()\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = fusedclr.SGD([p], lr=0.5)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        p.grad = torch.ones(3); opt.step()\n"
        "n = sum('reference backend' in str(x.message) for x in w)\n"
        "assert n == 1, n\n"
        "assert torch.equal(p.detach(), torch.zeros(3)), p\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_segment_tracker_refreshes_the_table_like_the_python_fallback(monkeypatch):
    """The per-step refresh of a bucket's host segment table [note: segment refresh]: the
    parameters' and gradients' addresses written (0 for a None grad, 1 for an empty one),
    flags 0 when nothing moved, TABLE_CHANGED when a grad was replaced, SLOW_PATH for a grad
    the kernels cannot walk (dtype, shape, strides) and PARAM_CHANGED for a parameter that
    changed dtype or size; the C loop and the Python fallback (what ops.segment_tracker
    returns without the extension) agree at every stage."""
    ps = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2)),
          torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.randn(4))]
    trackers = {"c": ops.segment_tracker(ps, torch.float32, torch.device("cpu"))}
    with monkeypatch.context() as m:
        m.setattr(ops, "_C", None)
        trackers["python"] = ops.segment_tracker(ps, torch.float32, torch.device("cpu"))
    assert trackers["python"].func is ops._refresh_in_python
    tables = {}
    for name in trackers:
        tables[name] = torch.zeros(len(ps), 4, dtype=torch.int64)
        tables[name][:, 2] = torch.tensor([0, 16, 32, 32])  # offsets and numels are left alone
        tables[name][:, 3] = torch.tensor([3, 4, 0, 4])

    def refresh():
        flags = {name: fn(tables[name]) for name, fn in trackers.items()}
        assert flags["c"] == flags["python"], flags
        assert torch.equal(tables["c"], tables["python"]), tables
        return flags["c"]

    ps[0].grad = torch.randn(3)
    ps[2].grad = torch.zeros(0)
    ps[3].grad = torch.randn(4)
    assert refresh() == ops.TABLE_CHANGED
    t = tables["c"]
    assert t[:, 0].tolist() == [p.data_ptr() for p in ps]
    assert t[:, 1].tolist() == [ps[0].grad.data_ptr(), 0, 1, ps[3].grad.data_ptr()]
    assert t[:, 2].tolist() == [0, 16, 32, 32] and t[:, 3].tolist() == [3, 4, 0, 4]
    assert refresh() == 0  # nothing moved: nothing to upload

    old = ps[0].grad  # kept alive, so that the new gradient cannot reuse its address
    ps[0].grad = torch.randn(3)
    assert refresh() == ops.TABLE_CHANGED and t[0, 1] == ps[0].grad.data_ptr() != old.data_ptr()
    ps[1].grad = torch.randn(2, 2)
    assert refresh() == ops.TABLE_CHANGED and t[1, 1] == ps[1].grad.data_ptr()
    ps[0].grad = None
    assert refresh() == ops.TABLE_CHANGED and t[0, 1] == 0
    assert refresh() == 0

    # Gradients the kernels cannot walk as their parameter's memory image.
    good = ps[1].grad
    ps[1].grad = torch.randn(2, 2).t()  # other strides
    assert refresh() == ops.SLOW_PATH
    ps[1].grad = good
    assert refresh() == 0
    ps[3].grad_dtype = None  # allows a gradient of another dtype
    ps[3].grad = torch.randn(4, dtype=torch.float64)
    assert refresh() == ops.SLOW_PATH
    ps[3].grad = torch.randn(4)
    assert refresh() == ops.TABLE_CHANGED
    ps[3].grad.data = torch.randn(2, 2)  # another shape, past the setter's check
    assert refresh() == ops.SLOW_PATH
    ps[3].grad = torch.randn(4)
    assert refresh() == ops.TABLE_CHANGED

    # A parameter moved to another dtype (model.double()) or size: the bucket must be rebuilt.
    ps[2].data = ps[2].data.double()
    assert refresh() & ops.PARAM_CHANGED
    ps[2].data = ps[2].data.float()
    assert refresh() == 0
    ps[3].data = torch.randn(5)
    assert refresh() & ops.PARAM_CHANGED

    with pytest.raises(TypeError, match="parameter 1 is not a tensor"):
        ops.segment_tracker([ps[0], "not a tensor"], torch.float32, torch.device("cpu"))
