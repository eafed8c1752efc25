"""The precision opt-ins [note: precision opt-ins]: bf16 states, fp32 master weights
and stochastic rounding: the reference's rounding, its statistics on the C++ CPU
kernel, and the opt-ins through the optimizers. Op by op against the reference,
for every optimizer and backend: tests/test_op_parity.py."""

from __future__ import annotations

import io

import pytest
import test_cuda as checks
import torch
from conftest import CPU_BACKENDS, TOL, requires_extension

import fusedclr
from fusedclr import reference

# -- the ops on CPU: the GPU suite's check of the rounding statistics with the CPU kernel ------


@pytest.fixture
def on_cpu_kernel(monkeypatch):
    monkeypatch.setattr(checks, "DEVICE", "cpu")  # checks.OPS: the compiled ops, which take CPU tensors too


@requires_extension()
@pytest.mark.usefixtures("on_cpu_kernel")
def test_cpu_kernel_stochastic_rounding_is_unbiased():
    checks.test_stochastic_rounding_is_unbiased()


def test_reference_rounding_is_unbiased_and_exact_where_representable():
    """The reference's own stochastic rounding: every result is one of the two bf16
    neighbours, values bf16 holds exactly never move, the round-up rate is the mean
    relative position between the neighbours (unbiased), and infinities, NaN and
    zeros keep their values."""
    x = torch.rand(100_000) * 10
    x[:1000] = x[:1000].to(torch.bfloat16).float()  # exactly representable
    key = reference.rounding_key(7, torch.full((x.numel(),), 3, dtype=torch.int64))
    index = torch.arange(x.numel())
    out = reference.round_stochastic(x, key, index).float()
    bits = x.view(torch.int32) >> 16  # x > 0: truncation is rounding down
    down, up = (bits << 16).view(torch.float32), ((bits + 1) << 16).view(torch.float32)
    exact = x == down
    assert exact[:1000].all() and torch.equal(out[exact], x[exact])
    assert torch.all((out == down) | (out == up))
    frac = ((x - down) / (up - down))[~exact].double().mean().item()
    rate = (out[~exact] == up[~exact]).double().mean().item()
    assert abs(rate - frac) < 0.005
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    got = reference.round_stochastic(special, key[:5], index[:5]).float()
    assert got[:2].tolist() == [float("inf"), -float("inf")] and got[2].isnan() and got[3:].eq(0).all()


def test_reference_hash_is_uint32_arithmetic():
    """mix32 against a direct evaluation in Python integers (mod 2**32)."""
    def mix(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    xs = [0, 1, 2**31, 2**32 - 1, 123456789, 0xDEADBEEF]
    assert reference.mix32(torch.tensor(xs)).tolist() == [mix(v) for v in xs]


# -- through the optimizers ------------------------------------------------------


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype)) for s in [(300, 7), (33,), (1,)]]


def _train(params, opt, steps, seed=1):
    """``steps`` steps with seeded gradients, rounded through bf16 so runs in any dtype see the same values."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(torch.bfloat16).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [fusedclr.AdamW, fusedclr.SGD])
def test_master_weights_track_the_fp32_run(cls, backend):
    """bf16 parameters with fp32 masters: the masters follow an fp32 run of torch at fp32
    tolerance, and the parameters are those masters rounded, where plain bf16 drifts."""
    kw = {"lr": 1e-2, "weight_decay": 1e-2} | ({"momentum": 0.9} if cls is fusedclr.SGD else {})
    ours = _model(torch.bfloat16)
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = cls(ours, backend=backend, master_weights=True, **kw)
    _train(ours, opt, 20)
    _train(fp32, getattr(torch.optim, cls.__name__)(fp32, **kw), 20)
    for p, q in zip(ours, fp32):
        master = opt.state[p]["master_param"]
        torch.testing.assert_close(master, q.detach(), **TOL[torch.float32])
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("option", ["master_weights", "stochastic_rounding", "plain"])
def test_updates_below_half_an_ulp(backend, option):
    """SGD steps of 0.1 ulp on bf16 ones: lost to rounding to nearest, accumulated by the
    master, and kept on average by stochastic rounding (200 steps of 1e-4 below 1.0)."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    kw = {} if option == "plain" else {option: True}
    opt = fusedclr.SGD([p], lr=1e-4, backend=backend, **kw)
    for _ in range(200):
        p.grad = torch.ones_like(p)
        opt.step()
    mean = p.detach().double().mean().item()
    if option == "plain":
        assert mean == 1.0
    elif option == "master_weights":
        assert mean == pytest.approx(torch.tensor(1 - 0.02).to(torch.bfloat16).item(), abs=0)
        torch.testing.assert_close(opt.state[p]["master_param"], torch.full_like(p, 0.98, dtype=torch.float32),
                                   rtol=0, atol=1e-5)
    else:
        # Per element a random walk of 200 unbiased roundings (std <= 0.028); the mean
        # of 4096 has std <= 4.4e-4, and rounding to nearest would leave it at 1.0.
        assert mean == pytest.approx(0.98, abs=2e-3)


SR_OPTIMIZERS = {
    "adamw": lambda ps, backend: fusedclr.AdamW(ps, lr=1e-2, backend=backend, stochastic_rounding=True),
    # torch's SGD checkpoint has no step count: with stochastic rounding fusedclr's carries one.
    "sgd": lambda ps, backend: fusedclr.SGD(ps, lr=1e-2, backend=backend, stochastic_rounding=True),
    "sgd_momentum": lambda ps, backend: fusedclr.SGD(ps, lr=1e-2, momentum=0.9, backend=backend,
                                                     stochastic_rounding=True),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("make", list(SR_OPTIMIZERS))
def test_stochastic_rounding_is_reproducible_and_resumes_exactly(backend, make):
    """The bits come from (seed, step, element): two runs under one torch.manual_seed agree
    bit for bit, and so does a run resumed from a state_dict in a fresh optimizer."""
    runs = []
    for _ in range(2):
        ps = _model(torch.bfloat16, seed=5)  # torch.manual_seed(5): the rounding seed derives from it
        opt = SR_OPTIMIZERS[make](ps, backend)
        _train(ps, opt, 6)
        runs.append([p.detach().clone() for p in ps])
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    start = [p.detach() for p in _model(torch.bfloat16, seed=5)]
    assert all(not torch.equal(a, b) for a, b in zip(runs[0], start)), "nothing trained"
    torch.manual_seed(5)
    resumed = [torch.nn.Parameter(r.clone()) for r in runs[1]]
    opt2 = SR_OPTIMIZERS[make](resumed, backend)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, map_location="cpu"))
    _train(resumed, opt2, 3, seed=9)
    _train(ps, opt, 3, seed=9)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ps, resumed))
    assert all(not torch.equal(a.detach(), b) for a, b in zip(resumed, runs[1])), "the resumed run did not train"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights_state_dict_round_trips(backend):
    """master_param travels in state_dict (fusedclr -> fusedclr continues identically);
    a torch checkpoint (no master) starts the masters from the parameters; torch loads
    ours and ignores the extra key."""
    ps = _model(torch.bfloat16)
    opt = fusedclr.AdamW(ps, lr=1e-2, backend=backend, master_weights=True)
    _train(ps, opt, 4)
    sd = opt.state_dict()
    assert all("master_param" in sd["state"][i] for i in range(3))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    copy = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = fusedclr.AdamW(copy, lr=1e-2, backend=backend, master_weights=True)
    opt2.load_state_dict(torch.load(buf, map_location="cpu"))
    for i, p in enumerate(copy):
        assert torch.equal(opt2.state[p]["master_param"], sd["state"][i]["master_param"])
    _train(ps, opt, 3, seed=4)
    _train(copy, opt2, 3, seed=4)
    for p, q in zip(ps, copy):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])

    # torch.optim loads ours (the extra key rides along unused) and steps.
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2)
    torch_opt.load_state_dict(opt.state_dict())
    _train(theirs, torch_opt, 1)
    # A torch checkpoint has no masters: they start from the parameters.
    plain = torch.optim.AdamW(theirs, lr=1e-2)
    _train(theirs, plain, 2)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt3 = fusedclr.AdamW(fresh, lr=1e-2, backend=backend, master_weights=True)
    opt3.load_state_dict(plain.state_dict())
    for p in fresh:
        assert torch.equal(opt3.state[p]["master_param"], p.detach().float())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_parameter_written_outside_the_optimizer_wins_over_its_master(backend):
    """After model.load_state_dict-style writes, the next step starts from the new values,
    except where the written value is what the parameter held already (the master's
    rounding): there the finer master goes on."""
    ps = _model(torch.bfloat16)
    opt = fusedclr.AdamW(ps, lr=1e-2, backend=backend, master_weights=True)
    _train(ps, opt, 3)
    old = opt.state[ps[0]]["master_param"].clone()
    with torch.no_grad():
        ps[0].copy_(torch.full_like(ps[0], 0.25))
    opt.param_groups[0]["lr"] = 0.0  # a step that moves nothing: the master becomes the parameter
    _train(ps, opt, 1)
    kept = old.to(torch.bfloat16) == 0.25
    assert 0 < kept.sum() < 5  # a few of the 2100 old masters round to 0.25
    want = torch.where(kept, old, torch.full_like(old, 0.25))
    assert torch.equal(opt.state[ps[0]]["master_param"], want)
    assert not torch.equal(opt.state[ps[1]]["master_param"], ps[1].detach().float())  # untouched: still finer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_bf16_states_against_torch(name, backend):
    """state_dtype=torch.bfloat16 keeps bf16 states (torch.optim's own choice for bf16
    parameters) and is no worse than twice torch's bf16 error against a float64 run."""
    kw = {"lr": 1e-2, "weight_decay": 1e-2} | ({"momentum": 0.9} if name == "SGD" else {})
    ours = _model(torch.bfloat16)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref64 = [torch.nn.Parameter(p.detach().double()) for p in ours]
    opt = getattr(fusedclr, name)(ours, backend=backend, state_dtype=torch.bfloat16, **kw)
    _train(ours, opt, 10)
    _train(theirs, getattr(torch.optim, name)(theirs, **kw), 10)
    _train(ref64, getattr(torch.optim, name)(ref64, **kw), 10)
    state = opt.state[ours[0]]
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k != "step")
    for p, q, r in zip(ours, theirs, ref64):
        err_ours = (p.detach().double() - r.detach()).abs().max().item()
        err_torch = (q.detach().double() - r.detach()).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-12


def test_precision_options_are_validated():
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="state_dtype must be None"):
        fusedclr.AdamW(p, state_dtype=torch.float16)
    with pytest.raises(TypeError, match="state_dtype must be a torch.dtype"):
        fusedclr.AdamW(p, state_dtype="bfloat16")
    with pytest.raises(ValueError, match="not both"):
        fusedclr.SGD(p, master_weights=True, stochastic_rounding=True)
    with pytest.raises(TypeError, match="master_weights must be a bool"):
        fusedclr.Adam(p, master_weights=1)
    # fp32 parameters are unaffected by all three.
    opt = fusedclr.AdamW(p, state_dtype=torch.bfloat16, master_weights=True)
    b = opt._buckets[0][0]
    assert b.master is None and b.sr_seed is None and b.states["exp_avg"].dtype == torch.float32
