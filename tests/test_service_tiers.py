"""Tiers through ``Service`` on the fake engine: demotion to disk and promotion on a hit, damaged
files, restarts, shared bytes of nested breakpoints, and the budget under concurrent load."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from promptcache.cache.clock import FakeClock
from promptcache.cache.disk import DiskTier
from promptcache.config import CacheConfig
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatResult
from promptcache.engine.fake import FakeCodec, FakeEngine
from promptcache.service import Service, tier_stack
from promptcache.types import BlockHash
from tests.conftest import chat, collect, make_config, make_service, run_async, text, words

BPT = 64  # FakeEngine's default KV bytes per token
ONE_ENTRY = BPT * 2100  # room for one ~2000-token entry


def sys_request(seed: int, question: str = "hi") -> ChatRequest:
    return chat(("user", [text(question)]), system=[text(words(1950 + 40 * seed, seed), "5m")])


def ask(service: Service, *requests: ChatRequest) -> list[ChatResult]:
    async def body() -> list[ChatResult]:
        return [await collect(service.generate(r)) for r in requests]

    return run_async(service, body)


def cold(request: ChatRequest) -> ChatResult:
    """The answer without any cache: the reference a hit must reproduce."""
    (result,) = ask(make_service(), request)
    return result


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.fakekv"))


def disk_path(service: Service, key: BlockHash) -> Path:
    disk = service.store.tiers.tier("disk")
    assert isinstance(disk, DiskTier)
    return disk.path(key)


def disk_service(tmp_path: Path, clock: FakeClock | None = None, **cache: Any) -> Service:
    cache = {"capacity_bytes": ONE_ENTRY, "disk_dir": tmp_path, **cache}
    return make_service(FakeEngine(), clock, **cache)


def test_a_demoted_entry_is_read_back_from_disk_and_promoted(tmp_path: Path) -> None:
    service = disk_service(tmp_path)
    tiers: list[dict[int, str | None]] = []

    async def body() -> list[ChatResult]:
        results = []
        for request in (sys_request(1), sys_request(2), sys_request(1, "again")):
            results.append(await collect(service.generate(request)))
            tiers.append({e.num_tokens: e.tier for e in service.store.entries()})
        return results

    a1, b1, a2 = run_async(service, body)
    a, b = a1.usage.written_total, b1.usage.written_total
    assert a > 1024 and a != b
    assert tiers == [{a: "host"}, {a: "disk", b: "host"}, {b: "disk", a: "host"}]
    assert a2.usage.read_tokens == a  # B's write pushed A to disk; the hit brought it back
    assert a2.usage.written_total == 0
    assert a2.content == cold(sys_request(1, "again")).content
    stats = service.store.stats
    assert stats.demotions == {("host", "capacity"): 2, ("host", "shutdown"): 1}
    assert stats.promotions == {("disk", "hit"): 1}
    assert {e.tier for e in service.store.entries()} == {"disk"}  # all written at shutdown
    service.store.check_integrity()


def test_a_damaged_file_is_a_miss_with_the_right_answer_and_goes(tmp_path: Path) -> None:
    service = disk_service(tmp_path)
    first, _ = ask(service, sys_request(1), sys_request(2))
    path = disk_path(service, service.store.entries()[0].key)  # A's file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    (again,) = ask(service, sys_request(1))
    assert again.usage.read_tokens == 0
    assert again.usage.written_total == first.usage.written_total
    assert again.content == first.content
    assert not path.exists() or path.read_bytes() != bytes(data)
    assert service.store.stats.evictions[("disk", "corrupt")] == 1
    service.store.check_integrity()


def test_restart_reads_unexpired_entries_from_disk(tmp_path: Path) -> None:
    clock = FakeClock()
    first = disk_service(tmp_path, clock, capacity_bytes=10 * ONE_ENTRY)
    (written,) = ask(first, sys_request(1))
    assert len(files(tmp_path)) == 1  # written at shutdown
    clock.advance(200)
    second = disk_service(tmp_path, clock, capacity_bytes=10 * ONE_ENTRY)
    (read,) = ask(second, sys_request(1, "later"))
    assert read.usage.read_tokens == written.usage.written_total
    assert read.content == cold(sys_request(1, "later")).content
    # The read refreshed it (t0 + 5m from the second request); the next run sees that.
    clock.advance(250)
    third = disk_service(tmp_path, clock, capacity_bytes=10 * ONE_ENTRY)
    (again,) = ask(third, sys_request(1, "later"))
    assert again.usage.read_tokens == written.usage.written_total


def test_entries_that_expired_while_down_are_gone(tmp_path: Path) -> None:
    clock = FakeClock()
    ask(disk_service(tmp_path, clock), sys_request(1))
    clock.advance(301)
    later = disk_service(tmp_path, clock)
    (result,) = ask(later, sys_request(1))
    assert result.usage.read_tokens == 0 and result.usage.written_total > 0
    assert later.store.stats.evictions[("disk", "expired")] == 1


def test_nested_breakpoints_store_their_common_prefix_once() -> None:
    service = make_service(capacity_bytes=1 << 30)
    request = chat(
        ("user", [text(words(1500, 3), "5m"), text(words(1500, 4)), text("q")]),
        system=[text(words(1200, 1), "5m"), text(words(1300, 2), "5m")],
        tools=[],
    )
    (result,) = ask(service, request)
    entries = service.store.entries()
    assert len(entries) == 3 and result.usage.written_total == max(e.num_tokens for e in entries)
    longest = max(e.nbytes for e in entries)
    assert sum(e.nbytes for e in entries) > 1.5 * longest  # what copies would take
    assert service.store.used_bytes <= 1.1 * longest
    service.store.check_integrity()


def test_extending_a_restored_prefix_shares_its_pages() -> None:
    service = make_service(capacity_bytes=1 << 30)
    base = chat(("user", [text("hi")]), system=[text(words(2000, 1), "5m")])
    longer = chat(
        ("user", [text(words(3000, 2), "5m"), text("q")]), system=[text(words(2000, 1), "5m")]
    )
    ask(service, base, longer)
    longest = max(e.nbytes for e in service.store.entries())
    assert len(service.store) == 2
    assert service.store.used_bytes <= 1.1 * longest


def test_one_read_serves_concurrent_hits_on_a_disk_entry(tmp_path: Path) -> None:
    service = disk_service(tmp_path)
    ask(service, sys_request(1), sys_request(2))  # A now on disk
    engine = service.engine
    assert isinstance(engine, FakeEngine)
    loads: list[Path] = []
    codec = engine.kv_codec
    original = codec.load

    def counted(path: Path) -> Any:
        loads.append(path)
        return original(path)

    codec.load = counted  # type: ignore[method-assign]

    async def body() -> list[ChatResult]:
        return list(
            await asyncio.gather(*(collect(service.generate(sys_request(1))) for _ in range(4)))
        )

    results = run_async(service, body)
    assert len(loads) == 1
    assert all(r.usage.read_tokens > 0 for r in results)
    assert len({tuple(r.content) for r in results}) == 1


def test_concurrent_readers_of_a_damaged_file_write_it_once(tmp_path: Path) -> None:
    engine = FakeEngine()
    service = make_service(engine, capacity_bytes=ONE_ENTRY, disk_dir=tmp_path)
    first, _ = ask(service, sys_request(1), sys_request(2))
    path = disk_path(service, service.store.entries()[0].key)  # A's file
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    before = engine.num_prefill_tokens_total

    async def body() -> list[ChatResult]:
        return list(
            await asyncio.gather(*(collect(service.generate(sys_request(1))) for _ in range(4)))
        )

    results = run_async(service, body)
    writes = [r for r in results if r.usage.written_total > 0]
    reads = [r for r in results if r.usage.read_tokens > 0]
    assert len(writes) == 1 and len(reads) == 3  # single flight holds across the re-plan
    assert all(r.content == first.content for r in results)
    n = first.usage.prompt_tokens
    offset = first.usage.written_total
    assert engine.num_prefill_tokens_total - before == n + 3 * (n - offset)
    assert len(service.inflight) == 0


def test_the_budget_holds_under_concurrent_load(tmp_path: Path) -> None:
    # device -> host -> disk, each with room for a few entries, and more prompts than fit.
    engine = FakeEngine(device="cuda")
    entry = BPT * 1100
    service = make_service(
        engine,
        capacity_bytes=3 * entry,
        host_capacity_bytes=4 * entry,
        disk_dir=tmp_path,
        disk_capacity_bytes=6 * entry,
        min_cacheable_tokens=256,
    )
    assert [t.name for t in service.store.tiers] == ["device", "host", "disk"]

    def request(i: int) -> ChatRequest:
        prefix = i % 10
        return chat(
            ("user", [text(words(400, 100 + prefix), "5m"), text(f"question {i}")]),
            system=[text(words(600, prefix), "5m")],
        )

    requests = [request(i) for i in range(60)]
    expected = {i: cold(requests[i]).content for i in range(10)}

    async def body() -> list[ChatResult]:
        results = []
        for wave in range(3):  # waves of 20 concurrent requests, over a store already full
            batch = requests[wave * 20 : (wave + 1) * 20]
            results += await asyncio.gather(*(collect(service.generate(r)) for r in batch))
            service.store.check_integrity()
        return results

    results = run_async(service, body)
    for i, result in enumerate(results):
        u = result.usage
        assert u.prompt_tokens == u.read_tokens + u.written_total + u.uncached_tokens
        if i < 10:
            assert result.content == expected[i]
    for tier in service.store.tiers:
        assert 0 < tier.peak_bytes <= tier.capacity_bytes, tier.name
    stats = service.store.stats
    assert stats.demotions and stats.promotions
    assert sum(r.usage.read_tokens > 0 for r in results) > 20
    service.store.check_integrity()
    assert {p.name for p in tmp_path.iterdir()} <= {
        e.key.hex() + FakeCodec.suffix for e in service.store.entries() if e.tier == "disk"
    }


def test_tier_stack_follows_the_engine_device(tmp_path: Path) -> None:
    codec = FakeCodec()
    gpu = tier_stack(CacheConfig(host_capacity_bytes=8, disk_dir=tmp_path), "cuda:0", codec)
    assert [(t.name, t.capacity_bytes) for t in gpu] == [
        ("device", 4 << 30),
        ("host", 8),
        ("disk", 16 << 30),
    ]
    cpu = tier_stack(CacheConfig(host_capacity_bytes=8), "cpu", codec)  # RAM is the engine's memory
    assert [(t.name, t.capacity_bytes) for t in cpu] == [("host", 4 << 30)]


def test_entries_reach_disk_soon_without_a_shutdown(tmp_path: Path) -> None:
    """Write-behind: the file exists while the server runs, so a crash (here: a copy of the
    directory taken before the shutdown) keeps the entry."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    service = disk_service(live, capacity_bytes=10 * ONE_ENTRY)
    engine = service.engine

    async def body() -> ChatResult:
        result = await collect(service.generate(sys_request(1)))
        for _ in range(500):  # bounded: 5 s
            if files(live):
                break
            await asyncio.sleep(0.01)
        shutil.copytree(live, crashed)
        return result

    written = run_async(service, body)
    (entry,) = service.store.entries()
    assert len(files(crashed)) == 1 and service.store.stats.copies == {("disk", "written"): 1}
    assert service.store.stats.demotions == {("host", "shutdown"): 1}  # the copy was enough
    assert isinstance(engine, FakeEngine)

    (read,) = ask(disk_service(crashed, capacity_bytes=10 * ONE_ENTRY), sys_request(1, "later"))
    assert read.usage.read_tokens == written.usage.written_total == entry.num_tokens
    assert read.content == cold(sys_request(1, "later")).content


def test_without_write_behind_entries_reach_disk_at_shutdown(tmp_path: Path) -> None:
    service = disk_service(tmp_path, capacity_bytes=10 * ONE_ENTRY, disk_write_behind=False)

    async def body() -> None:
        await collect(service.generate(sys_request(1)))
        await asyncio.sleep(0.2)
        assert files(tmp_path) == [] and service.copies is None

    run_async(service, body)
    assert len(files(tmp_path)) == 1


def test_the_store_is_built_when_the_engine_loads(tmp_path: Path) -> None:
    """The tiers move bytes through the engine's codec: before it loads there are none, and
    readers (metrics, stats) see an empty store."""
    service = Service(FakeEngine, make_config(disk_dir=tmp_path), clock=FakeClock())
    assert not service.is_ready and len(service.store.tiers) == 0
    assert service.store.entries() == [] and service.store.clear() == 0
    assert "promptcache_cache_entries{" not in service.metrics.render().decode()

    async def main() -> None:
        await service.start()
        for _ in range(500):  # bounded: 5 s
            if service.is_ready:
                break
            await asyncio.sleep(0.01)
        assert [t.name for t in service.store.tiers] == ["host", "disk"]
        assert service.copies is not None  # writing behind once the disk tier is indexed
        await service.stop()

    asyncio.run(main())
