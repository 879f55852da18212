"""Copies written behind to the disk tier: what a copy saves (a demotion or a shutdown writes
nothing), what removes it, a full disk and a full queue, writes that race with moves and
removals, refreshed expiries, and the ``CopyWriter`` task. Fake clock, fake codec, real files."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

import pytest

from promptcache.cache.copies import CopyQueue, CopyWriter
from promptcache.cache.disk import DiskTier
from promptcache.cache.entry import Entry
from promptcache.cache.store import PrefixStore
from promptcache.cache.tiers import MemoryTier, TierStack
from promptcache.core.payload import KVPayload
from promptcache.engine.fake import FakeCodec
from tests.cache.payloads import BPT, T, key, payload

E = 10 * BPT  # a 10-token entry in memory
FILE = 1177  # what its file takes: the payload padded to nbytes, plus the header


class Counting(FakeCodec):
    """The fake codec, counting the files it writes (and failing them on demand)."""

    def __init__(self) -> None:
        self.saves = 0
        self.fail = False

    def save(self, payload: KVPayload, path: Path, metadata: Mapping[str, str]) -> None:
        if self.fail:
            raise OSError("disk full")
        self.saves += 1
        super().save(payload, path, metadata)


def open_store(
    directory: Path, memory: int = 10 * E, disk: int = 100 * FILE, queue: int = 8
) -> tuple[PrefixStore, DiskTier, Counting]:
    codec = Counting()
    tier = DiskTier(directory, disk, codec)
    store = PrefixStore(TierStack([MemoryTier("host", memory, codec), tier]), write_behind=queue)
    return store, tier, codec


def put(store: PrefixStore, n: int, now: float = 0.0, ttl: str = "5m") -> Entry:
    entry = store.put(key(n), payload(10, n), "1h" if ttl == "1h" else "5m", now, T, now)
    assert entry is not None
    return entry


def write_all(store: PrefixStore, now: float = 0.0) -> int:
    """What the writer does, synchronously: every queued copy written and kept."""
    kept = 0
    while (job := store.take_copy(now)) is not None:
        kept += store.copied(job, job.tier.stage(job), now)
    return kept


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_copy_makes_demotion_and_shutdown_free(tmp_path: Path) -> None:
    store, disk, codec = open_store(tmp_path, memory=2 * E)
    a = put(store, 1)
    assert len(store.copy_queue) == 1 and codec.saves == 0  # queued, never written on put
    assert write_all(store) == 1
    assert a.tier == "host" and a.copies == {"disk"} and codec.saves == 1
    assert files(tmp_path) == [disk.path(a.key).name]
    assert disk.used_bytes == disk.path(a.key).stat().st_size == FILE  # the copy is charged
    store.check_integrity()

    put(store, 2)
    put(store, 3)  # pushes a down: its copy becomes its home, nothing is written
    assert a.tier == "disk" and a.copies == set() and codec.saves == 1
    assert store.stats.demotions == {("host", "capacity"): 1}
    store.check_integrity()

    store.persist(1.0)  # b and c have copies queued, not written: the shutdown writes them
    assert codec.saves == 3 and {e.tier for e in store.entries()} == {"disk"}
    assert store.stats.demotions["host", "shutdown"] == 2
    write_all(store)  # what was still queued is not wanted any more
    assert codec.saves == 3 and store.stats.copies["disk", "written"] == 1
    store.check_integrity()


def test_shutdown_writes_nothing_for_entries_with_a_copy(tmp_path: Path) -> None:
    store, _, codec = open_store(tmp_path)
    for n in (1, 2, 3):
        put(store, n)
    write_all(store)
    assert codec.saves == 3
    assert store.persist(1.0) == 3 and codec.saves == 3
    assert {e.tier for e in store.entries()} == {"disk"}
    store.check_integrity()


@pytest.mark.parametrize("how", ["expiry", "clear", "discard", "eviction"])
def test_removing_an_entry_deletes_its_copy(tmp_path: Path, how: str) -> None:
    store, disk, _ = open_store(tmp_path, memory=1 * E, disk=FILE * 3 // 2)
    a = put(store, 1)
    write_all(store)
    assert files(tmp_path) == [disk.path(a.key).name]
    if how == "expiry":
        assert store.evict_expired(301.0) == 1
    elif how == "clear":
        assert store.clear() == 1
    elif how == "discard":
        assert store.discard(a)
    else:  # b pushes a to disk (its copy), c pushes a out of the disk
        put(store, 2)
        assert a.tier == "disk"
        put(store, 3)
        assert a.tier is None and store.stats.evictions["disk", "capacity"] == 1
    assert disk.path(a.key).name not in files(tmp_path) and a.copies == set()
    store.check_integrity()


def test_a_write_that_races_with_a_removal_leaves_no_file(tmp_path: Path) -> None:
    store, disk, _ = open_store(tmp_path)
    a = put(store, 1)
    job = store.take_copy(0.0)
    assert job is not None and job.entry is a
    copy = job.tier.stage(job)  # on the writer's thread...
    store.clear()  # ...while the loop removes the entry
    assert not store.copied(job, copy, 0.0)
    assert files(tmp_path) == [] and len(disk) == 0
    assert store.stats.copies == {("disk", "abandoned"): 1}
    store.check_integrity()


def test_a_write_that_races_with_a_demotion_to_disk_is_abandoned(tmp_path: Path) -> None:
    store, disk, codec = open_store(tmp_path)
    a = put(store, 1)
    job = store.take_copy(0.0)
    assert job is not None
    copy = job.tier.stage(job)
    assert store.demote(a, 0.0) and a.tier == "disk"  # written now, by the demotion
    assert not store.copied(job, copy, 0.0)
    assert files(tmp_path) == [disk.path(a.key).name] and codec.saves == 2
    store.check_integrity()


def test_a_write_for_an_expired_entry_never_covers_its_successor(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path)
    old = put(store, 1)
    store.pin(old)
    job = store.take_copy(0.0)
    assert job is not None
    copy = job.tier.stage(job)
    new = put(store, 1, now=400.0)  # the old one expired (pinned): a new entry takes the key
    assert new is not old and new.copies == set()
    assert not store.copied(job, copy, 400.0)  # the old entry's copy is not the new one's
    assert new.copies == set() and files(tmp_path) == []
    assert write_all(store, 400.0) == 1 and new.copies == {"disk"}
    store.unpin(old)
    store.check_integrity()


def test_a_full_disk_drops_copies_before_entries(tmp_path: Path) -> None:
    store, disk, _ = open_store(tmp_path, memory=2 * E, disk=FILE * 5 // 2)  # two files
    a, b = put(store, 1), put(store, 2)
    write_all(store)
    assert a.copies == b.copies == {"disk"}
    c = put(store, 3)  # a goes to disk (its copy), c is copied: b's copy makes room
    write_all(store)
    assert (a.tier, b.tier, c.tier) == ("disk", "host", "host")
    assert b.copies == set() and c.copies == {"disk"}
    assert store.stats.copies["disk", "dropped"] == 1 and not store.stats.evictions
    d = put(store, 4)  # b goes to disk, written: c's copy makes room for it
    assert b.tier == "disk" and c.copies == set() and a.tier == "disk"
    assert store.stats.copies["disk", "dropped"] == 2 and not store.stats.evictions
    write_all(store)  # d's copy makes room as a demotion would: a, least recently used, goes
    assert d.copies == {"disk"} and a.tier is None
    assert store.stats.evictions == {("disk", "capacity"): 1}
    store.check_integrity()
    assert files(tmp_path) == sorted(disk.path(e.key).name for e in disk.entries())


def test_pinned_entries_keep_their_copies(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path, memory=10 * E, disk=FILE * 3 // 2)
    a = put(store, 1)
    write_all(store)
    store.pin(a)
    put(store, 2)
    assert write_all(store) == 0  # no room: the only other copy is a pinned entry's
    assert a.copies == {"disk"} and store.stats.copies["disk", "no_room"] == 1
    store.unpin(a)
    store.check_integrity()


def test_a_full_queue_skips_and_counts(tmp_path: Path) -> None:
    store, _, codec = open_store(tmp_path, queue=2)
    for n in (1, 2, 3, 4):
        put(store, n)
    assert len(store.copy_queue) == 2 and store.stats.copies == {("disk", "skipped"): 2}
    assert write_all(store) == 2 and codec.saves == 2
    store.persist(1.0)  # the skipped ones are written at shutdown
    assert codec.saves == 4


def test_without_write_behind_nothing_is_queued(tmp_path: Path) -> None:
    store, _, codec = open_store(tmp_path, queue=0)
    put(store, 1)
    assert len(store.copy_queue) == 0 and store.take_copy(0.0) is None and codec.saves == 0


def test_a_refreshed_entry_gets_a_fresher_copy(tmp_path: Path) -> None:
    store, disk, codec = open_store(tmp_path)
    a = put(store, 1)
    write_all(store)
    store.touch(a, 100.0)  # lags by 100 s < half the TTL: the copy stays as it is
    assert len(store.copy_queue) == 0 and disk.staleness(a) == 100.0
    store.touch(a, 200.0)  # lags by 200 s: a crash would cost too much of its life
    assert write_all(store, 200.0) == 1 and codec.saves == 2
    assert disk.staleness(a) == 0.0 and len(disk) == 1
    metadata = FakeCodec().read_metadata(disk.path(a.key))
    assert float(metadata["promptcache.expires_at"]) == a.expires_at == 500.0
    store.touch(a, 250.0)
    store.persist(250.0)  # a stale copy is written again at shutdown
    assert codec.saves == 3 and disk.staleness(a) == 0.0 and a.tier == "disk"
    assert files(tmp_path) == [disk.path(a.key).name]
    store.check_integrity()


def test_a_crash_finds_what_was_copied(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path)
    a, _ = put(store, 1), put(store, 2)
    job = store.take_copy(0.0)
    assert job is not None and job.entry is a
    store.copied(job, job.tier.stage(job), 0.0)
    job = store.take_copy(0.0)
    assert job is not None
    job.tier.stage(job)  # killed while the second copy was written: a *.tmp file is left
    fresh, disk, _ = open_store(tmp_path)
    assert fresh.restore(disk, disk.scan(), 10.0) == 1
    (found,) = fresh.entries()
    assert found.key == a.key and found.tier == "disk" and found.expires_at == 300.0
    assert files(tmp_path) == [disk.path(a.key).name]
    fresh.check_integrity()


def test_the_queue_holds_one_copy_per_key_and_tier(tmp_path: Path) -> None:
    queue = CopyQueue(limit=1)
    tier = DiskTier(tmp_path, FILE, FakeCodec())
    old, new = (Entry(key(1), T, 10, "5m", 0.0, 300.0) for _ in range(2))
    assert queue.offer(old, tier) and queue.offer(old, tier)  # queued once
    assert queue.offer(new, tier) and len(queue) == 1  # same slot: the newer entry
    assert not queue.offer(Entry(key(2), T, 10, "5m", 0.0, 300.0), tier)  # full
    assert queue.pop() == (new, tier) and queue.pop() is None
    with pytest.raises(ValueError):
        CopyQueue(-1)


# --- the writer task ----------------------------------------------------------------------


def test_the_writer_copies_new_entries_off_the_loop(tmp_path: Path) -> None:
    store, disk, codec = open_store(tmp_path)

    async def main() -> None:
        writer = CopyWriter(store, lambda: 0.0)
        writer.start()
        entries = [put(store, n) for n in (1, 2, 3)]
        assert codec.saves == 0  # nothing written on the request path
        await writer.idle()
        assert all(e.copies == {"disk"} for e in entries) and codec.saves == 3
        put(store, 4)
        await writer.idle()
        await writer.stop()
        put(store, 5)  # after stop: queued, left for the shutdown's persist
        await asyncio.sleep(0.01)
        assert len(store.copy_queue) == 1

    asyncio.run(main())
    assert store.stats.copies == {("disk", "written"): 4}
    assert len(files(tmp_path)) == 4 and len(disk) == 4
    store.check_integrity()


def test_a_failing_disk_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, _, codec = open_store(tmp_path)
    codec.fail = True

    async def main() -> None:
        writer = CopyWriter(store, lambda: 0.0)
        writer.start()
        for n in (1, 2, 3):
            put(store, n)
        await writer.idle()
        await writer.stop()

    with caplog.at_level(logging.WARNING, logger="promptcache.cache.store"):
        asyncio.run(main())
    assert store.stats.copies == {("disk", "failed"): 3}
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    assert files(tmp_path) == [] and all(e.copies == set() for e in store.entries())
    store.check_integrity()
