"""fusedclr: fused single-launch optimizer steps with in-kernel LR/momentum schedules.

Drop-in ``torch.optim`` replacements (:class:`SGD`, :class:`Adam`,
:class:`AdamW`, :class:`RMSprop`, :class:`Adagrad`, :class:`RAdam`,
:class:`NAdam`), plus :class:`Lion` and the :class:`Lookahead` wrapper, that
keep each param group's optimizer states in flat buffers and update them in
one kernel launch per (group, device, dtype),
with the learning rate and momentum evaluated inside the kernel from
:mod:`fusedclr.lr_scheduler` schedules.
"""

from __future__ import annotations

import importlib
from typing import Any

from fusedclr import reference
from fusedclr.ops import extension_available
from fusedclr.optim import SGD, Adagrad, Adam, AdamW, Lion, Lookahead, NAdam, RAdam, RMSprop

__version__ = "0.1.0"

# The tuning workflow pulls in plotting and progress bars: load it on first use.
_LAZY = {
    "lr_find": "fusedclr.lr_finder",
    "LRFinderResult": "fusedclr.lr_finder",
    "scale_lr": "fusedclr.tuning",
    "sweep": "fusedclr.tuning",
}

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Lion",
    "Lookahead",
    "NAdam",
    "RAdam",
    "RMSprop",
    "extension_available",
    "lr_scheduler",
    "reference",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name == "lr_scheduler":
        return importlib.import_module("fusedclr.lr_scheduler")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusedclr' has no attribute {name!r}")
