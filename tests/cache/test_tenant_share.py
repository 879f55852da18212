"""Tenant shares (spec §1.13): under pressure a tenant over its share of a tier loses its own
entries first, and a tenant within its share is never evicted to make room for one over it."""

from __future__ import annotations

import pytest

from promptcache.cache.entry import Entry
from promptcache.cache.store import PrefixStore
from promptcache.types import TenantId
from tests.cache.payloads import BPT, host_store, key, payload, stack

A, B = TenantId("a"), TenantId("b")
ENTRY = 5 * BPT  # a 5-token payload: no complete page, so no bytes shared between entries


def put(store: PrefixStore, n: int, tenant: TenantId, now: float = 0.0) -> Entry | None:
    return store.put(key(n), payload(5, n), "1h", now, tenant, now)


def keys_of(store: PrefixStore, tenant: TenantId) -> set[int]:
    return {int.from_bytes(e.key, "big") for e in store.entries() if e.tenant == tenant}


def test_a_flood_evicts_only_the_flooding_tenant() -> None:
    store = host_store(10 * ENTRY, tenant_share=0.5)
    for n in range(4):
        assert put(store, n, A) is not None
    for n in range(100, 120):  # b writes 20 entries into a budget of 10
        assert put(store, n, B, now=1.0) is not None
    assert keys_of(store, A) == {0, 1, 2, 3}
    assert keys_of(store, B) == set(range(114, 120))  # its own most recent
    assert store.used_bytes == 10 * ENTRY
    assert store.stats.evictions == {("host", "tenant_share"): 14}
    store.check_integrity()


def test_without_a_share_the_flood_takes_everything() -> None:
    """The attack the share prevents (plain LRU)."""
    store = host_store(10 * ENTRY)
    for n in range(4):
        put(store, n, A)
    for n in range(100, 120):
        put(store, n, B, now=1.0)
    assert keys_of(store, A) == set()
    assert store.stats.evictions == {("host", "capacity"): 14}


def test_the_tenant_over_its_share_goes_first_even_when_more_recent() -> None:
    store = host_store(10 * ENTRY, tenant_share=0.5)
    put(store, 0, A)  # a's entry is the least recently used
    for n in range(100, 109):  # b alone would fill the tier; with a there, it holds 9/10
        put(store, n, B, now=1.0)
    assert put(store, 1, A, now=2.0) is not None
    assert keys_of(store, A) == {0, 1}
    assert keys_of(store, B) == set(range(101, 109))
    assert store.stats.evictions == {("host", "tenant_share"): 1}


def test_a_tenant_alone_may_use_the_whole_budget() -> None:
    store = host_store(10 * ENTRY, tenant_share=0.5)
    for n in range(12):
        assert put(store, n, B) is not None
    assert keys_of(store, B) == set(range(2, 12))
    assert store.stats.evictions == {("host", "capacity"): 2}


def test_within_its_share_a_tenant_makes_room_by_plain_lru() -> None:
    store = host_store(10 * ENTRY, tenant_share=0.5)
    for n in range(5):
        put(store, n, A)
    for n in range(100, 105):
        put(store, n, B, now=1.0)
    # Both hold exactly half. a's next entry puts a over: a's own oldest goes.
    assert put(store, 5, A, now=2.0) is not None
    assert keys_of(store, A) == {1, 2, 3, 4, 5} and len(keys_of(store, B)) == 5
    assert store.stats.evictions == {("host", "tenant_share"): 1}


def test_an_over_share_entry_is_refused_rather_than_evicting_a_neighbour() -> None:
    store = host_store(10 * ENTRY, tenant_share=0.5)
    for n in range(5):
        put(store, n, A)
    pinned = [put(store, n, B, now=1.0) for n in range(100, 105)]
    for entry in pinned:
        assert entry is not None
        store.pin(entry)  # b's own entries are in use: nothing of b's can move
    assert put(store, 105, B, now=2.0) is None
    assert keys_of(store, A) == {0, 1, 2, 3, 4}
    assert store.stats.evictions == {("host", "tenant_share"): 1}
    store.check_integrity()


def test_share_applies_per_tier_and_demotes_the_flood() -> None:
    store = PrefixStore(tiers=stack(device=10 * ENTRY, host=40 * ENTRY), tenant_share=0.5)
    for n in range(4):
        put(store, n, A)
    for n in range(100, 120):
        put(store, n, B, now=1.0)
    device = {e.key for e in store.tiers.top.entries()}
    assert {key(n) for n in range(4)} <= device  # a's entries stay in the fast tier
    assert store.stats.demotions == {("device", "tenant_share"): 14}
    assert store.tiers.tier("device").tenant_bytes(A) == 4 * ENTRY
    assert store.tiers.tier("host").tenant_bytes(B) == 14 * ENTRY
    assert not store.stats.evictions
    store.check_integrity()


def test_shared_pages_are_charged_once_to_their_tenant() -> None:
    store = host_store(1000 * BPT, tenant_share=0.5)
    store.put(key(1), payload(25, 7), "5m", 0.0, A, 0.0)  # pages (7, 0), (7, 1) + a tail
    store.put(key(2), payload(35, 7), "5m", 0.0, A, 0.0)  # shares both pages
    tier = store.tiers.top
    assert tier.tenant_bytes(A) == tier.used_bytes == (25 + 15) * BPT
    store.check_integrity()


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_share_must_be_a_fraction(share: float) -> None:
    with pytest.raises(ValueError, match="tenant_share"):
        host_store(100, tenant_share=share)
