"""``Lease``: a request's pin and in-flight keys, each released exactly once."""

from __future__ import annotations

import asyncio

import pytest

from promptcache.cache.inflight import InFlight
from promptcache.cache.lease import Lease
from promptcache.types import BlockHash, TenantId
from tests.cache.payloads import host_store, payload

KEY = BlockHash(b"k" * 32)
OTHER = BlockHash(b"o" * 32)


def test_release_unpins_and_finishes_once() -> None:
    async def scenario() -> None:
        store, inflight = host_store(1 << 20), InFlight()
        entry = store.put(KEY, payload(64), "5m", 0.0, TenantId("t"), 0.0)
        assert entry is not None
        store.pin(entry)  # the planner pins the hit it plans
        lease = Lease(store, inflight)
        lease.hold(entry, [OTHER])
        assert lease.keys == [OTHER] and OTHER in inflight
        waiter = asyncio.create_task(inflight.wait(OTHER, 5.0))
        await asyncio.sleep(0)
        lease.release()
        assert entry.ref_cnt == 0 and OTHER not in inflight
        assert await waiter
        lease.release()  # a second release (the request's finally) changes nothing
        assert entry.ref_cnt == 0

    asyncio.run(scenario())


def test_keys_another_request_computes_are_not_held() -> None:
    async def scenario() -> None:
        store, inflight = host_store(1 << 20), InFlight()
        first, second = Lease(store, inflight), Lease(store, inflight)
        first.hold(None, [KEY])
        second.hold(None, [KEY, OTHER])
        assert second.keys == [OTHER]
        second.release()
        assert KEY in inflight  # still the first request's
        first.release()
        assert KEY not in inflight

    asyncio.run(scenario())


def test_a_new_pin_needs_the_old_one_released() -> None:
    async def scenario() -> None:
        store, inflight = host_store(1 << 20), InFlight()
        entry = store.put(KEY, payload(64), "5m", 0.0, TenantId("t"), 0.0)
        assert entry is not None
        store.pin(entry)
        lease = Lease(store, inflight)
        lease.hold(entry, [])
        with pytest.raises(RuntimeError, match="pin"):
            lease.hold(entry, [])
        assert lease.unpin() is entry and entry.ref_cnt == 0
        assert lease.unpin() is None

    asyncio.run(scenario())
