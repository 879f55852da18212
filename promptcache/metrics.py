"""Prometheus metrics: request counters and TTFT histograms kept as they happen, store gauges
and eviction counts read at scrape time. Each ``Metrics`` has its own registry, so several
services in one process (tests) never collide."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from promptcache.cache.store import PrefixStore
from promptcache.core.response import CacheUsage

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _StoreCollector(Collector):
    """Entries, bytes and evictions of the store, read when Prometheus scrapes."""

    def __init__(self, stores: Callable[[], dict[str, PrefixStore]]) -> None:
        self._stores = stores

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily(
            "promptcache_cache_entries", "Cache entries held, by tier", labels=["tier"]
        )
        used = GaugeMetricFamily(
            "promptcache_cache_bytes", "Bytes of KV held, by tier", labels=["tier"]
        )
        capacity = GaugeMetricFamily(
            "promptcache_cache_capacity_bytes", "Byte budget, by tier", labels=["tier"]
        )
        evictions = CounterMetricFamily(
            "promptcache_cache_evictions",
            "Entries removed, by tier and reason (capacity = before its TTL ran out)",
            labels=["tier", "reason"],
        )
        for tier, store in self._stores().items():
            entries.add_metric([tier], len(store))
            used.add_metric([tier], store.used_bytes)
            capacity.add_metric([tier], store.capacity_bytes)
            for reason, count in sorted(store.stats.evictions.items()):
                evictions.add_metric([tier, reason], count)
        yield from (entries, used, capacity, evictions)


class Metrics:
    """The server's metrics; ``observe`` once per served request."""

    def __init__(self, stores: Callable[[], dict[str, PrefixStore]]) -> None:
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
        self.ttft = Histogram(
            "promptcache_time_to_first_token_seconds",
            "From request start to the first output (or the end of a pre-warm), by outcome",
            ["outcome"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(stores))

    def observe(self, usage: CacheUsage, *, restored: int, computed: int, ttft_s: float) -> None:
        outcome = "hit" if usage.read_tokens > 0 else "miss"
        self.requests.labels(outcome).inc()
        self.read_tokens.inc(usage.read_tokens)
        for ttl, tokens in usage.written_tokens.items():
            self.written_tokens.labels(ttl).inc(tokens)
        self.prefill_saved.inc(restored)
        self.prefill_tokens.inc(computed)
        self.ttft.labels(outcome).observe(ttft_s)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


__all__ = ["Metrics"]
