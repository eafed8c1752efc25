"""Running cases: every provider of a case in turns, then the report of a whole run."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cases import DTYPES, ONECYCLE_TOTAL_STEPS, OPTIMS, Case, bytes_per_param
from .check import wrong
from .machine import _loadavg, git_commit, machine_info
from .providers import BASELINE, COMPARED_PROVIDERS, Stepper, baseline, build, unavailable
from .report import format_table
from .shapes import numel_of, shape_list
from .steadiness import NOISY_IQR, NOISY_RATIO_SPREAD
from .timing import Budget, Timing, _Sampler, copy_bandwidth, count_launches, deadline, ratio_quartiles, synchronizer


def free(case: Case) -> None:
    """Returns a provider's memory before the next one allocates its own.

    Optimizers and schedulers hold reference cycles (torch's schedulers wrap
    ``optimizer.step``), so only the collector frees them; it costs ~0.3 s
    with torch loaded, which is spent only where the memory matters.
    """
    if _state_footprint(case) >= 64 << 20:
        gc.collect()
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _state_footprint(case: Case) -> int:
    """Bytes one provider holds for ``case`` (parameters, grads, fp32 states)."""
    p = case.torch_dtype.itemsize
    spec = OPTIMS[case.optim]
    return case.numel * (2 * p + 4 * (spec.states + (spec.lookahead is not None)))


# Providers of a case sample round-robin when together they hold at most this much.
INTERLEAVE_BYTES = 2 << 30


def _memory_room(device: str) -> int:
    """Half of the memory available now on ``device``: what two providers may hold at once."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0] // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError):
        pass
    return INTERLEAVE_BYTES


def _lockstep(samplers: Sequence[_Sampler]) -> None:
    """Samples ``samplers`` in turns (order reversed every round) until each is done.

    Taking turns puts the samplers in the same stretches of time, so a busy
    neighbour slows them alike. Samples last about ``Budget.sample_s``
    whatever the step, so the providers need about as many turns.
    """
    order = list(samplers)
    while not all(s.done for s in order):
        for s in order:
            if not s.done:
                s.sample()
        order.reverse()


def measure(
    case: Case,
    providers: Sequence[str],
    budget: Budget,
    *,
    compile_timeout: float | None = 300.0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Times every provider on ``case``; one result row per provider (skips and errors included).

    Three ways to share the machine's time fairly, by memory [note: bench method]:

    * ``interleaved``: all providers live at once and sample in turns;
    * ``paired``: too big for that, so the baseline (:func:`~.providers.baseline`:
      torch-fused, or torch-foreach where torch has no fused step) stays live and
      each other provider samples in turns with it, then is freed; its ratio is
      taken against the baseline samples of its own pairing;
    * ``sequential``: not even two fit; one provider after another.

    First every provider is checked on a small version of the case
    (:func:`~.check.wrong`): one that does not step, or steps elsewhere than
    torch, is not timed and its row is an ``error`` with the reason.

    The rows of fusedclr's providers also get ``vs_torch``: for every torch
    provider (for-loop, foreach, fused) and DeepSpeed's CPU Adam that sampled
    in turns with it, the median and quartiles of the per-round ratios that
    provider's time / fusedclr time.
    """
    base_name = baseline(case)  # torch-fused, or torch-foreach where torch has no fused step
    rows: dict[str, dict[str, Any]] = {}
    runnable = []
    for name in providers:
        reason = unavailable(name, case, compile_timeout=compile_timeout)
        if reason is None:
            runnable.append(name)
        else:
            rows[name] = {"provider": name, "status": "skipped", "reason": reason}
    for name, reason in wrong(case, runnable).items():
        rows[name] = {"provider": name, "status": "error", "reason": f"wrong result: {reason}"}
        log(f"  {name}: {rows[name]['reason']}")
        runnable.remove(name)
    sync = synchronizer(case.device)
    per, room = _state_footprint(case), _memory_room(case.device)
    if per * len(runnable) <= min(INTERLEAVE_BYTES, room):
        mode = "interleaved"
    elif base_name in runnable and len(runnable) > 1 and 2 * per <= room:
        mode = "paired"
    else:
        mode = "sequential"

    def start(name: str) -> tuple[Stepper, _Sampler] | None:
        stepper = None
        try:
            stepper = build(name, case)
            sampler = _Sampler(stepper.step, sync, budget)
            with deadline(compile_timeout if name == "torch-compile" else None):
                sampler.warm_up()
            return stepper, sampler
        except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
            if stepper is not None:
                stepper.close()
            if isinstance(e, TimeoutError) and name == "torch-compile":
                rows[name] = {"provider": name, "status": "skipped", "reason": f"compiling {e}"}
            else:
                rows[name] = {"provider": name, "status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}
            log(f"  {name}: {rows[name]['reason']}")
            free(case)
            return None

    def finish(name: str, stepper: Stepper, samplers: Sequence[_Sampler], pair: Timing | None = None) -> None:
        pooled = Timing([w for s in samplers for w in s.wall], [c for s in samplers for c in s.cpu],
                        samplers[0].inner)
        rows[name] = {
            "provider": name,
            "status": "ok",
            **pooled.summary(),
            "state_dtype": str(stepper.state_dtype).removeprefix("torch."),
            # One step when steps are slow (for-loop steps over thousands of tensors): enough to count.
            "launches_per_step": count_launches(stepper.step, case.device,
                                                steps=1 if samplers[0].one > 0.01 else 3),
            "note": stepper.note,
        }
        if pair is not None:
            rows[name]["paired_baseline"] = {"median_s": pair.median, "min_s": min(pair.wall),
                                             "cpu_s": pair.cpu_median}
        stepper.close()
        free(case)

    # Per-round ratio spreads: (baseline samples, provider samples) taken in turns.
    turns: dict[str, tuple[list[float], list[float]]] = {}
    # fusedclr provider -> compared provider -> (its samples, fusedclr samples) taken in turns.
    vs_torch: dict[str, dict[str, tuple[list[float], list[float]]]] = {}

    base = start(base_name) if mode == "paired" else None
    if mode == "paired" and base is None:
        mode, runnable = "sequential", [n for n in runnable if n != base_name]
    if mode == "interleaved":
        live = {name: got for name in runnable if (got := start(name)) is not None}
        _lockstep([s for _, s in live.values()])
        if base_name in live:
            turns = {name: (live[base_name][1].wall, s.wall) for name, (_, s) in live.items() if name != base_name}
        for name, (_, s) in live.items():
            if name.startswith("fusedclr-"):
                vs_torch[name] = {t: (live[t][1].wall, s.wall) for t in COMPARED_PROVIDERS if t in live}
        for name, (stepper, sampler) in live.items():
            finish(name, stepper, [sampler])
    elif mode == "paired" and base is not None:
        base_runs: list[_Sampler] = []
        for name in runnable:
            got = None if name == base_name else start(name)
            if got is None:
                continue
            with_base = base[1].fork()
            _lockstep([with_base, got[1]])
            base_runs.append(with_base)
            turns[name] = (with_base.wall, got[1].wall)
            if name.startswith("fusedclr-"):
                vs_torch[name] = {base_name: turns[name]}
            finish(name, got[0], [got[1]], pair=with_base.timing())
        if not base_runs:
            _lockstep([base[1]])
            base_runs.append(base[1])
        finish(base_name, base[0], base_runs)
    else:
        for name in runnable:
            got = start(name)
            if got is not None:
                _lockstep([got[1]])
                finish(name, got[0], [got[1]])

    for name, (base_wall, wall) in turns.items():
        if rows[name]["status"] == "ok":
            rows[name]["ratio_q1"], rows[name]["ratio_q3"] = ratio_quartiles(base_wall, wall)
            rows[name]["ratio_spread_from"] = "turns"
            # The ratio shown with that IQR is the same rounds' median: a ratio of the two medians
            # can fall outside its own bracket on a busy machine.
            rows[name]["ratio_turns"] = _ratio_stats(base_wall, wall)["ratio"]
    for name, pairs in vs_torch.items():
        if rows[name]["status"] == "ok":
            rows[name]["vs_torch"] = {t: _ratio_stats(*pair) for t, pair in pairs.items()
                                      if rows[t]["status"] == "ok"}
    out = []
    for name in providers:
        row = {**dataclasses.asdict(case), "tensors": len(case.shapes), "numel": case.numel, **rows[name]}
        row["mode"] = mode
        row["baseline"] = base_name
        out.append(row)
    return out


def _ratio_stats(base: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of the per-round ratios ``base[i] / other[i]``."""
    ratios = [b / o for b, o in zip(base, other) if o > 0]
    q1, q3 = ratio_quartiles(base, other)
    return {"ratio": statistics.median(ratios), "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios),
            "rounds": len(ratios)}


def _annotate(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    """Adds bytes, GB/s, % of copy bandwidth and the ratio against the case's baseline to its rows.

    The ratio fields keep their historical names (``ratio_vs_fused``, ...): they
    are against ``row["baseline"]``, torch-fused unless torch has no fused step.
    """
    name = rows[0].get("baseline", BASELINE) if rows else BASELINE
    base_row = next((r for r in rows if r["provider"] == name and r["status"] == "ok"), None)
    for r in rows:
        r["copy_gbps"] = copy_gbps
        if r["status"] != "ok":
            continue
        base = r.get("paired_baseline", base_row)
        bpp = bytes_per_param(r["optim"], DTYPES[r["dtype"]], getattr(torch, r["state_dtype"]))
        r["bytes_per_param"] = bpp
        r["bytes_per_step"] = bpp * r["numel"]
        r["gbps"] = r["bytes_per_step"] / r["median_s"] / 1e9
        r["pct_copy"] = 100.0 * r["gbps"] / copy_gbps
        if "ratio_turns" in r:
            r["ratio_vs_fused"] = r["ratio_turns"]  # the median of the per-round ratios, as its IQR
        else:
            r["ratio_vs_fused"] = base["median_s"] / r["median_s"] if base else None
        if base and "ratio_q1" not in r and r["provider"] != name and "q3_s" in base:
            # Not sampled in turns (sequential mode): the widest ratios the two spreads allow.
            r["ratio_q1"], r["ratio_q3"] = base["q1_s"] / r["q3_s"], base["q3_s"] / r["q1_s"]
            r["ratio_spread_from"] = "quartiles"
        spread = r["ratio_q3"] / r["ratio_q1"] if r.get("ratio_q1") else 1.0
        r["noisy"] = r["iqr_rel"] > NOISY_IQR or spread > NOISY_RATIO_SPREAD
        # Best against best: what each would do undisturbed, a check on the medians of a busy machine.
        r["ratio_vs_fused_min"] = base["min_s"] / r["min_s"] if base else None
        # Host CPU time is what a preempted step does not accrue: on a CPU run with
        # --threads 1 (no spin-waiting threads) it measures the work itself.
        r["ratio_vs_fused_cpu"] = base["cpu_s"] / r["cpu_s"] if base and r["cpu_s"] > 0 else None


def run(
    *,
    device: str,
    optims: Sequence[str],
    shapes: Sequence[str],
    dtypes: Sequence[str],
    schedules: Sequence[str],
    providers: Sequence[str],
    budget: Budget,
    compile_timeout: float | None = 300.0,
    time_limit_s: float | None = None,
    thread_check: dict[str, Any] | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every case; returns the report that :func:`main` prints and writes as JSON.

    The copy yardstick is measured right before and right after each case's
    providers, and the faster of the two is used: noise from other processes
    only ever slows a copy down, so this is the conservative denominator.

    Cases run optimizer by optimizer, then dtype by dtype, schedule by schedule,
    every shape in the order given: a run cut short has the fp32 rows of every
    shape, constant lr then OneCycleLR, before any bf16 row. With ``time_limit_s``, no case starts once that many
    seconds have passed, or when the last case's length would take the run past
    them; the cases left out are listed in the report's ``not_run`` (a case
    already started runs to its end). ``on_case`` receives the report so far
    after every case (``complete`` false, the cases still to come under
    ``not_run``), so that a run cut short from outside still leaves its results.
    ``thread_check`` (from :func:`~fusedclr.bench.steadiness.check_threads`, with
    the thread count used) goes into the report's ``machine``.
    """
    started = time.perf_counter()
    load_before = _loadavg()
    results: list[dict[str, Any]] = []
    copies: list[dict[str, Any]] = []
    not_run: list[dict[str, str]] = []
    plan = [Case(optim, shape, dtype, schedule, device)
            for optim in optims for dtype in dtypes for schedule in schedules for shape in shapes]

    def skipped(case: Case, reason: str) -> dict[str, str]:
        return {"optim": case.optim, "shape": case.shape, "dtype": case.dtype, "schedule": case.schedule,
                "reason": reason}

    def report(pending: Sequence[Case] = ()) -> dict[str, Any]:
        machine = machine_info(device)
        machine["loadavg_before"], machine["loadavg_after"] = load_before, _loadavg()
        if thread_check is not None:
            machine["thread_check"] = thread_check
        return {
            "schema": "fusedclr-bench/1",
            "machine": machine,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "config": {
                "device": device,
                "optims": list(optims),
                "shapes": {s: {"tensors": len(shape_list(s)), "numel": numel_of(shape_list(s))} for s in shapes},
                "dtypes": list(dtypes),
                "schedules": list(schedules),
                "providers": list(providers),
                "baseline": BASELINE,
                # Per optimizer: torch-fused, or torch-foreach where torch has no fused step here.
                "baselines": {o: baseline(Case(o, shapes[0], dtypes[0], schedules[0], device)) for o in optims}
                if shapes and dtypes and schedules else {},
                "budget": dataclasses.asdict(budget),
                "time_limit_s": time_limit_s,
                "bytes_per_param": "2*param + grad + 2*state*states, + (2*param + 2*state)/k for Lookahead "
                "(docs/benchmarks.md)",
                "onecycle_total_steps": ONECYCLE_TOTAL_STEPS,
            },
            "copy": copies,
            "results": results,
            # Whether every planned case ran: false in the reports written while the
            # run goes on, and when --time-limit left cases out (listed under not_run).
            "complete": not pending and not not_run,
            "not_run": not_run + [skipped(c, "not reached: the run was still going when this was written")
                                  for c in pending],
            "elapsed_s": time.perf_counter() - started,
        }

    def copy(case: Case, when: str) -> float:
        nbytes = case.copy_bytes if device == "cpu" else max(case.copy_bytes, 1 << 30)
        gbps, timing, moved = copy_bandwidth(nbytes, device, budget)
        copies.append({"optim": case.optim, "shape": case.shape, "dtype": case.dtype, "schedule": case.schedule,
                       "when": when, "bytes": moved, "gbps": gbps, **timing.summary()})
        return gbps

    last_case_s = 0.0
    for i, case in enumerate(plan):
        elapsed = time.perf_counter() - started
        if time_limit_s is not None and elapsed + last_case_s > time_limit_s:
            not_run.append(skipped(case, f"--time-limit {time_limit_s:g} s reached"))
            continue
        case_start = time.perf_counter()
        before = copy(case, "before")
        rows = measure(case, providers, budget, compile_timeout=compile_timeout, log=log)
        gbps = max(before, copy(case, "after"))
        _annotate(rows, gbps)
        results += rows
        log(format_table(rows, device))
        last_case_s = time.perf_counter() - case_start
        if on_case is not None:
            on_case(report(plan[i + 1:]))
    if not_run:
        log(f"time limit reached: {len(not_run)} case(s) not run (listed under 'not_run' in the report)")
    return report()
