"""The benchmarked shape lists: ``n tensors x numel`` families and two model-shaped lists."""

from __future__ import annotations

import math
from collections.abc import Sequence


Shape = tuple[int, ...]
K, M = 1 << 10, 1 << 20


def resnet50_shapes() -> list[Shape]:
    """Parameter shapes of torchvision's ResNet-50 (161 tensors, 25,557,032 elements).

    Written from the architecture: a 7x7 stem, bottleneck stages of
    (3, 4, 6, 3) blocks of widths (64, 128, 256, 512) with expansion 4, a
    projection shortcut in each stage's first block, batch-norm weight and
    bias after every convolution, and a 1000-way classifier.
    """
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_small_shapes() -> list[Shape]:
    """Parameter shapes of GPT-2 small (148 tensors, 124,439,808 elements; LM head tied to wte).

    Vocabulary 50257, 1024 positions, 12 layers of width 768 with a fused
    QKV projection (Conv1D layout, in x out), a 4x MLP and pre-LayerNorms.
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


# docs/DESIGN.md section 4: n tensors x elements each, then the two model-shaped lists.
SHAPES: dict[str, list[Shape]] = {
    "10000x64": [(64,)] * 10000,
    "2000x1024": [(1024,)] * 2000,
    "200x1M": [(M,)] * 200,
    "10x16M": [(16 * M,)] * 10,
    "resnet50": resnet50_shapes(),
    "gpt2-small": gpt2_small_shapes(),
}
# Not in a default run, named with --shapes: a mid-size list (26.2M elements, 100 MiB per fp32 buffer:
# far beyond the CPU's caches) small enough that all four providers of a case sample in turns (2 GiB).
EXTRA_SHAPES: dict[str, list[Shape]] = {
    "100x256K": [(256 * K,)] * 100,
}
# The "n tensors x numel" lists (docs/DESIGN.md's and the quick ones), as opposed to model-shaped lists.
SHAPES_NXM = frozenset({"10000x64", "2000x1024", "200x1M", "10x16M", "128x64", "4x256K", "100x256K"})
# Over 100M elements: seconds per step and gigabytes per provider on a laptop-class CPU.
BIG_SHAPES = frozenset({"200x1M", "10x16M", "gpt2-small"})
# `--quick`: the same two regimes (many small tensors, few large ones), scaled
# down so that the whole run takes seconds on 2 cores.
QUICK_SHAPES: dict[str, list[Shape]] = {
    "128x64": [(64,)] * 128,
    "4x256K": [(256 * K,)] * 4,
}


def shape_list(name: str) -> list[Shape]:
    """The shape list called ``name`` in :data:`SHAPES`, :data:`QUICK_SHAPES` or :data:`EXTRA_SHAPES`."""
    for table in (SHAPES, QUICK_SHAPES, EXTRA_SHAPES):
        if name in table:
            return table[name]
    raise ValueError(f"unknown shape {name!r}; choose from "
                     f"{sorted(SHAPES) + sorted(QUICK_SHAPES) + sorted(EXTRA_SHAPES)}")


def numel_of(shapes: Sequence[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)
