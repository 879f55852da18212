"""``DiskTier``: a directory of one self-contained file per entry, named by its key.

A file is the codec's (``KVCodec.save``: the KV bytes, a checksum, and the metadata below), so it
can be read back alone after a restart: ``scan`` reads every header and ``entry_from_metadata``
rebuilds the entry (spec §1.12: no prompt text, only the key, tenant, TTL and sizes). An entry is
charged its file size. Writes are atomic: the codec writes ``<name>.tmp`` and renames it. A copy
written behind is staged under a name of its own (``<name>.<nonce>.tmp``, so two writes of one
key never share a temporary file) and renamed into place on the event loop by ``publish``; a
crash leaves only ``*.tmp`` files, which the next ``scan`` deletes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from promptcache.cache.entry import Entry
from promptcache.cache.tiers import Copy, CopyJob, CopyTier, Found, Parts, Room
from promptcache.core.payload import CorruptPayload, KVCodec, KVPayload, PartId
from promptcache.types import TTL_SECONDS, BlockHash, TenantId, Ttl

log = logging.getLogger(__name__)

_META_PREFIX = "promptcache."


class DiskTier(CopyTier):
    """The ``disk`` tier: files in ``directory``, written and read by ``codec``."""

    def __init__(self, directory: Path, capacity_bytes: int, codec: KVCodec) -> None:
        super().__init__("disk", capacity_bytes)
        self.directory = directory
        self.codec = codec
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: BlockHash) -> Path:
        """The file of ``key``."""
        return self.directory / f"{key.hex()}{self.codec.suffix}"

    def put(self, entry: Entry, payload: KVPayload, room: Room) -> bool:
        """Write the file now (on the event loop, as a demotion needs), then charge its size."""
        if not self.accepts(payload):
            return False  # larger than the whole tier: do not write it just to delete it
        path = self.path(entry.key)
        try:
            self.codec.save(payload, path, entry_metadata(entry))
            size = path.stat().st_size
        except OSError as exc:
            log.warning("writing cache entry to %s failed: %s", path, exc)
            return False
        parts = file_parts(entry.key, size)
        if not room(parts):
            path.unlink(missing_ok=True)
            return False
        self.add(entry, parts)
        return True

    def reader(self, entry: Entry) -> Callable[[], KVPayload]:
        path, codec = self.path(entry.key), self.codec
        return lambda: codec.load(path)

    def accepts(self, payload: KVPayload) -> bool:
        return payload.nbytes <= self.capacity_bytes

    def stage(self, job: CopyJob) -> Copy:
        staged = self.directory / f"{self.path(job.entry.key).name}.{secrets.token_hex(4)}.tmp"
        metadata = entry_metadata(job.entry, expires_at=job.expires_at)
        try:
            self.codec.save(job.payload, staged, metadata)
            size = staged.stat().st_size
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return Copy(job.entry.key, file_parts(job.entry.key, size), job.expires_at, staged)

    def publish(self, copy: Copy) -> None:
        assert isinstance(copy.handle, Path)
        os.replace(copy.handle, self.path(copy.key))

    def abandon(self, copy: Copy) -> None:
        assert isinstance(copy.handle, Path)
        copy.handle.unlink(missing_ok=True)

    def erase(self, key: BlockHash) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def scan(self) -> list[Found]:
        """Every stored file's entry, from its header only, oldest first. Unfinished writes
        (``*.tmp``: a crash, or a write behind that never finished) are deleted; files of
        other names are left alone."""
        found: list[tuple[float, Found]] = []
        suffix = self.codec.suffix
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(".tmp"):  # a write that never finished: never valid
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            key = key_of(path, suffix)
            if key is None:
                continue  # not a name we write: leave foreign files alone
            try:
                entry = entry_from_metadata(self.codec.read_metadata(path), key)
                stat = path.stat()
            except (CorruptPayload, OSError) as exc:
                found.append((0.0, Found(key, None, (), str(exc))))
                continue
            found.append((stat.st_mtime, Found(key, entry, file_parts(key, stat.st_size))))
        found.sort(key=lambda pair: pair[0])
        return [f for _, f in found]

    def check_integrity(self) -> None:
        super().check_integrity()
        for key in self._entries:
            if not self.path(key).is_file():
                raise AssertionError(f"disk: entry {key.hex()[:12]} lost its file")


def entry_metadata(entry: Entry, *, expires_at: float | None = None) -> dict[str, str]:
    """What a file must remember to index ``entry`` again after a restart (spec §1.12: no
    prompt text, only the key, tenant and sizes). ``expires_at``: the expiry to record, when
    not the entry's current one (a copy taken earlier)."""
    return {
        f"{_META_PREFIX}key": entry.key.hex(),
        f"{_META_PREFIX}tenant": entry.tenant,
        f"{_META_PREFIX}ttl": entry.ttl,
        f"{_META_PREFIX}num_tokens": str(entry.num_tokens),
        f"{_META_PREFIX}created_at": repr(entry.created_at),
        f"{_META_PREFIX}expires_at": repr(entry.expires_at if expires_at is None else expires_at),
        f"{_META_PREFIX}num_hits": str(entry.num_hits),
    }


def entry_from_metadata(metadata: dict[str, str], key: BlockHash) -> Entry:
    """The entry a file describes. Raises ``CorruptPayload`` when the fields are missing, bad, or
    name another key than the file's name."""
    try:
        stored = bytes.fromhex(metadata[f"{_META_PREFIX}key"])
        ttl_name = metadata[f"{_META_PREFIX}ttl"]
        if ttl_name not in TTL_SECONDS:
            raise ValueError(f"ttl {ttl_name!r}")
        ttl: Ttl = "1h" if ttl_name == "1h" else "5m"
        created_at = float(metadata[f"{_META_PREFIX}created_at"])
        expires_at = float(metadata[f"{_META_PREFIX}expires_at"])
        num_tokens = int(metadata[f"{_META_PREFIX}num_tokens"])
        num_hits = int(metadata.get(f"{_META_PREFIX}num_hits", "0"))
        tenant = TenantId(metadata[f"{_META_PREFIX}tenant"])
    except (KeyError, ValueError) as exc:
        raise CorruptPayload(f"bad entry metadata: {exc}") from exc
    if stored != key or num_tokens <= 0 or not (math.isfinite(created_at + expires_at)):
        raise CorruptPayload("entry metadata does not match its file")
    return Entry(key, tenant, num_tokens, ttl, created_at, expires_at, num_hits=num_hits)


def key_of(path: Path, suffix: str) -> BlockHash | None:
    """The key a file is named after, or None for a foreign name."""
    if not path.name.endswith(suffix):
        return None
    try:
        key = bytes.fromhex(path.name.removesuffix(suffix))
    except ValueError:
        return None
    return BlockHash(key) if len(key) == 32 else None


def disk_part(key: BlockHash) -> PartId:
    """The part id of an entry's file: files are never shared, so the whole key names it."""
    return int.from_bytes(key, "big")


def file_parts(key: BlockHash, size: int) -> Parts:
    """What a file of ``size`` bytes is charged: one part of its own."""
    return ((disk_part(key), size),)


__all__ = [
    "DiskTier",
    "disk_part",
    "entry_from_metadata",
    "entry_metadata",
    "file_parts",
    "key_of",
]
