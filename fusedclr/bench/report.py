"""Output: the text table of a case, markdown tables and the plot of a report."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .providers import BASELINE, COMPARED_PROVIDERS, PROVIDERS
from .shapes import SHAPES_NXM


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def _ratio_iqr(r: dict[str, Any]) -> str:
    """The ratio's inter-quartile range, ``q1-q3``, or ``-`` where it has none (the baseline)."""
    if r.get("ratio_q1") is None:
        return "-"
    return f"{_ratio(r['ratio_q1']).removesuffix('x')}-{_ratio(r['ratio_q3'])}"


def format_table(rows: Sequence[dict[str, Any]], device: str) -> str:
    """One case's rows as an aligned text table."""
    if not rows:
        return ""
    r0 = rows[0]
    base = r0.get("baseline", BASELINE)
    head = (f"{r0['optim']} {r0['shape']} ({r0['tensors']} tensors, {r0['numel'] / 1e6:.3g}M params) "
            f"{r0['dtype']} {r0['schedule']} on {device}; copy {r0.get('copy_gbps', float('nan')):.1f} GB/s"
            + ("" if base == BASELINE else f"; ratios vs {base} (torch has no fused step for it)"))
    cols = ["provider", "median ms", "IQR", "min..max ms", f"x {base.removeprefix('torch-')}", "(IQR)", "(min)",
            "GB/s", "% copy", "cpu ms"]
    if device.startswith("cuda"):
        cols.append("launches")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["provider"], f"{r['status']}: {r['reason']}"])
            continue
        ratio = r.get("ratio_vs_fused")
        line = [
            r["provider"],
            _ms(r["median_s"]),
            f"{100 * r['iqr_rel']:.0f}%",
            f"{_ms(r['min_s'])}..{_ms(r['max_s'])}",
            _ratio(ratio),
            _ratio_iqr(r),
            _ratio(r.get("ratio_vs_fused_min")),
            f"{r['gbps']:.1f}",
            f"{r['pct_copy']:.0f}%",
            _ms(r["cpu_s"]),
        ]
        if device.startswith("cuda"):
            lp = r.get("launches_per_step")
            line.append("-" if lp is None else f"{lp:.0f}")
        if r.get("note"):
            line.append(f"({r['note']})")
        lines.append(line)
    # A list, not max(a, *b): when every provider was skipped, b is empty and max(int) raises.
    widths = [max([len(c), *(len(x[i]) for x in lines if len(x) > 2 and i < len(x))]) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) if i < len(widths) else c for i, c in enumerate(cells)
    )
    out = [head, "  " + fmt(cols)]
    for x in lines:
        out.append("  " + (fmt(x) if len(x) > 2 else f"{x[0].ljust(widths[0])}  {x[1]}"))
    noisy = [r["provider"] for r in rows if r.get("noisy")]
    if noisy:
        out.append(f"  noisy: {', '.join(noisy)} (a wide IQR of its time or of its ratio): the machine was busy; "
                   "trust the ratios' IQR, not their medians" + (", or measure with --threads 1"
                                                                 if device == "cpu" else ""))
    return "\n".join(out)


def markdown_table(report: dict[str, Any], optim: str, schedule: str = "constant") -> str:
    """Median ms per step, ratio vs the baseline and IQR for one optimizer and schedule, as markdown.

    The baseline is torch-fused, or torch-foreach where torch has no fused
    step (the rows' ``baseline``). A ratio marked with a dagger was taken
    against the baseline samples of its own pairing (``mode == "paired"``), not
    against the baseline's cell.
    """
    rows = [r for r in report["results"] if r["schedule"] == schedule and r["optim"] == optim]
    providers = [p for p in report["config"]["providers"] if any(r["provider"] == p and r["status"] == "ok"
                                                                   for r in rows)]
    keys = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows))
    out = ["| shape | dtype | " + " | ".join(providers) + " | fusedclr GB/s (% copy) |",
           "|---|---|" + "---|" * len(providers) + "---|"]
    for key in keys:
        cells = []
        fc = None
        for p in providers:
            r = next((r for r in rows if (r["shape"], r["dtype"]) == key and r["provider"] == p), None)
            if r is None or r["status"] != "ok":
                cells.append("-")
                continue
            ratio = r.get("ratio_vs_fused")
            mark = "†" if "paired_baseline" in r else ""
            spread = "" if r.get("ratio_q1") is None else f" [{_ratio_iqr(r)}]"
            cells.append(f"{_ms(r['median_s'])} ms" + ("" if ratio is None else f", {_ratio(ratio)}{mark}{spread}")
                         + f" (IQR {100 * r['iqr_rel']:.0f}%)" + (" noisy" if r.get("noisy") else ""))
            if p.startswith("fusedclr-") and fc is None:
                fc = r
        bw = "-" if fc is None else f"{fc['gbps']:.1f} ({fc['pct_copy']:.0f}%)"
        out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {bw} |")
    return "\n".join(out)


def markdown_report(report: dict[str, Any]) -> str:
    """The machine line and one :func:`markdown_table` per (optimizer, schedule)."""
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
    parts = [f"Measured {report['date'][:10]} on {where}; torch {m['torch']}, commit "
             f"{(report['git_commit'] or '?')[:12]}, load average {m.get('loadavg_before')} before and "
             f"{m.get('loadavg_after')} after. Cells: median time per step, ratio baseline time / this "
             "time (> 1 is faster; the baseline is torch-fused, or torch-foreach where torch has no fused "
             "step) with its inter-quartile range in brackets (per round of samples taken in "
             "turns), the time's inter-quartile range as % of the median, and 'noisy' where either is wide; "
             "†: ratio against the baseline "
             "samples taken in turns with this provider (big shapes), which can differ from the baseline's "
             "cell (all its samples). Last column: the first fusedclr provider's GB/s and % of the same run's "
             "copy bandwidth."]
    for optim in report["config"]["optims"]:
        for schedule in report["config"]["schedules"]:
            if not any(r["optim"] == optim and r["schedule"] == schedule for r in report["results"]):
                continue  # not reached (time limit, or a run still going)
            base = next((r["baseline"] for r in report["results"] if r["optim"] == optim and "baseline" in r),
                        BASELINE)
            parts.append(f"**{optim}, {'constant lr' if schedule == 'constant' else 'OneCycleLR'}**"
                         + ("" if base == BASELINE else f" (ratios vs {base}: torch has no fused step for it)")
                         + "\n\n" + markdown_table(report, optim, schedule))
    if any(r.get("vs_torch") for r in report["results"]):
        parts.append("**fusedclr against each torch implementation** (and DeepSpeed's CPU Adam where it ran; "
                     "median of the per-round ratios their time / fusedclr time, > 1: fusedclr is faster; IQR in "
                     "brackets)\n\n" + markdown_vs_torch(report))
    check = m.get("thread_check")
    if check and not check["steady"]:
        parts.insert(1, f"Thread check: torch at {check['threads']} threads was unsteady here "
                     f"({'; '.join(check['reasons'])}); this run used {check['used']} thread(s).")
    by_reason: dict[str, list[str]] = {}
    for c in report.get("not_run", []):
        by_reason.setdefault(c["reason"], []).append(f"{c['optim']} {c['shape']} {c['dtype']} {c['schedule']}")
    for reason, cases in by_reason.items():
        parts.append(f"Not run ({reason}): {', '.join(cases)}.")
    return "\n\n".join(parts) + "\n"


def markdown_vs_torch(report: dict[str, Any]) -> str:
    """One row per (case, fusedclr provider): its time, GB/s, % copy and its ratio against every torch
    provider (and DeepSpeed's CPU Adam) it sampled in turns with (``vs_torch``), each with the IQR of
    the per-round ratios."""
    torch_names = [p for p in COMPARED_PROVIDERS if any(p in r.get("vs_torch", {}) for r in report["results"])]
    m = report["machine"]
    out = ["| optimizer | shape | dtype | schedule | threads | provider | ms per step (IQR) | GB/s (% copy) | "
           + " | ".join(f"vs {t}" for t in torch_names) + " |",
           "|---|---|---|---|---|---|---|---|" + "---|" * len(torch_names)]
    for r in report["results"]:
        if r["status"] != "ok" or not r["provider"].startswith("fusedclr-"):
            continue
        cells = []
        for t in torch_names:
            v = r.get("vs_torch", {}).get(t)
            cells.append("-" if v is None else f"{_ratio(v['ratio'])} [{_ratio(v['q1']).removesuffix('x')}-"
                         f"{_ratio(v['q3'])}]")
        out.append(f"| {r['optim']} | {r['shape']} | {r['dtype']} | {r['schedule']} | "
                   f"{m.get('torch_threads', '?')} | {r['provider']} | {_ms(r['median_s'])} "
                   f"({100 * r['iqr_rel']:.0f}%) | {r['gbps']:.1f} ({r['pct_copy']:.0f}%) | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def _label_shapes(ax: Any, points: Sequence[tuple[float, float, str]]) -> None:
    """Names the baseline's points: right of the point in the left part of the axis, left of
    it near the right edge (so no label leaves the panel), alternately above and below
    neighbours so close points do not overlap."""
    lo, hi = ax.get_xlim()
    for i, (x, y, name) in enumerate(points):
        near_right = math.log(x / lo) > 0.7 * math.log(hi / lo)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-5 if near_right else 5, 5 if i % 2 else -11),
                    ha="right" if near_right else "left", fontsize=7, color="0.3", clip_on=True)


def plot(report: dict[str, Any], path: str) -> None:
    """Log-log time per step against tensor count (left) and parameter count (right).

    One row per (optimizer, dtype, schedule), one colour per provider. The
    ``n x numel`` shapes are joined by lines (in that family, more tensors
    means smaller ones); model-shaped lists are stars, unjoined. Bars span the
    inter-quartile range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [r for r in report["results"] if r["status"] == "ok"]
    panels = list(dict.fromkeys((r["optim"], r["dtype"], r["schedule"]) for r in ok)) or [("-", "-", "-")]
    providers = [p for p in report["config"]["providers"] if any(r["provider"] == p for r in ok)]
    colors = {p: f"C{i}" for i, p in enumerate(PROVIDERS)}
    top_in, bottom_in = 1.25, 0.6  # title and legend; x label (inches)
    height = 3.9 * len(panels) + top_in + bottom_in
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, height), squeeze=False)
    # Fixed margins: tight_layout measured every label and took half the time of the whole plot.
    fig.subplots_adjust(left=0.065, right=0.985, top=1 - top_in / height, bottom=bottom_in / height,
                        hspace=0.38, wspace=0.18)
    for row, (optim, dtype, schedule) in enumerate(panels):
        mine = [r for r in ok if (r["optim"], r["dtype"], r["schedule"]) == (optim, dtype, schedule)]
        for col, (xkey, xlabel) in enumerate((("tensors", "tensors per step"), ("numel", "parameters per step"))):
            ax = axes[row][col]
            for p in providers:
                for family, fmt in ((SHAPES_NXM, "o-"), (None, "*")):
                    pts = sorted(
                        (r[xkey], r["median_s"] * 1e3, r["q1_s"] * 1e3, r["q3_s"] * 1e3)
                        for r in mine
                        if r["provider"] == p and ((r["shape"] in family) if family else (r["shape"] not in SHAPES_NXM))
                    )
                    if not pts:
                        continue
                    xs, ys, lo, hi = zip(*pts)
                    ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                                fmt=fmt, color=colors[p], ms=4 if family else 9, capsize=2, lw=1.3)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.margins(x=0.12)
            _label_shapes(ax, sorted((r[xkey], r["median_s"] * 1e3, r["shape"]) for r in mine
                                     if r["provider"] == r.get("baseline", BASELINE)))
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel("ms per step (median)", fontsize=9)
            sched = "constant lr" if schedule == "constant" else "OneCycleLR (torch's / fusedclr's in-kernel)"
            ax.set_title(f"{optim} {dtype}, {sched}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m.get('torch_threads', '?')} torch threads"
    fig.suptitle(f"fusedclr bench on {report['config']['device']}: {where}, torch {m['torch']}, "
                 f"{report['date'][:10]}; bars: inter-quartile range", fontsize=10, y=1 - 0.3 / height)
    handles = [Line2D([], [], color=colors[p], marker="o", label=p) for p in providers]
    handles.append(Line2D([], [], color="0.3", marker="*", ms=9, ls="", label="model-shaped lists"))
    # At the top, under the title: the first thing read, whatever the number of rows.
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.55 / height),
               ncol=min(len(handles), 7), fontsize=8, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
