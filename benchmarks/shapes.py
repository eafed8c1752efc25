"""Shape lists of the benchmark suite, as pytest parameters.

The lists themselves live in :mod:`fusedclr.bench` (docs/DESIGN.md section 4's
``n x numel`` lists, a ResNet-50-like and a GPT-2-small-like list), shared with
``fusedclr bench``; this module only marks the big ones, so that a quick run
deselects them with ``-m "not big"``.
"""

from __future__ import annotations

import pytest

from fusedclr.bench import BIG_SHAPES, SHAPES, gpt2_small_shapes, resnet50_shapes

__all__ = ["BIG_SHAPES", "SHAPES", "gpt2_small_shapes", "resnet50_shapes", "shape_params"]


def shape_params() -> list:
    """Every shape name of :data:`SHAPES`, those of :data:`BIG_SHAPES` marked ``big``."""
    return [pytest.param(name, id=name, marks=[pytest.mark.big] if name in BIG_SHAPES else []) for name in SHAPES]
