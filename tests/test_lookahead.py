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
