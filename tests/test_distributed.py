"""fusedclr under DDP, FSDP2 and ZeroRedundancyOptimizer: 2 processes, gloo, CPU.

Every case trains a small model on 2 ranks, each on half of every batch, and
compares with single-process training on the whole batch by torch.optim (and
torch.nn.utils.clip_grad_norm_), the ground truth. The workers run in processes
forked from a forkserver that has imported torch once, so a case costs well under
a second on top of one interpreter start.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.utils._python_dispatch
import torch.utils._pytree

import fusedclr

WORLD = 2
STEPS = 4
CLIP = 0.3

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed "
                       "with gloo"),
]


# --------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, name: str, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: a rank that fails leaves the other waiting in a collective.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        globals()[name](rank, *args)
    finally:
        dist.destroy_process_group()


def _run(worker, *args) -> None:
    """Runs ``worker(rank, *args)`` on WORLD ranks; a failure on any rank fails the test with its traceback."""
    multiprocessing.set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint", "fusedclr", __name__]
    )
    torch.multiprocessing.start_processes(_entry, args=(worker.__name__, _free_port(), args), nprocs=WORLD,
                                          start_method="forkserver")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Odd sizes: FSDP2 shards 7 rows as 4 + 3 and 3 rows as 2 + 1.
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)


def _loss(model, x, y, rank: int | None = None) -> torch.Tensor:
    if rank is not None:  # this rank's half of the batch; the mean over halves is the full mean
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    return torch.nn.functional.mse_loss(model(x), y)


OPTIONS = {
    "AdamW": {"lr": 0.05, "weight_decay": 0.01, "amsgrad": True},
    "SGD": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
}


def _groups(model, cls: str) -> list[dict]:
    """Two param groups (weights, biases) with different learning rates."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "lr": OPTIONS[cls]["lr"] / 2}]


def _single_process(cls: str, steps: int = STEPS, clip: float | None = CLIP) -> torch.nn.Module:
    """The ground truth: torch.optim on the whole batch in this process."""
    model = _model()
    opt = getattr(torch.optim, cls)(_groups(model, cls), **OPTIONS[cls])
    for step in range(steps):
        opt.zero_grad()
        _loss(model, *_batch(step)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def _assert_params_match(expected: torch.nn.Module, model: torch.nn.Module) -> None:
    for (name, want), got in zip(expected.named_parameters(), model.parameters(), strict=True):
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        torch.testing.assert_close(got.detach(), want.detach(), msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------


def _no_torch_zero(params) -> None:
    raise AssertionError("zero_grad(set_to_none=False) handed a bucket of gradients to torch's loop")


def _ddp_worker(rank: int, cls: str, gradient_as_bucket_view: bool, set_to_none: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fusedclr.optim._base as base

    base._zero_grads_as_torch = _no_torch_zero  # this worker process only: DDP's gradients go through the table
    ddp = DDP(_model(seed=rank), gradient_as_bucket_view=gradient_as_bucket_view)  # DDP broadcasts rank 0's
    opt = getattr(fusedclr, cls)(_groups(ddp.module, cls), **OPTIONS[cls], max_grad_norm=CLIP)
    bucket = opt._buckets[0][0]
    weight = ddp.module[0].weight
    assert bucket.params[0] is weight
    for step in range(STEPS):
        grad = weight.grad
        opt.zero_grad(set_to_none=set_to_none)
        if grad is not None and not set_to_none:  # zeroed in place, through the table
            assert weight.grad is grad and not grad.any()
        _loss(ddp, *_batch(step), rank).backward()
        opt.step()
        # The kernel read DDP's gradient where it is (a bucket view or not): no gather copy.
        assert bucket.host_table[0, 0] == weight.data_ptr() and bucket.host_table[0, 1] == weight.grad.data_ptr()
    _assert_params_match(_single_process(cls), ddp.module)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_in_place"])
@pytest.mark.parametrize("gradient_as_bucket_view", [False, True])
@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_ddp_matches_single_process(cls, gradient_as_bucket_view, set_to_none):
    """DDP (both gradient modes, gradients set to None or zeroed in place between steps) + fused
    clipping over all-reduced grads == one process."""
    _run(_ddp_worker, cls, gradient_as_bucket_view, set_to_none)


# --------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------


def _fsdp_model(seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


class _CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the copies of more than one element that run under it (0-dim ones carry the
    gradient norm)."""

    COPIES = ("aten::copy_", "aten::_foreach_copy_", "aten::_to_copy", "aten::clone")

    def __init__(self):
        super().__init__()
        self.large = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.COPIES:
            sizes = [a.numel() for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
            if max(sizes, default=0) > 1:
                self.large.append((func._schema.name, sizes))
        return out


def _fsdp_train(model, opt, steps: range, set_to_none: bool = True) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=set_to_none)
        _loss(model, *_batch(step), dist.get_rank()).backward()
        opt.step()


def _fsdp_worker(rank: int, cls: str, set_to_none: bool) -> None:
    from torch.distributed.tensor import DTensor

    import fusedclr.optim._base as base

    base._zero_grads_as_torch = _no_torch_zero  # this worker process only: the local shards go through the table
    model = _fsdp_model()
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    shards = [p.to_local().data_ptr() for p in params]
    opt = getattr(fusedclr, cls)(_groups(model, cls), **OPTIONS[cls], max_grad_norm=CLIP)
    _fsdp_train(model, opt, range(STEPS - 1), set_to_none)
    # The last step updates FSDP's shards in place through the segment table: no copy in or out.
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=set_to_none)
    if not set_to_none:  # zeroed in place, through the local shards
        assert all(p.grad is g and not g.to_local().any() for p, g in zip(params, grads))
    _loss(model, *_batch(STEPS - 1), dist.get_rank()).backward()
    with _CopyCounter() as copies:
        opt.step()
    assert copies.large == [], copies.large
    # FSDP owns the storage: the shards were updated in place, never re-pointed.
    assert [p.to_local().data_ptr() for p in params] == shards
    assert all(isinstance(p, DTensor) for p in model.parameters())
    _assert_params_match(_single_process(cls), model)
    reference = _single_process(cls, steps=STEPS, clip=None)  # the clip must have mattered
    assert not torch.allclose(params[0].full_tensor(), next(reference.parameters()))
    state = opt.state_dict()["state"]
    for pid, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        for name, value in state[pid].items():
            if name != "step":
                assert isinstance(value, DTensor) and value.placements == p.placements, name
                assert value.to_local().shape == p.to_local().shape


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_in_place"])
@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_fsdp2_matches_single_process(cls, set_to_none):
    """fully_shard + fused clipping (norm reduced over the shards) == one process, with the
    gradients set to None or zeroed in place between steps; DTensor shards never re-pointed;
    states are DTensors placed like their parameters."""
    _run(_fsdp_worker, cls, set_to_none)


def _dcp_worker(rank: int, cls: str, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp_model()
    opt = getattr(fusedclr, cls)(_groups(model, cls), **OPTIONS[cls], max_grad_norm=CLIP)
    _fsdp_train(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    at_save = [p.to_local().clone() for p in model.parameters()]
    _fsdp_train(model, opt, range(3, 6))  # the uninterrupted run
    assert all(not torch.equal(p.to_local(), s) for p, s in zip(model.parameters(), at_save)), "nothing trained"

    fresh = _fsdp_model(seed=123)  # other weights: the load must bring everything
    fresh_opt = getattr(fusedclr, cls)(_groups(fresh, cls), **OPTIONS[cls], max_grad_norm=CLIP)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _fsdp_train(fresh, fresh_opt, range(3, 6))
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a.to_local(), b.to_local())
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert want.keys() == got.keys()
    for pid in want:
        for key, value in want[pid].items():
            if key == "step":
                assert float(got[pid][key]) == float(value) == 6
            else:
                assert torch.equal(got[pid][key].to_local(), value.to_local()), (pid, key)


@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_fsdp2_dcp_save_load_resumes_exactly(cls, tmp_path):
    """torch.distributed.checkpoint saves the DTensor states shard by shard; a fresh
    model and optimizer loaded from it continue bitwise like the uninterrupted run."""
    _run(_dcp_worker, cls, str(tmp_path / "ckpt"))


# --------------------------------------------------------------------------
# ZeroRedundancyOptimizer
# --------------------------------------------------------------------------


def _zero_worker(rank: int) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_model())
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=fusedclr.AdamW, **OPTIONS["AdamW"])
    assert isinstance(opt.optim, fusedclr.AdamW)
    owned = {id(p) for g in opt.optim.param_groups for p in g["params"]}
    assert 0 < len(owned) < len(list(ddp.parameters())), "each rank must own a strict subset"
    for step in range(STEPS):
        opt.zero_grad()
        _loss(ddp, *_batch(step), rank).backward()
        opt.step()
    model = _model()
    truth = torch.optim.AdamW(model.parameters(), **OPTIONS["AdamW"])
    for step in range(STEPS):
        truth.zero_grad()
        _loss(model, *_batch(step)).backward()
        truth.step()
    _assert_params_match(model, ddp.module)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        merged = opt.state_dict()["state"]
        want = truth.state_dict()["state"]
        assert merged.keys() == want.keys()
        for pid, st in want.items():
            for key, value in st.items():
                if key == "step":
                    assert float(merged[pid][key]) == float(value)
                else:
                    torch.testing.assert_close(merged[pid][key], value)


def test_zero_redundancy_optimizer_with_fused_adamw():
    """ZeroRedundancyOptimizer(optimizer_class=fusedclr.AdamW) under DDP == one process,
    and its consolidated state_dict is torch's."""
    _run(_zero_worker)


def _zero_resume_worker(rank: int) -> None:
    import copy

    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build(seed):
        ddp = DDP(_model(seed))
        return ddp, ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=fusedclr.AdamW, **OPTIONS["AdamW"])

    def train(ddp, opt, steps):
        for step in steps:
            opt.zero_grad()
            _loss(ddp, *_batch(step), rank).backward()
            opt.step()

    ddp, opt = build(0)
    train(ddp, opt, range(2))
    for to in range(WORLD):  # every rank gets the whole checkpoint
        opt.consolidate_state_dict(to=to)
        if rank == to:
            ckpt = copy.deepcopy({"model": ddp.module.state_dict(), "optim": opt.state_dict()})
    at_save = [p.detach().clone() for p in ddp.parameters()]
    train(ddp, opt, range(2, STEPS))
    assert all(not torch.equal(p, s) for p, s in zip(ddp.parameters(), at_save)), "nothing trained"

    fresh, fresh_opt = build(123)
    fresh.module.load_state_dict(ckpt["model"])
    # ZeroRedundancyOptimizer assigns its shard's entries to optimizer.state[param] itself.
    fresh_opt.load_state_dict(ckpt["optim"])
    train(fresh, fresh_opt, range(2, STEPS))
    _assert_params_match(ddp.module, fresh.module)


def test_zero_redundancy_optimizer_resumes_from_its_state_dict():
    """ZeroRedundancyOptimizer.load_state_dict writes each shard's states into optimizer.state[param];
    those writes reach fusedclr's flat buffers, so the resumed run is the uninterrupted one."""
    _run(_zero_resume_worker)
