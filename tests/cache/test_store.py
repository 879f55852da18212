from __future__ import annotations

from dataclasses import dataclass

import pytest

from promptcache.cache.store import PrefixStore
from promptcache.types import BlockHash, TenantId

T = TenantId("t")


@dataclass(frozen=True)
class Payload:
    num_tokens: int
    nbytes: int


def key(n: int) -> BlockHash:
    return BlockHash(n.to_bytes(32, "big"))


def test_put_get_and_strict_expiry() -> None:
    store = PrefixStore(1000)
    entry = store.put(key(1), Payload(10, 100), "5m", t0=0.0, tenant=T, now=1.0)
    assert entry is not None and entry.expires_at == 300.0
    assert store.get(key(1), 299.0) is entry
    assert store.get(key(1), 300.0) is None  # strict: expired at exactly t0 + ttl
    assert len(store) == 0 and store.used_bytes == 0
    assert store.stats.evictions["expired"] == 1
    store.check_integrity()


def test_touch_refreshes_from_request_start_and_never_shortens() -> None:
    store = PrefixStore(1000)
    entry = store.put(key(1), Payload(10, 100), "5m", t0=0.0, tenant=T, now=0.0)
    assert entry is not None
    store.touch(entry, t0=240.0)
    assert entry.expires_at == 540.0
    store.touch(entry, t0=100.0)
    assert entry.expires_at == 540.0
    one_hour = store.put(key(2), Payload(10, 100), "1h", t0=0.0, tenant=T, now=0.0)
    assert one_hour is not None and one_hour.expires_at == 3600.0
    store.touch(one_hour, t0=10.0)
    assert one_hour.expires_at == 3610.0  # TTL class is fixed at write


def test_entries_are_immutable_put_returns_existing() -> None:
    store = PrefixStore(1000)
    first = store.put(key(1), Payload(10, 100), "5m", 0.0, T, 0.0)
    second = store.put(key(1), Payload(10, 200), "1h", 1.0, T, 1.0)
    assert second is first and store.used_bytes == 100
    assert first is not None and first.ttl == "5m"


def test_eviction_expired_first_then_lru_and_pins_protected() -> None:
    store = PrefixStore(300)
    a = store.put(key(1), Payload(1, 100), "1h", 0.0, T, 0.0)
    b = store.put(key(2), Payload(1, 100), "5m", 0.0, T, 0.0)
    c = store.put(key(3), Payload(1, 100), "1h", 0.0, T, 0.0)
    assert a and b and c
    # b expires; a is the least recently used live entry, but expired b goes first.
    store.touch(a, 10.0)  # LRU order is now b, c, a
    d = store.put(key(4), Payload(1, 100), "1h", 400.0, T, 400.0)
    assert d is not None
    assert [e.key for e in store.entries()] == [key(3), key(1), key(4)]
    assert store.stats.evictions == {"expired": 1}
    # Under pressure the least recently used live entry goes, unless it is pinned.
    store.pin(c)
    e = store.put(key(5), Payload(1, 100), "1h", 401.0, T, 401.0)
    assert e is not None
    assert [x.key for x in store.entries()] == [key(3), key(4), key(5)]  # a evicted, c pinned
    assert store.stats.evictions["capacity"] == 1
    store.check_integrity()


def test_no_room_is_a_result_not_an_error() -> None:
    store = PrefixStore(150)
    a = store.put(key(1), Payload(1, 100), "5m", 0.0, T, 0.0)
    assert a is not None
    store.pin(a)
    assert store.put(key(2), Payload(1, 100), "5m", 0.0, T, 0.0) is None
    assert store.put(key(3), Payload(1, 1000), "5m", 0.0, T, 0.0) is None
    assert store.stats.evictions["rejected"] == 2
    store.unpin(a)
    with pytest.raises(RuntimeError):
        store.unpin(a)
    store.check_integrity()


def test_clear_and_sweep() -> None:
    store = PrefixStore(1000)
    store.put(key(1), Payload(1, 100), "5m", 0.0, T, 0.0)
    store.put(key(2), Payload(1, 100), "1h", 0.0, T, 0.0)
    assert store.evict_expired(301.0) == 1
    assert store.clear() == 1
    assert len(store) == 0
    store.check_integrity()
