"""``RemoteTier`` under ``PrefixStore`` against a real ``redis-server``: an entry whose write is
done keeps Redis as its copy and is served from there once memory lets it go, entries found by
lookup are indexed charged nothing, reads check the bytes against the entry, and a full write
queue drops and counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from promptcache.cache.entry import Entry
from promptcache.cache.remote.store import RemoteStore
from promptcache.cache.remote.tier import RemoteTier, namespace
from promptcache.cache.remote.writer import RemoteWriter
from promptcache.cache.store import PrefixStore
from promptcache.cache.tiers import MemoryTier, TierStack
from promptcache.core.payload import CorruptPayload
from promptcache.engine.fake import FakeCodec
from tests.cache.payloads import BPT, T, key, payload
from tests.redis_server import RedisServer

R = TypeVar("R")
E = 10 * BPT  # a 10-token entry in memory


def run(
    server: RedisServer,
    body: Callable[[PrefixStore, RemoteTier], Awaitable[R]],
    *,
    memory: int = E,
    writer_items: int = 16,
) -> R:
    """``body(store, tier)``: a ``host`` tier of ``memory`` bytes above the remote tier."""

    async def main() -> R:
        codec = FakeCodec()
        remote = RemoteStore(server.url, namespace="test", chunk_bytes=4096)
        tier = RemoteTier(remote, codec, RemoteWriter(remote, max_items=writer_items))
        store = PrefixStore(TierStack([MemoryTier("host", memory, codec), tier]))
        tier.start()
        try:
            return await body(store, tier)
        finally:
            await tier.stop()

    return asyncio.run(main())


async def write(store: PrefixStore, tier: RemoteTier, entry: Entry) -> None:
    """What the service does after a commit: queue it for Redis, a copy once stored."""
    data = store.resident(entry)
    assert data is not None
    assert tier.write(entry, data, lambda stored: (stored and store.shared(entry, tier)) or None)
    await tier.writer.flush()


def now() -> float:
    return time.time()


def test_a_written_entry_is_served_from_redis_once_memory_lets_it_go(
    redis_server: RedisServer,
) -> None:
    async def body(store: PrefixStore, tier: RemoteTier) -> None:
        original = payload(10, 1)
        first = store.put(key(1), original, "5m", now(), T, now())
        assert first is not None
        await write(store, tier, first)
        assert (first.tier, first.copies) == ("host", {"remote"})
        store.check_integrity()
        second = store.put(key(2), payload(10, 2), "5m", now(), T, now())  # no room for both
        assert second is not None and (first.tier, first.copies) == ("remote", set())
        assert tier.used_bytes == 0 and len(tier) == 1
        store.check_integrity()
        store.pin(first)
        loaded = await asyncio.to_thread(store.loader(first))
        assert loaded == original
        assert store.promote(first, loaded, now())
        store.unpin(first)
        # Back in memory, Redis its copy; 2 had none, so it had to go.
        assert (first.tier, first.copies) == ("host", {"remote"})
        assert store.get(key(2), now()) is None
        store.check_integrity()

    run(redis_server, body)


def test_entries_found_by_lookup_are_indexed_charged_nothing(redis_server: RedisServer) -> None:
    async def body(store: PrefixStore, tier: RemoteTier) -> None:
        entry = store.put(key(1), payload(10, 1), "5m", now(), T, now())
        assert entry is not None
        await write(store, tier, entry)
        other = PrefixStore(TierStack([MemoryTier("host", E, tier.codec), tier]))
        (found,) = await tier.lookup([key(1), key(2)], T)
        assert await tier.lookup([key(1)], "someone-else") == []  # type: ignore[arg-type]
        # ``tier`` already indexes the first store's copy; a replica has its own tier object.
        tier.release(entry)
        entry.copies.clear()
        assert other.adopt(tier, found, now())
        assert (found.tier, found.parts, found.num_tokens) == ("remote", (), 10)
        assert not other.adopt(tier, found, now())  # known already
        assert found.expires_at == pytest.approx(entry.expires_at, abs=0.01)
        late = Entry(key(3), T, 10, "5m", 0.0, 1.0)
        assert not other.adopt(tier, late, now())  # expired
        other.check_integrity()

    run(redis_server, body)


def test_a_value_that_is_not_the_entrys_is_deleted_and_a_miss(redis_server: RedisServer) -> None:
    async def body(store: PrefixStore, tier: RemoteTier) -> None:
        entry = store.put(key(1), payload(10, 1), "5m", now(), T, now())
        assert entry is not None
        await write(store, tier, entry)
        # Another entry's bytes under this key (a valid encoding, checksums fine).
        wrong = tier.codec.encode(payload(12, 7), {"promptcache.key": key(9).hex()})
        assert await tier.store.put(key(1), wrong, {"x": "1"}, entry.expires_at)
        store.demote(entry, now())  # memory lets it go: Redis is read next
        assert entry.tier == "remote"
        with pytest.raises(CorruptPayload):
            await asyncio.to_thread(store.loader(entry))
        assert await tier.store.metas([key(1)]) == {}  # deleted before the miss is reported

    run(redis_server, body)


def test_a_full_queue_drops_and_counts(redis_server: RedisServer) -> None:
    async def body(store: PrefixStore, tier: RemoteTier) -> None:
        await tier.writer.stop()
        tier.writer = RemoteWriter(tier.store, max_items=1)  # not started: nothing drains
        entries = [store.put(key(n), payload(5, n), "5m", now(), T, now()) for n in (1, 2)]
        done: list[bool] = []
        assert [tier.write(e, payload(5, n), done.append) for n, e in enumerate(entries) if e] == [
            True,
            False,
        ]
        assert tier.store.stats.dropped == 1 and done == []
        tier.writer.start()
        await tier.writer.flush()
        assert done == [True]

    run(redis_server, body, memory=4 * E)


def test_the_namespace_keeps_models_and_layouts_apart() -> None:
    assert namespace("m", "r1", "kv/1") != namespace("m", "r2", "kv/1")
    assert namespace("m", "r1", "kv/1") != namespace("m", "r1", "kv/2")
    assert "{" not in namespace("{m}", "r", "l") and "}" not in namespace("{m}", "r", "l")
