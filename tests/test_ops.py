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


def _bucket(sizes, dtype=torch.float32, chunk=64, amsgrad=False, momentum=True):
    """A hand-built flat bucket following the contract in csrc/ops.cpp."""
    padded = [-(-n // ALIGN) * ALIGN for n in sizes]
    total = sum(padded)
    rows, off = [], 0
    for seg, n in enumerate(padded):
        for b in range(off, off + n, chunk):
            rows.append((seg, b, min(b + chunk, off + n)))
        off += n
    state = torch.float64 if dtype == torch.float64 else torch.float32
    mask = torch.zeros(total, dtype=torch.bool)
    off = 0
    for n, pn in zip(sizes, padded):
        mask[off : off + n] = True
        off += pn
    b = {
        "param": torch.where(mask, torch.randn(total, dtype=torch.float64), 0).to(dtype),
        "grad": torch.where(mask, torch.randn(total, dtype=torch.float64), 0).to(dtype),
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
    return b


def _adam_args(b, active=None, decoupled=True, maximize=False, wd=0.01, grad_scale=None, found_inf=None):
    return (b["param"], b["grad"], b["exp_avg"], b["exp_avg_sq"], b["max_exp_avg_sq"], b["seg_steps"], b["chunks"],
            active, b["hyper"], b["schedule"], b["schedule_step"], 0.999, 1e-8, wd, decoupled, maximize,
            grad_scale, found_inf)


def _sgd_args(b, active=None, nesterov=False, maximize=False, wd=0.01, grad_scale=None, found_inf=None):
    return (b["param"], b["grad"], b["momentum_buffer"], b["seg_steps"], b["chunks"], active, b["hyper"],
            b["schedule"], b["schedule_step"], 0.0, wd, nesterov, maximize, grad_scale, found_inf)


def _clone(b):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


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
    b = _bucket([3 * 64 + 17, 5, 130], amsgrad=amsgrad)
    b["schedule"] = torch.tensor(SCHEDULES[schedule], dtype=torch.float64)
    r = _clone(b)
    active = torch.tensor([True, False, True])
    for step in range(8):
        act = active if step % 3 == 1 else None
        ops.adam_step_(*_adam_args(b, act, decoupled, maximize))
        reference.adam_step_(*_adam_args(r, act, decoupled, maximize))
        b["schedule_step"].add_(1)
        r["schedule_step"].add_(1)
    for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "seg_steps"):
        if b[key] is not None:
            torch.testing.assert_close(b[key], r[key], **TOL[torch.float32])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_kernel_matches_reference(schedule, nesterov, momentum, maximize):
    if nesterov and not momentum:
        pytest.skip("nesterov needs momentum")
    b = _bucket([3 * 64 + 17, 5, 130], momentum=momentum)
    b["schedule"] = torch.tensor(SCHEDULES[schedule], dtype=torch.float64)
    r = _clone(b)
    for step in range(8):
        act = torch.tensor([True, True, False]) if step == 2 else None
        ops.sgd_step_(*_sgd_args(b, act, nesterov, maximize))
        reference.sgd_step_(*_sgd_args(r, act, nesterov, maximize))
        b["schedule_step"].add_(1)
        r["schedule_step"].add_(1)
    for key in ("param", "momentum_buffer", "seg_steps"):
        if b[key] is not None:
            torch.testing.assert_close(b[key], r[key], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_kernel_dtypes_match_reference(dtype):
    b = _bucket([100, 37], dtype=dtype)
    r = _clone(b)
    for _ in range(7):
        ops.adam_step_(*_adam_args(b))
        reference.adam_step_(*_adam_args(r))
    assert b["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Same fp32 math on both sides: the stored parameters agree to the dtype's own
    # assert_close defaults (one rounding of the final store).
    torch.testing.assert_close(b["param"], r["param"], **TOL.get(dtype, {}))
    torch.testing.assert_close(b["exp_avg_sq"], r["exp_avg_sq"], **TOL[b["exp_avg_sq"].dtype])


def test_found_inf_changes_nothing_and_grad_scale_unscales():
    b = _bucket([50, 20], amsgrad=True)
    ops.adam_step_(*_adam_args(b))
    before = _clone(b)
    ops.adam_step_(*_adam_args(b, found_inf=torch.tensor(1.0)))
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(b[key], value), f"{key} changed on a skipped step"
    # grad_scale: scaled grads + scale == unscaled grads.
    scaled = _clone(b)
    scaled["grad"] = b["grad"] * 1024
    ops.adam_step_(*_adam_args(scaled, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0)))
    ops.adam_step_(*_adam_args(b))
    torch.testing.assert_close(scaled["param"], b["param"], **TOL[torch.float32])


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
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default, _adam_args(_clone(b)))
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default,
                          _adam_args(_clone(b), active=torch.tensor([True, False]), grad_scale=torch.tensor(2.0),
                                     found_inf=torch.tensor(0.0)))
    torch.library.opcheck(torch.ops.fusedclr.sgd_step_.default, _sgd_args(_clone(b)))
    # The precision opt-ins [note: precision opt-ins]: a mutated fp32 master, a seed with bf16 states.
    low = _bucket([40, 9], dtype=torch.bfloat16, amsgrad=True)
    master = low["param"].float()
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default, (*_adam_args(_clone(low)), master))
    torch.library.opcheck(torch.ops.fusedclr.sgd_step_.default, (*_sgd_args(_clone(low)), master.clone()))
    bf16_states = {k: v.bfloat16() if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and v is not None else v
                   for k, v in _clone(low).items()}
    torch.library.opcheck(torch.ops.fusedclr.adam_step_.default, (*_adam_args(bf16_states), None, 7))
    torch.library.opcheck(torch.ops.fusedclr.sgd_step_.default, _sgd_args(_clone(low)), {"sr_seed": 2**40})
    torch.library.opcheck(torch.ops.fusedclr.schedule_eval.default,
                          (torch.tensor(SCHEDULES["onecycle"], dtype=torch.float64), torch.tensor(3)))


def test_bad_arguments_are_named():
    b = _bucket([10])
    bad = _clone(b)
    bad["exp_avg"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match="exp_avg"):
        ops.adam_step_(*_adam_args(bad))
    bad = _clone(b)
    bad["grad"] = bad["grad"].double()
    with pytest.raises(RuntimeError, match="grad dtype"):
        ops.adam_step_(*_adam_args(bad))


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
        "        p.grad.fill_(1.0); opt.step()\n"
        "n = sum('reference backend' in str(x.message) for x in w)\n"
        "assert n == 1, n\n"
        "assert torch.equal(p.detach(), torch.zeros(3)), p\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_grads_are_matches_python_identity_check():
    """The C fast-path check agrees with `p.grad is e` in every case the optimizers rely on,
    from the lists (grads_are) and prepared once (grads_checker, as buckets use it)."""
    import operator

    ps = [torch.nn.Parameter(torch.ones(2)) for _ in range(4)]
    views = [torch.zeros(2) for _ in ps]
    for p, v in zip(ps, views):
        p.grad = v
    cases = {
        "all views": (ps, views),
        "one replaced": (ps, [*views[:3], torch.zeros(2)]),
        "expected None, grad set": (ps, [*views[:3], None]),
    }
    checks = {name: ops.grads_checker(*lists) for name, lists in cases.items()}
    for name, (params, expected) in cases.items():
        want = all(map(operator.is_, (p.grad for p in params), expected))
        assert ops.grads_are(params, expected) is want, name
        assert checks[name]() is want, name
    ps[3].grad = None  # a prepared check sees grads change after it was made
    assert ops.grads_are(ps, [*views[:3], None]) is True and checks["expected None, grad set"]() is True
    assert ops.grads_are(ps, views) is False and checks["all views"]() is False
    for fn in (ops.grads_are, ops.grads_checker):
        with pytest.raises(ValueError, match="length"):
            fn(ps, views[:2])
        with pytest.raises(TypeError, match="lists of tensors"):
            fn([*ps[:3], "not a tensor"], views)
        with pytest.raises(TypeError, match="lists of tensors"):
            fn(ps, [*views[:3], 1.0])
    # A tensor that never had autograd metadata has no grad; a tensor subclass is a tensor.
    class Sub(torch.Tensor):
        pass

    bare, sub = torch.zeros(2), torch.zeros(2).as_subclass(Sub)
    sub.grad = views[0]
    assert ops.grads_are([bare, sub], [None, views[0]]) is True
    assert ops.grads_are([bare, sub], [views[1], views[0]]) is False
    assert ops.grads_checker([bare, sub], [None, views[0]])() is True
    assert ops.grads_checker([bare, sub], [views[1], views[0]])() is False
