"""Before a provider is timed: does it step, and to the parameters torch steps to?

A benchmark of a step that does nothing (or the wrong thing) would report a
great speed. So :func:`wrong` steps every provider :data:`CHECK_STEPS` times on a
small version of the case (same optimizer, schedule and device; fresh
parameters and constant gradients from the same seeds) and compares:

* the parameters must change (in fp32 and in the case's dtype);
* in fp32 they must end within ``RTOL x`` the reference's own change
  (``max |p_ref - p_0|``) plus ``ATOL`` of the reference's: torch's for-loop
  step, else its foreach one (the bench's foreach Lion), else its fused one,
  whichever is among the providers and steps at all.

A provider that fails is not timed: its row reads ``error`` with the reason.
``torch-compile`` is not checked (compiling takes tens of seconds), and a
provider that cannot run here at all is left to
:func:`~fusedclr.bench.providers.unavailable`. The results are kept per
(optimizer, schedule, device, dtype, provider) for the rest of the process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .cases import Case
from .providers import TORCH_PROVIDERS, build, unavailable

CHECK_SHAPE = "128x64"
# Past Lookahead's first synchronisation (k = 5), and enough steps for a wrong bias correction to show.
CHECK_STEPS = 6
RTOL = 1e-2
ATOL = 5e-7  # about 4 fp32 ulps of 1.0 (the parameters start in [-1, 1])

_CHECKED: dict[tuple[str, str, str, str, str], str | None] = {}


def _run(provider: str, case: Case) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters before, after) :data:`CHECK_STEPS` steps of ``provider`` on ``case``, in fp32 on the CPU."""
    stepper = build(provider, case)
    try:
        before = [p.detach().float().cpu().clone() for p in stepper.params]
        for _ in range(CHECK_STEPS):
            stepper.step()
        after = [p.detach().float().cpu().clone() for p in stepper.params]
    finally:
        stepper.close()
    return before, after


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def wrong(case: Case, providers: Sequence[str]) -> dict[str, str]:
    """The providers of ``providers`` whose steps on a small ``case`` are wrong, each with the reason."""
    small = dataclasses.replace(case, shape=CHECK_SHAPE, dtype="fp32")
    checked = [p for p in providers if p != "torch-compile" and unavailable(p, small) is None]
    todo = [p for p in checked if (case.optim, case.schedule, case.device, case.dtype, p) not in _CHECKED]
    if todo:
        runs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]] | str] = {}
        for p in checked:
            try:
                runs[p] = _run(p, small)
            except Exception as e:  # noqa: BLE001 - the reason is the result
                runs[p] = f"{type(e).__name__}: {e}"[:200]
        changed = {p: not isinstance(r, str) and _max_diff(*r) > 0 for p, r in runs.items()}
        ref = next((p for p in TORCH_PROVIDERS if changed.get(p)), None)
        for p in todo:
            r = runs[p]
            reason = None
            if isinstance(r, str):
                reason = f"failed the check on {CHECK_SHAPE} fp32: {r}"
            elif not changed[p]:
                reason = f"did not change the parameters in {CHECK_STEPS} steps ({CHECK_SHAPE} fp32)"
            elif ref is not None and p != ref:
                ref_before, ref_after = runs[ref]  # type: ignore[misc]
                scale, diff = _max_diff(ref_after, ref_before), _max_diff(r[1], ref_after)
                if diff > RTOL * scale + ATOL:
                    reason = (f"after {CHECK_STEPS} steps ({CHECK_SHAPE} fp32) its parameters differ from {ref}'s "
                              f"by {diff:.3g}, over {RTOL:g} x the update ({scale:.3g}) + {ATOL:g}")
            if reason is None and case.dtype != "fp32":
                try:
                    before, after = _run(p, dataclasses.replace(small, dtype=case.dtype))
                    if _max_diff(after, before) == 0:
                        reason = f"did not change the parameters in {CHECK_STEPS} steps ({CHECK_SHAPE} {case.dtype})"
                except Exception as e:  # noqa: BLE001
                    reason = f"failed the check on {CHECK_SHAPE} {case.dtype}: {type(e).__name__}: {e}"[:300]
            _CHECKED[(case.optim, case.schedule, case.device, case.dtype, p)] = reason
    out = {}
    for p in checked:
        reason = _CHECKED[(case.optim, case.schedule, case.device, case.dtype, p)]
        if reason is not None:
            out[p] = reason
    return out
