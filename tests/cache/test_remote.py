"""The shared Redis tier's byte layer against a real ``redis-server``: chunked round trips,
expiry from the entry's TTL and extension that never shortens, one-round-trip probes, corrupt
and foreign values as deleted misses, cross-replica locks, the write-behind queue, and Redis
killed, hung and brought back under a live store."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from promptcache.cache.remote import (
    FIELD_EXPIRES_AT,
    FIELD_NCHUNKS,
    FIELD_SIZE,
    FIELD_VERSION,
    RemoteStore,
    RemoteWriter,
)
from promptcache.cache.remote.store import redact
from promptcache.engine.fake import FakeCodec, FakePayload
from promptcache.types import BlockHash
from tests.redis_server import RedisServer

T = TypeVar("T")
CHUNK = 1000
LOGGER = "promptcache.cache.remote.store"


def key(n: int) -> BlockHash:
    return BlockHash(n.to_bytes(32, "big"))


def run(
    server: RedisServer,
    body: Callable[[RemoteStore, Redis], Awaitable[T]],
    **options: Any,
) -> T:
    """``body(store, raw client)`` on a fresh event loop; both closed after it."""

    async def main() -> T:
        options.setdefault("chunk_bytes", CHUNK)
        # A loaded CI machine can stall a healthy Redis past the 0.5 s default; the tests of
        # a slow Redis give their own.
        options.setdefault("op_timeout_s", 5.0)
        store = RemoteStore(server.url, namespace="test-model", **options)
        raw = Redis.from_url(server.url)
        try:
            return await body(store, raw)
        finally:
            await store.close()
            await raw.aclose()

    return asyncio.run(main())


def later(seconds: float) -> float:
    return time.time() + seconds


async def entry_keys(store: RemoteStore, raw: Redis, k: BlockHash) -> list[bytes]:
    meta, _, _ = store.keys(k)
    prefix = meta.removesuffix("meta")
    return sorted(await raw.keys(prefix + "*"))


@pytest.mark.parametrize("size", [0, 1, CHUNK, 4 * CHUNK + 500])
def test_values_round_trip_in_chunks(redis_server: RedisServer, size: int) -> None:
    data = os.urandom(size)

    async def body(store: RemoteStore, raw: Redis) -> None:
        assert await store.put(key(1), data, {"tenant": "t", "tokens": "42"}, later(60))
        found = await store.get(key(1))
        assert found is not None
        meta, value = found
        assert value == data
        assert meta["tenant"] == "t" and meta["tokens"] == "42"
        assert meta[FIELD_SIZE] == str(size)
        assert abs(float(meta[FIELD_EXPIRES_AT]) - later(60)) < 5
        nchunks = -(-size // CHUNK)
        assert meta[FIELD_NCHUNKS] == str(nchunks)
        assert len(await entry_keys(store, raw, key(1))) == 1 + nchunks
        assert await store.get(key(2)) is None
        s = store.stats
        assert (s.writes, s.hits, s.misses, s.corrupt, s.errors) == (1, 1, 1, 0, 0)
        assert s.bytes_written == s.bytes_read == size

    run(redis_server, body)


def test_codec_bytes_round_trip_through_redis(redis_server: RedisServer) -> None:
    """The seam the tiers will use: ``KVCodec.encode`` in, ``decode`` out."""
    codec = FakeCodec()
    tokens = tuple(range(300))
    states = tuple(bytes([i % 256]) * 32 for i in range(301))
    payload = FakePayload(tokens, states, 64, (1, 2, 3, 4), 64, 5)

    async def body(store: RemoteStore, raw: Redis) -> None:
        assert await store.put(key(1), codec.encode(payload, {"e": "1"}), {}, later(60))
        found = await store.get(key(1))
        assert found is not None
        assert codec.decode(found[1]) == (payload, {"e": "1"})

    run(redis_server, body, chunk_bytes=4096)


def test_every_key_expires_at_the_entry_expiry(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        await store.put(key(1), os.urandom(3 * CHUNK), {}, later(60))
        names = await entry_keys(store, raw, key(1))
        assert len(names) == 4
        for name in names:
            assert 55_000 < await raw.pttl(name) <= 60_000
        # An expiry already past writes nothing.
        assert not await store.put(key(2), b"x", {}, later(-1))
        assert await entry_keys(store, raw, key(2)) == []
        # Redis drops the entry when its TTL ends.
        await store.put(key(3), os.urandom(2 * CHUNK), {}, later(0.3))
        await asyncio.sleep(0.5)
        assert await entry_keys(store, raw, key(3)) == []
        assert await store.get(key(3)) is None

    run(redis_server, body)


def test_extend_never_shortens(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        await store.put(key(1), os.urandom(3 * CHUNK), {}, later(60))
        names = await entry_keys(store, raw, key(1))
        assert not await store.extend(key(1), later(30))
        for name in names:
            assert 55_000 < await raw.pttl(name) <= 60_000
        assert await store.extend(key(1), later(3600))
        for name in names:
            assert 3_595_000 < await raw.pttl(name) <= 3_600_000
        assert (await store.metas([key(1)]))[key(1)][FIELD_EXPIRES_AT]
        assert not await store.extend(key(2), later(3600))  # nothing there: nothing created
        assert await entry_keys(store, raw, key(2)) == []
        assert store.stats.extends == 1

    run(redis_server, body)


def test_metas_probe_a_chain_in_one_round_trip(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        for n in (1, 3):
            await store.put(key(n), os.urandom(2 * CHUNK), {"n": str(n)}, later(60))
        round_trips: list[str] = []
        execute, command = Pipeline.execute, Redis.execute_command

        async def counted_execute(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
            round_trips.append("pipeline")
            return await execute(self, *args, **kwargs)

        async def counted_command(self: Redis, *args: Any, **kwargs: Any) -> Any:
            round_trips.append(str(args[0]))
            return await command(self, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "execute", counted_execute)
        monkeypatch.setattr(Redis, "execute_command", counted_command)
        found = await store.metas([key(n) for n in range(1, 6)])
        monkeypatch.undo()
        assert round_trips == ["pipeline"]
        assert sorted(found) == [key(1), key(3)]
        assert found[key(3)]["n"] == "3"
        assert await store.metas([]) == {}

    run(redis_server, body)


@pytest.mark.parametrize("damage", ["flip", "short", "missing", "extra bytes"])
def test_a_damaged_value_is_a_miss_and_deleted(redis_server: RedisServer, damage: str) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        data = os.urandom(4 * CHUNK)
        await store.put(key(1), data, {}, later(60))
        _, prefix, _ = store.keys(key(1))
        chunk = bytearray(data[CHUNK : 2 * CHUNK])
        if damage == "flip":
            chunk[7] ^= 1
            await raw.set(prefix + "1", bytes(chunk), keepttl=True)
        elif damage == "short":
            await raw.set(prefix + "1", bytes(chunk[:-1]), keepttl=True)
        elif damage == "missing":
            await raw.delete(prefix + "1")
        else:
            await raw.set(prefix + "3", data[3 * CHUNK :] + b"!", keepttl=True)
        assert await store.get(key(1)) is None
        assert await entry_keys(store, raw, key(1)) == []
        s = store.stats
        assert (s.corrupt, s.misses, s.hits, s.errors) == (1, 1, 0, 0)

    run(redis_server, body)


def test_a_value_replaced_between_reads_is_a_plain_miss(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica rewrites the entry between ``get``'s meta read and its chunk read: that
    read misses, and the new value is not mistaken for damage and deleted."""

    async def body(store: RemoteStore, raw: Redis) -> None:
        await store.put(key(1), os.urandom(3 * CHUNK), {}, later(60))
        new = os.urandom(2 * CHUNK)
        execute = Pipeline.execute
        replaced: list[bool] = []

        async def replace_first(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
            if self.is_transaction and not replaced:  # get's chunk read
                replaced.append(True)
                await store.put(key(1), new, {}, later(60))
            return await execute(self, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "execute", replace_first)
        assert await store.get(key(1)) is None
        monkeypatch.undo()
        assert replaced and store.stats.corrupt == 0
        found = await store.get(key(1))
        assert found is not None and found[1] == new

    run(redis_server, body)


@pytest.mark.parametrize(
    "field, value", [(FIELD_VERSION, "0"), (FIELD_NCHUNKS, "many"), (FIELD_SIZE, "-1")]
)
def test_a_foreign_meta_is_a_miss(redis_server: RedisServer, field: str, value: str) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        await store.put(key(1), os.urandom(2 * CHUNK), {}, later(60))
        meta, _, _ = store.keys(key(1))
        await raw.hset(meta, field, value)
        assert await store.metas([key(1)]) == {}  # a probe skips it...
        assert await store.get(key(1)) is None  # ...a read deletes it
        assert not await raw.exists(meta)
        assert store.stats.corrupt == 1

    run(redis_server, body)


def test_namespaces_and_reserved_names_are_apart(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        other = RemoteStore(redis_server.url, namespace="other-model")
        try:
            await store.put(key(1), b"ours", {}, later(60))
            assert await other.get(key(1)) is None
            assert await other.metas([key(1)]) == {}
        finally:
            await other.close()
        with pytest.raises(ValueError, match="reserved"):
            await store.put(key(2), b"x", {FIELD_SIZE: "1"}, later(60))
        assert await store.delete(key(1))
        assert not await store.delete(key(1))
        assert await entry_keys(store, raw, key(1)) == []

    run(redis_server, body)
    with pytest.raises(ValueError):
        RemoteStore(redis_server.url, namespace="a{b}")
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://host:6379") == "redis://host:6379"


def test_a_lock_has_one_owner(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        assert await store.lock_holder(key(1)) is None
        assert await store.try_lock(key(1), "replica-a", 10_000)
        assert not await store.try_lock(key(1), "replica-b", 10_000)
        assert await store.lock_holder(key(1)) == "replica-a"
        assert not await store.unlock(key(1), "replica-b")  # not b's to release
        assert await store.lock_holder(key(1)) == "replica-a"
        assert await store.unlock(key(1), "replica-a")
        assert await store.lock_holder(key(1)) is None
        assert await store.try_lock(key(1), "replica-b", 10_000)
        assert await store.try_lock(key(2), "replica-a", 10_000)  # locks are per key

    run(redis_server, body)


def test_an_expired_lock_goes_to_the_next_and_stays_theirs(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        assert await store.try_lock(key(1), "replica-a", 100)
        await asyncio.sleep(0.3)
        assert await store.try_lock(key(1), "replica-b", 10_000)
        assert not await store.unlock(key(1), "replica-a")  # a's late unlock spares b's lock
        assert await store.lock_holder(key(1)) == "replica-b"

    run(redis_server, body)


def test_the_writer_drops_what_does_not_fit_and_never_blocks(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        writer = RemoteWriter(store, max_items=2, max_bytes=3 * CHUNK)
        assert writer.submit_put(key(1), os.urandom(CHUNK), {}, later(60))
        assert writer.submit_put(key(2), os.urandom(CHUNK), {}, later(60))
        assert not writer.submit_put(key(3), os.urandom(CHUNK), {}, later(60))  # 2 items
        assert writer.pending == 2 and store.stats.dropped == 1
        writer.start()
        await writer.flush()
        assert writer.pending == 0 and writer.pending_bytes == 0
        assert not writer.submit_put(key(4), os.urandom(4 * CHUNK), {}, later(60))  # bytes
        assert store.stats.dropped == 2
        # A value made on a worker thread, then an extend of it, in order.
        made = os.urandom(CHUNK)
        assert writer.submit_put(key(5), lambda: made, {"m": "1"}, later(60), nbytes=CHUNK)
        assert writer.submit_extend(key(5), later(3600))
        with pytest.raises(TypeError):
            writer.submit_put(key(6), lambda: made, {}, later(60))
        await writer.stop()
        assert not writer.submit_extend(key(5), later(7200))  # stopped: dropped
        assert store.stats.dropped == 3
        assert [await store.get(key(n)) is not None for n in range(1, 6)] == [
            True,
            True,
            False,
            False,
            True,
        ]
        meta, _, _ = store.keys(key(5))
        assert await raw.pttl(meta) > 3_500_000
        assert store.stats.writes == 3

    run(redis_server, body)


def test_stop_drops_what_it_cannot_write_in_time(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        writer = RemoteWriter(store)
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow() -> bytes:
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=5)
            return b"late"

        writer.submit_put(key(1), slow, {}, later(60), nbytes=4)
        writer.submit_put(key(2), b"never", {}, later(60))
        writer.start()
        await writer.stop(timeout_s=0.2)
        gate.set()
        assert store.stats.dropped == 2
        assert writer.pending == 0

    run(redis_server, body)


@pytest.mark.timeout(60)
def test_redis_killed_means_misses_then_it_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def body(store: RemoteStore, raw: Redis) -> None:
        await store.put(key(1), os.urandom(3 * CHUNK), {}, later(60))
        writer = RemoteWriter(store)
        writer.start()
        redis_server.kill()
        # Liveness, not speed: every call answers (no exception) well within the bound.
        async with asyncio.timeout(5):
            assert await store.get(key(1)) is None
            assert not store.is_up
            for _ in range(3):
                assert await store.get(key(1)) is None
                assert await store.metas([key(1), key(2)]) == {}
                assert not await store.put(key(2), b"x", {}, later(60))
                assert not await store.extend(key(1), later(600))
                assert not await store.delete(key(1))
                assert await store.try_lock(key(1), "a", 1000)  # nobody to wait for
                assert not await store.unlock(key(1), "a")
                assert await store.lock_holder(key(1)) is None
                assert writer.submit_put(key(3), b"y", {}, later(60))
            await writer.flush()
        assert store.stats.skipped > 0 and store.stats.errors >= 1
        down = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down) == 1, "the outage is logged once"
        assert redis_server.url.split("//")[1] in down[0].getMessage()

        redis_server.restart()  # empty, same port
        async with asyncio.timeout(30):
            while not await store.ping():
                await asyncio.sleep(0.05)
        assert store.is_up
        assert len([r for r in caplog.records if "is back" in r.getMessage()]) == 1
        assert await store.put(key(4), os.urandom(2 * CHUNK), {}, later(60))
        assert await store.get(key(4)) is not None
        await writer.stop()

    run(redis_server, body, retry_s=0.1, max_retry_s=0.4)


@pytest.mark.timeout(60)
def test_a_hung_redis_times_out_and_recovers(redis_server: RedisServer) -> None:
    async def body(store: RemoteStore, raw: Redis) -> None:
        await store.put(key(1), os.urandom(3 * CHUNK), {}, later(60))
        redis_server.pause()
        try:
            async with asyncio.timeout(5):
                assert await store.get(key(1)) is None  # the operation deadline, then down
                assert not store.is_up
                assert await store.get(key(1)) is None  # at once, no second wait
        finally:
            redis_server.resume()
        async with asyncio.timeout(30):
            while await store.get(key(1)) is None:
                await asyncio.sleep(0.05)
        assert store.is_up

    run(redis_server, body, op_timeout_s=0.3, retry_s=0.1, max_retry_s=0.4)
