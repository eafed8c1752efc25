"""Buckets: the flat state buffers and segment table of one (param group, device, dtype).

[note: flat buckets]
A :class:`Bucket` owns one flat buffer per optimizer state (``exp_avg``,
``momentum_buffer``, the fp32 master, ...) for the parameters of one (param
group, device, dtype). The parameters and gradients themselves stay wherever
the model, autograd, DDP or FSDP2 put them: nothing is re-pointed and nothing
is gathered. The kernels find them through the bucket's *segment table*
[note: segment table] (csrc/include/fusedclr/segments.h), one row per
parameter (a complex parameter is its real view) with the addresses of the
parameter and of its gradient and the segment's offset into the state
buffers, so a step is still one pass over memory and one launch whatever the
number of tensors. Segments start at multiples of ``ALIGN`` elements of the
state buffers (64 bytes for fp32 states); the padding stays zero.

Before every launch, :meth:`Bucket.prepare` refreshes the table from the
parameters as they are now, in one C loop [note: segment refresh]: the
gradient's address, or 0 for a ``None`` grad (the segment is inactive: its
step does not advance and nothing of it changes, as in torch). Only a table
that changed is written (and, off the CPU, uploaded), so with static tensors
nothing happens and a captured CUDA graph stays valid. A gradient the kernels
cannot walk as it is (other strides than its parameter) is copied into a
temporary with the parameter's layout, in Python; a wrong dtype, shape, device
or a sparse gradient raises an error that names the parameter. A parameter
whose dtype or device changed since the bucket was built (``model.to(...)``,
``.half()``) raises :class:`ParamChanged`, and the optimizer re-buckets its
group with the states converted, as torch's ``load_state_dict`` would.

[note: shard buckets]
FSDP2 (``fully_shard``) and tensor parallelism hand the optimizer DTensor
parameters whose local shards live in storage that FSDP owns and
all-gathers from. A :class:`ShardBucket`'s table points at those local shards
and at the local shards of their gradients (the refresh reads
``_local_tensor``), so the kernel updates FSDP's own storage in place, with
no copy in or out. Its states are exposed (``optimizer.state``,
``state_dict()``) as DTensors with the parameters' mesh and placements (views
of the flat state buffers), so ``torch.distributed.checkpoint`` saves and
loads them shard by shard, and the global gradient norm reduces the local
sums of squares over the mesh.

[note: staggered buffers]
The update streams through the parameter, the gradient and the state buffers
at the same element index. Large CPU allocations come from mmap and start at
the same offset within a 4 KiB page, so without care the streams hit addresses
that agree in their low 12 bits: the core's memory disambiguation then sees
false store-to-load dependencies (4K aliasing) and the same L1 sets fill up
(measured with flat parameter buffers, 2-core EPYC, fp32 AdamW over 200 x 1M:
1.03 ns/element aligned, 0.50 staggered). The parameters and gradients are
torch's own tensors now. Large ones that glibc serves from mmap start at byte
64 of a page (``TORCH_PAGE_OFFSET``, torch 2.14; glibc raises its mmap
threshold as large blocks are freed, after which large tensors come from the
heap at any offset), so a large model's parameters and gradients often alias
each other whatever we do, as do torch's own states in its fused step. :func:`_staggered_zeros` keeps ours off that offset and apart: state
buffer ``slot`` starts at byte ``64 + (slot + 1) * STAGGER`` of a page. A bucket
has at most four state streams (three Adam states and the fp32 master), so
``STAGGER`` = 640 keeps every pair, and each state and the parameters, at least
640 bytes apart within the page. CUDA's allocator and the GPU's address hashing
do not have this problem, so only CPU buffers are staggered.

[note: bucket precision]
A bucket of bf16 or fp16 parameters may hold an fp32 ``master`` copy of its
parameter buffer and, for bf16, bf16 state buffers or a stochastic-rounding
seed; the kernels' side is [note: precision opt-ins]
(csrc/include/fusedclr/precision.h). The master starts as the parameters'
values, is exposed as the ``master_param`` state of every parameter and
travels in ``state_dict()``; the kernels restart it from any parameter that
was written outside the optimizer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from fusedclr import ops, reference
from fusedclr.reference import memory_image

ALIGN = 16
# Byte distance between the page offsets of a bucket's flat buffers [note: staggered buffers].
STAGGER = 640
PAGE = 4096
# Page offset of torch's large CPU allocations, where parameters and gradients sit [note: staggered buffers].
TORCH_PAGE_OFFSET = 64
CHUNK = {"cpu": 16384}
DEFAULT_CHUNK = 8192
# Table columns, as csrc/include/fusedclr/segments.h.
PARAM, GRAD, OFFSET, NUMEL = 0, 1, 2, 3


class ParamChanged(Exception):
    """A parameter's dtype or device changed after its bucket was built: the optimizer re-buckets."""


def _real_numel(p: Tensor) -> int:
    return p.numel() * (2 if p.is_complex() else 1)


def real_dtype(p: Tensor) -> torch.dtype:
    return p.real.dtype if p.is_complex() else p.dtype


def _shaped(flat: Tensor, like: Tensor) -> Tensor:
    """A view of ``flat`` (1-D, real, ``like``'s elements in memory order) with ``like``'s
    shape, strides and (complex) dtype: state element k sits where parameter element k does."""
    if like.is_complex():
        real = torch.view_as_real(like)
        return torch.view_as_complex(flat.as_strided(real.shape, real.stride()))
    return flat.as_strided(like.shape, like.stride())


def _capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being captured into a CUDA graph [note: table upload]."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def is_dtensor(t: Tensor) -> bool:
    # Importing torch.distributed.tensor costs ~1 s; whoever made a DTensor has imported it already.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _staggered_zeros(total: int, dtype: torch.dtype, device: torch.device, slot: int) -> Tensor:
    """A zero 1-D buffer of ``total`` elements; on CPU it starts ``64 + (slot + 1) * STAGGER`` bytes into a page.

    See [note: staggered buffers]; the offsets stay 64-byte aligned.
    """
    if device.type != "cpu":
        return torch.zeros(total, dtype=dtype, device=device)
    item = torch.empty((), dtype=dtype).element_size()
    pad = PAGE // item
    raw = torch.zeros(total + pad, dtype=dtype, device=device)
    want = (TORCH_PAGE_OFFSET + (slot + 1) * STAGGER) % PAGE
    start = ((want - raw.data_ptr()) % PAGE) // item
    return raw[start : start + total]


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers one block of memory without gaps or overlaps, in some dimension
    order (contiguous, channels_last, a transpose...): what the kernels can walk."""
    if t.layout != torch.strided:
        return False
    if t.is_contiguous() or t.numel() <= 1:
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _describe(p: Tensor, index: int) -> str:
    return f"parameter {index} of its group (shape {tuple(p.shape)}, {p.dtype} on {p.device})"


class Bucket:
    """The flat state buffers and the segment table of one (param group, device, dtype).

    Args:
        params: the parameters, in the group's order.
        state_names: the per-element state buffers to allocate (``exp_avg``, ...).
        state_dtype: dtype of the state buffers (fp32 for fp32/bf16/fp16
            parameters, or bf16 for bf16 ones [note: bucket precision]).
        master: keep an fp32 master copy of the parameters (bf16/fp16 only).
        sr_seed: the stochastic-rounding seed of bf16 parameter writes, or ``None``.
    """

    def __init__(self, params: Sequence[Tensor], state_names: Sequence[str], state_dtype: torch.dtype,
                 master: bool = False, sr_seed: int | None = None, state_init: dict[str, float] | None = None,
                 seg_scalar: tuple[str, float] | None = None) -> None:
        self.params = list(params)
        # The tensors the kernels walk: the parameters themselves, or their local shards
        # (ShardBucket), or a dense shadow of a parameter with gaps [note: shadowed parameters].
        walked = list(self._locals())  # a copy: shadows replace entries
        self._shadowed = [i for i, t in enumerate(walked) if not is_dense(t)]
        if self._shadowed and isinstance(self, ShardBucket):
            t = walked[self._shadowed[0]]
            raise ValueError(f"fusedclr: the local shard of {_describe(t, self._shadowed[0])} is not dense "
                             f"(strides {t.stride()}); shard parameters so that each local shard is dense")
        with torch.no_grad():
            for i in self._shadowed:
                walked[i] = torch.empty_like(walked[i], memory_format=torch.contiguous_format).copy_(walked[i])
        self.locals = walked
        first = self.locals[0]
        self.device = first.device
        self.dtype = real_dtype(first)
        numels = [_real_numel(t) for t in self.locals]
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + -(-n // ALIGN) * ALIGN)
        self.numels = numels
        self.offsets = offsets
        self.total = offsets[-1]

        self.state_dtype = state_dtype
        self._slots = 0
        # What a state starts from (Adagrad's initial_accumulator_value; 0 unless named).
        self.state_init = dict(state_init or {})
        self.states = {}
        for name in state_names:
            self.add_state(name)
        self.seg_steps = torch.zeros(len(self.params), dtype=torch.int64, device=self.device)
        # A per-segment float64 state of the optimizer (NAdam's mu_product): its name and start, or None.
        self.seg_scalar = seg_scalar
        self.seg_scalars = (None if seg_scalar is None else
                            torch.full((len(self.params),), float(seg_scalar[1]), dtype=torch.float64,
                                       device=self.device))
        self.master = None
        if master:
            self.master = self._zeros(self.total, torch.float32)
            self._copy_params_to(self.master)
        self.sr_seed = sr_seed

        chunk = CHUNK.get(self.device.type, DEFAULT_CHUNK)
        rows = [(seg, b, min(b + chunk, off + n))
                for seg, (off, n) in enumerate(zip(offsets, numels)) for b in range(off, off + n, chunk)]
        self.chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(self.device)
        # The host table [note: segment table]; the kernels read `table`, its copy on the device.
        self.host_table = torch.zeros(len(self.params), 4, dtype=torch.int64)
        self.host_table[:, OFFSET] = torch.tensor(offsets[:-1], dtype=torch.int64)
        self.host_table[:, NUMEL] = torch.tensor(numels, dtype=torch.int64)
        self.table = self.host_table if self.device.type == "cpu" else self.host_table.to(self.device)
        self._tracker = self._make_tracker()  # the C refresh [note: segment refresh]
        self._staging: Tensor | None = None  # the pinned copy of the last table upload
        # [note: table upload]: rows written since the last upload; a CUDA graph holds an upload.
        self._unsent = False
        self._graphed = False
        self._captured_staging: list[Tensor] = []
        # The gradients the slow path handed the kernels this step (copies held alive), or None.
        self._walked_grads: list[Tensor | None] | None = None
        # Why a sparse gradient is refused, or None where the optimizer steps it densely
        # [note: sparse gradients]; set by the optimizer before every prepare.
        self.sparse_error: str | None = "sparse gradients are not supported"
        self.hyper = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.hyper_cache: tuple | None = None
        self.schedule: Tensor | None = None
        self.schedule_step: Tensor | None = None

    def __getstate__(self) -> dict:
        # The prepared refresh holds borrowed pointers and does not copy or pickle.
        # A copy's device table is its own: no graph holds an upload into it [note: table upload].
        return {**self.__dict__, "_tracker": None, "_graphed": False, "_captured_staging": []}

    def __setstate__(self, state: dict) -> None:
        """After ``copy.deepcopy`` or unpickling (the optimizer's buckets travel with it): the table
        is refreshed from the copied parameters on the next step."""
        self.__dict__.update(state)
        self._tracker = None

    def _zeros(self, total: int, dtype: torch.dtype) -> Tensor:
        """A zero flat buffer in the bucket's next stagger slot [note: staggered buffers]."""
        out = _staggered_zeros(total, dtype, self.device, self._slots)
        self._slots += 1
        return out

    def _locals(self) -> list[Tensor]:
        return self.params

    def _copy_params_to(self, flat: Tensor) -> None:
        """Copies every parameter's values into ``flat`` at its segment (construction, loads)."""
        with torch.no_grad():
            torch._foreach_copy_([flat[o : o + n] for o, n in zip(self.offsets, self.numels)],
                                 [memory_image(t.detach()) for t in self.locals])

    # -- views -------------------------------------------------------------

    def state_view(self, name: str, index: int) -> Tensor:
        """The (local) state of parameter ``index``: a view of the flat state buffer in the parameter's layout."""
        off, n = self.offsets[index], self.numels[index]
        return _shaped(self.states[name][off : off + n], self.locals[index])

    def state_tensor(self, name: str, index: int) -> Tensor:
        """The state as ``optimizer.state`` and ``state_dict()`` expose it (a live view)."""
        return self.state_view(name, index)

    def local_value(self, value: Tensor, index: int) -> Tensor:
        """A loaded state tensor of parameter ``index`` in the shape of :meth:`state_view`."""
        return value.reshape(self.locals[index].shape)

    def master_view(self, index: int) -> Tensor:
        """The fp32 master of parameter ``index`` (a view of ``master``), in the parameter's layout."""
        off, n = self.offsets[index], self.numels[index]
        return _shaped(self.master[off : off + n], self.locals[index])

    def master_tensor(self, index: int) -> Tensor:
        """The master as ``optimizer.state`` and ``state_dict()`` expose it (a live view)."""
        return self.master_view(index)

    def add_state(self, name: str) -> None:
        if name not in self.states:
            self.states[name] = self._zeros(self.total, self.state_dtype)
            if self.state_init.get(name, 0.0) != 0.0:
                self.states[name].fill_(self.state_init[name])

    def reset_state(self, index: int) -> None:
        """Parameter ``index`` starts afresh: every state at its initial value, step 0."""
        for name in self.states:
            self.state_view(name, index).fill_(self.state_init.get(name, 0.0))
        if self.seg_scalar is not None:
            self.seg_scalars[index] = self.seg_scalar[1]
        self.seg_steps[index] = 0

    # -- the segment table -------------------------------------------------------

    def prepare(self) -> None:
        """Makes the segment table describe the parameters and gradients as they are now.

        [note: segment refresh] in csrc/ops.cpp. Raises :class:`ParamChanged`
        when a parameter changed dtype or device, and an error naming the
        parameter for a gradient no step can use; a failed prepare changes nothing
        the kernels read.
        """
        self._walked_grads = None
        if self._shadowed:
            flags = self._check_params() | ops.SLOW_PATH  # the C refresh would see the gaps
        else:
            flags = self._refresh()
        self._unsent |= bool(flags & ops.TABLE_CHANGED)  # rows it wrote before a stop count too
        if flags & ops.PARAM_CHANGED:
            self._raise_param_changed()
        if flags & ops.SLOW_PATH:
            self._refresh_slowly()
            flags |= ops.TABLE_CHANGED
        self._sync_table(flags)

    def prepare_zero(self) -> bool:
        """Refreshes the table for ``grad_zero_``; whether it may zero this bucket's gradients.

        True when the table points at every gradient where it is and none of
        them is tracked by autograd or copy-on-write [note: zero_grad through
        the table]. False when torch must zero them: a gradient the kernels
        cannot walk as it is (it would be a temporary copy), one that requires
        grad or shares copy-on-write storage, a parameter with gaps (walked
        through its shadow) or that changed dtype, device or size. Raises
        nothing: zero_grad takes whatever gradients torch's takes.
        """
        self._walked_grads = None  # the table stands for no slow path's copies any more
        if self._shadowed or self.device.type == "meta":
            return False
        flags = self._refresh()
        self._unsent |= bool(flags & ops.TABLE_CHANGED)
        self._sync_table(flags)  # rows written before a stop must reach the device table too
        return not flags & (ops.SLOW_PATH | ops.PARAM_CHANGED | ops.GRAD_READ_ONLY)

    def _sync_table(self, flags: int) -> None:
        """Uploads the host table when it differs from the device table (off the CPU) [note: table upload]."""
        if self.table is self.host_table:
            self._unsent = False
            return
        capturing = _capturing(self.device)
        if flags & ops.TABLE_CHANGED or self._unsent or self._graphed or capturing:
            self._upload(capturing)

    def _make_tracker(self):
        return ops.segment_tracker(self.params, self.dtype, self.device, isinstance(self, ShardBucket))

    def _refresh(self) -> int:
        if self._tracker is None:  # after copying or unpickling
            self._tracker = self._make_tracker()
        return self._tracker(self.host_table)

    def _upload(self, capturing: bool = False) -> None:
        """Copies the host table into the device table in place, stream-ordered after the kernels
        that read the old one, through a fresh pinned buffer (the host allocator reuses it only
        once the copy is done).

        [note: table upload]
        The device table must always describe the tensors the next kernel reads. The host
        table is compared with the tensors, not with the device table, so two things keep
        them together. A refresh that wrote rows and then stopped (a gradient refused, a
        parameter re-bucketed) leaves the bucket `_unsent` until an upload succeeds: else a
        later step that finds the same addresses again would upload nothing and walk the
        old ones. And a step captured in a CUDA graph always captures an upload, of the
        table it captured with: every replay then restores that table whatever an eager
        step uploaded in between, and once a graph holds one, every eager step uploads
        its own (`_graphed`), since a replay may have overwritten it. A captured upload's
        pinned buffer lives as long as the bucket.
        """
        if self.device.type == "meta":
            return
        pinned = self.device.type == "cuda"
        staging = torch.empty_like(self.host_table, pin_memory=pinned).copy_(self.host_table)
        self.table.copy_(staging, non_blocking=pinned)
        self._staging = staging
        self._unsent = False
        if capturing:
            self._graphed = True
            self._captured_staging.append(staging)

    def _grads(self) -> list[Tensor | None]:
        """The gradients of the walked tensors (a Python loop: the slow path and the reference only)."""
        return [p.grad for p in self.params]

    def _local_grad(self, g: Tensor) -> Tensor:
        return g

    def _check_params(self) -> int:
        """PARAM_CHANGED when a parameter no longer has the bucket's dtype, device or size (the C
        refresh's check, in Python for buckets with shadowed parameters)."""
        for p, n in zip(self._locals(), self.numels):
            if real_dtype(p) != self.dtype or p.device != self.device or _real_numel(p) != n:
                return ops.PARAM_CHANGED
        return 0

    def _refresh_slowly(self) -> None:
        """The refresh in Python, for what the C loop hands over [note: segment refresh]: every
        gradient is checked before the table changes; a dense gradient with other strides than its
        parameter is copied into the parameter's layout for this step.

        [note: sparse gradients]
        torch's SGD and Adagrad (without weight decay) take sparse gradients; so do fusedclr's,
        through a dense copy made here for the step. The dense update is torch's sparse one:
        the rows the gradient leaves out see a zero gradient, which leaves Adagrad's sum and
        parameter as they are and decays SGD's momentum buffer as torch's sparse buffer decays
        (its rows are the dense buffer's non-zero rows). The copy costs a dense pass over the
        parameter per step where torch touches only the gradient's rows: for large sparse
        embeddings, torch's own optimizer is the faster one. Every other optimizer refuses
        sparse gradients as torch's does (``Bucket.sparse_error``).

        [note: shadowed parameters]
        A parameter with gaps between its elements (a strided slice made a leaf) cannot be walked as
        one block: the bucket keeps a dense shadow of it that the table points at. Each step copies
        the parameter into its shadow and its gradient into a dense temporary here, and
        :meth:`finish_step` copies the shadow back: a few copies per step for these rare
        parameters, and a Python loop over their bucket's parameters.
        """
        grads = self._grads()
        self._check_grads(grads)
        with torch.no_grad():
            for i in self._shadowed:
                self.locals[i].copy_(self.params[i])
        rows, walked = [], []
        for t, g in zip(self.locals, grads):
            if g is not None:
                g = self._local_grad(g)
                if g.is_sparse:  # [note: sparse gradients]
                    g = g.coalesce().to_dense()
                if g.stride() != t.stride() or not is_dense(g):
                    g = torch.empty_like(t).copy_(g)
            walked.append(g)
            rows.append((t.data_ptr(), reference.grad_address(g)))
        self.host_table[:, :2] = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
        self._walked_grads = walked

    def _raise_param_changed(self) -> None:
        for i, (t, n) in enumerate(zip(self._locals(), self.numels)):
            if _real_numel(t) != n:
                raise RuntimeError(
                    f"fusedclr: {_describe(t, i)} has {_real_numel(t)} elements, but had {n} when the optimizer "
                    "was built: its states no longer fit. Build a new optimizer for the resized parameter"
                )
        raise ParamChanged()  # dtype, device or density: re-bucketed (a parameter with gaps gets a shadow)

    def reference_segments(self) -> reference.Segments:
        """The table's tensors, for the reference backend (which cannot follow addresses)."""
        grads = self._walked_grads
        if grads is None:
            grads = [None if g is None else self._local_grad(g) for g in self._grads()]
        return reference.Segments(self.locals, grads, self.offsets[:-1], self.total)

    def finish_step(self) -> None:
        """Runs after the launch: shadows are copied back into their parameters [note: shadowed
        parameters], and the step's temporary gradient copies may go (stream-ordered)."""
        if self._shadowed and self._walked_grads is not None:
            with torch.no_grad():
                for i in self._shadowed:
                    if self._walked_grads[i] is not None:
                        self.params[i].copy_(self.locals[i])
        self._walked_grads = None

    def _check_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Validates every gradient before anything changes: a failed step changes nothing."""
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if g.is_sparse and self.sparse_error is not None:
                raise RuntimeError(f"fusedclr: parameter {i} of its group has a sparse gradient: "
                                   f"{self.sparse_error}")
            if g.dtype != p.dtype:
                raise RuntimeError(
                    f"fusedclr: the gradient of parameter {i} of its group has dtype {g.dtype}, "
                    f"the parameter has {p.dtype}; gradients must match their parameter's dtype"
                )
            if g.shape != p.shape:
                raise RuntimeError(
                    f"fusedclr: the gradient of parameter {i} of its group has shape {tuple(g.shape)}, "
                    f"the parameter has {tuple(p.shape)}"
                )
            if g.device != p.device:
                raise RuntimeError(
                    f"fusedclr: the gradient of parameter {i} of its group is on {g.device}, "
                    f"the parameter on {p.device}"
                )

    # -- gradient norm ---------------------------------------------------------

    @property
    def grad_norm_dtype(self) -> torch.dtype:
        return _math_dtype(self.dtype)

    def grad_sumsq(self) -> Tensor:
        """The active gradients' sum of squares, float64, 0-dim on the bucket's device: one
        reduction over the table, no copy [note: fused clipping]."""
        if ops.extension_available() and (self.device.type == "cpu" or
                                          (self.device.type == "cuda" and ops.cuda_kernels_registered())):
            return ops.grad_sumsq(self.table, self.dtype, self.chunks)
        walked = self._walked_grads  # the step's dense copies, where the slow path made some
        grads = [g for g in walked if g is not None] if walked is not None else [
            self._local_grad(g) for g in self._grads() if g is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return torch.stack([memory_image(g).double().square().sum() for g in grads]).sum()

    def grad_norm(self) -> Tensor:
        """L2 norm of the bucket's gradients as a 0-dim device tensor."""
        return self.grad_sumsq().sqrt().to(self.grad_norm_dtype)


class ShardBucket(Bucket):
    """A bucket of DTensor parameters whose table points at their local shards [note: shard buckets].

    All parameters share one device mesh and the same sharded/replicated mesh
    dimensions, so one reduction over the mesh turns the local gradient norm
    into the global one.
    """

    def __init__(self, params: Sequence[Tensor], state_names: Sequence[str], state_dtype: torch.dtype,
                 master: bool = False, sr_seed: int | None = None, state_init: dict[str, float] | None = None,
                 seg_scalar: tuple[str, float] | None = None) -> None:
        from torch.distributed.tensor import Partial, Replicate

        first = params[0]
        self.mesh = first.device_mesh
        # Shard(d) or _StridedShard placements contribute partial sums of squares; replicas do not.
        self.norm_placements = [Partial() if pl.is_shard() else Replicate() for pl in first.placements]
        super().__init__(params, state_names, state_dtype, master, sr_seed, state_init, seg_scalar)

    def _locals(self) -> list[Tensor]:
        with torch.no_grad():  # under no_grad, to_local() is the shard itself, not an autograd alias
            return [p.to_local() for p in self.params]

    def prepare(self) -> None:
        # The shards are FSDP's: it may re-create them (lazy init, a checkpoint load), so the
        # walked tensors are re-read with the table (the refresh reads them in C).
        super().prepare()
        self._check_placements(self._grads())

    def _local_grad(self, g: Tensor) -> Tensor:
        return g.to_local()

    def _refresh_slowly(self) -> None:
        self.locals = self._locals()
        super()._refresh_slowly()

    def reference_segments(self) -> reference.Segments:
        self.locals = self._locals()
        return super().reference_segments()

    def state_tensor(self, name: str, index: int) -> Tensor:
        return self._as_dtensor(self.state_view(name, index), index)

    def master_tensor(self, index: int) -> Tensor:
        return self._as_dtensor(self.master_view(index), index)

    def _as_dtensor(self, local: Tensor, index: int) -> Tensor:
        from torch.distributed.tensor import DTensor

        p = self.params[index]
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def local_value(self, value: Tensor, index: int) -> Tensor:
        p = self.params[index]
        if not is_dtensor(value):
            raise ValueError(
                f"loaded state of DTensor parameter {index} (shape {tuple(p.shape)}) is a plain tensor of shape "
                f"{tuple(value.shape)}; load sharded optimizer states with torch.distributed.checkpoint "
                "(get_optimizer_state_dict / set_optimizer_state_dict), which keeps them as DTensors"
            )
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local().reshape(self.locals[index].shape)

    def _check_grads(self, grads: Sequence[Tensor | None]) -> None:
        super()._check_grads(grads)
        self._check_placements(grads)

    def _check_placements(self, grads: Sequence[Tensor | None]) -> None:
        """DTensor gradients must be sharded like their parameters (a Python loop over the
        bucket's parameters: FSDP2 hands few, large ones)."""
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is not None and (not is_dtensor(g) or tuple(g.placements) != tuple(p.placements)):
                layout = tuple(g.placements) if is_dtensor(g) else "a plain tensor"
                raise RuntimeError(
                    f"fusedclr: the gradient of DTensor parameter {i} of its group is {layout}, the "
                    f"parameter is {tuple(p.placements)}; gradients must be DTensors sharded like their parameter"
                )

    def grad_norm(self) -> Tensor:
        from torch.distributed.tensor import DTensor

        local_sq = self.grad_sumsq().to(self.grad_norm_dtype)
        total_sq = DTensor.from_local(local_sq, self.mesh, self.norm_placements, run_check=False).full_tensor()
        return total_sq.sqrt()
