"""PNG plots of a report: TTFT by hit and miss per run; cumulative cost with and without caching.

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas directly, never pyplot, so
no display or global backend state is involved.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from promptcache.bench.report import Report, is_hit, request_costs, summarize

HIT, MISS = "#2a9d8f", "#e76f51"


def ttft_plot(report: Report, path: Path) -> Path:
    """TTFT of every request, hits and misses side by side for each run (log scale)."""
    fig = Figure(figsize=(max(6.0, 2.2 * len(report.runs) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, run in enumerate(report.runs):
        basis = summarize(run, report.prices).split_basis
        ok = [r for r in run.records if r.error is None and r.ttft_s is not None]
        for offset, hit, colour in ((-0.18, True, HIT), (0.18, False, MISS)):
            ys = [r.ttft_s for r in ok if is_hit(r, basis) == hit and r.ttft_s is not None]
            if not ys:
                continue
            # Spread points sideways deterministically so equal values stay visible.
            xs = [i + offset + 0.1 * ((k % 5) - 2) / 2 for k in range(len(ys))]
            ax.scatter(xs, ys, s=18, color=colour, alpha=0.8, label=None)
            box = ax.boxplot([ys], positions=[i + offset], widths=0.28, showfliers=False)
            for line in box["medians"]:
                line.set_color(colour)
    ax.scatter([], [], color=HIT, label="hit (cache read)")
    ax.scatter([], [], color=MISS, label="miss")
    ax.set_xticks(range(len(report.runs)), [run.label for run in report.runs])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log scale)")
    ax.set_title(f"TTFT by cache hit and miss: workload {report.workload}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
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
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def write_plots(report: Report, out_dir: Path, stem: str) -> list[Path]:
    """Both plots as ``<stem>-ttft.png`` and ``<stem>-cost.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        ttft_plot(report, out_dir / f"{stem}-ttft.png"),
        cost_plot(report, out_dir / f"{stem}-cost.png"),
    ]


__all__ = ["cost_plot", "ttft_plot", "write_plots"]
