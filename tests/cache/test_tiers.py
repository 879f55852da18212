"""The tier stack under ``PrefixStore``: demotion under pressure, promotion on a hit, real files
on disk with checksums, and what a restart finds. Fake clock, fake codec, no torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptcache.cache.disk import DiskTier
from promptcache.cache.entry import Entry
from promptcache.cache.store import PrefixStore
from promptcache.cache.tiers import MemoryTier, TierStack
from promptcache.core.payload import CorruptPayload, KVPayload
from promptcache.engine.fake import FakeCodec, FakePayload
from tests.cache.payloads import BPT, T, key, payload, stack

E = 10 * BPT  # bytes of a 10-token entry in memory


def fetch(store: PrefixStore, entry: Entry, now: float) -> KVPayload:
    """What the service does on a hit: read the bytes (pinned), then promote."""
    store.pin(entry)
    try:
        loaded = store.loader(entry)()
        store.promote(entry, loaded, now)
        return loaded
    finally:
        store.unpin(entry)


def tiers_of(store: PrefixStore) -> dict[int, str | None]:
    return {int.from_bytes(e.key, "big"): e.tier for e in store.entries()}


def disk_of(store: PrefixStore) -> DiskTier:
    disk = store.tiers.tier("disk")
    assert isinstance(disk, DiskTier)
    return disk


def restart(store: PrefixStore, now: float) -> int:
    """What the service does at start: index what the disk tier holds."""
    disk = disk_of(store)
    return store.restore(disk, disk.scan(), now)


def test_pressure_demotes_down_the_stack_instead_of_dropping(tmp_path: Path) -> None:
    store = PrefixStore(tiers=stack(2 * E, 2 * E, tmp_path, 100 * E))
    for n in range(1, 6):
        assert store.put(key(n), payload(10, n), "5m", 0.0, T, float(n)) is not None
        store.check_integrity()
    # Least recently used first: 1 and 2 went device -> host -> disk, 3 and 4 to host.
    assert tiers_of(store) == {1: "disk", 2: "host", 3: "host", 4: "device", 5: "device"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [key(1).hex() + ".fakekv"]
    assert store.stats.demotions == {("device", "capacity"): 3, ("host", "capacity"): 1}
    assert not store.stats.evictions
    file = tmp_path / f"{key(1).hex()}.fakekv"
    assert store.tiers.tier("disk").used_bytes == file.stat().st_size


def test_expired_entries_are_reclaimed_before_live_ones_move(tmp_path: Path) -> None:
    store = PrefixStore(tiers=stack(2 * E, 2 * E, tmp_path, 100 * E))
    store.put(key(1), payload(10, 1), "1h", 0.0, T, 0.0)
    store.put(key(2), payload(10, 2), "5m", 0.0, T, 0.0)
    store.put(key(3), payload(10, 3), "1h", 400.0, T, 400.0)  # 2 has expired: it goes, 1 stays
    assert tiers_of(store) == {1: "device", 3: "device"}
    assert store.stats.evictions == {("device", "expired"): 1}
    assert not store.stats.demotions


def test_a_hit_in_a_lower_tier_is_promoted(tmp_path: Path) -> None:
    store = PrefixStore(tiers=stack(2 * E, 1 * E, tmp_path, 100 * E))
    for n in (1, 2, 3, 4):
        store.put(key(n), payload(10, n), "5m", 0.0, T, 0.0)
    assert tiers_of(store)[1] == "disk"
    entry = store.get(key(1), 1.0)
    assert entry is not None
    loaded = fetch(store, entry, 1.0)
    assert isinstance(loaded, FakePayload) and loaded.tokens == payload(10, 1).tokens
    assert entry.tier == "device" and store.is_resident(entry)
    # The file stays as the entry's copy: a later demotion or shutdown writes nothing.
    assert (tmp_path / f"{key(1).hex()}.fakekv").exists() and entry.copies == {"disk"}
    assert store.stats.promotions == {("disk", "hit"): 1}
    store.check_integrity()


def test_no_room_to_promote_leaves_the_entry_where_it_is(tmp_path: Path) -> None:
    store = PrefixStore(tiers=stack(1 * E, None, tmp_path, 100 * E))
    a = store.put(key(1), payload(10, 1), "5m", 0.0, T, 0.0)
    b = store.put(key(2), payload(10, 2), "5m", 0.0, T, 0.0)
    assert a is not None and b is not None and a.tier == "disk"
    store.pin(b)  # the device tier's only entry is in use
    assert fetch(store, a, 1.0).num_tokens == 10  # served from the file all the same
    assert a.tier == "disk" and not store.stats.promotions
    store.check_integrity()


def test_an_entry_too_big_for_the_top_starts_lower(tmp_path: Path) -> None:
    store = PrefixStore(tiers=stack(1 * E, 3 * E, tmp_path, 100 * E))
    big = store.put(key(1), payload(25, 1), "5m", 0.0, T, 0.0)
    assert big is not None and big.tier == "host"
    huge = store.put(key(2), payload(40, 2), "5m", 0.0, T, 0.0)
    assert huge is not None and huge.tier == "disk"
    store.check_integrity()


def test_pinned_entries_never_move() -> None:
    store = PrefixStore(tiers=stack(2 * E, 10 * E))
    a = store.put(key(1), payload(10, 1), "5m", 0.0, T, 0.0)
    assert a is not None
    store.pin(a)
    for n in (2, 3, 4):
        store.put(key(n), payload(10, n), "5m", 0.0, T, 0.0)
    assert a.tier == "device"
    assert not store.demote(a, 0.0) and a.tier == "device"
    store.unpin(a)
    assert store.demote(a, 0.0) and a.tier == "host"
    store.check_integrity()


def test_the_last_tier_drops_least_recently_used(tmp_path: Path) -> None:
    probe = PrefixStore(tiers=stack(0, None, tmp_path / "probe", 100 * E))
    probe.put(key(9), payload(10, 9), "5m", 0.0, T, 0.0)
    one_file = probe.tiers.tier("disk").used_bytes  # files differ by a few header bytes
    store = PrefixStore(tiers=stack(1 * E, None, tmp_path / "d", one_file * 5 // 2))
    for n in (1, 2, 3, 4):
        store.put(key(n), payload(10, n), "5m", 0.0, T, 0.0)
    assert tiers_of(store) == {2: "disk", 3: "disk", 4: "device"}
    assert store.stats.evictions == {("disk", "capacity"): 1}
    assert len(list((tmp_path / "d").iterdir())) == 2
    store.check_integrity()


# --- corruption -----------------------------------------------------------------------------


def _on_disk(tmp_path: Path) -> tuple[PrefixStore, Entry, Path]:
    store = PrefixStore(tiers=stack(1 * E, None, tmp_path, 100 * E))
    entry = store.put(key(1), payload(10, 1), "5m", 0.0, T, 0.0)
    store.put(key(2), payload(10, 2), "5m", 0.0, T, 0.0)
    assert entry is not None and entry.tier == "disk"
    return store, entry, tmp_path / f"{key(1).hex()}.fakekv"


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "delete"])
def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    store, entry, path = _on_disk(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "header":
        path.write_bytes(b"garbage" + bytes(data[7:]))
    else:
        path.unlink()
    store.pin(entry)
    with pytest.raises(CorruptPayload):
        store.loader(entry)()
    store.unpin(entry)
    assert store.discard(entry, "corrupt")
    assert not path.exists() and store.get(key(1), 1.0) is None
    assert store.stats.evictions == {("disk", "corrupt"): 1}
    store.check_integrity()


# --- persistence ----------------------------------------------------------------------------


def test_restart_finds_unexpired_entries_and_drops_the_rest(tmp_path: Path) -> None:
    store = PrefixStore(tiers=stack(10 * E, None, tmp_path, 100 * E))
    store.put(key(1), payload(10, 1), "5m", 0.0, T, 0.0)
    hour = store.put(key(2), payload(20, 2), "1h", 0.0, T, 0.0)
    assert hour is not None
    store.touch(hour, 100.0)  # refreshed before the shutdown: the file keeps the new expiry
    assert store.persist(10.0) == 2
    assert {e.tier for e in store.entries()} == {"disk"}
    assert store.stats.demotions == {("device", "shutdown"): 2}
    # Odd files: an unfinished write, a foreign file, one with a broken header.
    (tmp_path / f"{key(3).hex()}.fakekv.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / f"{key(4).hex()}.fakekv").write_bytes(b"PCFAKEKV1\nrubbish")

    # The server was down for six minutes: the 5m entry expired meanwhile.
    fresh = PrefixStore(tiers=stack(10 * E, None, tmp_path, 100 * E))
    assert restart(fresh, now=360.0) == 1
    found = fresh.get(key(2), 360.0)
    assert found is not None and found.tier == "disk" and found.num_tokens == 20
    assert found.expires_at == 3700.0 and found.ttl == "1h" and found.tenant == T
    assert fresh.get(key(1), 360.0) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key(2).hex()}.fakekv", "notes.txt"]
    assert fresh.stats.evictions == {("disk", "expired"): 1, ("disk", "corrupt"): 1}
    assert fetch(fresh, found, 361.0).num_tokens == 20
    fresh.check_integrity()


def test_restore_respects_the_disk_budget(tmp_path: Path) -> None:
    store = PrefixStore(tiers=stack(10 * E, None, tmp_path, 100 * E))
    for n in (1, 2, 3):
        store.put(key(n), payload(10, n), "1h", 0.0, T, 0.0)
    store.persist(0.0)
    size = next(tmp_path.iterdir()).stat().st_size
    small = PrefixStore(tiers=stack(10 * E, None, tmp_path, 2 * size + 10))
    assert restart(small, 1.0) == 2
    assert len(list(tmp_path.iterdir())) == 2
    small.check_integrity()


def test_stack_validation(tmp_path: Path) -> None:
    codec = FakeCodec()
    with pytest.raises(ValueError, match="repeat"):
        TierStack([MemoryTier("host", 1, codec), MemoryTier("host", 1, codec)])
    with pytest.raises(ValueError, match="first tier"):
        TierStack([DiskTier(tmp_path, 1, codec), MemoryTier("host", 1, codec)])
    with pytest.raises(ValueError, match="memory tiers must come first"):
        TierStack(
            [
                MemoryTier("device", 1, codec),
                DiskTier(tmp_path, 1, codec),
                MemoryTier("host", 1, codec),
            ]
        )
    with pytest.raises(ValueError, match="capacity"):
        MemoryTier("host", -1, codec)
    with pytest.raises(ValueError, match="device or host"):
        MemoryTier("disk", 1, codec)
    # No tiers: the store a service shows while its model loads holds nothing.
    loading = PrefixStore(TierStack(()))
    assert len(loading) == 0 and loading.used_bytes == 0 and loading.clear() == 0
    with pytest.raises(LookupError):
        loading.put(key(1), payload(10), "5m", 0.0, T, 0.0)


# --- memory tiers alone ---------------------------------------------------------------------


class Recording(FakeCodec):
    """The fake codec, noting which copies were asked for (and failing them on demand)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def to_host(self, payload: KVPayload) -> KVPayload:
        self.calls.append("to_host")
        if self.fail:
            raise MemoryError("no host memory")
        return payload

    def to_device(self, payload: KVPayload) -> KVPayload:
        self.calls.append("to_device")
        return payload


def test_a_memory_tier_copies_payloads_in_and_holds_them() -> None:
    codec = Recording()
    device, host = MemoryTier("device", 100 * E, codec), MemoryTier("host", 100 * E, codec)
    a, b, c = (Entry(key(n), T, 25, "5m", 0.0, 300.0) for n in (1, 2, 3))
    a.tier, b.tier, c.tier = "device", "host", "device"  # the store's to say
    pa, pc = payload(25, 1), payload(25, 1)  # one chain: two shared pages, own tails
    asked: list[object] = []
    assert device.put(a, pa, lambda parts: asked.append(parts) or True)
    assert host.put(b, payload(25, 2), lambda parts: True)
    assert codec.calls == ["to_device", "to_host"] and asked == [device.parts_of(a)]
    assert device.payload(a) is pa and device.reader(a)() is pa and host.payload(a) is None
    assert device.put(c, pc, lambda parts: True)
    assert device.used_bytes == (20 + 5 + 5) * BPT  # shared pages charged once
    device.check_integrity()
    host.check_integrity()
    device.release(a)
    assert device.payload(a) is None and a not in device and device.used_bytes == 25 * BPT
    device.check_integrity()


def test_a_memory_tier_that_cannot_take_a_payload_holds_nothing() -> None:
    host = MemoryTier("host", 100 * E, Recording(fail=True))
    a = Entry(key(1), T, 10, "5m", 0.0, 300.0)
    assert not host.put(a, payload(10, 1), lambda parts: False)  # no room: never copied
    assert not host.put(a, payload(10, 1), lambda parts: True)  # the copy failed
    assert len(host) == 0 and host.used_bytes == 0
    host.check_integrity()
