"""Flat buffers: one contiguous buffer per (param group, device, dtype).

[note: flat buckets]
A :class:`Bucket` re-points every parameter's ``.data`` to a view of one flat
parameter buffer and its ``.grad`` to a view of one flat gradient buffer, so
autograd accumulates in place, ``zero_grad()`` is one fill and the optimizer
step is one kernel launch over the whole bucket. Segments (one per parameter;
a complex parameter is its real view) are padded to ``ALIGN`` elements so every
segment starts 64-byte aligned; padding stays zero and no update moves it.

When something replaces a gradient (user code, DDP's ``gradient_as_bucket_view``,
``zero_grad(set_to_none=True)`` followed by backward), :meth:`Bucket.gather`
copies the foreign gradients into the flat buffer and marks parameters whose
grad is ``None`` inactive for that step: their step count does not advance and
nothing of theirs changes, as in torch.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

ALIGN = 16
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
        state_dtype: dtype of the state buffers (fp32 for fp32/bf16/fp16 parameters).
    """

    def __init__(self, params: Sequence[Tensor], state_names: Sequence[str], state_dtype: torch.dtype) -> None:
        first = params[0]
        self.device = first.device
        self.dtype = real_dtype(first)
        self.params = list(params)
        numels = [_real_numel(p) for p in self.params]
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
        flat = torch.zeros(total, dtype=self.dtype, **opts)
        grad_flat = torch.zeros(total, dtype=self.dtype, **opts)
        self.states = {name: torch.zeros(total, dtype=state_dtype, **opts) for name in state_names}
        self.seg_steps = torch.zeros(len(self.params), dtype=torch.int64, **opts)
        with torch.no_grad():
            for p, off, n in zip(self.params, offsets, numels):
                flat[off : off + n].copy_(_flat_real(p.detach()))
                if p.grad is not None:
                    grad_flat[off : off + n].copy_(_flat_real(p.grad))

        chunk = CHUNK.get(self.device.type, DEFAULT_CHUNK)
        rows = []
        for seg, (off, n) in enumerate(zip(offsets, padded)):
            for b in range(off, off + n, chunk):
                rows.append((seg, b, min(b + chunk, off + n)))
        self.chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(self.device)

        self.param_views = [_shaped(flat[o : o + n], p) for p, o, n in zip(self.params, offsets, numels)]
        self.grad_views = [_shaped(grad_flat[o : o + n], p) for p, o, n in zip(self.params, offsets, numels)]
        for p, view in zip(self.params, self.param_views):
            p.data = view
        self.expected = [g if p.requires_grad else None for p, g in zip(self.params, self.grad_views)]
        for p, g in zip(self.params, self.expected):
            if g is not None:
                p.grad = g
        self.flat = flat
        self.grad_flat = grad_flat
        frozen = [e is None for e in self.expected]
        self.static_active = (
            None if not any(frozen) else torch.tensor([not f for f in frozen], dtype=torch.bool).to(self.device)
        )
        self.hyper = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.hyper_cache: tuple | None = None
        self.schedule: Tensor | None = None
        self.schedule_step: Tensor | None = None

    # -- views -------------------------------------------------------------

    def state_view(self, name: str, index: int) -> Tensor:
        off, n = self.offsets[index], self.numels[index]
        return _shaped(self.states[name][off : off + n], self.params[index])

    def add_state(self, name: str, dtype: torch.dtype) -> None:
        if name not in self.states:
            self.states[name] = torch.zeros_like(self.flat, dtype=dtype)

    # -- gradients -----------------------------------------------------------

    def gather(self) -> Tensor | None:
        """Makes the flat gradient buffer hold every parameter's current grad.

        Returns the per-segment ``active`` mask for the kernel (``None`` when all
        are active). Fast path: every grad is still the view we installed, which
        costs one C-level pass over the parameters and no tensor work.
        """
        grads = list(map(_grad_of, self.params))
        if all(map(operator.is_, grads, self.expected)):
            return self.static_active
        # Validate everything before copying anything: a failed step changes nothing.
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
        dst, src, act = [], [], []
        for g, view, off, n in zip(grads, self.grad_views, self.offsets, self.numels):
            act.append(g is not None)
            if g is not None and g is not view:
                dst.append(self.grad_flat[off : off + n])
                src.append(_flat_real(g))
        if dst:
            torch._foreach_copy_(dst, src)
        if all(act):
            return None
        return torch.tensor(act, dtype=torch.bool).to(self.device, non_blocking=True)

    def zero_grad(self, set_to_none: bool | None) -> None:
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        self.grad_flat.zero_()
        grads = list(map(_grad_of, self.params))
        if all(map(operator.is_, grads, self.expected)):
            return
        for p, g, e in zip(self.params, grads, self.expected):
            if g is e:
                continue
            if g is None:
                p.grad = e  # re-attach the (zeroed) flat view
            else:
                # A wrapper's grad (e.g. a DDP bucket view): zero it in place as torch does.
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()
