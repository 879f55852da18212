"""Prometheus metrics: request counters and TTFT histograms kept as they happen, per-tier store
gauges (bytes, peak bytes, budget), pinned entries, in-flight keys and eviction, demotion and
promotion counts read at scrape time, and the process's own figures (resident memory, CPU). Each
``Metrics`` has its own registry, so several services in one process (tests) never collide.

Misses are counted by reason (one per breakpoint not read), hits and read tokens by the tier the
entry was found in, and each tenant's bytes and share of each tier are read at scrape time,
labelled with a digest of the tenant (never the key or its name). With a shared tier
(``--redis-url``), its reads, writes, drops and errors and whether Redis is up are read from its
counters at scrape time (``promptcache_remote_*``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from promptcache.cache.remote.tier import RemoteTier
from promptcache.cache.store import PrefixStore
from promptcache.core.response import CacheMiss, CacheUsage


def tenant_digest(tenant: str) -> str:
    """A stable, non-reversible label for a tenant."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:12]


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _StoreCollector(Collector):
    """Entries, bytes, evictions and moves of the store per tier, pins and in-flight keys, read
    when Prometheus scrapes."""

    def __init__(self, store: Callable[[], PrefixStore], inflight: Callable[[], int]) -> None:
        self._store = store
        self._inflight = inflight

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily(
            "promptcache_cache_entries", "Cache entries served from each tier", labels=["tier"]
        )
        copies = GaugeMetricFamily(
            "promptcache_cache_copies",
            "Copies held by each tier (disk) of entries served from a tier above, written "
            "behind so a crash keeps them",
            labels=["tier"],
        )
        used = GaugeMetricFamily(
            "promptcache_cache_bytes",
            "Bytes of KV held, by tier (copies included)",
            labels=["tier"],
        )
        peak = GaugeMetricFamily(
            "promptcache_cache_peak_bytes", "Most bytes ever held, by tier", labels=["tier"]
        )
        capacity = GaugeMetricFamily(
            "promptcache_cache_capacity_bytes", "Byte budget, by tier", labels=["tier"]
        )
        evictions = CounterMetricFamily(
            "promptcache_cache_evictions",
            "Entries removed, by tier and reason (capacity = before its TTL ran out; "
            "tenant_share = its tenant was over its share of the tier, or refused for it)",
            labels=["tier", "reason"],
        )
        demotions = CounterMetricFamily(
            "promptcache_cache_demotions",
            "Entries moved one tier down (or further, when full), by the tier they left and reason",
            labels=["tier", "reason"],
        )
        promotions = CounterMetricFamily(
            "promptcache_cache_promotions",
            "Entries moved to the top tier on a hit, by the tier they left",
            labels=["tier", "reason"],
        )
        write_behind = CounterMetricFamily(
            "promptcache_cache_write_behind",
            "Copies written behind to a lower tier, by tier and outcome (written; skipped: the "
            "queue was full; no_room; abandoned: the entry went or moved meanwhile; failed; "
            "dropped: deleted later to make room)",
            labels=["tier", "outcome"],
        )
        tenant_bytes = GaugeMetricFamily(
            "promptcache_cache_tenant_bytes",
            "Bytes of KV held by each tenant (a digest of it), by tier",
            labels=["tier", "tenant"],
        )
        tenant_share = GaugeMetricFamily(
            "promptcache_cache_tenant_share",
            "Each tenant's share of each tier's budget (tenant_cache_share bounds it under "
            "pressure)",
            labels=["tier", "tenant"],
        )
        store = self._store()
        for tier in store.tiers:
            for tenant in sorted(tier.tenants()):
                held = tier.tenant_bytes(tenant)
                label = [tier.name, tenant_digest(tenant)]
                tenant_bytes.add_metric(label, held)
                tenant_share.add_metric(label, held / max(1, tier.capacity_bytes))
            served = sum(1 for entry in tier.entries() if entry.tier == tier.name)
            entries.add_metric([tier.name], served)
            copies.add_metric([tier.name], len(tier) - served)
            used.add_metric([tier.name], tier.used_bytes)
            peak.add_metric([tier.name], tier.peak_bytes)
            capacity.add_metric([tier.name], tier.capacity_bytes)
        pinned = GaugeMetricFamily(
            "promptcache_cache_pinned_entries",
            "Entries pinned by a running request (0 when idle)",
            value=sum(1 for entry in store.entries() if entry.ref_cnt > 0),
        )
        inflight = GaugeMetricFamily(
            "promptcache_inflight_keys",
            "Keys a running request is computing (single flight; 0 when idle)",
            value=self._inflight(),
        )
        stats = store.stats
        for family, counts in (
            (evictions, stats.evictions),
            (demotions, stats.demotions),
            (promotions, stats.promotions),
            (write_behind, stats.copies),
        ):
            for (tier_name, reason), count in sorted(counts.items()):
                family.add_metric([tier_name, reason], count)
        yield from (entries, copies, used, peak, capacity, pinned, inflight)
        yield from (tenant_bytes, tenant_share, evictions, demotions, promotions, write_behind)


class _RemoteCollector(Collector):
    """The shared tier's counters (``RemoteStats``) and health, read when Prometheus scrapes;
    nothing without a shared tier."""

    COUNTERS = (
        ("hits", "Values read from Redis (a hit there: its bytes fetched and checked)"),
        ("misses", "Reads that found nothing usable (gone, corrupt, failed, Redis down)"),
        ("writes", "Entries stored in Redis, written behind the requests"),
        ("extends", "Expiries in Redis moved later by a read that refreshed an entry"),
        ("dropped", "Writes to Redis dropped: the write-behind queue was full, or stopping"),
        ("errors", "Redis operations that failed (unreachable, too slow, refused)"),
        ("skipped", "Redis operations answered at once because Redis was down"),
        ("corrupt", "Values found damaged or foreign in Redis, and deleted"),
        ("bytes_written", "Bytes stored in Redis"),
        ("bytes_read", "Bytes read from Redis"),
    )

    def __init__(self, remote: Callable[[], RemoteTier | None]) -> None:
        self._remote = remote

    def collect(self) -> Iterator[Metric]:
        remote = self._remote()
        if remote is None:
            return
        stats = remote.store.stats
        for name, doc in self.COUNTERS:
            yield CounterMetricFamily(f"promptcache_remote_{name}", doc, value=getattr(stats, name))
        yield GaugeMetricFamily(
            "promptcache_remote_up",
            "1 while Redis answers, 0 from a failure until a retry finds it back",
            value=1 if remote.store.is_up else 0,
        )
        yield GaugeMetricFamily(
            "promptcache_remote_pending_writes",
            "Writes to Redis queued or running",
            value=remote.writer.pending,
        )


class Metrics:
    """The server's metrics; ``observe`` once per served request."""

    def __init__(
        self,
        store: Callable[[], PrefixStore],
        inflight: Callable[[], int],
        remote: Callable[[], RemoteTier | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "promptcache_requests",
            "Generation requests, by cache outcome (hit = read at least one token)",
            ["outcome"],
            registry=self.registry,
        )
        self.read_tokens = Counter(
            "promptcache_cache_read_tokens",
            "Prompt tokens read from the cache",
            registry=self.registry,
        )
        self.written_tokens = Counter(
            "promptcache_cache_written_tokens",
            "Prompt tokens written to the cache, by TTL",
            ["ttl"],
            registry=self.registry,
        )
        self.prefill_saved = Counter(
            "promptcache_prefill_tokens_saved",
            "Prompt tokens restored instead of recomputed",
            registry=self.registry,
        )
        self.prefill_tokens = Counter(
            "promptcache_prefill_tokens",
            "Prompt tokens computed by the engine",
            registry=self.registry,
        )
        self.misses = Counter(
            "promptcache_cache_misses",
            "Breakpoints not read, by reason (never_written, expired, evicted, below_minimum, "
            "outside_lookback, prefix_changed, model_changed)",
            ["reason"],
            registry=self.registry,
        )
        self.tier_hits = Counter(
            "promptcache_cache_hits",
            "Requests that read a cache entry, by the tier it was found in",
            ["tier"],
            registry=self.registry,
        )
        self.tier_read_tokens = Counter(
            "promptcache_cache_tier_read_tokens",
            "Prompt tokens read from the cache, by the tier the entry was found in",
            ["tier"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "promptcache_time_to_first_token_seconds",
            "From request start to the first output (or the end of a pre-warm), by outcome",
            ["outcome"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(store, inflight))
        self.registry.register(_RemoteCollector(remote))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends

    def observe(
        self,
        usage: CacheUsage,
        *,
        restored: int,
        computed: int,
        ttft_s: float,
        tier: str | None = None,
        misses: tuple[CacheMiss, ...] = (),
    ) -> None:
        outcome = "hit" if usage.read_tokens > 0 else "miss"
        self.requests.labels(outcome).inc()
        self.read_tokens.inc(usage.read_tokens)
        for ttl, tokens in usage.written_tokens.items():
            self.written_tokens.labels(ttl).inc(tokens)
        self.prefill_saved.inc(restored)
        self.prefill_tokens.inc(computed)
        self.ttft.labels(outcome).observe(ttft_s)
        for miss in misses:
            self.misses.labels(miss.reason).inc()
        if tier is not None and usage.read_tokens:
            self.tier_hits.labels(tier).inc()
            self.tier_read_tokens.labels(tier).inc(usage.read_tokens)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


__all__ = ["Metrics", "tenant_digest"]
