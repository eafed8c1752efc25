"""Optimizers, dtypes, schedules, the bytes a step moves, and :class:`Case`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .shapes import Shape, numel_of, shape_list


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """One optimizer configuration, named on the command line."""

    torch_class: str  # the torch.optim class, and fusedclr's class of the same name
    kwargs: dict[str, Any]
    states: int  # per-element state tensors read and written every step
    lr: float
    momentum: bool  # whether OneCycleLR cycles its momentum (SGD/RMSprop momentum or beta1)
    # Lookahead (k, alpha) around the optimizer: slow weights, one more per-element state,
    # read and written (with the parameter) every k-th step only.
    lookahead: tuple[int, float] | None = None


OPTIMS: dict[str, OptimSpec] = {
    "adamw": OptimSpec("AdamW", {"weight_decay": 1e-2}, 2, 1e-3, True),
    "adam": OptimSpec("Adam", {}, 2, 1e-3, True),
    "adamw-amsgrad": OptimSpec("AdamW", {"weight_decay": 1e-2, "amsgrad": True}, 3, 1e-3, True),
    "sgd": OptimSpec("SGD", {"momentum": 0.9}, 1, 1e-2, True),
    "sgd-plain": OptimSpec("SGD", {"momentum": 0.0}, 0, 1e-2, False),
    # torch's defaults (and default lr) unless said otherwise.
    "rmsprop": OptimSpec("RMSprop", {}, 1, 1e-2, False),  # square_avg (no momentum, not centered)
    "adagrad": OptimSpec("Adagrad", {}, 1, 1e-2, False),  # sum; no momentum for OneCycleLR to cycle
    "radam": OptimSpec("RAdam", {}, 2, 1e-3, True),
    "nadam": OptimSpec("NAdam", {}, 2, 2e-3, True),  # + mu_product, one scalar per tensor (not counted)
    # Lion's paper advises a weight decay 3-10x AdamW's: 0.1 (a zero would skip the decay pass).
    "lion": OptimSpec("Lion", {"betas": (0.9, 0.99), "weight_decay": 0.1}, 1, 1e-4, True),
    "lookahead": OptimSpec("AdamW", {"weight_decay": 1e-2}, 2, 1e-3, True, lookahead=(5, 0.5)),
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCHEDULES = ("constant", "onecycle")
# Long enough that no run steps past the end of the cycle (OneCycleLR raises there).
ONECYCLE_TOTAL_STEPS = 10**9


def bytes_per_param(optim: str, param_dtype: torch.dtype, state_dtype: torch.dtype) -> int | float:
    """Bytes one parameter element moves per step: the roofline of docs/DESIGN.md section 4.

    The parameter is read and written, the gradient read, and every state
    tensor read and written: ``2 p + g + 2 s x states``. This gives docs/DESIGN.md's
    table: SGD 12, SGD momentum 20, Adam/AdamW 28 (+8 amsgrad) at fp32; 22 for
    bf16 parameters and gradients with fp32 moments; 14 with bf16 moments (what
    ``torch.optim`` keeps for bf16 parameters). Lookahead adds its slow weights'
    synchronisation, ``(2 p + 2 s) / k`` per step (the parameter and the slow
    weights read and written every k-th step): 28 + 16/5 = 31.2 at fp32, k = 5.
    :data:`BYTES_TABLE` lists every optimizer's numbers.
    """
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    spec = OPTIMS[optim]
    moved = 3 * p + 2 * s * spec.states
    if spec.lookahead is None:
        return moved
    return moved + (2 * p + 2 * s) / spec.lookahead[0]


def _bytes_table() -> dict[str, dict[str, int | float]]:
    f32, bf16 = torch.float32, torch.bfloat16
    return {name: {"states": spec.states + (spec.lookahead is not None),
                   "fp32": bytes_per_param(name, f32, f32),
                   "bf16_fp32_states": bytes_per_param(name, bf16, f32),
                   "bf16_bf16_states": bytes_per_param(name, bf16, bf16)}
            for name, spec in OPTIMS.items()}


# Bytes per parameter element per step of every optimizer (docs/benchmarks.md prints it):
# per-element states, then fp32, bf16 params with fp32 states (fusedclr), bf16 with bf16 states (torch).
BYTES_TABLE: dict[str, dict[str, int | float]] = _bytes_table()


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
        return int(self.numel * bytes_per_param(self.optim, self.torch_dtype, torch.float32))
