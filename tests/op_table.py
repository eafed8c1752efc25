"""The op-level optimizer table, and the buckets it steps.

One row per math policy of ``fusedclr::step_`` (csrc/include/fusedclr/
optimizers/*.h, ``fusedclr.reference.POLICIES``): its state buffers and option
list in the policy's order, which states an option set leaves out, the option
sets that select different kernel variants (compile-time bits of the policy,
or a leaner variant that ``refine`` picks at run time), whether it keeps a
per-segment scalar (NAdam's mu_product) and whether it advances the step
counters and reads the gradient (Lookahead does neither). :meth:`Optimizer.args`
builds ``step_``'s arguments for a :class:`Bucket`, for the compiled ops (the
segment table) and for the reference (its :class:`fusedclr.reference.Segments`).

tests/test_op_parity.py drives every backend against the reference from this
table; tests/test_op_errors.py feeds every backend the same bad calls. Adding
an optimizer to the kernels means adding its row here.

A :class:`Bucket` is what fusedclr.optim._flat builds, by hand and following
the contract of csrc/ops.cpp [note: step contract]: separate parameter and
gradient tensors (ragged sizes, views at odd element offsets of one shared
tensor, a transposed 2-D one, an empty one) behind a segment table [note:
segment table], flat state buffers with each segment at an ALIGN-aligned
offset, and a chunk table of (segment, begin, end) rows covering each
segment's elements (not the padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fusedclr import reference
from fusedclr.optim._flat import ALIGN

# -- the table -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One math policy as ``step_`` sees it.

    ``defaults`` holds every option, ``lr`` and ``momentum`` (``hyper``: the
    momentum, or beta1 for the Adam family and Lion) and the switches of
    optional states (``optional`` maps a state to its switch). ``sets`` are
    the option sets a parity test runs, as overrides of ``defaults``; ``full``
    names the one the feature rows (dtypes, AMP, schedules, precision opt-ins)
    run, the set that exercises most of the policy. ``state_init``: states that
    do not start at 0 (a value, or ``"param"``: a copy of the parameters).
    """

    name: str
    states: tuple[str, ...]
    options: tuple[str, ...]
    defaults: Mapping[str, float | bool]
    sets: Mapping[str, Mapping[str, float | bool]]
    full: str
    optional: Mapping[str, str] = dataclasses.field(default_factory=dict)
    state_init: Mapping[str, float | str] = dataclasses.field(default_factory=dict)
    seg_scalars: bool = False
    advances: bool = True
    uses_grad: bool = True

    def config(self, option_set: str | Mapping[str, Any]) -> dict[str, Any]:
        """``defaults`` with an option set's overrides (by name, or given)."""
        over = self.sets[option_set] if isinstance(option_set, str) else option_set
        unknown = set(over) - set(self.defaults)
        if unknown:
            raise KeyError(f"{self.name}: unknown option(s) {sorted(unknown)}")
        return {**self.defaults, **over}

    def present(self, cfg: Mapping[str, Any]) -> tuple[str, ...]:
        """The states this configuration passes (the others are None)."""
        return tuple(s for s in self.states if s not in self.optional or cfg[self.optional[s]])

    def option_list(self, cfg: Mapping[str, Any]) -> list[float]:
        return [float(cfg[o]) for o in self.options]

    def args(self, b: Bucket, cfg: Mapping[str, Any], seg: Tensor | reference.Segments, *, maximize: bool = False,
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None, sr_seed: int | None = None,
             param_dtype: torch.dtype | None = None) -> tuple:
        """``step_``'s arguments for bucket ``b``; ``seg`` is its segment table (the compiled
        ops) or its Segments (the reference)."""
        return (self.name, seg, param_dtype or b.dtype, [b.states[s] for s in self.states], b.seg_steps,
                b.seg_scalars, b.chunks, b.hyper, b.schedule, b.schedule_step, self.option_list(cfg), maximize,
                grad_scale, found_inf, b.master, sr_seed)


# Values that make every term count: updates of ~0.1 on N(0, 1) parameters (an error of 1e-4
# in a step size shows at fp32 tolerance), weight decay of ~1e-2 per step, momentum_decay
# and lr_decay that move their coefficients visibly within eight steps.
ADAM_FAMILY = {"lr": 0.1, "momentum": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "decoupled": False}

TABLE: dict[str, Optimizer] = {o.name: o for o in [
    Optimizer(
        "sgd", ("momentum_buffer",), ("dampening", "weight_decay", "nesterov"),
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "buffer": True},
        {
            "plain": {"buffer": False, "momentum": 0.0},
            "weight_decay": {"buffer": False, "momentum": 0.0, "weight_decay": 0.05},
            "momentum": {},
            "momentum_wd_dampening": {"weight_decay": 0.05, "dampening": 0.3},
            "nesterov": {"nesterov": True},
            "nesterov_wd": {"nesterov": True, "weight_decay": 0.05},
            # A buffer but momentum 0 (a schedule may get there): the buffer-free variant, buffer untouched.
            "buffer_momentum0": {"momentum": 0.0, "weight_decay": 0.05},
        },
        full="nesterov_wd", optional={"momentum_buffer": "buffer"},
    ),
    Optimizer(
        "adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ("beta2", "eps", "weight_decay", "decoupled"),
        {**ADAM_FAMILY, "amsgrad": False},
        {
            "plain": {},
            "l2": {"weight_decay": 0.05},
            "adamw": {"weight_decay": 0.05, "decoupled": True},
            "amsgrad": {"amsgrad": True},
            "amsgrad_l2": {"amsgrad": True, "weight_decay": 0.05},
            "amsgrad_adamw": {"amsgrad": True, "weight_decay": 0.05, "decoupled": True},
        },
        full="amsgrad_adamw", optional={"max_exp_avg_sq": "amsgrad"},
    ),
    Optimizer(
        "rmsprop", ("square_avg", "grad_avg", "momentum_buffer"), ("alpha", "eps", "weight_decay"),
        {"lr": 0.01, "momentum": 0.0, "alpha": 0.9, "eps": 1e-8, "weight_decay": 0.0, "centered": False,
         "buffer": False},
        {
            "plain": {},
            "weight_decay": {"weight_decay": 0.05},
            "centered": {"centered": True},
            "momentum": {"buffer": True, "momentum": 0.9},
            "centered_momentum_wd": {"centered": True, "buffer": True, "momentum": 0.9, "weight_decay": 0.05},
            "buffer_momentum0": {"buffer": True, "momentum": 0.0, "centered": True},
        },
        full="centered_momentum_wd", optional={"grad_avg": "centered", "momentum_buffer": "buffer"},
    ),
    Optimizer(
        "adagrad", ("sum",), ("lr_decay", "weight_decay", "eps"),
        {"lr": 0.1, "momentum": 0.0, "lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10},
        {"plain": {}, "wd_lr_decay": {"weight_decay": 0.05, "lr_decay": 0.1}},
        full="wd_lr_decay", state_init={"sum": 0.1},  # initial_accumulator_value
    ),
    Optimizer(
        # Eight steps cross rho_t > 5 (step 6 for beta2 = 0.999): both branches run.
        "radam", ("exp_avg", "exp_avg_sq"), ("beta2", "eps", "weight_decay", "decoupled"), ADAM_FAMILY,
        {"plain": {}, "l2": {"weight_decay": 0.05}, "decoupled": {"weight_decay": 0.05, "decoupled": True}},
        full="decoupled",
    ),
    Optimizer(
        "nadam", ("exp_avg", "exp_avg_sq"), ("beta2", "eps", "weight_decay", "decoupled", "momentum_decay"),
        {**ADAM_FAMILY, "momentum_decay": 0.3},
        {"plain": {}, "l2": {"weight_decay": 0.05}, "decoupled": {"weight_decay": 0.05, "decoupled": True}},
        full="decoupled", seg_scalars=True,
    ),
    Optimizer(
        "lion", ("exp_avg",), ("beta2", "weight_decay"),
        {"lr": 0.05, "momentum": 0.9, "beta2": 0.99, "weight_decay": 0.0},
        {"plain": {}, "weight_decay": {"weight_decay": 0.1}},
        full="weight_decay",
    ),
    Optimizer(
        # Runs after an inner step (see inner_step); k = 1 synchronises at every step.
        "lookahead", ("slow",), ("k", "alpha"), {"lr": 0.0, "momentum": 0.0, "k": 3, "alpha": 0.5},
        {"k3": {}, "k1": {"k": 1, "alpha": 0.8}},
        full="k3", state_init={"slow": "param"}, advances=False, uses_grad=False,
    ),
]}

# (optimizer, option set) rows, and ids for them.
VARIANTS = [(o.name, s) for o in TABLE.values() for s in o.sets]
NAMES = list(TABLE)


def inner_step(b: Bucket, active: Sequence[bool] | None, found_inf: Tensor | None, step: int) -> None:
    """What Lookahead's inner optimizer does before it: a plain SGD step (lr 0.1) of the active
    segments (through the master under master weights) that advances their step counts, except on
    the first step, so that Lookahead also sees step 0 (which is not a synchronisation)."""
    if found_inf is not None and float(found_inf.reshape(())) != 0:
        return
    flags = active if active is not None else [True] * len(b.params)
    for i, (p, g, o, on) in enumerate(zip(b.params, b.grads, b.offsets, flags)):
        if not on or step == 0:
            continue
        n = p.numel()
        img, grad = reference.memory_image(p), reference.memory_image(g)
        if b.master is not None:
            b.master[o : o + n] -= 0.1 * grad.float()
            img.copy_(b.master[o : o + n])
        else:
            img.sub_(0.1 * grad)
        b.seg_steps[i] += 1


# -- buckets ---------------------------------------------------------------------

BLOCK = 4096
# Ragged: not multiples of the chunk, the alignment or any vector width; a 1-element
# segment, an empty one (its empty gradient still counts a step), a chunk-sized one, one
# long enough to be split into several work items on CUDA and a 2-D one stepped transposed.
RAGGED = [3 * BLOCK + 17, 1, 64, 1000, 5, 0, BLOCK, 20001]


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The math type: where states live unless bf16 parameters keep bf16 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each segment's offset into the flat state buffers (multiples of ALIGN) and their length."""
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off += -(-n // ALIGN) * ALIGN
    return offsets, off


def placed(sizes: Sequence[int], dtype: torch.dtype, device, offset: int = 0) -> list[Tensor]:
    """Separate tensors of ``sizes`` elements, laid out as a model's parameters may be: every
    third is a view at an odd element offset of one shared tensor (segment starts off any
    alignment), a 1000-element one is a transposed 2-D tensor (dense, not contiguous), the rest
    stand alone, ``offset`` elements into their storage."""
    shared = torch.zeros(sum(n + 2 for i, n in enumerate(sizes) if i % 3 == 1) + 2, dtype=dtype, device=device)
    out, pos = [], 1
    for i, n in enumerate(sizes):
        if i % 3 == 1:
            out.append(shared[pos : pos + n])
            pos += n + (2 if (pos + n) % 2 else 1)  # the next view starts at an odd offset too
        elif n == 1000:
            out.append(torch.zeros(offset + n, dtype=dtype, device=device)[offset:].view(40, 25).t())
        else:
            out.append(torch.zeros(offset + n, dtype=dtype, device=device)[offset:])
    return out


class Bucket:
    """One bucket: parameters and gradients as separate tensors, flat states (by the table's
    state names; None where absent), step counts, per-segment scalars, chunk table, hyper,
    schedule and counter, and an fp32 master copy (or None)."""

    params: list[Tensor]
    grads: list[Tensor]
    offsets: list[int]
    total: int
    states: dict[str, Tensor | None]
    seg_steps: Tensor
    seg_scalars: Tensor | None
    chunks: Tensor
    hyper: Tensor
    schedule: Tensor
    schedule_step: Tensor
    master: Tensor | None

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def segments(self, active: Sequence[bool] | None = None) -> reference.Segments:
        """The bucket's Segments; ``active[i]`` False gives segment i a None grad."""
        grads = [g if active is None or active[i] else None for i, g in enumerate(self.grads)]
        return reference.Segments(self.params, grads, self.offsets, self.total)

    def table(self, active: Sequence[bool] | None = None) -> Tensor:
        return self.segments(active).table(self.device)

    def flat_params(self) -> Tensor:
        """The parameters gathered into the state layout (zero padding)."""
        flat = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for p, o in zip(self.params, self.offsets):
            flat[o : o + p.numel()] = reference.memory_image(p)
        return flat

    def set_grads(self, flat: Tensor) -> None:
        """Writes one step's gradients (state layout) into the gradient tensors in place."""
        for g, o in zip(self.grads, self.offsets):
            reference.memory_image(g).copy_(flat[o : o + g.numel()])

    def buffers(self) -> dict[str, Tensor]:
        """Everything a step may change: "param" (flat), each present state, the master,
        the step counts and the per-segment scalars."""
        out = {"param": self.flat_params()}
        out.update({k: v for k, v in self.states.items() if v is not None})
        for k in ("master", "seg_steps", "seg_scalars"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.buffers().items()}

    def clone(self, device=None, dtype: torch.dtype | None = None) -> Bucket:
        """An identical copy (on ``device``): its own parameter and gradient tensors with the
        same strides (in ``dtype`` if given), its own states and counters."""
        out = Bucket.__new__(Bucket)
        dev = device or self.device

        def copy(t, dt=None):
            return None if t is None else t.detach().to(device=dev, dtype=dt or t.dtype).clone()

        out.params = [copy(t, dtype) for t in self.params]
        out.grads = [copy(t, dtype) for t in self.grads]
        out.offsets, out.total = list(self.offsets), self.total
        out.states = {k: copy(v) for k, v in self.states.items()}
        for k in ("seg_steps", "seg_scalars", "chunks", "hyper", "schedule", "schedule_step", "master"):
            setattr(out, k, copy(getattr(self, k)))
        return out


def bucket(opt: Optimizer, cfg: Mapping[str, Any], sizes: Sequence[int] = RAGGED, dtype: torch.dtype = torch.float32,
           device="cpu", *, chunk: int = BLOCK, offset: int = 0, state_dtype: torch.dtype | None = None,
           master: bool = False, schedule: Sequence[float] | None = None, seed: int = 0) -> Bucket:
    """A bucket for ``opt`` under ``cfg``: N(0, 1) parameters, states at 0 (or their
    ``state_init``), ``hyper`` = [lr, momentum]. ``offset`` > 0 shifts every standalone
    tensor and every flat buffer that many elements into its storage (misaligned
    pointers: the kernels' scalar paths)."""
    offsets, total = layout(sizes)
    rows = [(seg, b, min(b + chunk, o + n)) for seg, (o, n) in enumerate(zip(offsets, sizes))
            for b in range(o, o + n, chunk)]
    gen = torch.Generator().manual_seed(seed)

    def flat(values: Tensor, dt: torch.dtype) -> Tensor:
        out = torch.zeros(total + offset, dtype=dt, device=device)[offset:]
        out.copy_(values)
        return out

    b = Bucket.__new__(Bucket)
    b.params = placed(sizes, dtype, device, offset)
    b.grads = placed(sizes, dtype, device, offset)
    b.offsets, b.total = offsets, total
    values = torch.randn(total, generator=gen, dtype=torch.float64)
    for p, o in zip(b.params, offsets):
        reference.memory_image(p).copy_(values[o : o + p.numel()])
    sdt = state_dtype or state_dtype_for(dtype)
    present = opt.present(cfg)
    b.states = {}
    for name in opt.states:
        init = opt.state_init.get(name, 0.0)
        start = b.flat_params().to(torch.float64).cpu() if init == "param" else torch.full((total,), float(init))
        b.states[name] = flat(start, sdt) if name in present else None
    b.seg_steps = torch.zeros(len(sizes), dtype=torch.int64, device=device)
    b.seg_scalars = torch.ones(len(sizes), dtype=torch.float64, device=device) if opt.seg_scalars else None
    b.chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(device)
    b.hyper = torch.tensor([float(cfg["lr"]), float(cfg["momentum"])], dtype=torch.float64, device=device)
    b.schedule = torch.tensor(reference.no_schedule() if schedule is None else schedule, dtype=torch.float64,
                              device=device)
    b.schedule_step = torch.zeros((), dtype=torch.int64, device=device)
    b.master = flat(b.flat_params().float().cpu(), torch.float32) if master else None
    return b


def gradients(b: Bucket, steps: int, seed: int = 1, scale: float = 1.0) -> list[Tensor]:
    """``steps`` flat N(0, 1) gradients (times ``scale``) on the bucket's elements, zero padding (CPU, float64)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b.total, dtype=torch.bool)
    for p, o in zip(b.params, b.offsets):
        mask[o : o + p.numel()] = True
    return [torch.where(mask, torch.randn(b.total, generator=gen, dtype=torch.float64) * scale, 0)
            for _ in range(steps)]


Plan = Callable[[int], Mapping[str, Any]]


def run(step_fn: Callable[..., None], opt: Optimizer, cfg: Mapping[str, Any], b: Bucket, grads: Sequence[Tensor], *,
        fused: bool, plan: Plan = lambda step: {}, maximize: bool = False, sr_seed: int | None = None,
        before: Callable[[int, Bucket], None] | None = None,
        each: Callable[[int, Mapping[str, Any], dict, Bucket], None] | None = None) -> None:
    """Steps ``b`` through ``grads`` with ``step_fn``: a compiled op (``fused``: it gets the
    segment table) or reference.step_ (the Segments). ``plan(step)`` may give the step's
    "active" segments (the others get None grads), "grad_scale" and "found_inf". Lookahead
    runs after its inner step (:func:`inner_step`), with NaN gradients, as every policy that
    reads none (``uses_grad``). ``before(step, b)`` runs first at every
    step (a write from outside the optimizer); ``each(step, plan, snapshot, b)`` sees every
    step's buffers from before the call and the bucket after it."""
    for step, g in enumerate(grads):
        b.set_grads(g)
        if before is not None:
            before(step, b)
        kw = dict(plan(step))
        active = kw.pop("active", None)
        if opt.name == "lookahead":
            inner_step(b, active, kw.get("found_inf"), step)
        if not opt.uses_grad:  # the policy must not read them: NaN would show
            b.set_grads(torch.full((b.total,), float("nan"), dtype=torch.float64))
        snapshot = b.snapshot() if each is not None else None
        seg = b.table(active) if fused else b.segments(active)
        step_fn(*opt.args(b, cfg, seg, maximize=maximize, sr_seed=sr_seed, **kw))
        if each is not None:
            each(step, {"active": active, **kw}, snapshot, b)
        b.schedule_step.add_(1)


def segment_ids(b: Bucket) -> Tensor:
    """Each flat element's segment (padding belongs to the segment before it), CPU int64."""
    ends = b.offsets[1:] + [b.total]
    lengths = torch.tensor([e - o for o, e in zip(b.offsets, ends)], dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(b.offsets)), lengths)


def padding(b: Bucket) -> Tensor:
    """The flat elements that belong to no parameter (CPU bool): no kernel may write there."""
    mask = torch.ones(b.total, dtype=torch.bool)
    for p, o in zip(b.params, b.offsets):
        mask[o : o + p.numel()] = False
    return mask


# -- the ops that only walk the gradients (grad_sumsq, grad_zero_) ----------------

# Bad calls of those ops: (id, edit of their arguments by name, message). They share
# check_segments (csrc/include/fusedclr/checks.h), so every backend refuses each alike,
# before anything moves.
GRAD_OP_BAD_CALLS: list[tuple[str, Callable[[dict], None], str]] = [
    ("param_dtype_int", lambda a: a.update(param_dtype=torch.int32),
     r"^fusedclr: param_dtype is Int; the kernels update Float, Double, Half and BFloat16 parameters"),
    ("segments_int32", lambda a: a.update(segments=a["segments"].int()),
     r"^fusedclr: segments must be a contiguous int64 \[n, 4\] table .* got Int of shape"),
    ("segments_3_columns", lambda a: a.update(segments=a["segments"][:, :3].contiguous()),
     r"^fusedclr: segments must be a contiguous int64 \[n, 4\] table .* got Long of shape \[\d+, 3\]"),
    ("chunks_int32", lambda a: a.update(chunks=a["chunks"].int()),
     r"^fusedclr: chunks must be a contiguous int64 \[n, 3\] table"),
    ("chunks_2_columns", lambda a: a.update(chunks=a["chunks"][:, :2].contiguous()),
     r"^fusedclr: chunks must be a contiguous int64 \[n, 3\] table"),
]


def grad_storages(b: Bucket) -> list[Tensor]:
    """Every storage behind the bucket's gradients, once, as a flat tensor over all of it: what is
    around and between the gradients too (views of one shared tensor, the elements before an
    ``offset`` tensor)."""
    out, seen = [], set()
    for g in b.grads:
        storage = g.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            n = storage.nbytes() // g.element_size()
            out.append(torch.empty(0, dtype=g.dtype, device=g.device).set_(storage, 0, (n,), (1,)))
    return out


# What surrounds the gradients in their storages, which grad_zero_ must leave alone.
AROUND = 1234.5


def check_grad_zero(grad_zero_: Callable[[Tensor, torch.dtype, Tensor], None], device, dtype: torch.dtype, *,
                    offset: int = 0, chunk: int = 1000) -> None:
    """``grad_zero_(segments, param_dtype, chunks)`` against ``reference.grad_zero_`` on twin
    buckets of RAGGED sizes, a segment in four without a gradient: every storage behind the
    gradients ends as the reference leaves it, bit for bit (the active gradients zero, the
    inactive ones and everything around the gradients untouched)."""
    opt = TABLE["sgd"]
    cfg = opt.config(opt.full)
    active = [i % 4 != 2 for i in range(len(RAGGED))]

    def twin(dev) -> Bucket:
        b = bucket(opt, cfg, RAGGED, dtype, dev, chunk=chunk, offset=offset)
        for s in grad_storages(b):
            s.fill_(AROUND)
        b.set_grads(gradients(b, 1)[0])
        return b

    ours, ref = twin(device), twin("cpu")
    grad_zero_(ours.table(active), dtype, ours.chunks)
    reference.grad_zero_(ref.segments(active), dtype, ref.chunks)
    got, want = [s.cpu() for s in grad_storages(ours)], grad_storages(ref)
    assert len(got) == len(want) and any(bool((s == AROUND).any()) for s in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for g, on in zip(ref.grads, active):
        assert not on or not g.any()
    assert any(g.numel() and g.all() for g, on in zip(ref.grads, active) if not on)
