"""Optimizers, dtypes, schedules, the bytes a step moves, and :class:`Case`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .shapes import Shape, numel_of, shape_list


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """One optimizer configuration, named on the command line."""

    torch_class: str
    kwargs: dict[str, Any]
    states: int  # per-element state tensors read and written every step
    lr: float
    momentum: bool  # whether OneCycleLR cycles its momentum (SGD momentum or Adam beta1)


OPTIMS: dict[str, OptimSpec] = {
    "adamw": OptimSpec("AdamW", {"weight_decay": 1e-2}, 2, 1e-3, True),
    "adam": OptimSpec("Adam", {}, 2, 1e-3, True),
    "adamw-amsgrad": OptimSpec("AdamW", {"weight_decay": 1e-2, "amsgrad": True}, 3, 1e-3, True),
    "sgd": OptimSpec("SGD", {"momentum": 0.9}, 1, 1e-2, True),
    "sgd-plain": OptimSpec("SGD", {"momentum": 0.0}, 0, 1e-2, False),
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCHEDULES = ("constant", "onecycle")
# Long enough that no run steps past the end of the cycle (OneCycleLR raises there).
ONECYCLE_TOTAL_STEPS = 10**9


def bytes_per_param(optim: str, param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """Bytes one parameter element moves per step: the roofline of docs/DESIGN.md section 4.

    The parameter is read and written, the gradient read, and every state
    tensor read and written: ``2 p + g + 2 s x states``. This gives docs/DESIGN.md's
    table: SGD 12, SGD momentum 20, Adam/AdamW 28 (+8 amsgrad) at fp32; 22 for
    bf16 parameters and gradients with fp32 moments; 14 with bf16 moments (what
    ``torch.optim`` keeps for bf16 parameters).
    """
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    return 3 * p + 2 * s * OPTIMS[optim].states


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked configuration; every provider runs it."""

    optim: str
    shape: str
    dtype: str
    schedule: str
    device: str = "cpu"

    @property
    def shapes(self) -> list[Shape]:
        return shape_list(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return numel_of(self.shapes)

    @property
    def label(self) -> str:
        return f"{self.optim} {self.shape} {self.dtype} {self.schedule} {self.device}"

    @property
    def copy_bytes(self) -> int:
        """Bytes a step of this case moves with fp32 states: the copy yardstick's size."""
        return self.numel * bytes_per_param(self.optim, self.torch_dtype, torch.float32)
