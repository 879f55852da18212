"""``PrefixStore`` with one memory tier: expiry, refresh, LRU eviction, pins, budget."""

from __future__ import annotations

import pytest

from tests.cache.payloads import BPT, T, host_store, key, payload

ENTRY = 10 * BPT  # a 10-token payload


def test_put_get_and_strict_expiry() -> None:
    store = host_store(1000)
    entry = store.put(key(1), payload(10), "5m", t0=0.0, tenant=T, now=1.0)
    assert entry is not None and entry.expires_at == 300.0 and entry.tier == "host"
    assert store.get(key(1), 299.0) is entry
    assert store.get(key(1), 300.0) is None  # strict: expired at exactly t0 + ttl
    assert len(store) == 0 and store.used_bytes == 0
    assert store.stats.evictions == {("host", "expired"): 1}
    store.check_integrity()


def test_touch_refreshes_from_request_start_and_never_shortens() -> None:
    store = host_store(10_000)
    entry = store.put(key(1), payload(10), "5m", t0=0.0, tenant=T, now=0.0)
    assert entry is not None
    store.touch(entry, t0=240.0)
    assert entry.expires_at == 540.0
    store.touch(entry, t0=100.0)
    assert entry.expires_at == 540.0
    one_hour = store.put(key(2), payload(10, 1), "1h", t0=0.0, tenant=T, now=0.0)
    assert one_hour is not None and one_hour.expires_at == 3600.0
    store.touch(one_hour, t0=10.0)
    assert one_hour.expires_at == 3610.0  # TTL class is fixed at write


def test_entries_are_immutable_put_returns_existing() -> None:
    store = host_store(10_000)
    first = store.put(key(1), payload(10), "5m", 0.0, T, 0.0)
    second = store.put(key(1), payload(20), "1h", 1.0, T, 1.0)
    assert second is first and store.used_bytes == ENTRY
    assert first is not None and first.ttl == "5m"


def test_eviction_expired_first_then_lru_and_pins_protected() -> None:
    store = host_store(3 * ENTRY)
    a = store.put(key(1), payload(10, 1), "1h", 0.0, T, 0.0)
    b = store.put(key(2), payload(10, 2), "5m", 0.0, T, 0.0)
    c = store.put(key(3), payload(10, 3), "1h", 0.0, T, 0.0)
    assert a and b and c
    # b expires; a is the least recently used live entry, but expired b goes first.
    store.touch(a, 10.0)  # LRU order is now b, c, a
    d = store.put(key(4), payload(10, 4), "1h", 400.0, T, 400.0)
    assert d is not None
    assert [e.key for e in store.entries()] == [key(3), key(1), key(4)]
    assert store.stats.evictions == {("host", "expired"): 1}
    # Under pressure the least recently used live entry goes, unless it is pinned.
    store.pin(c)
    e = store.put(key(5), payload(10, 5), "1h", 401.0, T, 401.0)
    assert e is not None
    assert [x.key for x in store.entries()] == [key(3), key(4), key(5)]  # a evicted, c pinned
    assert store.stats.evictions["host", "capacity"] == 1
    store.check_integrity()


def test_no_room_is_a_result_not_an_error() -> None:
    store = host_store(ENTRY + ENTRY // 2)
    a = store.put(key(1), payload(10, 1), "5m", 0.0, T, 0.0)
    assert a is not None
    store.pin(a)
    assert store.put(key(2), payload(10, 2), "5m", 0.0, T, 0.0) is None
    assert store.put(key(3), payload(100, 3), "5m", 0.0, T, 0.0) is None
    assert store.stats.evictions["host", "rejected"] == 2
    store.unpin(a)
    with pytest.raises(RuntimeError):
        store.unpin(a)
    store.check_integrity()


def test_clear_and_sweep() -> None:
    store = host_store(10_000)
    store.put(key(1), payload(10, 1), "5m", 0.0, T, 0.0)
    store.put(key(2), payload(10, 2), "1h", 0.0, T, 0.0)
    assert store.evict_expired(301.0) == 1
    assert store.clear() == 1
    assert len(store) == 0
    assert store.stats.evictions == {("host", "expired"): 1, ("host", "cleared"): 1}
    store.check_integrity()


def test_nested_entries_share_pages_and_are_charged_once() -> None:
    # 10-token pages: entries at 25, 50 and 75 tokens share [0, 20) and [0, 50).
    store = host_store(10_000)
    entries = [store.put(key(n), payload(n), "5m", 0.0, T, 0.0) for n in (25, 50, 75)]
    assert all(entries)
    unique_tokens = 70 + 5 + 5  # pages 0..6 once, plus the partial pages of 25 and 75
    assert store.used_bytes == unique_tokens * BPT
    assert store.used_bytes <= 1.1 * 75 * BPT
    # Removing the longest releases only what no other entry holds.
    assert store.discard(entries[2])  # type: ignore[arg-type]
    assert store.used_bytes == (50 + 5) * BPT
    store.check_integrity()


def test_shared_pages_count_when_making_room() -> None:
    store = host_store(60 * BPT)
    a = store.put(key(1), payload(50), "5m", 0.0, T, 0.0)
    # 55 tokens shares a's five pages: only its 5-token tail is new, so a stays.
    b = store.put(key(2), payload(55), "5m", 0.0, T, 0.0)
    assert a and b and len(store) == 2 and store.used_bytes == 55 * BPT
    store.check_integrity()


def test_unpin_of_unpinned_and_discard_of_replaced_entry() -> None:
    store = host_store(10_000)
    a = store.put(key(1), payload(10), "5m", 0.0, T, 0.0)
    assert a is not None
    store.pin(a)
    # a expires while pinned: a new write under its key replaces the mapping; the reader's
    # discard of the old entry must not touch the new one.
    b = store.put(key(1), payload(10), "5m", 400.0, T, 400.0)
    assert b is not None and b is not a
    assert not store.discard(a)
    store.unpin(a)
    assert store.get(key(1), 401.0) is b
    store.check_integrity()
