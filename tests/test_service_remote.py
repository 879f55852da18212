"""The shared Redis tier through ``Service`` on the fake engine, against a real ``redis-server``:
entries written behind with their TTL, read by another replica (its own local tiers) with exact
usage and the same answer, refreshed there, corrupt or foreign values as misses, single flight
across replicas (and a dead holder's lock lapsing), and Redis killed and restarted mid-run.

Each ``Service`` here is one replica; several run on one event loop, sharing nothing but Redis.
Their clocks start at the wall clock's time, since Redis expires keys on its own clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from promptcache.api.dashboard import stats_json
from promptcache.cache.clock import FakeClock
from promptcache.cache.hashing import block_hashes
from promptcache.cache.remote.store import RemoteStore
from promptcache.cache.remote.tier import RemoteTier
from promptcache.cache.remote.writer import RemoteWriter
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatResult, Started
from promptcache.engine.fake import FakeCodec, FakeEngine
from promptcache.service import Service
from promptcache.types import BlockHash
from tests.conftest import chat, collect, make_config, text, words
from tests.redis_server import RedisServer, free_port

T = TypeVar("T")


def sys_request(seed: int, question: str = "hi") -> ChatRequest:
    return chat(("user", [text(question)]), system=[text(words(1950 + 40 * seed, seed), "5m")])


def replica(
    redis: RedisServer | str | None, clock: FakeClock | None = None, **cache: Any
) -> Service:
    """A replica with its own engine and local tiers, and ``redis`` (a server or its URL) as its
    shared tier."""
    if redis is not None:
        cache["redis_url"] = redis if isinstance(redis, str) else redis.url
        # A loaded CI machine can stall a healthy Redis past the 0.5 s default.
        cache.setdefault("redis_timeout_s", 5.0)
    config = make_config(**cache)
    return Service(FakeEngine(), config, clock=clock or FakeClock(time.time()))


def run_replicas(services: list[Service], body: Callable[[], Awaitable[T]]) -> T:
    """Start every replica, run ``body`` on their one loop, stop them."""

    async def main() -> T:
        for service in services:
            await service.start()
        try:
            return await body()
        finally:
            for service in services:
                await service.stop()

    return asyncio.run(main())


async def ask(service: Service, request: ChatRequest) -> tuple[ChatResult, Started]:
    """The result and its ``Started`` event (which says the tier the hit was read from)."""
    started: list[Started] = []

    async def events() -> Any:
        async for event in service.generate(request):
            if isinstance(event, Started):
                started.append(event)
            yield event

    return await collect(events()), started[0]


async def flushed(*services: Service) -> None:
    """Wait until every write queued for Redis has run, and its lock is released."""
    for service in services:
        assert service.remote is not None
        await service.remote.writer.flush()
    await asyncio.sleep(0.05)  # the unlocks, which follow each write


def remote(service: Service) -> RemoteTier:
    assert service.remote is not None
    return service.remote


def engine(service: Service) -> FakeEngine:
    assert isinstance(service.engine, FakeEngine)
    return service.engine


def key_of(service: Service, request: ChatRequest, block: int = 0) -> BlockHash:
    prepared = service.prepare(request)
    return block_hashes(prepared.layout.blocks, service.namespace(request))[block]


def test_a_new_entry_is_written_behind_with_its_ttl(redis_server: RedisServer) -> None:
    clock = FakeClock(time.time())
    a = replica(redis_server, clock)

    async def body() -> None:
        result, _ = await ask(a, sys_request(1))
        await flushed(a)
        (entry,) = a.store.entries()
        assert entry.copies == {"remote"}  # written: a local eviction would leave it served there
        meta_key, _, _ = remote(a).store.keys(entry.key)
        raw = Redis.from_url(redis_server.url)
        try:
            pttl = await raw.pttl(meta_key)
            meta = await raw.hgetall(meta_key)
        finally:
            await raw.aclose()
        left = entry.expires_at - time.time()
        assert abs(pttl / 1000 - left) < 1 and 290 < left <= 300
        assert meta[b"promptcache.tenant"] == b"default"
        assert meta[b"promptcache.ttl"] == b"5m"
        assert int(meta[b"promptcache.num_tokens"]) == result.usage.written_total
        assert remote(a).store.stats.writes == 1
        stats = stats_json(a, None)["remote"]  # an admin's /v1/cache/stats
        assert (stats["writes"], stats["up"], stats["pending_writes"]) == (1, True, 0)
        assert "promptcache_remote_writes_total 1.0" in a.metrics.render().decode()
        a.store.check_integrity()

    run_replicas([a], body)


def test_another_replica_reads_it_with_exact_usage_and_the_same_answer(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock(time.time())
    a, b = replica(redis_server, clock), replica(redis_server, clock)
    reference = replica(None, clock)

    async def body() -> None:
        written, _ = await ask(a, sys_request(1))
        await flushed(a)
        read, started = await ask(b, sys_request(1))
        assert started.read_tier == "remote"
        assert read.usage.read_tokens == written.usage.written_total > 1024
        assert read.usage.written_total == 0
        assert read.usage.prompt_tokens == written.usage.prompt_tokens
        n = written.usage.prompt_tokens
        assert engine(b).num_prefill_tokens_total == n - read.usage.read_tokens
        (entry,) = b.store.entries()
        assert (entry.tier, entry.copies) == ("host", {"remote"})  # promoted into memory
        again, started = await ask(b, sys_request(1, "again"))
        assert started.read_tier == "host" and again.usage.read_tokens == entry.num_tokens
        cold, _ = await ask(reference, sys_request(1))
        assert read.content == written.content == cold.content
        assert remote(b).store.stats.hits == 1
        b.store.check_integrity()

    run_replicas([a, b, reference], body)


def test_a_read_refreshes_the_expiry_in_redis_too(redis_server: RedisServer) -> None:
    clock = FakeClock(time.time())
    a, b = replica(redis_server, clock), replica(redis_server, clock)

    async def body() -> None:
        await ask(a, sys_request(1))
        await flushed(a)
        clock.advance(100)
        await ask(b, sys_request(1))  # reads it from Redis: expiry = t0 + 100 + 300
        clock.advance(50)
        await ask(b, sys_request(1, "local"))  # a local hit refreshes Redis too: + 50
        await flushed(b)
        (entry,) = b.store.entries()
        assert entry.expires_at == pytest.approx(a.store.entries()[0].created_at + 450)
        meta = (await remote(b).store.metas([entry.key]))[entry.key]
        assert float(meta["remote.expires_at"]) == pytest.approx(entry.expires_at, abs=0.01)
        assert remote(b).store.stats.extends >= 2
        # A replica that finds it now sees the later expiry, not the one first written.
        (found,) = await remote(a).lookup([entry.key], entry.tenant)
        assert found.expires_at == pytest.approx(entry.expires_at, abs=0.01)

    run_replicas([a, b], body)


@pytest.mark.parametrize("damage", ["chunk", "foreign"])
def test_a_corrupt_or_foreign_value_is_a_miss_and_is_deleted(
    redis_server: RedisServer, damage: str
) -> None:
    clock = FakeClock(time.time())
    a, b = replica(redis_server, clock), replica(redis_server, clock)

    async def body() -> None:
        written, _ = await ask(a, sys_request(1))
        await flushed(a)
        (entry,) = a.store.entries()
        store = remote(a).store
        raw = Redis.from_url(redis_server.url)
        try:
            _, chunk_prefix, _ = store.keys(entry.key)
            if damage == "chunk":  # bytes changed under a valid meta: the checksum fails
                await raw.setrange(f"{chunk_prefix}0", 100, b"garbage")
            else:  # a well-formed value whose bytes are not this entry's payload
                fields = (await store.metas([entry.key]))[entry.key]
                meta = {k: v for k, v in fields.items() if not k.startswith("remote.")}
                assert await store.put(entry.key, b"not a payload", meta, entry.expires_at)
            read, _ = await ask(b, sys_request(1))
            assert read.usage.read_tokens == 0
            assert read.usage.written_total == written.usage.written_total
            assert read.content == written.content
            await flushed(b)  # b wrote its own entry: the key is good again
            assert b.store.stats.evictions[("remote", "corrupt")] == 1
            again, _ = await ask(replica_c, sys_request(1))
            assert again.usage.read_tokens == written.usage.written_total
        finally:
            await raw.aclose()

    replica_c = replica(redis_server, clock)
    run_replicas([a, b, replica_c], body)


def test_a_full_write_queue_drops_and_counts_and_the_lock_goes(redis_server: RedisServer) -> None:
    clock = FakeClock(time.time())
    a = replica(redis_server, clock)
    other = replica(redis_server, clock)

    async def body() -> None:
        tier = remote(a)
        # A writer with room for one write, not running yet: the second is dropped.
        await tier.writer.stop()
        tier.writer = RemoteWriter(tier.store, max_items=1)
        await ask(a, sys_request(1))
        result, _ = await ask(a, sys_request(2))
        assert result.usage.written_total > 0  # the request never waited, nor failed
        assert tier.store.stats.dropped == 1
        assert a.metrics.render().decode().count("promptcache_remote_dropped_total 1.0") == 1
        await asyncio.sleep(0.05)
        key = a.store.entries()[-1].key
        assert await tier.store.lock_holder(key) is None  # dropped: its lock went at once
        tier.writer.start()
        await tier.writer.flush()
        await asyncio.sleep(0.05)
        assert await tier.store.lock_holder(a.store.entries()[0].key) is None
        read, _ = await ask(other, sys_request(1))  # the queued one was written
        assert read.usage.read_tokens > 0
        await tier.writer.stop()

    run_replicas([a, other], body)


def test_concurrent_first_requests_on_two_replicas_prefill_once(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock(time.time())
    replicas = [replica(redis_server, clock) for _ in range(3)]

    async def body() -> None:
        results = await asyncio.gather(*(ask(r, sys_request(1)) for r in replicas))
        usages = [result.usage for result, _ in results]
        writers = [u for u in usages if u.written_total > 0]
        readers = [u for u in usages if u.read_tokens > 0]
        assert len(writers) == 1 and len(readers) == 2
        assert all(u.read_tokens == writers[0].written_total for u in readers)
        assert {started.read_tier for _, started in results} == {None, "remote"}
        n = usages[0].prompt_tokens
        prefilled = sum(engine(r).num_prefill_tokens_total for r in replicas)
        assert prefilled == n + 2 * (n - writers[0].written_total)
        assert len({tuple(result.content) for result, _ in results}) == 1
        assert sum(remote(r).store.stats.writes for r in replicas) == 1

    run_replicas(replicas, body)


def test_a_dead_holders_lock_lapses_and_the_waiter_computes(redis_server: RedisServer) -> None:
    clock = FakeClock(time.time())
    a = replica(redis_server, clock)

    async def body() -> None:
        key = key_of(a, sys_request(1))
        # A replica that died holding the lock: nobody unlocks it; it lapses after 0.5 s.
        assert await remote(a).store.try_lock(key, "dead-replica", 500)
        started = time.monotonic()
        result, _ = await ask(a, sys_request(1))
        waited = time.monotonic() - started
        assert result.usage.written_total > 0
        assert 0.4 < waited < 5
        await flushed(a)
        assert await remote(a).store.lock_holder(key) is None

    run_replicas([a], body)


def test_a_holder_that_takes_too_long_is_not_waited_for_forever(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock(time.time())
    a = replica(redis_server, clock, inflight_wait_timeout_s=0.3)

    async def body() -> None:
        key = key_of(a, sys_request(1))
        assert await remote(a).store.try_lock(key, "slow-replica", 60_000)
        started = time.monotonic()
        result, _ = await ask(a, sys_request(1))
        assert result.usage.written_total > 0
        assert 0.25 < time.monotonic() - started < 5
        assert await remote(a).store.lock_holder(key) == "slow-replica"  # never ours to free

    run_replicas([a], body)


def test_redis_killed_mid_run_then_restarted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(time.time())
    a, b = replica(redis_server, clock), replica(redis_server, clock)
    caplog.set_level(logging.WARNING, logger="promptcache.cache.remote.store")

    async def shared(seed: int) -> bool:
        """Whether a document written on ``a`` is read on ``b``."""
        written, _ = await ask(a, sys_request(seed))
        await flushed(a)
        read, _ = await ask(b, sys_request(seed))
        assert written.usage.written_total > 0 and read.content == written.content
        return read.usage.read_tokens == written.usage.written_total

    async def body() -> None:
        assert await shared(1)
        redis_server.kill()
        for seed in (2, 3, 4):  # served from the local tiers; each replica writes its own
            assert not await shared(seed)
            local, started = await ask(b, sys_request(seed, "again"))
            assert started.read_tier == "host" and local.usage.read_tokens > 0
        redis_server.restart()
        deadline = time.monotonic() + 30  # the stores retry at 1 s, doubling up to 10 s
        seed = 10
        while not await shared(seed):
            assert time.monotonic() < deadline, "sharing did not resume"
            await asyncio.sleep(0.2)
            seed += 1

    run_replicas([a, b], body)
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    back = [r for r in caplog.records if "is back" in r.getMessage()]
    assert len(unreachable) == 2 and len(back) == 2  # once per replica, each way


def test_without_redis_at_start_it_serves_and_never_waits() -> None:
    a = replica(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    async def body() -> None:
        started = time.monotonic()
        for seed in (1, 1, 2):
            await ask(a, sys_request(seed))
        assert time.monotonic() - started < 3
        assert not remote(a).store.is_up
        text = a.metrics.render().decode()
        assert "promptcache_remote_up 0.0" in text

    run_replicas([a], body)


def test_the_tier_sits_below_disk_and_charges_nothing(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    a = replica(redis_server, disk_dir=tmp_path)
    assert [t.name for t in a.store.tiers] == ["host", "disk", "remote"]
    assert a.store.tiers.tier("remote").capacity_bytes == 0
    assert isinstance(remote(a).codec, FakeCodec)
    assert remote(a).store.namespace == "fake@fake-1/promptcache-fake-kv/1"
    assert isinstance(remote(a).store, RemoteStore)
