"""Several targets at once: which replica each request goes to, and the cluster's figures.

A cluster run sends one workload across N replicas the way a load balancer without session
affinity would, so that a prefix written on one replica is asked for on another. Without a cache
the replicas share, each of them prefills a document again the first time it sees it, and the
cluster hit rate falls below one server's; a shared tier brings it back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from promptcache.bench.workloads import BenchRequest, prefix_key

if TYPE_CHECKING:  # the client routes with this module, so it cannot be imported from here
    from promptcache.bench.client import RequestRecord


def round_robin(requests: Sequence[BenchRequest], n: int) -> list[int]:
    """The target (0..n-1) of each request: round robin over the requests of each prefix.

    The k-th request of the p-th distinct prefix (tools and system prompt: a ``qa`` document, a
    ``chat`` conversation's document, the ``agent`` tool list) goes to target ``(p + k) mod n``.
    Where every request has its own prefix, or all share one, this is plain ``i mod n``. Plain
    ``i mod n`` alone would not do: the workloads interleave their documents, so with as many
    documents as targets (``qa``'s 3 on 3 replicas) every question about a document would land
    on the replica that wrote it, and the run would show no sharing at all. Starting each prefix
    one target further keeps the load within one request of even.
    """
    if n < 1:
        raise ValueError("round robin over no targets")
    first: dict[str, int] = {}
    seen: dict[str, int] = {}
    out = []
    for req in requests:
        key = prefix_key(req)
        p = first.setdefault(key, len(first))
        k = seen.get(key, 0)
        seen[key] = k + 1
        out.append((p + k) % n)
    return out


@dataclass(frozen=True)
class TargetFigures:
    """What one target of a run served; token sums are ``None`` where the server was silent."""

    url: str
    requests: int
    errors: int
    hits: int
    ttft_mean: float | None
    cache_read_tokens: int | None
    cache_write_tokens: int | None


@dataclass(frozen=True)
class ClusterFigures:
    """A run's hit rates over all its targets, and each target's share.

    ``token_hit_rate`` is tokens read from a cache over cacheable prompt tokens (read + written:
    every token up to a breakpoint is one or the other); ``request_hit_rate`` is requests that
    hit over requests that succeeded. ``None`` where the servers do not report what it needs.
    """

    targets: tuple[TargetFigures, ...]
    requests: int
    hits: int
    cache_read_tokens: int | None
    cacheable_tokens: int | None
    token_hit_rate: float | None
    request_hit_rate: float | None


def _sum(values: Sequence[int | None]) -> int | None:
    """The sum, or ``None`` when any value is unknown (a partial sum would mislead)."""
    if any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def figures(
    records: Sequence[RequestRecord], urls: Sequence[str], hit: Callable[[RequestRecord], bool]
) -> ClusterFigures:
    """The cluster figures of ``records`` sent to ``urls`` (``record.target`` indexes them);
    ``hit`` is the report's rule for a cache hit."""
    ok = [r for r in records if r.error is None]
    per_target = []
    for i, url in enumerate(urls):
        mine = [r for r in records if r.target == i]
        good = [r for r in mine if r.error is None]
        ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
        per_target.append(
            TargetFigures(
                url=url,
                requests=len(mine),
                errors=len(mine) - len(good),
                hits=sum(hit(r) for r in good),
                ttft_mean=sum(ttfts) / len(ttfts) if ttfts else None,
                cache_read_tokens=_sum([r.cache_read_tokens for r in good]),
                cache_write_tokens=_sum([r.cache_write_tokens for r in good]),
            )
        )
    read = _sum([r.cache_read_tokens for r in ok])
    written = _sum([r.cache_write_tokens for r in ok])
    cacheable = None if read is None or written is None else read + written
    hits = sum(hit(r) for r in ok)
    return ClusterFigures(
        targets=tuple(per_target),
        requests=len(ok),
        hits=hits,
        cache_read_tokens=read,
        cacheable_tokens=cacheable,
        token_hit_rate=read / cacheable if cacheable and read is not None else None,
        request_hit_rate=hits / len(ok) if ok else None,
    )


__all__ = ["ClusterFigures", "TargetFigures", "figures", "round_robin"]
