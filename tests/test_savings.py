"""The live savings ledger and its price sheet (the format of ``promptcache bench --prices``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptcache.bench.prices import Prices
from promptcache.config import ConfigError
from promptcache.core.response import CacheMiss, CacheUsage
from promptcache.savings import Ledger, PrefillRate
from promptcache.types import TenantId
from tests.conftest import make_service

A, B = TenantId("a"), TenantId("b")


def test_savings_use_the_price_sheet_and_the_prefill_rate() -> None:
    ledger = Ledger(Prices(input_per_mtok=1.0, read_multiplier=0.1, write_5m_multiplier=1.25))
    ledger.rate.observe(tokens=2000, seconds=1.0)
    write = CacheUsage(3000, 0, {"5m": 2000, "1h": 0})
    read = CacheUsage(3000, 2000, {"5m": 0, "1h": 0})
    ledger.record(
        A, write, misses=(CacheMiss("never_written", 0, 2000),), tier=None, ttft_s=1, now=5
    )
    ledger.record(A, read, misses=(), tier="host", ttft_s=0.1, now=25)
    ledger.record(B, write, misses=(), tier=None, ttft_s=1, now=26)
    a = ledger.totals(A).to_json()
    assert (a["requests"], a["hits"], a["read_tokens"]) == (2, 1, 2000)
    assert a["prefill_seconds_saved"] == pytest.approx(1.0)
    # 2000 written at 1.25x and 2000 read at 0.1x instead of 4000 at 1x: $0.00065 saved.
    assert a["money_saved"] == pytest.approx((4000 - 2000 * 1.25 - 2000 * 0.1) / 1e6)
    assert a["misses_by_reason"] == {"never_written": 1}
    assert a["read_tokens_by_tier"] == {"host": 2000}
    assert ledger.totals().requests == 3
    assert [r["tenant"] for r in ledger.recent(A)] == [A, A]
    assert [b["tokens_saved"] for b in ledger.series(A)] == [0, 2000]
    assert [b["requests"] for b in ledger.series()] == [1, 2]


def test_prefill_rate_is_a_moving_average() -> None:
    rate = PrefillRate(weight=0.5)
    assert rate.seconds(100) == 0.0  # nothing measured yet: no claim
    rate.observe(1000, 1.0)
    rate.observe(3000, 1.0)
    assert rate.tokens_per_s == 2000 and rate.seconds(1000) == 0.5


def test_the_service_reads_the_price_sheet(tmp_path: Path) -> None:
    sheet = tmp_path / "prices.toml"
    sheet.write_text('name = "local"\ninput_per_mtok = 0.5\n')
    assert make_service(prices_file=sheet).ledger.prices.input_per_mtok == 0.5
    sheet.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="unknown price keys"):
        make_service(prices_file=sheet)
