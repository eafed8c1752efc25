"""fusedclr under the frameworks people train with: Hugging Face Trainer, accelerate,
Lightning and timm's schedulers (docs/integrations.md).

Each test runs the same tiny model on the same synthetic data twice through the
framework, once with fusedclr's optimizer (and scheduler) and once with
torch.optim's, and compares every parameter after the run at fp32's
tolerances: the framework must not be able to tell them apart. Learning rates
are large enough that an lr off by 1% moves the parameters far outside the
tolerance. A framework that is not installed skips its tests (the
``integrations`` extra installs them all).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from torch import nn

import fusedclr
import fusedclr.lr_scheduler

FP32 = TOL[torch.float32]
IN, HIDDEN, CLASSES = 8, 16, 3


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def synthetic(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name].detach(), pb[name].detach(), **FP32, msg=lambda m: f"{name}: {m}")


def assert_moved(before: nn.Module, after: nn.Module) -> None:
    """The run trained: every parameter moved well beyond the comparison's tolerance."""
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters()):
        assert (p1.detach() - p0.detach()).abs().max() > 100 * FP32["atol"], name


def shares_storage(opt_cls: Callable = fusedclr.SGD) -> bool:
    """Whether fusedclr's optimizers make a model's parameters views of one storage."""
    model = tiny_model()
    opt_cls(model.parameters(), lr=0.1)
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return len(ptrs) < len(list(model.parameters()))


# --------------------------------------------------------------------------
# timm: CosineLRScheduler with warm-up driving a fusedclr optimizer
# --------------------------------------------------------------------------


def _timm_run(opt_cls: type, steps: int = 12) -> nn.Module:
    from timm.scheduler import CosineLRScheduler

    model = tiny_model()
    opt = opt_cls(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=1e-3, warmup_t=4, warmup_lr_init=5e-3,
                              t_in_epochs=False)
    x, y = synthetic()
    for i in range(steps):
        xb, yb = x[(i * 16) % 64:][:16], y[(i * 16) % 64:][:16]
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        sched.step_update(num_updates=i + 1)
    return model


def test_timm_cosine_scheduler_with_warmup():
    pytest.importorskip("timm")
    fused, ref = _timm_run(fusedclr.SGD), _timm_run(torch.optim.SGD)
    assert_moved(tiny_model(), ref)
    assert_same_params(fused, ref)


# --------------------------------------------------------------------------
# accelerate: prepare, accumulate, clip_grad_norm_, save_state / load_state
# --------------------------------------------------------------------------


@pytest.fixture
def accelerate_state():
    """Skips without accelerate; leaves its process-wide state as it found none."""
    pytest.importorskip("accelerate")
    yield
    _reset_accelerate()


def _reset_accelerate() -> None:
    """accelerate keeps one process-wide state (it remembers the accumulation steps): each
    run starts from a fresh one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _accelerate_run(fused: bool, steps: int, *, save_at: tuple[int, Path] | None = None,
                    load: Path | None = None) -> nn.Module:
    """``steps`` optimizer steps of 2 accumulated batches each (one epoch is 4 steps);
    ``save_at=(k, folder)`` saves the whole state after step k; ``load`` loads one first."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _reset_accelerate()
    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_model()
    optim = fusedclr.AdamW if fused else torch.optim.AdamW
    scheds = fusedclr.lr_scheduler if fused else torch.optim.lr_scheduler
    opt = optim(model.parameters(), lr=0.02, weight_decay=1e-2)
    sched = scheds.OneCycleLR(opt, max_lr=0.02, total_steps=16)
    x, y = synthetic()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    if load is not None:
        accelerator.load_state(str(load))
    done = 0
    while done < steps:
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(xb), yb))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 0.3)
                opt.step()
                sched.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                done += 1
                if save_at is not None and done == save_at[0]:
                    accelerator.save_state(str(save_at[1]))
                if done == steps:
                    break
    return accelerator.unwrap_model(model)


def test_accelerate_prepare_accumulate_and_clip(accelerate_state):
    fused, ref = _accelerate_run(True, steps=8), _accelerate_run(False, steps=8)
    assert_moved(tiny_model(), ref)
    assert_same_params(fused, ref)


def test_accelerate_save_state_load_state_round_trip(accelerate_state, tmp_path):
    """save_state writes the model with safetensors by default, which refuses tensors that
    share storage: the parameters stay the model's own (the segment table), so it round-trips."""
    assert not shares_storage()
    straight = _accelerate_run(True, steps=8, save_at=(4, tmp_path / "ckpt"))
    # Step 4 ends an epoch, so the resumed run's fresh loader meets the same batches.
    resumed = _accelerate_run(True, steps=4, load=tmp_path / "ckpt")
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    assert_same_params(resumed, _accelerate_run(False, steps=8))


# --------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------


class _Classifier(nn.Module):
    """What Trainer expects of a model: keyword inputs, a loss in the output when given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = synthetic()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _trainer(tmp: Path, *, model: nn.Module | None = None, max_steps: int = 8, save_steps: int | None = None,
             **kwargs):
    """A Trainer on CPU: 8 rows a batch, 2 batches accumulated per step (4 steps an epoch),
    gradients clipped at 0.3 (their norms are 0.5-0.75), no logging, no evaluation, saving only when asked."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp), max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_grad_norm=0.3, learning_rate=0.02, weight_decay=1e-2, warmup_steps=2, lr_scheduler_type="linear",
        use_cpu=True, seed=0, data_seed=0, report_to=[], logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    return Trainer(model=model if model is not None else _Classifier(), args=args, train_dataset=_Rows(), **kwargs)


def test_trainer_optimizers_argument(tmp_path):
    """``Trainer(optimizers=(optimizer, scheduler))`` with fusedclr's AdamW and in-kernel OneCycleLR."""
    pytest.importorskip("transformers")

    def run(optim: type, scheds) -> nn.Module:
        model = _Classifier()
        opt = optim(model.parameters(), lr=0.02, weight_decay=1e-2)
        sched = scheds.OneCycleLR(opt, max_lr=0.02, total_steps=8)
        _trainer(tmp_path / optim.__module__, model=model, optimizers=(opt, sched)).train()
        return model

    fused = run(fusedclr.AdamW, fusedclr.lr_scheduler)
    ref = run(torch.optim.AdamW, torch.optim.lr_scheduler)
    assert_moved(_Classifier(), ref)
    assert_same_params(fused, ref)


def test_trainer_optimizer_cls_and_kwargs_with_its_own_scheduler(tmp_path):
    """Trainer builds the optimizer from the class, and its own linear warm-up schedule
    (torch's LambdaLR, writing ``group["lr"]``) around it."""
    pytest.importorskip("transformers")

    def run(optim: type) -> nn.Module:
        trainer = _trainer(tmp_path / optim.__module__, optimizer_cls_and_kwargs=(optim, {"weight_decay": 1e-2}))
        trainer.train()
        assert type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)) is optim
        return trainer.model

    fused, ref = run(fusedclr.AdamW), run(torch.optim.AdamW)
    assert_moved(_Classifier(), ref)
    assert_same_params(fused, ref)


def test_trainer_resumes_bit_exactly_from_a_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    kwargs = {"optimizer_cls_and_kwargs": (fusedclr.AdamW, {"weight_decay": 1e-2})}
    straight = _trainer(tmp_path / "run", save_steps=4, **kwargs)
    straight.train()
    resumed = _trainer(tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    for (name, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(a, b), name
    ref = _trainer(tmp_path / "torch", optimizer_cls_and_kwargs=(torch.optim.AdamW, {"weight_decay": 1e-2}))
    ref.train()
    assert_same_params(resumed.model, ref.model)


# --------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------


def _lightning_module(optim: type, scheds, *, backbone: bool = False):
    """A LightningModule over the tiny model: SGD with momentum and a per-step CyclicLR with
    cyclical momentum from ``scheds`` (None: no scheduler). ``backbone``: split into ``backbone`` and ``head`` for BackboneFinetuning,
    optimizing only what is trainable when the optimizer is built."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            net = tiny_model()
            if backbone:
                self.backbone, self.head = net[:2], net[2]
            else:
                self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x)) if backbone else self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            opt = optim([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
            if scheds is None:
                return opt
            sched = scheds.CyclicLR(opt, base_lr=0.005, max_lr=0.05, step_size_up=3, cycle_momentum=True)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Module()


def _lightning_fit(module, *, max_steps: int, callbacks=(), ckpt_path: str | None = None,
                   same_batches: bool = False) -> None:
    """Fits on the synthetic rows, 16 a batch (4 steps an epoch), on the CPU, quietly;
    ``same_batches``: the first 16 rows four times, so that every batch is the same."""
    import lightning as L

    x, y = synthetic()
    if same_batches:
        x, y = x[:16].repeat(4, 1), y[:16].repeat(4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Lightning adds a ModelCheckpoint writing to ./checkpoints unless told not to.
    saving = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=saving, callbacks=list(callbacks), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)


@pytest.fixture
def lightning():
    pytest.importorskip("lightning")
    import logging

    # Lightning prints its hardware summary and tips at INFO on every fit.
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def test_lightning_configure_optimizers_with_a_per_step_schedule(lightning):
    fused = _lightning_module(fusedclr.SGD, fusedclr.lr_scheduler)
    ref = _lightning_module(torch.optim.SGD, torch.optim.lr_scheduler)
    for module in (fused, ref):
        _lightning_fit(module, max_steps=10)
    assert_moved(tiny_model(), ref.net)
    assert_same_params(fused, ref)


def test_lightning_model_checkpoint_resume(lightning, tmp_path):
    """Resumed from ModelCheckpoint's end-of-epoch file, the run ends where the uninterrupted
    one does, bit for bit. Lightning 2.6 resumes such a file as batch 4 of epoch 0 with a
    fresh loader (it replays the epoch's first batch), so every batch is made the same: the
    test is about the optimizer's and the schedule's state, not Lightning's data position."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = _lightning_module(fusedclr.SGD, fusedclr.lr_scheduler)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    _lightning_fit(straight, max_steps=8, callbacks=[saver], same_batches=True)
    first_epoch = tmp_path / "epoch=0-step=4.ckpt"
    assert first_epoch.exists(), sorted(p.name for p in tmp_path.iterdir())
    resumed = _lightning_module(fusedclr.SGD, fusedclr.lr_scheduler)
    _lightning_fit(resumed, max_steps=8, ckpt_path=str(first_epoch), same_batches=True)
    assert resumed.trainer.global_step == 8
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.equal(a, b), name
    ref = _lightning_module(torch.optim.SGD, torch.optim.lr_scheduler)
    _lightning_fit(ref, max_steps=8, same_batches=True)
    assert_moved(tiny_model(), ref.net)
    assert_same_params(resumed, ref)


def _backbone_finetuning():
    from lightning.pytorch.callbacks import BackboneFinetuning

    return BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5,
                              backbone_initial_ratio_lr=0.1, should_align=True, train_bn=False)


def test_lightning_backbone_finetuning_without_a_scheduler(lightning):
    """BackboneFinetuning unfreezes the backbone at epoch 1 with ``add_param_group`` and then
    sets that group's lr at every epoch start: fusedclr's new group follows, as torch's does."""

    def run(optim: type):
        module = _lightning_module(optim, None, backbone=True)
        _lightning_fit(module, max_steps=12, callbacks=[_backbone_finetuning()])
        assert len(module.trainer.optimizers[0].param_groups) == 2 and module.trainer.global_step == 12
        return module

    fused, ref = run(fusedclr.SGD), run(torch.optim.SGD)
    assert_moved(tiny_model()[:2], ref.backbone)
    assert_same_params(fused, ref)


def test_lightning_backbone_finetuning_adds_a_group_to_a_scheduled_optimizer(lightning):
    """With a scheduler, as torch 2.14 is the spec: its schedulers refuse a param group they
    were not built with, so the first scheduler step after the unfreeze raises ValueError
    (a strict zip over the groups). fusedclr's scheduler raises the same error at the same
    point, after an optimizer step that updated the new group with its own lr: the parameters
    there, the backbone's included, are torch's."""

    def run(optim: type, scheds):
        module = _lightning_module(optim, scheds, backbone=True)
        with pytest.raises(ValueError, match="zip"):
            _lightning_fit(module, max_steps=12, callbacks=[_backbone_finetuning()])
        assert len(module.trainer.optimizers[0].param_groups) == 2 and module.trainer.global_step == 5
        return module

    fused = run(fusedclr.SGD, fusedclr.lr_scheduler)
    ref = run(torch.optim.SGD, torch.optim.lr_scheduler)
    assert not torch.equal(ref.backbone[0].weight, tiny_model()[0].weight)
    assert_moved(tiny_model()[2], ref.head)
    assert_same_params(fused, ref)
