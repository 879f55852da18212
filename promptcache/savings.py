"""What the cache saved, live, per tenant and in total: tokens read instead of computed, prefill
seconds saved and money on a price sheet; with the misses by reason, the latest requests and a
time series for the dashboard.

Seconds come from the engine's measured prefill rate (``PrefillRate``: prompt tokens computed
per second of prefill, a moving average over served requests), so a read of R tokens saved
``R / rate`` seconds. Money uses the price sheet of ``promptcache bench --prices``
(``bench/prices.py``, one implementation): the prompt at full input price, minus what it cost
with the cache (reads at the read multiplier, writes at the write multipliers). A request that
writes more than it reads saves a negative amount: the write premium is real.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from promptcache.bench.prices import DEFAULT, Prices, cost
from promptcache.core.response import CacheMiss, CacheUsage
from promptcache.types import TenantId, TierName

RECENT = 200
BUCKET_S = 10.0
BUCKETS = 360
TENANTS = 1024


class PrefillRate:
    """Prompt tokens computed per second of prefill, an exponential moving average."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.tokens_per_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        old = self.tokens_per_s
        self.tokens_per_s = rate if old is None else old + self.weight * (rate - old)

    def seconds(self, tokens: int) -> float:
        return tokens / self.tokens_per_s if self.tokens_per_s else 0.0


@dataclass(slots=True)
class Totals:
    """Cumulative figures of one tenant, or of all."""

    requests: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    read_tokens: int = 0
    written_tokens: int = 0
    seconds_saved: float = 0.0
    cost: float = 0.0
    cost_without_cache: float = 0.0
    misses: Counter[str] = field(default_factory=Counter)
    read_by_tier: Counter[str] = field(default_factory=Counter)

    def add(self, usage: CacheUsage, misses: tuple[CacheMiss, ...], tier: str | None,
            seconds: float, paid: float, full: float) -> None:  # fmt: skip
        self.requests += 1
        self.hits += usage.read_tokens > 0
        self.prompt_tokens += usage.prompt_tokens
        self.read_tokens += usage.read_tokens
        self.written_tokens += usage.written_total
        self.seconds_saved += seconds
        self.cost += paid
        self.cost_without_cache += full
        self.misses.update(m.reason for m in misses)
        if tier is not None and usage.read_tokens:
            self.read_by_tier[tier] += usage.read_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "hits": self.hits,
            "hit_rate": round(self.hits / self.requests, 4) if self.requests else 0.0,
            "prompt_tokens": self.prompt_tokens,
            "read_tokens": self.read_tokens,
            "written_tokens": self.written_tokens,
            "computed_tokens": self.prompt_tokens - self.read_tokens,
            "prefill_seconds_saved": round(self.seconds_saved, 4),
            "cost": round(self.cost, 6),
            "cost_without_cache": round(self.cost_without_cache, 6),
            "money_saved": round(self.cost_without_cache - self.cost, 6),
            "misses_by_reason": dict(sorted(self.misses.items())),
            "read_tokens_by_tier": dict(sorted(self.read_by_tier.items())),
        }


@dataclass(slots=True)
class _Bucket:
    start: float
    requests: int = 0
    hits: int = 0
    read_tokens: int = 0


class Ledger:
    """The savings of every request, kept per tenant (at most ``TENANTS``) and in total."""

    def __init__(self, prices: Prices = DEFAULT, bucket_s: float = BUCKET_S) -> None:
        self.prices = prices
        self.bucket_s = bucket_s
        self.rate = PrefillRate()
        self.total = Totals()
        self._tenants: OrderedDict[TenantId, Totals] = OrderedDict()
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._series: OrderedDict[TenantId | None, deque[_Bucket]] = OrderedDict()

    def record(
        self,
        tenant: TenantId,
        usage: CacheUsage,
        *,
        misses: tuple[CacheMiss, ...],
        tier: TierName | None,
        ttft_s: float,
        now: float,
    ) -> None:
        """Account one served request (its prompt side: output costs the same either way)."""
        seconds = self.rate.seconds(usage.read_tokens)
        paid = cost(
            self.prices,
            uncached=usage.uncached_tokens,
            read=usage.read_tokens,
            write_5m=usage.written_tokens["5m"],
            write_1h=usage.written_tokens["1h"],
        )
        full = cost(self.prices, uncached=usage.prompt_tokens)
        totals = self._tenants.setdefault(tenant, Totals())
        self._tenants.move_to_end(tenant)
        while len(self._tenants) > TENANTS:
            self._tenants.popitem(last=False)
        for into in (self.total, totals):
            into.add(usage, misses, tier, seconds, paid, full)
        self._recent.append(
            {
                "time": now,
                "tenant": tenant,
                "prompt_tokens": usage.prompt_tokens,
                "read_tokens": usage.read_tokens,
                "written_tokens": usage.written_total,
                "outcome": "hit" if usage.read_tokens else "miss",
                "tier": tier if usage.read_tokens else None,
                "misses": [
                    {"block": m.block, "reason": m.reason, "tokens": m.tokens} for m in misses
                ],
                "ttft_ms": round(ttft_s * 1000, 1),
            }
        )
        for key in (None, tenant):
            bucket = self._bucket(key, now)
            bucket.requests += 1
            bucket.hits += usage.read_tokens > 0
            bucket.read_tokens += usage.read_tokens

    def _bucket(self, key: TenantId | None, now: float) -> _Bucket:
        series = self._series.setdefault(key, deque(maxlen=BUCKETS))
        self._series.move_to_end(key)
        while len(self._series) > TENANTS + 1:
            self._series.popitem(last=False)
        start = now - now % self.bucket_s
        if not series or series[-1].start != start:
            series.append(_Bucket(start))
        return series[-1]

    def totals(self, tenant: TenantId | None = None) -> Totals:
        """One tenant's figures (empty when it has none), or all when ``tenant`` is None."""
        if tenant is None:
            return self.total
        return self._tenants.get(tenant, Totals())

    def tenants(self) -> dict[TenantId, Totals]:
        return dict(self._tenants)

    def recent(self, tenant: TenantId | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest requests, newest first; only ``tenant``'s when given."""
        rows = [r for r in reversed(self._recent) if tenant is None or r["tenant"] == tenant]
        return rows[:limit]

    def series(self, tenant: TenantId | None = None) -> list[dict[str, Any]]:
        """Per time bucket: requests, hits, hit rate, read tokens and cumulative read tokens."""
        out = []
        cumulative = 0
        for bucket in self._series.get(tenant, ()):
            cumulative += bucket.read_tokens
            out.append(
                {
                    "time": bucket.start,
                    "requests": bucket.requests,
                    "hits": bucket.hits,
                    "hit_rate": round(bucket.hits / bucket.requests, 4) if bucket.requests else 0,
                    "read_tokens": bucket.read_tokens,
                    "tokens_saved": cumulative,
                }
            )
        return out


__all__ = ["Ledger", "PrefillRate", "Totals"]
