"""fusedclr.Lookahead beyond the table's parity: skipped steps, the slow weights' start, misuse."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS

import fusedclr


def _run(p0: torch.Tensor, grads: list[torch.Tensor], *, k: int, alpha: float, lr: float) -> torch.Tensor:
    """Lookahead over plain SGD in float64, the paper's algorithm (slow weights from ``p0``)."""
    fast = p0.double().clone()
    slow = fast.clone()
    for t, g in enumerate(grads, 1):
        fast = fast - lr * g.double()
        if t % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
    return fast


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_slow_weights_start_from_the_weights_at_the_first_step(backend):
    """Weights loaded after the optimizer is built (a checkpoint, an init) are where the slow
    weights start, not the values the parameters had at construction."""
    p = torch.nn.Parameter(torch.zeros(33))
    opt = fusedclr.Lookahead(fusedclr.SGD([p], lr=0.1, backend=backend), k=3, alpha=0.5)
    loaded = torch.randn(33)
    with torch.no_grad():
        p.copy_(loaded)
    grads = [torch.randn(33) for _ in range(7)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach().double(), _run(loaded, grads, k=3, alpha=0.5, lr=0.1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["found_inf", "skip_nonfinite"])
def test_a_skipped_step_skips_the_synchronisation(backend, how):
    """A step that GradScaler's found_inf (or skip_nonfinite's NaN check) skips right after a
    synchronisation leaves the step count at a multiple of k; the synchronisation must not run
    again. With fp32 parameters running it again changes nothing (fast == slow); with bf16
    ones it would pull the fp32 slow weights towards their bf16 rounding, so this runs in bf16."""
    p = torch.nn.Parameter(torch.randn(40).bfloat16())
    opt = fusedclr.Lookahead(fusedclr.SGD([p], lr=0.1, backend=backend, skip_nonfinite=how == "skip_nonfinite"),
                             k=2, alpha=0.5)
    for _ in range(2):  # the second step synchronises
        p.grad = torch.randn(40).bfloat16()
        opt.step()
    before = p.detach().clone()
    slow = opt.state_dict()["lookahead"]["slow"][0].clone()
    assert not torch.equal(slow, before.float()), "the test needs slow weights that bf16 does not hold exactly"
    p.grad = torch.full((40,), float("nan")).bfloat16() if how == "skip_nonfinite" else torch.randn(40).bfloat16()
    opt.step(found_inf=torch.ones(()) if how == "found_inf" else None)
    assert torch.equal(p.detach(), before)
    assert torch.equal(opt.state_dict()["lookahead"]["slow"][0], slow)


def test_misuse_raises_naming_the_argument():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="wraps a fusedclr optimizer"):
        fusedclr.Lookahead(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="Invalid k"):
        fusedclr.Lookahead(fusedclr.SGD([p], lr=0.1), k=0)
    with pytest.raises(ValueError, match="Invalid alpha"):
        fusedclr.Lookahead(fusedclr.SGD([p], lr=0.1), alpha=1.5)
    with pytest.raises(TypeError, match="wraps a fusedclr optimizer"):
        fusedclr.Lookahead(fusedclr.Lookahead(fusedclr.SGD([p], lr=0.1)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_slow_weights_follow_a_conversion_of_the_model(backend):
    """``model.double()`` between two synchronisations: the wrapped optimizer re-buckets the group
    and converts its states, and the slow weights move with them (not restarted from the converted
    fast weights, which would lose the step back)."""
    model = torch.nn.Linear(5, 3, bias=False)
    p0 = model.weight.detach().clone()
    opt = fusedclr.Lookahead(fusedclr.SGD(model.parameters(), lr=0.1, backend=backend), k=4, alpha=0.5)
    grads = [torch.randn(3, 5) for _ in range(6)]
    for g in grads[:2]:
        model.weight.grad = g.clone()
        opt.step()
    model.double()
    for g in grads[2:]:
        model.weight.grad = g.double()
        opt.step()
    assert model.weight.dtype == torch.float64
    torch.testing.assert_close(model.weight.detach(), _run(p0, grads, k=4, alpha=0.5, lr=0.1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lr_set_through_lookahead_after_load_state_dict_reaches_the_kernel(backend):
    """load_state_dict replaces the wrapped optimizer's group list: a scheduler (or a hand edit,
    or a framework) that sets lr through the Lookahead afterwards must still be obeyed."""
    p = torch.nn.Parameter(torch.randn(17))
    opt = fusedclr.Lookahead(fusedclr.SGD([p], lr=0.1, backend=backend), k=1, alpha=0.5)
    p.grad = torch.ones(17)
    opt.step()  # k=1: fast and slow weights agree after every step
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.optimizer.param_groups
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    for _ in range(3):
        opt.step()  # at lr 0 nothing moves
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.param_groups[0]["lr"] = 0.2
    sched.base_lrs = [0.2]
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_stays_unbiased_through_the_synchronisation(backend):
    """bf16 weights at 1.0, updates of 1/8 of an ulp: after Lookahead(k=1) over SGD with stochastic
    rounding, the mean is the float64 run's. The synchronisation draws bits of its own; with the inner
    step's bits (the same hash of step and element) the two roundings of a step add their errors
    (mean 0.870 where 0.900 is right)."""
    n, steps = 8192, 200
    means = []
    for dtype, kw in ((torch.float64, {}), (torch.bfloat16, {"stochastic_rounding": True})):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = fusedclr.Lookahead(fusedclr.SGD([p], lr=1.0, backend=backend, **kw), k=1, alpha=0.5)
        for _ in range(steps):
            p.grad = torch.full((n,), 1e-3, dtype=dtype)
            opt.step()
        means.append(p.double().mean().item())
    assert means[0] == pytest.approx(0.9, abs=1e-9)
    # Unbiased, each element's slow weight random-walks: per step it moves by half of two rounding
    # errors, each of variance <= ulp**2 / 4 (ulp = 2**-8 below 1), so its variance after the steps is
    # <= steps * ulp**2 / 8. Six standard errors of the mean over n elements: 1.3e-3 (biased: 3e-2).
    assert abs(means[1] - means[0]) < 6 * 2**-8 * (steps / 8) ** 0.5 / n**0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32_states", "bf16_states"])
def test_master_weights_keep_small_moves_through_the_synchronisation(backend, state_dtype):
    """bf16 parameters with fp32 masters: Lookahead's slow weights are fp32 whatever the state dtype,
    so steps far below a bf16 ulp still move the masters, and the parameter follows them."""
    n, steps = 1024, 100
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = fusedclr.Lookahead(fusedclr.AdamW([p], lr=1e-4, weight_decay=0.0, master_weights=True,
                                            state_dtype=state_dtype, backend=backend), k=5, alpha=0.5)
    for _ in range(steps):
        p.grad = torch.ones(n, dtype=torch.bfloat16)
        opt.step()
    # Each step moves the fast weights by lr (Adam with a constant gradient); each sync keeps half of
    # the k steps' move: 100 steps -> 20 syncs of 5 * 1e-4 * 0.5 = 5e-3 in all (bf16 slow weights lost
    # every one of them). bf16 moments round each moment to 2**-9 relative: the move to ~1%.
    master = opt.state[p]["master_param"]
    move = 1 - master.double()
    want = torch.full_like(move, 20 * 5 * 1e-4 * 0.5)
    torch.testing.assert_close(move, want, rtol=0.02 if state_dtype else 5e-4, atol=0)
    assert torch.equal(p, master.to(torch.bfloat16))
    assert opt.state_dict()["lookahead"]["slow"][0].dtype == torch.float32


def test_compiled_step_synchronises_like_eager():
    """Lookahead.step inside torch.compile: the inner step's skip decision reaches the synchronisation
    (it crashed without an eager step first, and read a stale skip after a skipped eager one)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 3)
        x = torch.randn(16, 8)
        opt = fusedclr.Lookahead(fusedclr.SGD(m.parameters(), lr=0.1), k=2, alpha=0.5)
        m(x).pow(2).mean().backward()
        opt.step(found_inf=torch.ones(()))  # a skipped eager step (a GradScaler inf step)

        def step():
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()

        fn = torch.compile(step, backend="eager") if compiled else step
        for _ in range(6):
            fn()
        slow = opt.state_dict()["lookahead"]["slow"][0]
        assert torch.equal(slow, m.weight.detach())  # step 6 of k = 2: synchronised
        results.append(m.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_stochastic_rounding_on_float16_parameters_raises():
    p16 = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="parameter 1 of this param group is float16.*master_weights=True"):
        fusedclr.AdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)), p16], stochastic_rounding=True)
    opt = fusedclr.AdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], stochastic_rounding=True)
    with pytest.raises(ValueError, match="float16"):
        opt.add_param_group({"params": [p16]})
