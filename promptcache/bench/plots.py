"""PNG plots of a report: TTFT by hit and miss per run beside each request's decode rate; cumulative
cost with and without caching.

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas directly, never pyplot, so
no display or global backend state is involved. Log axes carry plain-number ticks (0.3, 1, 6),
and legends sit outside the axes, below them, so they never hide a point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from promptcache.bench.report import Report, decode_rate, is_hit, request_costs, summarize

HIT, MISS, RATE = "#2a9d8f", "#e76f51", "#264653"
NICE = (1.0, 2.0, 3.0, 6.0)
"""Mantissas of log-axis ticks: 0.1, 0.2, 0.3, 0.6, 1, 2, 3, 6, 10, ..."""


def nice_ticks(lo: float, hi: float) -> list[float]:
    """Plain-number ticks covering ``[lo, hi]`` (positive), thinned to at most about eight."""
    lo, hi = max(lo, 1e-6), max(hi, lo)
    ticks = []
    for exp in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        ticks += [float(f"{m:g}e{exp}") for m in NICE]  # 0.3, not 0.30000000000000004
    below = [t for t in ticks if t <= lo]
    above = [t for t in ticks if t >= hi]
    inside = [t for t in ticks if lo < t < hi]
    chosen = [below[-1], *inside, above[0]]
    while len(chosen) > 8:  # keep the ends, drop every other tick between them
        chosen = [chosen[0], *chosen[1:-1][1::2], chosen[-1]]
    return chosen


def plain_log_axis(ax: Axes, values: Sequence[float], unit: str) -> None:
    """Log y axis with plain-number ticks ("0.3 s", "1 s", "6 s") spanning ``values``; a
    linear one where none is positive (a run whose every request failed: an empty log axis
    has no ticks to draw, and matplotlib raised)."""
    values = [v for v in values if v > 0]
    if not values:
        return
    ax.set_yscale("log")
    ticks = nice_ticks(min(values), max(values))
    ax.set_ylim(ticks[0] / 1.15, ticks[-1] * 1.15)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g} {unit}".rstrip()))
    ax.yaxis.set_minor_locator(NullLocator())


def _spread(i: int, offset: float, n: int) -> list[float]:
    # Spread points sideways deterministically so equal values stay visible.
    return [i + offset + 0.1 * ((k % 5) - 2) / 2 for k in range(n)]


def _ttft_axes(report: Report, ax: Axes) -> None:
    values: list[float] = []
    for i, run in enumerate(report.runs):
        basis = summarize(run, report.prices).split_basis
        ok = [r for r in run.records if r.error is None and r.ttft_s is not None]
        for offset, hit, colour in ((-0.18, True, HIT), (0.18, False, MISS)):
            ys = [r.ttft_s for r in ok if is_hit(r, basis) == hit and r.ttft_s is not None]
            if not ys:
                continue
            values += ys
            ax.scatter(_spread(i, offset, len(ys)), ys, s=18, color=colour, alpha=0.8)
            box = ax.boxplot([ys], positions=[i + offset], widths=0.28, showfliers=False)
            for line in box["medians"]:
                line.set_color(colour)
    ax.scatter([], [], color=HIT, label="TTFT, hit (cache read)")
    ax.scatter([], [], color=MISS, label="TTFT, miss")
    ax.set_xticks(range(len(report.runs)), [run.label for run in report.runs])
    plain_log_axis(ax, values, "s")
    ax.set_ylabel("time to first token (log scale)")
    ax.set_title("TTFT by cache hit and miss")
    ax.grid(axis="y", alpha=0.3)


def _decode_axes(report: Report, ax: Axes) -> None:
    values: list[float] = []
    for i, run in enumerate(report.runs):
        ys = [x for x in (decode_rate(r) for r in run.records) if x is not None]
        if ys:
            values += ys
            ax.scatter(_spread(i, 0.0, len(ys)), ys, s=18, color=RATE, alpha=0.8)
            box = ax.boxplot([ys], positions=[i], widths=0.4, showfliers=False)
            for line in box["medians"]:
                line.set_color(RATE)
        agg = summarize(run, report.prices).output_tokens_per_s
        if agg:
            values.append(agg)
            ax.scatter([i + 0.32], [agg], marker="D", s=36, color=MISS)
    ax.scatter([], [], color=RATE, label="decode rate per request")
    ax.scatter([], [], marker="D", color=MISS, label="aggregate output tok/s")
    ax.set_xticks(range(len(report.runs)), [run.label for run in report.runs])
    plain_log_axis(ax, values, "")
    ax.set_ylabel("output tokens/s after the first (log scale)")
    ax.set_title("Decode rate")
    ax.grid(axis="y", alpha=0.3)


def ttft_plot(report: Report, path: Path) -> Path:
    """TTFT of every request by hit and miss (left) beside each request's decode rate and the
    run's aggregate output rate (right), per run, on log axes."""
    width = max(9.0, 3.6 * len(report.runs) + 2)
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _ttft_axes(report, left)
    _decode_axes(report, right)
    fig.suptitle(
        f"workload {report.workload}, concurrency {report.concurrency}: "
        "first token, then the rest of the answer"
    )
    handles, labels = [], []
    for ax in (left, right):
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    fig.legend(handles, labels, loc="outside lower center", ncols=4, frameon=False)
    fig.savefig(path, dpi=110)
    return path


def cost_plot(report: Report, path: Path) -> Path:
    """Cumulative hosted-price cost over the run's requests, with caching and without."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ["#264653", "#e9c46a", "#f4a261", "#2a9d8f", "#8d99ae"]
    drawn = False  # any line with data
    for i, run in enumerate(report.runs):
        if run.cold:
            continue  # the same prompts as the cached run, so its line is that run's "without"
        colour = colours[i % len(colours)]
        ok = sorted((r for r in run.records if r.error is None), key=lambda r: r.start_s)
        costs = [request_costs(r, report.prices, run.ttl) for r in ok]
        missing = []
        for which, style, name in ((0, "-", "with caching"), (1, "--", "without caching")):
            values = [c[which] for c in costs]
            if not values or any(v is None for v in values):
                missing.append(name)
                continue
            total, ys = 0.0, [0.0]
            for v in values:
                total += v or 0.0
                ys.append(total)
            ax.plot(range(len(ys)), ys, style, color=colour, label=f"{run.label}: {name}")
            drawn = True
        if missing:
            # Said in the legend, so a missing line reads as "unknown", not as "free".
            what = "usage" if len(missing) == 2 else missing[0]
            ax.plot([], [], ":", color=colour, label=f"{run.label}: {what} not reported")
    if not drawn:
        ax.text(0.5, 0.5, "no server reported token usage", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("requests completed (in order sent)")
    ax.set_ylabel(f"cumulative cost (USD, {report.prices.name})")
    ax.set_title(f"Hosted-price cost of workload {report.workload}")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    fig.savefig(path, dpi=110)
    return path


def write_plots(report: Report, out_dir: Path, stem: str) -> list[Path]:
    """``<stem>-ttft.png`` (TTFT beside decode rate) and ``<stem>-cost.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        ttft_plot(report, out_dir / f"{stem}-ttft.png"),
        cost_plot(report, out_dir / f"{stem}-cost.png"),
    ]


__all__ = ["cost_plot", "nice_ticks", "plain_log_axis", "ttft_plot", "write_plots"]
