"""Per-run figures from per-request records: TTFT percentiles by hit and miss, time per request,
decode rate, throughput, tokens not recomputed and hosted-price costs; the terminal table and the
JSON file.

Percentiles interpolate linearly between closest ranks (numpy's default, Hyndman-Fan type 7).
A request is a *hit* when the server reports cache reads for at least half of its prompt. For a
server that reports no cache usage the split falls back to the workload's own view (the request's
stable prefix was sent before) and the table says so; token and cost figures it cannot know read
"not reported". A hit sent while an earlier miss of the same prefix had not yet begun to answer
is *joined* (``joined_hits``): it waits for that miss to write the prefix (a server with single
flight) or reads it once written, so its TTFT is the miss's less a head start; the table counts
those apart from the hits' percentiles.

The decode rate of a request is its output tokens after the first over the time after the first
token (``(n - 1) / (total - ttft)``): what a reader of the streamed answer sees. Where the server
reports no output tokens, its stream's content deltas stand in for them (one per token on a
server that streams token by token) and the table marks the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from promptcache.bench import cluster
from promptcache.bench.client import RequestRecord
from promptcache.bench.prices import Prices, cost

NOT_REPORTED = "not reported"
HIT_SHARE = 0.5
"""By usage, a request is a hit when it read at least this share of its prompt from the cache."""


@dataclass
class Run:
    """One workload run against one server."""

    label: str
    url: str
    protocol: str
    cold: bool
    records: list[RequestRecord]
    ttl: str = "5m"
    notes: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    """The URLs of a run across several servers (``record.target`` indexes them); empty: ``url``."""

    def target_urls(self) -> list[str]:
        """Every server the run sent requests to, in ``record.target`` order."""
        return self.targets or [self.url]


@dataclass(frozen=True)
class Stats:
    """Count, mean and percentiles of a sample (``None`` when it is empty)."""

    n: int
    mean: float | None
    p50: float | None
    p95: float | None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of an empty sample")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: Sequence[float]) -> Stats:
    """``Stats`` of ``values``."""
    if not values:
        return Stats(0, None, None, None)
    return Stats(
        len(values), sum(values) / len(values), percentile(values, 0.5), percentile(values, 0.95)
    )


def request_costs(
    r: RequestRecord, prices: Prices, ttl: str = "5m"
) -> tuple[float | None, float | None]:
    """(cost with caching, cost without caching) of one request; ``None`` where unknowable.

    Without caching every prompt token is billed as input. With caching, reads and writes are
    billed with their multipliers; writes the server does not split by TTL are billed at the TTL
    the workload asked for.
    """
    if r.error is not None or r.prompt_tokens is None or r.output_tokens is None:
        return None, None
    uncached = cost(prices, uncached=r.prompt_tokens, output=r.output_tokens)
    if r.cache_read_tokens is None or r.cache_write_tokens is None:
        return None, uncached
    written = r.cache_write_tokens
    w1h = r.cache_write_1h_tokens
    if w1h is None:
        w1h = written if ttl == "1h" else 0
    cached = cost(
        prices,
        uncached=r.prompt_tokens - r.cache_read_tokens - written,
        read=r.cache_read_tokens,
        write_5m=written - w1h,
        write_1h=w1h,
        output=r.output_tokens,
    )
    return cached, uncached


def _total(values: Sequence[int | float | None]) -> Any:
    """The sum, or ``None`` when any value is unknown (a partial sum would mislead)."""
    if any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


@dataclass(frozen=True)
class Summary:
    """The per-run figures."""

    requests: int
    errors: int
    wall_s: float
    ttft: Stats
    hit: Stats
    miss: Stats
    joined: Stats
    """Hits sent while an earlier miss of their prefix was still before its first token (not
    in ``hit``)."""
    split_basis: str
    total_time: Stats
    decode_rate: Stats
    token_basis: str  # where output token counts come from: "usage", "chunks" (deltas), "none"
    output_tokens: int | None
    output_tokens_per_s: float | None  # aggregate: all output tokens over the run's wall time
    requests_per_min: float
    prompt_tokens: int | None
    cache_read_tokens: int | None
    cache_write_tokens: int | None
    cost_with_caching: float | None
    cost_without_caching: float | None
    cluster: cluster.ClusterFigures
    """Hit rates over all targets and per target (one target: the server's own)."""

    @property
    def saving(self) -> float | None:
        """Fraction of the uncached cost that caching saved."""
        if self.cost_with_caching is None or not self.cost_without_caching:
            return None
        return 1.0 - self.cost_with_caching / self.cost_without_caching

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the JSON report."""
        return {**asdict(self), "saving": self.saving}


def is_hit(r: RequestRecord, basis: str) -> bool:
    """Whether ``r`` counts as a cache hit under ``basis`` ("usage" or "workload").

    By usage, a hit reads at least half of its prompt from the cache: a server that reuses any
    common prefix also reports small reads on a new prompt (llama-server: 1 cached token, the
    BOS, on a new document), which do not make it a hit.
    """
    if basis == "usage":
        read = r.cache_read_tokens or 0
        if r.prompt_tokens:
            return read >= HIT_SHARE * r.prompt_tokens
        return read > 0
    return r.repeat


def joined_hits(ok: Sequence[RequestRecord], basis: str) -> set[int]:
    """The indices of the hits in ``ok`` sent while an earlier miss of the same prefix had not
    yet begun to answer: what they read, that miss was still writing."""
    misses = [r for r in ok if r.prefix and r.ttft_s is not None and not is_hit(r, basis)]
    return {
        r.index
        for r in ok
        if r.prefix
        and r.ttft_s is not None
        and is_hit(r, basis)
        and any(
            m.prefix == r.prefix
            and m.index != r.index
            and m.start_s <= r.start_s < m.start_s + (m.ttft_s or 0.0)
            for m in misses
        )
    }


def generated_tokens(r: RequestRecord) -> int | None:
    """Output tokens of ``r``: the reported count, else its stream's content deltas."""
    return r.output_tokens if r.output_tokens is not None else r.content_chunks


def decode_rate(r: RequestRecord) -> float | None:
    """Output tokens per second after the first token; ``None`` with fewer than two tokens."""
    n = generated_tokens(r)
    if r.error is not None or r.ttft_s is None or n is None or n < 2:
        return None
    span = r.total_s - r.ttft_s
    return (n - 1) / span if span > 0 else None


def _token_basis(ok: Sequence[RequestRecord]) -> str:
    if all(r.output_tokens is not None for r in ok):
        return "usage"
    if all(generated_tokens(r) is not None for r in ok):
        return "chunks"
    return "none"


def summarize(run: Run, prices: Prices) -> Summary:
    """The figures of ``run`` priced with ``prices``."""
    ok = sorted((r for r in run.records if r.error is None), key=lambda r: r.start_s)
    basis = "usage" if ok and all(r.cache_read_tokens is not None for r in ok) else "workload"
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    joined = joined_hits(ok, basis)
    hits = {r.index: r.ttft_s for r in ok if r.ttft_s is not None and is_hit(r, basis)}
    misses = [r.ttft_s for r in ok if r.ttft_s is not None and not is_hit(r, basis)]
    if run.records:
        begin = min(r.start_s for r in run.records)
        wall = max(r.start_s + r.total_s for r in run.records) - begin
    else:
        wall = 0.0
    out_tokens = _total([r.output_tokens for r in ok])
    generated = _total([generated_tokens(r) for r in ok])
    rates = [x for x in (decode_rate(r) for r in ok) if x is not None]
    costs = [request_costs(r, prices, run.ttl) for r in ok]
    return Summary(
        requests=len(run.records),
        errors=len(run.records) - len(ok),
        wall_s=wall,
        ttft=stats(ttfts),
        hit=stats([t for i, t in hits.items() if i not in joined]),
        miss=stats(misses),
        joined=stats([t for i, t in hits.items() if i in joined]),
        split_basis=basis,
        total_time=stats([r.total_s for r in ok]),
        decode_rate=stats(rates),
        token_basis=_token_basis(ok),
        output_tokens=out_tokens,
        output_tokens_per_s=generated / wall if generated is not None and wall > 0 else None,
        requests_per_min=60.0 * len(ok) / wall if wall > 0 else 0.0,
        prompt_tokens=_total([r.prompt_tokens for r in ok]),
        cache_read_tokens=_total([r.cache_read_tokens for r in ok]),
        cache_write_tokens=_total([r.cache_write_tokens for r in ok]),
        cost_with_caching=_total([c for c, _ in costs]),
        cost_without_caching=_total([u for _, u in costs]),
        cluster=cluster.figures(run.records, run.target_urls(), lambda r: is_hit(r, basis)),
    )


@dataclass
class Report:
    """Everything one ``promptcache bench`` invocation measured."""

    workload: str
    params: dict[str, Any]
    concurrency: int
    prices: Prices
    runs: list[Run]

    def to_json(self) -> dict[str, Any]:
        """The JSON document, with each run's summary next to its records."""
        return {
            "version": 1,
            "workload": self.workload,
            "params": self.params,
            "concurrency": self.concurrency,
            "prices": self.prices.to_json(),
            "runs": [
                {
                    "label": run.label,
                    "url": run.url,
                    "protocol": run.protocol,
                    "cold": run.cold,
                    "ttl": run.ttl,
                    "notes": run.notes,
                    "targets": run.target_urls(),
                    "summary": summarize(run, self.prices).to_json(),
                    "requests": [r.to_json() for r in run.records],
                }
                for run in self.runs
            ],
        }

    def write(self, path: Path) -> None:
        """Write the JSON document to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load(path: Path) -> Report:
    """Read a report written by ``Report.write`` (summaries are recomputed from the records)."""
    data = json.loads(path.read_text())
    runs = [
        Run(
            label=r["label"],
            url=r.get("url", ""),
            protocol=r.get("protocol", ""),
            cold=bool(r.get("cold", False)),
            records=[RequestRecord.from_json(q) for q in r["requests"]],
            ttl=r.get("ttl", "5m"),
            notes=list(r.get("notes", [])),
            targets=list(r.get("targets", [])),
        )
        for r in data["runs"]
    ]
    return Report(
        workload=data["workload"],
        params=dict(data.get("params", {})),
        concurrency=int(data.get("concurrency", 1)),
        prices=Prices(**data["prices"]),
        runs=runs,
    )


def _s(x: float | None) -> str:
    return NOT_REPORTED if x is None else f"{x:.2f} s"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} tok/s"


def _n(x: int | None) -> str:
    return NOT_REPORTED if x is None else f"{x:,}"


def _usd(x: float | None) -> str:
    return NOT_REPORTED if x is None else f"${x:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = zip(row, widths, strict=True)
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
    return lines


def compare(a: str, a_mean: float, b: str, b_mean: float) -> str:
    """One line saying which of two mean TTFTs is lower, and by what factor."""
    faster, factor = (a, b_mean / a_mean) if a_mean <= b_mean else (b, a_mean / b_mean)
    return (
        f"mean TTFT: {a} {a_mean:.2f} s vs {b} {b_mean:.2f} s: "
        f"{faster} is {factor:.1f}x faster to the first token"
    )


def render(report: Report) -> str:
    """The terminal table: latency, then tokens and cost, then how the runs compare."""
    sums = [(run, summarize(run, report.prices)) for run in report.runs]
    n_req = max((s.requests for _, s in sums), default=0)
    out = [
        f"workload {report.workload}: {n_req} requests per run, concurrency {report.concurrency}, "
        + ", ".join(f"{k}={v}" for k, v in report.params.items() if k != "cold"),
        "",
    ]
    # The joined hits' column only where some run has them, so other tables keep their shape.
    any_joined = any(s.joined.n for _, s in sums)
    lat_header = ["run", "ok", "TTFT mean", "hit p50", "hit p95"]
    lat_header += ["joined p50"] if any_joined else []
    lat_header += ["miss p50", "miss p95"]
    lat_rows = []
    for run, s in sums:
        star = "" if s.split_basis == "usage" else "*"
        row = [
            run.label + star,
            f"{s.requests - s.errors}/{s.requests}",
            _s(s.ttft.mean),
            f"{_s(s.hit.p50)} ({s.hit.n})",
            _s(s.hit.p95),
        ]
        row += [f"{_s(s.joined.p50)} ({s.joined.n})"] if any_joined else []
        row += [f"{_s(s.miss.p50)} ({s.miss.n})", _s(s.miss.p95)]
        lat_rows.append(row)
    out += _table(lat_header, lat_rows)
    if any_joined:
        out.append(
            "joined: hits sent while an earlier miss of their prefix had not begun to answer "
            "(they read what it wrote; not in the hit columns)"
        )
    out.append("")
    ans_header = ["run", "total p50", "total mean", "decode p50", "out tok/s", "req/min", "wall"]
    ans_rows = []
    for run, s in sums:
        mark = "" if s.token_basis == "usage" else "\u2020"
        ans_rows.append(
            [
                run.label + mark,
                _s(s.total_time.p50),
                _s(s.total_time.mean),
                _rate(s.decode_rate.p50),
                "-" if s.output_tokens_per_s is None else f"{s.output_tokens_per_s:.1f}",
                f"{s.requests_per_min:.1f}",
                f"{s.wall_s:.0f} s",
            ]
        )
    out += _table(ans_header, ans_rows)
    out.append(
        "decode p50: per request, output tokens/s after the first token; "
        "out tok/s: all output tokens over the run's wall time"
    )
    if any(s.token_basis != "usage" for _, s in sums):
        out.append(
            "\u2020 the server reports no output tokens: its stream's content deltas are counted"
        )
    out.append("")
    cost_header = ["run", "prompt tokens", "not recomputed", "written", "cost cached"]
    cost_header += ["cost uncached", "saving"]
    cost_rows = []
    for run, s in sums:
        saving = s.saving
        cost_rows.append(
            [
                run.label,
                _n(s.prompt_tokens),
                _n(s.cache_read_tokens),
                _n(s.cache_write_tokens),
                _usd(s.cost_with_caching),
                _usd(s.cost_without_caching),
                "-" if saving is None else f"{saving:.0%}",
            ]
        )
    out += _table(cost_header, cost_rows)
    out.append(
        f"costs: what this traffic would cost at {report.prices.name} prices "
        f"(${report.prices.input_per_mtok:g}/${report.prices.output_per_mtok:g} per MTok in/out)"
    )
    if any(s.split_basis != "usage" for _, s in sums):
        out.append(
            "* the server reports no cache usage: hit/miss is the workload's view "
            "(a hit = its documents or tools were sent before)"
        )
    if len(sums) > 1:
        base_run, base = sums[0]
        for run, s in sums[1:]:
            if base.ttft.mean and s.ttft.mean:
                out.append(compare(base_run.label, base.ttft.mean, run.label, s.ttft.mean))
        for run, s in sums[1:]:
            a, b = base.decode_rate.p50, s.decode_rate.p50
            if a and b:
                out.append(
                    f"decode p50: {base_run.label} {a:.1f} tok/s vs {run.label} {b:.1f} tok/s "
                    f"({max(a, b) / min(a, b):.1f}x, {base_run.label if a >= b else run.label} "
                    "faster)"
                )
    for run, _ in sums:
        out += [f"note ({run.label}): {note}" for note in run.notes]
        errors = [r for r in run.records if r.error]
        if errors:
            out.append(f"{run.label}: {len(errors)} failed, first: {errors[0].error}")
    if any(len(run.target_urls()) > 1 for run, _ in sums):
        out += ["", *_cluster_lines(sums)]
    return "\n".join(out)


def _share(part: int | None, whole: int | None) -> str:
    if part is None or whole is None:
        return NOT_REPORTED
    if not whole:
        return "-"
    return f"{part / whole:.0%} ({part:,} of {whole:,})"


def _cluster_lines(sums: Sequence[tuple[Run, Summary]]) -> list[str]:
    """The cluster hit rate of every run, then what each target of a multi-target run served.

    Shown only when some run went to several targets, so one server's table keeps its shape.
    """
    header = ["run", "targets", "hit rate (tokens)", "hit rate (requests)"]
    rows = []
    for run, s in sums:
        c = s.cluster
        star = "" if s.split_basis == "usage" else "*"
        rows.append(
            [
                run.label + star,
                str(len(c.targets)),
                _share(c.cache_read_tokens, c.cacheable_tokens),
                _share(c.hits, c.requests),
            ]
        )
    out = _table(header, rows)
    out.append(
        "cluster hit rate, over all targets: tokens read from a cache / cacheable prompt tokens "
        "(read + written), and requests that hit / requests"
    )
    out.append("")
    t_header = ["run", "target", "requests", "hits", "TTFT mean", "read", "written"]
    t_rows = []
    for run, s in sums:
        if len(s.cluster.targets) < 2:
            continue
        for t in s.cluster.targets:
            failed = f" ({t.errors} failed)" if t.errors else ""
            t_rows.append(
                [
                    run.label,
                    t.url,
                    f"{t.requests}{failed}",
                    str(t.hits),
                    _s(t.ttft_mean),
                    _n(t.cache_read_tokens),
                    _n(t.cache_write_tokens),
                ]
            )
    out += _table(t_header, t_rows)
    out.append(
        "per target: unless the targets share a cache, a prefix written on one is written again "
        "on each other one it is sent to"
    )
    return out


__all__ = [
    "NOT_REPORTED",
    "Report",
    "Run",
    "Stats",
    "Summary",
    "compare",
    "decode_rate",
    "generated_tokens",
    "is_hit",
    "load",
    "percentile",
    "render",
    "request_costs",
    "stats",
    "summarize",
]
