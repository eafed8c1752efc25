"""Pieces of the Triton walk (fusedclr/triton/_walk.py): math-type helpers, the
chunk walk, the precision opt-ins' loads and stores, and the launch config.

[note: triton launch layout]
One program per row of the chunk table (segment, begin, end). A program reads
its row, evaluates the schedule and its segment's per-step scalars (step count,
bias corrections) once, then walks its element range in BLOCK tiles. The chunk
table bounds every program's work (the bucket splits segments into chunks of at
most 8192 elements on GPUs, 16384 on CPUs), so there is no per-element segment
search and no Python loop over parameters: one launch covers the whole flat
buffer whatever the number of tensors.

Tiles start at multiples of ALIGN elements and the range's unaligned head and
tail (empty for a bucket's table, whose segments are padded to ALIGN) go
through one extra masked tile of 2 * ALIGN lanes. The aligned bounds are
computed as ``(x // ALIGN) * ALIGN``, which Triton's axis analysis sees as
divisible by ALIGN, so the main loop can use vector loads even though the
offsets come from a tensor: compiled for sm_90 with Triton 3.8 (on a CPU-only
machine), a loop over ``range(begin, end, BLOCK)`` emits ``ld.global.b32`` and
the aligned loop ``ld.global.v4.b32`` / ``st.global.v4.b32``
(tests/test_triton.py::test_kernels_compile_for_sm90 keeps it so).

[note: triton host scalars]
The op's float ``options`` (beta2, eps, weight_decay, dampening, ...) are
``tl.constexpr``: the walk's ``OPT0`` to ``OPT4``. As runtime arguments they
would be typed fp32 (by Triton's launcher and by Inductor for user kernels)
while the interpreter keeps a Python double, and torch uses them in double
(``1 - beta2 ** step``): three answers. As constexprs they are exact doubles on
every path and fold into the kernel (the policies compute with them in float64,
then cast, as the C++ ``scalars`` do); a kernel is compiled per distinct value,
which a param group rarely changes (a sweep compiles one per point). lr and momentum / beta1, which schedules move
every step, stay on the device (``hyper``, ``schedule``), so they never
recompile anything.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ALIGN: tl.constexpr = tl.constexpr(16)

# Block sizes for the interpreter, where a tile is a numpy array and a large
# one only adds masked work to small test buffers.
INTERPRET_BLOCK = 256
GPU_BLOCK = 1024
# Lanes per program of the step-counter kernel, _walk._advance_kernel (a bucket has one segment per parameter).
ADVANCE_BLOCK = 256


def interpreting() -> bool:
    """Whether ``@triton.jit`` currently builds interpreted kernels (TRITON_INTERPRET)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def update_launch() -> dict[str, int]:
    """BLOCK and num_warps of the update kernels.

    Not autotuned: the kernels write the parameters through addresses read from
    the segment table, which Triton's autotuner could not restore between the
    timed runs of its configs (it restores only tensor arguments), so timing a
    config would step the parameters. One config, as measured for the chunk
    size (8192 elements per program on GPUs): 1024 elements and 4 warps per
    tile. The interpreter gets smaller tiles (a tile is a numpy array there).
    """
    if interpreting():
        return {"BLOCK": INTERPRET_BLOCK, "num_warps": 4}
    return {"BLOCK": GPU_BLOCK, "num_warps": 4}


@triton.jit
def to_math(x, MATH_F64: tl.constexpr):
    """``x`` in the math type: float64 for float64 buffers, float32 otherwise."""
    if MATH_F64:
        out = x.to(tl.float64)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def div(a, b, MATH_F64: tl.constexpr):
    """IEEE division: Triton's ``/`` is an approximate division for float32 on GPUs."""
    if MATH_F64:
        out = a / b
    else:
        out = tl.math.div_rn(a, b)
    return out


@triton.jit
def sqrt(x, MATH_F64: tl.constexpr):
    """IEEE square root (``tl.sqrt`` is approximate for float32 on GPUs)."""
    if MATH_F64:
        out = tl.sqrt(x)
    else:
        out = tl.sqrt_rn(x)
    return out


@triton.jit
def _bf16_rtne(x):
    """float32 -> bfloat16, rounding to nearest even by hand (c10::BFloat16's algorithm).

    The same bits as the GPUs' ``cvt.rn.bf16.f32``; done by hand because
    Triton's interpreter truncates in ``.to(tl.bfloat16)``, which would make CI
    disagree with GPUs and torch by an ulp on about half of the elements.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store(ptrs, x, mask):
    """Stores math-type values into a buffer of any float dtype, rounding to nearest even."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, _bf16_rtne(x.to(tl.float32)), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


# [note: precision opt-ins] (csrc/include/fusedclr/precision.h): how the
# parameter is written, a constexpr of the update kernels. Same values as
# fusedclr::ParamWrite.
WRITE_ROUND = 0
WRITE_MASTER = 1
WRITE_STOCHASTIC = 2


@triton.jit
def _mix32(x):
    """``fusedclr::mix32`` on uint32 tensors (multiplication wraps modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def rounding_key(sr_seed, step):
    """``fusedclr::rounding_key``: the per-(seed, step) key of the stochastic-rounding hash.

    ``sr_seed`` arrives reduced modulo 2**32 (the launchers' ``_seed_bits``); the
    int64 ``step`` is truncated to its low 32 bits, as C++'s cast does.
    """
    step_bits = step.to(tl.uint32) * tl.full([], 0x9E3779B9, tl.uint32)
    return _mix32(sr_seed.to(tl.uint32) ^ _mix32(step_bits))


@triton.jit
def write_key(sr_seed, step, WRITE: tl.constexpr):
    """The stochastic-rounding key of a program's segment, computed only when it is used."""
    if WRITE == 2:
        key = rounding_key(sr_seed, step)
    else:
        key = 0
    return key


@triton.jit
def _round_stochastic(x, key, idx):
    """float32 -> bfloat16 rounded stochastically, bit for bit ``fusedclr::round_stochastic``."""
    bits = x.to(tl.uint32, bitcast=True)
    noise = _mix32(key ^ idx.to(tl.uint32)) >> 16
    up = ((bits + noise) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, _bf16_rtne(x), up)


@triton.jit
def load_param(param_ptr, master_ptr, idx, mask, WRITE: tl.constexpr, MATH_F64: tl.constexpr):
    """The parameters as math values: under master weights the master, unless the parameter
    no longer holds its rounding (written outside the optimizer)."""
    p = to_math(tl.load(param_ptr + idx, mask=mask), MATH_F64)
    if WRITE == 1:
        master = tl.load(master_ptr + idx, mask=mask)
        if param_ptr.dtype.element_ty == tl.bfloat16:
            rounded = _bf16_rtne(master)
        else:
            rounded = master.to(param_ptr.dtype.element_ty)
        p = tl.where(rounded.to(tl.float32) == p, master, p)
    return p


@triton.jit
def store_param(param_ptr, master_ptr, idx, mask, p, key, WRITE: tl.constexpr):
    """Stores updated math values as parameters (and masters), as ``fusedclr::write_param``."""
    if WRITE == 1:
        tl.store(master_ptr + idx, p, mask=mask)
    if WRITE == 2:
        tl.store(param_ptr + idx, _round_stochastic(p, key, idx), mask=mask)
    else:
        store(param_ptr + idx, p, mask)


@triton.jit
def chunk_row(chunks_ptr, segments_ptr, found_inf_ptr, PARAM_DTYPE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """(segment, begin, end, param pointer, grad pointer) of this program's chunk.

    The pointers come from the segment table [note: segment table], shifted back by
    the segment's state offset so that ``ptr + idx`` addresses element ``idx`` of the
    state layout. ``end = begin`` when the segment must not move (no gradient, or
    ``found_inf`` set); a missing gradient then points at the parameter, so that no
    address computed here is null.
    """
    row = chunks_ptr + tl.program_id(0).to(tl.int64) * 3
    seg = tl.load(row)
    begin = tl.load(row + 1)
    end = tl.load(row + 2)
    entry = segments_ptr + seg * 4
    param_addr = tl.load(entry)
    grad_addr = tl.load(entry + 1)
    offset = tl.load(entry + 2)
    end = tl.where(grad_addr != 0, end, begin)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, begin)
    grad_addr = tl.where(grad_addr != 0, grad_addr, param_addr)
    param_ptr = param_addr.to(tl.pointer_type(PARAM_DTYPE), bitcast=True) - offset
    grad_ptr = grad_addr.to(tl.pointer_type(PARAM_DTYPE), bitcast=True) - offset
    return seg, begin, end, param_ptr, grad_ptr


@triton.jit
def aligned_bounds(begin, end):
    """[lo, hi): the ALIGN-aligned part of [begin, end) (empty when lo >= hi)."""
    lo = ((begin + (ALIGN - 1)) // ALIGN) * ALIGN
    hi = (end // ALIGN) * ALIGN
    return lo, hi


@triton.jit
def edge_lanes(begin, end, lo, hi):
    """Indices and mask of the unaligned head [begin, min(lo, end)) and tail [max(lo, hi), end)."""
    lane = tl.arange(0, 2 * ALIGN)
    head = lane < ALIGN
    idx = tl.where(head, begin + lane, tl.maximum(hi, lo) + lane - ALIGN)
    mask = tl.where(head, idx < tl.minimum(lo, end), idx < end)
    return idx, mask


@triton.jit
def _loop_bound_probe_kernel(n_ptr, out_ptr):
    """Counts ``range(0, n)`` with ``n`` loaded from memory: the loop shape of every kernel
    here, whose bounds come from the chunk table (see :func:`interpreter_problem`)."""
    count = tl.full([], 0, tl.int64)
    for _ in range(0, tl.load(n_ptr)):
        count += 1
    tl.store(out_ptr, count)


def interpreter_problem() -> str:
    """Why this Triton's interpreter cannot run the kernels here, or ``""`` when it can.

    Triton 3.6's interpreter turns a loop bound loaded from memory into a
    Python int with ``int()`` of a one-element array, which NumPy >= 2.4
    refuses (triton-lang/triton#9171; Triton 3.8 runs it). Every kernel here
    loops over such bounds, so the combination fails on the first step. Asked
    once, by running a one-program probe through the interpreter.
    """
    import torch

    n = torch.tensor([3], dtype=torch.int64)
    out = torch.zeros(1, dtype=torch.int64)
    try:
        _loop_bound_probe_kernel[(1,)](n, out)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the answer
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run loops whose bounds are loaded from "
                f"memory with NumPy {numpy.__version__} ({type(exc).__name__}: {exc}); this is "
                "triton-lang/triton#9171, fixed in later Triton. Use Triton >= 3.8 or NumPy < 2.4 for the "
                "interpreter")
    if int(out.item()) != 3:
        return f"Triton {triton.__version__}'s interpreter ran range(0, 3) {int(out.item())} times"
    return ""
