"""Flat buffers: one contiguous buffer per (param group, device, dtype).

[note: flat buckets]
A :class:`Bucket` re-points every parameter's ``.data`` to a view of one flat
parameter buffer and its ``.grad`` to a view of one flat gradient buffer, so
autograd accumulates in place, ``zero_grad()`` is one fill and the optimizer
step is one kernel launch over the whole bucket. Segments (one per parameter;
a complex parameter is its real view) are padded to ``ALIGN`` elements so every
segment starts 16-element aligned (64 bytes for fp32, 32 for bf16/fp16); padding stays zero and no update moves it.

When something replaces a gradient (user code, DDP's ``gradient_as_bucket_view``,
``zero_grad(set_to_none=True)`` followed by backward), :meth:`Bucket.gather`
copies the foreign gradients into the flat buffer and marks parameters whose
grad is ``None`` inactive for that step: their step count does not advance and
nothing of theirs changes, as in torch. Their stale gradient segments are zeroed,
so a global gradient norm (``max_grad_norm``) sees only the live gradients.

[note: shard buckets]
FSDP2 (``fully_shard``) and tensor parallelism hand the optimizer DTensor
parameters whose local shards live in storage that FSDP owns and all-gathers
from: re-pointing them (``p.data = view``) would detach the model from what
FSDP communicates. A :class:`ShardBucket` therefore does not own its
parameters. It keeps flat *copies* of the local shards (parameters, and the
states the kernels need), and every step copies the local parameters and
gradients in and the updated parameters back out, three foreach copies around
the same single kernel launch. The states are exposed as DTensors with the
parameters' mesh and placements (views of the flat state buffers), so
``torch.distributed.checkpoint`` saves and loads them shard by shard, and the
global gradient norm reduces the local sums of squares over the mesh.

[note: staggered buffers]
The update streams through the parameter, gradient and state buffers at the
same element index. Large CPU allocations come from mmap and start at the
same offset within a 4 KiB page, so without care all four (or five) streams
hit addresses that agree in their low 12 bits: the core's memory
disambiguation then sees false store-to-load dependencies (4K aliasing) and
the same L1 sets fill up. On a 2-core EPYC this made fp32 AdamW over 200 x 1M
elements run at 1.03 ns/element; torch's fused kernel over one 210M-element
tensor is exactly as slow, and its 200 separately allocated tensors (whose
page offsets happen to differ) take 0.52. :func:`_staggered_zeros` therefore
places buffer ``slot`` at byte ``slot * STAGGER`` of a page, for the same
0.50 ns/element. A bucket has at most six streams (parameter, gradient, three
Adam states and the fp32 master), so ``STAGGER`` = 640 keeps every pair at
least 640 bytes apart within the page. CUDA's allocator and the GPU's address
hashing do not have this problem, so only CPU buffers are staggered.

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

import operator
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fusedclr import ops

ALIGN = 16
# Byte distance between the page offsets of a bucket's flat buffers [note: staggered buffers].
STAGGER = 640
PAGE = 4096
CHUNK = {"cpu": 16384}
DEFAULT_CHUNK = 8192

_grad_of = operator.attrgetter("grad")


def _real_numel(p: Tensor) -> int:
    return p.numel() * (2 if p.is_complex() else 1)


def real_dtype(p: Tensor) -> torch.dtype:
    return p.real.dtype if p.is_complex() else p.dtype


def _shaped(flat: Tensor, like: Tensor) -> Tensor:
    """A view of ``flat`` (1-D, real) with ``like``'s shape and (complex) dtype."""
    if like.is_complex():
        return torch.view_as_complex(flat.view(*like.shape, 2))
    return flat.view(like.shape)


def is_dtensor(t: Tensor) -> bool:
    # Importing torch.distributed.tensor costs ~1 s; whoever made a DTensor has imported it already.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _staggered_zeros(total: int, dtype: torch.dtype, device: torch.device, slot: int) -> Tensor:
    """A zero 1-D buffer of ``total`` elements; on CPU it starts ``slot * STAGGER`` bytes into a page.

    See [note: staggered buffers]. Slots 0 and 1 are the parameter and gradient
    buffers, 2 and up the states; the offsets stay 64-byte aligned.
    """
    if device.type != "cpu":
        return torch.zeros(total, dtype=dtype, device=device)
    item = torch.empty((), dtype=dtype).element_size()
    pad = PAGE // item
    raw = torch.zeros(total + pad, dtype=dtype, device=device)
    want = (slot * STAGGER) % PAGE
    start = ((want - raw.data_ptr()) % PAGE) // item
    return raw[start : start + total]


def _flat_real(t: Tensor) -> Tensor:
    """``t`` as a 1-D real tensor (a copy only when ``t`` is not contiguous)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


class Bucket:
    """The flat buffers of one (param group, device, dtype).

    Args:
        params: the parameters, in the group's order.
        state_names: the per-element state buffers to allocate (``exp_avg``, ...).
        state_dtype: dtype of the state buffers (fp32 for fp32/bf16/fp16
            parameters, or bf16 for bf16 ones [note: bucket precision]).
        master: keep an fp32 master copy of the parameters (bf16/fp16 only).
        sr_seed: the stochastic-rounding seed of bf16 parameter writes, or ``None``.
    """

    def __init__(self, params: Sequence[Tensor], state_names: Sequence[str], state_dtype: torch.dtype,
                 master: bool = False, sr_seed: int | None = None) -> None:
        self.params = list(params)
        # The tensors whose elements the flat buffers hold: the parameters
        # themselves, or their local shards (ShardBucket).
        self.locals = self._locals()
        first = self.locals[0]
        self.device = first.device
        self.dtype = real_dtype(first)
        numels = [_real_numel(t) for t in self.locals]
        padded = [-(-n // ALIGN) * ALIGN for n in numels]
        offsets = [0]
        for n in padded:
            offsets.append(offsets[-1] + n)
        self.numels = numels
        self.offsets = offsets
        total = offsets[-1]

        # Allocate and fill everything before re-pointing any parameter, so a
        # failure (out of memory) leaves the model untouched.
        opts = {"device": self.device}
        self.state_dtype = state_dtype
        self._slots = 0
        flat = self._zeros(total, self.dtype)
        grad_flat = self._zeros(total, self.dtype)
        self.states = {name: self._zeros(total, state_dtype) for name in state_names}
        self.seg_steps = torch.zeros(len(self.params), dtype=torch.int64, **opts)
        with torch.no_grad():
            for t, off, n in zip(self.locals, offsets, numels):
                flat[off : off + n].copy_(_flat_real(t.detach()))
        self.master = self._zeros(total, torch.float32).copy_(flat) if master else None
        self.sr_seed = sr_seed

        chunk = CHUNK.get(self.device.type, DEFAULT_CHUNK)
        rows = []
        for seg, (off, n) in enumerate(zip(offsets, padded)):
            for b in range(off, off + n, chunk):
                rows.append((seg, b, min(b + chunk, off + n)))
        self.chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(self.device)

        self.param_views = [_shaped(flat[o : o + n], t) for t, o, n in zip(self.locals, offsets, numels)]
        self.grad_views = [_shaped(grad_flat[o : o + n], t) for t, o, n in zip(self.locals, offsets, numels)]
        self.flat = flat
        self.grad_flat = grad_flat
        self.expected = [g if p.requires_grad else None for p, g in zip(self.params, self.grad_views)]
        self._grads_check: Callable[[], bool] | None = None  # see grads_unchanged
        frozen = [e is None for e in self.expected]
        self.static_active = (
            None if not any(frozen) else torch.tensor([not f for f in frozen], dtype=torch.bool).to(self.device)
        )
        self._install()
        self.hyper = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.hyper_cache: tuple | None = None
        self.schedule: Tensor | None = None
        self.schedule_step: Tensor | None = None

    def grads_unchanged(self) -> bool:
        """Whether every parameter's ``.grad`` is still the flat-buffer view installed for it
        (``None`` for frozen parameters): the step's fast path, checked in C with the
        extension [note: grads check]."""
        check = self._grads_check
        if check is None:
            check = self._grads_check = ops.grads_checker(self.params, self.expected)
        return check()

    def __getstate__(self) -> dict:
        # The prepared grads check holds this bucket's tensors and does not copy or pickle.
        return {**self.__dict__, "_grads_check": None}

    def __setstate__(self, state: dict) -> None:
        """After ``copy.deepcopy`` or unpickling (the optimizer's buckets travel with it).

        ``Parameter.__deepcopy__`` clones a parameter's data into storage of its
        own, while the copied flat buffers and views share storage as the
        originals did (pickling keeps the parameters' sharing too), so deep-copied
        parameters are pointed at the copied flat buffer again, as :meth:`_install`
        did: otherwise the copy's steps would update its buffers and never its
        parameters. As torch's copies do, they come without ``.grad``.
        """
        self.__dict__.update(state)
        self.__dict__.setdefault("_grads_check", None)  # pickled before the prepared check existed
        self._repoint()

    def _repoint(self) -> None:
        for p, view in zip(self.params, self.param_views):
            if p.data_ptr() != view.data_ptr():
                p.data = view

    def _zeros(self, total: int, dtype: torch.dtype) -> Tensor:
        """A zero flat buffer in the bucket's next stagger slot [note: staggered buffers]."""
        out = _staggered_zeros(total, dtype, self.device, self._slots)
        self._slots += 1
        return out

    def _locals(self) -> list[Tensor]:
        return self.params

    def _install(self) -> None:
        """Makes every parameter's ``.data`` and ``.grad`` views of the flat buffers [note: flat buckets]."""
        with torch.no_grad():
            for p, view in zip(self.params, self.grad_views):
                if p.grad is not None:
                    view.copy_(p.grad)
        for p, view in zip(self.params, self.param_views):
            p.data = view
        for p, g in zip(self.params, self.expected):
            if g is not None:
                p.grad = g

    # -- views -------------------------------------------------------------

    def state_view(self, name: str, index: int) -> Tensor:
        """The (local) state of parameter ``index``: a view of the flat state buffer."""
        off, n = self.offsets[index], self.numels[index]
        return _shaped(self.states[name][off : off + n], self.locals[index])

    def state_tensor(self, name: str, index: int) -> Tensor:
        """The state as ``optimizer.state`` and ``state_dict()`` expose it (a live view)."""
        return self.state_view(name, index)

    def local_value(self, value: Tensor, index: int) -> Tensor:
        """A loaded state tensor of parameter ``index`` in the shape of :meth:`state_view`."""
        return value.reshape(self.locals[index].shape)

    def master_view(self, index: int) -> Tensor:
        """The fp32 master of parameter ``index`` (a view of ``master``), shaped like the parameter."""
        off, n = self.offsets[index], self.numels[index]
        return _shaped(self.master[off : off + n], self.locals[index])

    def master_tensor(self, index: int) -> Tensor:
        """The master as ``optimizer.state`` and ``state_dict()`` expose it (a live view)."""
        return self.master_view(index)

    def add_state(self, name: str) -> None:
        if name not in self.states:
            self.states[name] = self._zeros(self.flat.numel(), self.state_dtype)

    # -- gradients -----------------------------------------------------------

    def _check_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Validates every gradient before anything is copied: a failed step changes nothing."""
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    "fusedclr optimizers do not support sparse gradients (parameter "
                    f"{i} of its group has one); use torch.optim.SparseAdam for sparse parameters"
                )
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

    def _copy_grads_in(self, grads: Sequence[Tensor | None], sources: Sequence[Tensor | None]) -> Tensor | None:
        """Copies ``sources`` (the grads, or their local shards) into the flat gradient buffer.

        Segments without a gradient are zeroed (nothing reads them but the
        global norm) and marked inactive. Returns the kernel's ``active`` mask.
        """
        dst, src, stale, act = [], [], [], []
        for g, s, flat_view, off, n in zip(grads, sources, self.grad_views, self.offsets, self.numels):
            act.append(g is not None)
            if g is None:
                stale.append(self.grad_flat[off : off + n])
            elif s is not flat_view:
                dst.append(self.grad_flat[off : off + n])
                src.append(_flat_real(s))
        if dst:
            torch._foreach_copy_(dst, src)
        if stale:
            torch._foreach_zero_(stale)
        if all(act):
            return None
        return torch.tensor(act, dtype=torch.bool).to(self.device, non_blocking=True)

    def gather(self) -> Tensor | None:
        """Makes the flat gradient buffer hold every parameter's current grad.

        Returns the per-segment ``active`` mask for the kernel (``None`` when all
        are active). Fast path: every grad is still the view we installed, which
        costs one C-level pass over the parameters and no tensor work.
        """
        if self.grads_unchanged():
            return self.static_active
        grads = list(map(_grad_of, self.params))
        self._check_grads(grads)
        return self._copy_grads_in(grads, grads)

    def finish_step(self) -> None:
        """Runs after the kernel: nothing to do when the parameters are views of ``flat``."""

    @property
    def grad_norm_dtype(self) -> torch.dtype:
        return _math_dtype(self.dtype)

    def grad_norm(self) -> Tensor:
        """L2 norm of the bucket's gradients as a 0-dim device tensor (one pass over ``grad_flat``)."""
        return torch.linalg.vector_norm(self.grad_flat, dtype=self.grad_norm_dtype)

    def zero_grad(self, set_to_none: bool | None) -> None:
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        self.grad_flat.zero_()
        if self.grads_unchanged():
            return
        grads = list(map(_grad_of, self.params))
        for p, g, e in zip(self.params, grads, self.expected):
            if g is e:
                continue
            if g is None:
                p.grad = e  # re-attach the (zeroed) flat view
            else:
                _zero_foreign_grad(g)


def _zero_foreign_grad(g: Tensor) -> None:
    """Zeroes a grad we do not own (a DDP bucket view, an FSDP DTensor) in place, as torch does."""
    if g.grad_fn is not None:
        g.detach_()
    else:
        g.requires_grad_(False)
    g.zero_()


class ShardBucket(Bucket):
    """A bucket of DTensor parameters that never re-points them [note: shard buckets].

    All parameters share one device mesh and the same sharded/replicated mesh
    dimensions, so one reduction over the mesh turns the local gradient norm
    into the global one.
    """

    def __init__(self, params: Sequence[Tensor], state_names: Sequence[str], state_dtype: torch.dtype,
                 master: bool = False, sr_seed: int | None = None) -> None:
        from torch.distributed.tensor import Partial, Replicate

        first = params[0]
        self.mesh = first.device_mesh
        # Shard(d) or _StridedShard placements contribute partial sums of squares; replicas do not.
        self.norm_placements = [Partial() if pl.is_shard() else Replicate() for pl in first.placements]
        self._live: list[Tensor] = []
        super().__init__(params, state_names, state_dtype, master, sr_seed)

    def _locals(self) -> list[Tensor]:
        with torch.no_grad():  # under no_grad, to_local() is the shard itself, not an autograd alias
            return [p.to_local() for p in self.params]

    def _install(self) -> None:
        """Nothing: FSDP owns the parameters' storage; every step copies in and out."""

    def _repoint(self) -> None:
        """Nothing, as :meth:`_install`."""

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
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is not None and (not is_dtensor(g) or tuple(g.placements) != tuple(p.placements)):
                layout = tuple(g.placements) if is_dtensor(g) else "a plain tensor"
                raise RuntimeError(
                    f"fusedclr: the gradient of DTensor parameter {i} of its group is {layout}, the "
                    f"parameter is {tuple(p.placements)}; gradients must be DTensors sharded like their parameter"
                )

    def gather(self) -> Tensor | None:
        grads = list(map(_grad_of, self.params))
        self._check_grads(grads)
        # The shards may have been written since the last step (a checkpoint
        # load, FSDP re-creating them at lazy init): copy the current ones in.
        self._live = self._locals()
        torch._foreach_copy_([_flat_real(v) for v in self.param_views], [_flat_real(t) for t in self._live])
        local_grads = [None if g is None else g.to_local() for g in grads]
        return self._copy_grads_in(grads, local_grads)

    def finish_step(self) -> None:
        torch._foreach_copy_(self._live, self.param_views)
        self._live = []

    def grad_norm(self) -> Tensor:
        from torch.distributed.tensor import DTensor

        local_sq = super().grad_norm().square()
        total_sq = DTensor.from_local(local_sq, self.mesh, self.norm_placements, run_check=False).full_tensor()
        return total_sq.sqrt()

    def zero_grad(self, set_to_none: bool | None) -> None:
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                _zero_foreign_grad(g)
