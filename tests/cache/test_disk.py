"""``DiskTier`` alone: files written, read, staged, published and deleted, what a scan finds, and
the metadata a file keeps. Real files, the fake codec, no store."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptcache.cache.disk import DiskTier, entry_from_metadata, entry_metadata, key_of
from promptcache.cache.entry import Entry
from promptcache.cache.tiers import CopyJob, Parts
from promptcache.core.payload import CorruptPayload
from promptcache.engine.fake import FakeCodec, FakePayload
from tests.cache.payloads import BPT, T, key, payload


def entry(n: int, tokens: int = 10, expires_at: float = 300.0) -> Entry:
    """An entry served from the disk tier (where it is served from is the store's to say)."""
    return Entry(key(n), T, tokens, "5m", 0.0, expires_at, tier="disk")


def yes(parts: Parts) -> bool:
    return True


def no(parts: Parts) -> bool:
    return False


def test_put_writes_a_file_charged_its_size_and_release_deletes_it(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 100 * BPT, FakeCodec())
    e = entry(1)
    asked: list[Parts] = []
    assert disk.put(e, payload(10, 1), lambda parts: asked.append(parts) or True)
    path = disk.path(e.key)
    assert path.name == f"{key(1).hex()}.fakekv" and path.is_file()
    assert asked == [disk.parts_of(e)] and disk.used_bytes == path.stat().st_size > 10 * BPT
    loaded = disk.reader(e)()
    assert isinstance(loaded, FakePayload) and loaded.tokens == payload(10, 1).tokens
    disk.check_integrity()
    disk.release(e)
    assert not path.exists() and disk.used_bytes == 0 and len(disk) == 0


def test_put_refuses_without_leaving_a_file(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 20 * BPT, FakeCodec())
    assert not disk.put(entry(1, 30), payload(30, 1), yes)  # larger than the tier: not written
    assert not disk.put(entry(2), payload(10, 2), no)  # no room made for it
    assert list(tmp_path.iterdir()) == [] and len(disk) == 0


def test_a_copy_is_staged_then_published_or_abandoned(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 100 * BPT, FakeCodec())
    e = entry(1, expires_at=300.0)
    staged = disk.stage(CopyJob(e, disk, payload(10, 1), 300.0))
    assert not disk.path(e.key).exists() and len(disk) == 0  # invisible and uncharged
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith(disk.path(e.key).name) and tmp.name.endswith(".tmp")
    disk.abandon(staged)
    assert list(tmp_path.iterdir()) == []

    e.expires_at = 400.0  # refreshed while the copy was written: the file keeps what it had
    staged = disk.stage(CopyJob(e, disk, payload(10, 1), 300.0))
    disk.keep(e, staged)
    assert [p.name for p in tmp_path.iterdir()] == [disk.path(e.key).name]
    assert disk.used_bytes == disk.path(e.key).stat().st_size
    assert disk.staleness(e) == 100.0
    assert FakeCodec().read_metadata(disk.path(e.key))["promptcache.expires_at"] == "300.0"
    disk.check_integrity()


def test_two_copies_of_one_key_never_share_a_temporary_file(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 100 * BPT, FakeCodec())
    e = entry(1)
    first = disk.stage(CopyJob(e, disk, payload(10, 1), 300.0))
    second = disk.stage(CopyJob(e, disk, payload(10, 1), 300.0))
    assert first.handle != second.handle and len(list(tmp_path.iterdir())) == 2
    disk.publish(second)
    disk.abandon(first)
    assert [p.name for p in tmp_path.iterdir()] == [disk.path(e.key).name]


def test_scan_finds_entries_deletes_unfinished_writes_and_leaves_foreign_files(
    tmp_path: Path,
) -> None:
    codec = FakeCodec()
    disk = DiskTier(tmp_path, 100 * BPT, codec)
    for n in (1, 2):
        assert disk.put(entry(n, expires_at=100.0 * n), payload(10, n), yes)
    disk.stage(CopyJob(entry(3), disk, payload(10, 3), 300.0))  # a crash while writing
    (tmp_path / f"{key(4).hex()}.fakekv").write_bytes(b"PCFAKEKV1\nrubbish")
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / "short.fakekv").write_text("not a key")

    found = DiskTier(tmp_path, 100 * BPT, codec).scan()
    by_key = {f.key: f for f in found}
    assert set(by_key) == {key(1), key(2), key(4)}
    good = by_key[key(2)].entry
    assert good is not None and good.expires_at == 200.0 and good.tenant == T
    assert by_key[key(2)].parts == disk.parts_of(disk.entries()[1])
    assert by_key[key(4)].entry is None and by_key[key(4)].error
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert (tmp_path / "notes.txt").exists()


def test_metadata_round_trip_and_checks() -> None:
    e = entry(7, tokens=42, expires_at=123.5)
    e.num_hits = 3
    back = entry_from_metadata(entry_metadata(e), key(7))
    assert (back.key, back.tenant, back.num_tokens, back.ttl) == (e.key, T, 42, "5m")
    assert (back.created_at, back.expires_at, back.num_hits) == (0.0, 123.5, 3)
    assert entry_from_metadata(entry_metadata(e, expires_at=99.0), key(7)).expires_at == 99.0
    with pytest.raises(CorruptPayload, match="does not match"):
        entry_from_metadata(entry_metadata(e), key(8))
    with pytest.raises(CorruptPayload, match="bad entry metadata"):
        entry_from_metadata({"promptcache.key": key(7).hex()}, key(7))
    assert key_of(Path(f"{key(7).hex()}.fakekv"), ".fakekv") == key(7)
    assert key_of(Path(f"{key(7).hex()}.fakekv.1a2b.tmp"), ".fakekv") is None
