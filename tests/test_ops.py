"""The op registry: schemas, fake kernels (opcheck), the CPU op's own checks, grad_sumsq,
schedule_eval and the segment refresh. The optimizers' updates (and grad_zero_) against the
reference, on every backend: tests/test_op_parity.py; bad calls: tests/test_op_errors.py."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import op_table
import pytest
import torch
from conftest import TOL, requires_extension
from op_table import NAMES, TABLE

from fusedclr import ops, reference
from fusedclr.reference import Kind, descriptor, stage

pytestmark = requires_extension()


def _bucket(sizes, dtype=torch.float32, chunk=64, name="adam", option_set=None):
    """A bucket of the optimizer table (tests/op_table.py) and its configuration."""
    opt = TABLE[name]
    cfg = opt.config(option_set or opt.full)
    return opt, cfg, op_table.bucket(opt, cfg, sizes, dtype, chunk=chunk)


# Ragged: unaligned sizes, an empty parameter (its empty gradient still counts a step),
# views at odd offsets and a transposed one (op_table.placed).
SIZES = [3 * 64 + 17, 77, 1000, 5, 0]


SCHEDULES = {
    "none": reference.no_schedule(),
    "onecycle": descriptor([stage(Kind.ONE_CYCLE, [0.004, 0.1, 4e-6, 0.85, 0.95, 2, 2.0, 9.0, 0, 0],
                                  has_momentum=True)]),
    "warmup_then_cosine": descriptor([
        stage(Kind.LINEAR, [0.05, 0.1, 1.0, 3]),
        stage(Kind.COSINE, [0.05, 0.0, 6], t_begin=3),
    ]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_grad_sumsq_matches_reference_and_norm(dtype):
    """The active gradients' sum of squares in float64: the CPU op, the reference and
    torch.linalg.vector_norm of the gradients, squared (the emulated CUDA op:
    tests/test_cuda_emulated.py)."""
    _, _, b = _bucket(SIZES, dtype=dtype, chunk=50)
    b.set_grads(op_table.gradients(b, 1)[0])
    for active in (None, [True, False, True, True, False], [False] * len(SIZES)):
        segs = b.segments(active)
        got = ops.grad_sumsq(segs.table(), dtype, b.chunks)
        assert got.dtype == torch.float64 and got.dim() == 0
        want = sum((torch.linalg.vector_norm(g.double()) ** 2).item() for g in segs.grads if g is not None)
        torch.testing.assert_close(got.item(), float(want), **TOL[torch.float64])
        ref = reference.grad_sumsq(segs, dtype, b.chunks)
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


def _op_args(args: tuple) -> tuple:
    """``step_``'s arguments with the states list as the schema's state0..state3."""
    return (*args[:3], *ops.state_args(args[0], args[3]), *args[4:])


@pytest.mark.parametrize("name", NAMES)
def test_opcheck_step(name):
    """step_'s schema, fake kernel and aliasing for every optimizer: a plain call, one with a
    segment without a gradient and GradScaler's tensors, and the precision opt-ins on bf16
    parameters (a mutated fp32 master; a seed with bf16 states)."""
    opt, cfg, b = _bucket([40, 9, 0], name=name)
    b.set_grads(op_table.gradients(b, 1)[0])
    step = torch.ops.fusedclr.step_.default
    c = b.clone()
    torch.library.opcheck(step, _op_args(opt.args(c, cfg, c.table())))
    c = b.clone()
    torch.library.opcheck(step, _op_args(opt.args(c, cfg, c.table([True, False, True]), grad_scale=torch.tensor(2.0),
                                         found_inf=torch.tensor(0.0), maximize=True)))
    _, _, low = _bucket([40, 9, 0], dtype=torch.bfloat16, name=name)
    low.master = low.flat_params().float()
    c = low.clone()
    torch.library.opcheck(step, _op_args(opt.args(c, cfg, c.table())))
    low.master = None
    low.states = {k: None if v is None else v.bfloat16() for k, v in low.states.items()}
    torch.library.opcheck(step, _op_args(opt.args(low, cfg, low.table(), sr_seed=2**40)))


def test_opcheck_other_ops():
    _, _, b = _bucket([40, 9])
    torch.library.opcheck(torch.ops.fusedclr.grad_sumsq.default, (b.table(), torch.float32, b.chunks))
    b.set_grads(op_table.gradients(b, 1)[0])
    torch.library.opcheck(torch.ops.fusedclr.grad_zero_.default, (b.table([True, False]), torch.float32, b.chunks))
    torch.library.opcheck(torch.ops.fusedclr.schedule_eval.default,
                          (torch.tensor(SCHEDULES["onecycle"], dtype=torch.float64), torch.tensor(3)))


@pytest.mark.parametrize("name", NAMES)
def test_chunk_rows_are_checked(name):
    """The CPU op checks every chunk row on the host before anything moves: inside its
    segment's elements (not its padding) and naming a segment. (The other argument checks,
    shared by every backend: tests/test_op_errors.py.)"""
    opt, cfg, b = _bucket([10, 20], name=name)
    table = b.table()
    before = b.snapshot()
    for row, match in (((0, 0, 11), "lies outside segment 0"), ((1, 15, 20), "lies outside segment 1"),
                       ((1, 20, 17), "lies outside segment 1"), ((2, 0, 1), "names segment 2 of 2"),
                       ((-1, 0, 1), "names segment -1 of 2")):
        b.chunks = torch.tensor([row])
        with pytest.raises(RuntimeError, match=match):
            ops.step_(*opt.args(b, cfg, table))
    after = b.buffers()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match="names segment 2 of 2"):
        ops.grad_sumsq(table, torch.float32, torch.tensor([(2, 0, 1)]))
    b.set_grads(op_table.gradients(b, 1)[0])
    grads = [g.clone() for g in b.grads]
    for row, match in (((1, 15, 20), "lies outside segment 1"), ((2, 0, 1), "names segment 2 of 2")):
        with pytest.raises(RuntimeError, match=match):  # checked before the first row is zeroed
            ops.grad_zero_(table, torch.float32, torch.tensor([(0, 0, 10), row]))
    assert all(torch.equal(g, h) for g, h in zip(b.grads, grads))


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
    the kernels cannot walk (dtype, shape, strides), GRAD_READ_ONLY for one that requires grad
    or is copy-on-write and PARAM_CHANGED for a parameter that changed dtype or size; the C
    loop and the Python fallback (what ops.segment_tracker returns without the extension)
    agree at every stage."""
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

    # Gradients the step may read but grad_zero_ must leave to torch [note: zeroing through the
    # table]: flagged, and the walk goes on (their rows are written).
    ps[1].grad = torch.randn(2, 2, requires_grad=True)
    assert refresh() == ops.TABLE_CHANGED | ops.GRAD_READ_ONLY and t[1, 1] == ps[1].grad.data_ptr()
    assert refresh() == ops.GRAD_READ_ONLY
    source = torch.randn(2, 2)
    ps[1].grad = torch._lazy_clone(source)  # shares copy-on-write storage with `source`
    assert refresh() == ops.TABLE_CHANGED | ops.GRAD_READ_ONLY and t[1, 1] == source.const_data_ptr()
    assert torch._C._is_cow_tensor(ps[1].grad), "the refresh materialised a copy-on-write gradient"
    ps[1].grad = good
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


@pytest.mark.parametrize("threads", [1, 2])
def test_segment_refresh_of_many_parameters_matches_the_python_fallback(monkeypatch, threads):
    """The C refresh prefetches its parameters' metadata ahead [note: refresh prefetch] and, from
    1024 parameters, splits them between threads: with 3000 parameters of mixed sizes (empty
    ones and None, replaced and unwalkable gradients placed in either thread's half and within
    the prefetch distance of both ends) it writes the table and returns the flags the Python
    fallback does."""
    n = 3000
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 5, (n,), generator=gen).tolist()
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in sizes]
    trackers = {"c": ops.segment_tracker(ps, torch.float32, torch.device("cpu"))}
    with monkeypatch.context() as m:
        m.setattr(ops, "_C", None)
        trackers["python"] = ops.segment_tracker(ps, torch.float32, torch.device("cpu"))
    offsets = [0, *itertools.accumulate(sizes)][:-1]
    tables = {}
    for name in trackers:
        tables[name] = torch.zeros(n, 4, dtype=torch.int64)
        tables[name][:, 2] = torch.tensor(offsets)
        tables[name][:, 3] = torch.tensor(sizes)

    def refresh():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            flags = {name: fn(tables[name]) for name, fn in trackers.items()}
        finally:
            torch.set_num_threads(previous)
        assert flags["c"] == flags["python"], flags
        assert torch.equal(tables["c"], tables["python"])
        return flags["c"]

    for i, p in enumerate(ps):
        if i % 7 != 3:  # some stay None
            p.grad = torch.randn(p.shape, generator=gen)
    assert refresh() == ops.TABLE_CHANGED
    t = tables["c"]
    assert t[:, 0].tolist() == [p.data_ptr() for p in ps]
    assert t[:, 1].tolist() == [0 if p.grad is None else (p.grad.data_ptr() or 1) for p in ps]
    assert refresh() == 0
    kept = [p.grad for p in ps]  # alive, so that no new gradient reuses an old address
    for i in (0, 1, 5, 21, 1499, 1500, 1501, 2990, n - 1):
        ps[i].grad = torch.randn(ps[i].shape, generator=gen)
    assert refresh() == ops.TABLE_CHANGED
    assert t[:, 1].tolist() == [0 if p.grad is None else (p.grad.data_ptr() or 1) for p in ps]
    assert refresh() == 0
    for i in (2, 2999, 1600):  # a gradient the kernels cannot walk, at either end and in the second half
        good = ps[i].grad
        ps[i].grad_dtype = None
        ps[i].grad = torch.randn(ps[i].shape, dtype=torch.float64, generator=gen)
        assert refresh() == ops.SLOW_PATH
        ps[i].grad = good
        assert refresh() == 0
    ps[2500].data = torch.randn(sizes[2500] + 1)  # resized: the bucket must be rebuilt
    assert refresh() == ops.PARAM_CHANGED
    assert len(kept) == n
