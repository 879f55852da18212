"""Where the bytes of entries live: a ``TierStack`` of byte budgets, fastest first.

::

    device  (accelerator memory; CUDA engines only)   payloads on the engine's device
    host    (RAM; on a CPU engine this is the top)    payloads in host memory
    disk    (a directory, optional)                   one self-contained file per entry

A ``Tier`` is accounting only: which entries are resident, least recently used first, and the
bytes they hold, counting a part shared by several entries once (nested prefixes share pages),
in total and per tenant (a part is charged to the tenant of the entry that brought it; keys are
namespaced by tenant, so entries of two tenants never share a part).
The ``TierStack`` adds the engine's ``KVCodec`` that copies payloads between tiers and files.
Policy (what to demote, promote or drop, and when) belongs to ``PrefixStore``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from promptcache.cache.entry import Entry
from promptcache.core.payload import CorruptPayload, KVCodec, KVPayload, PartId
from promptcache.types import TTL_SECONDS, BlockHash, TenantId, TierName, Ttl

log = logging.getLogger(__name__)

Parts = tuple[tuple[PartId, int], ...]

_META_PREFIX = "promptcache."


def unique_parts(parts: Iterable[tuple[PartId, int]]) -> Parts:
    """``parts`` with repeated ids dropped (a payload may list a piece once only)."""
    seen: dict[PartId, int] = {}
    for part_id, nbytes in parts:
        seen.setdefault(part_id, nbytes)
    return tuple(seen.items())


class Tier:
    """One level: a byte budget and its resident entries, least recently used first.

    ``add`` charges an entry's parts and ``remove`` releases them; a part held by several
    resident entries is charged once. Neither moves bytes: the store does, through the codec.
    ``add`` raises ``AssertionError`` when the entry does not fit (callers make room first).
    """

    def __init__(self, name: TierName, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"tier {name}: capacity must be >= 0, got {capacity_bytes}")
        self.name: TierName = name
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        """The most ``used_bytes`` ever reached: tests check it never passed the budget."""
        self._entries: OrderedDict[BlockHash, Entry] = OrderedDict()
        self._parts: dict[PartId, list[int]] = {}  # id -> [number of holders, bytes]
        self._owners: dict[PartId, TenantId] = {}  # id -> the tenant charged for it
        self._tenant_bytes: dict[TenantId, int] = {}

    @property
    def is_disk(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, Entry) and self._entries.get(entry.key) is entry

    def entries(self) -> list[Entry]:
        """Resident entries, least recently used first (a copy: safe to mutate the tier)."""
        return list(self._entries.values())

    def tenant_bytes(self, tenant: TenantId) -> int:
        """Bytes charged to ``tenant`` in this tier."""
        return self._tenant_bytes.get(tenant, 0)

    def tenants(self) -> set[TenantId]:
        """The tenants holding bytes here."""
        return set(self._tenant_bytes)

    def added_bytes(self, parts: Iterable[tuple[PartId, int]]) -> int:
        """Bytes that ``parts`` would add: those not already held by a resident entry."""
        return sum(n for part_id, n in unique_parts(parts) if part_id not in self._parts)

    def fits(self, parts: Iterable[tuple[PartId, int]]) -> bool:
        return self.used_bytes + self.added_bytes(parts) <= self.capacity_bytes

    def add(self, entry: Entry, parts: Iterable[tuple[PartId, int]]) -> None:
        """Make ``entry`` resident, charged for ``parts`` (stored as ``entry.parts``)."""
        parts = unique_parts(parts)
        if not self.fits(parts):
            raise AssertionError(f"tier {self.name}: entry does not fit; make room first")
        if entry.key in self._entries:
            raise AssertionError(f"tier {self.name}: key {entry.key.hex()[:12]} already resident")
        for part_id, nbytes in parts:
            held = self._parts.get(part_id)
            if held is None:
                self._parts[part_id] = [1, nbytes]
                self.used_bytes += nbytes
                self._owners[part_id] = entry.tenant
                self._tenant_bytes[entry.tenant] = self.tenant_bytes(entry.tenant) + nbytes
            else:
                held[0] += 1
        entry.parts = parts
        entry.tier = self.name
        self._entries[entry.key] = entry
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def remove(self, entry: Entry) -> None:
        """Release ``entry``'s parts. Its ``tier`` is left for the caller to set."""
        if self._entries.get(entry.key) is not entry:
            raise AssertionError(f"tier {self.name}: entry {entry.key.hex()[:12]} not resident")
        del self._entries[entry.key]
        for part_id, _ in entry.parts:
            held = self._parts[part_id]
            held[0] -= 1
            if held[0] == 0:
                del self._parts[part_id]
                self.used_bytes -= held[1]
                owner = self._owners.pop(part_id)
                self._tenant_bytes[owner] -= held[1]
                if self._tenant_bytes[owner] == 0:
                    del self._tenant_bytes[owner]

    def touch(self, entry: Entry) -> None:
        """Mark ``entry`` most recently used in this tier."""
        if self._entries.get(entry.key) is entry:
            self._entries.move_to_end(entry.key)

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` when bytes or part counts disagree with the entries."""
        holders: dict[PartId, list[int]] = {}
        for key, entry in self._entries.items():
            if key != entry.key or entry.tier != self.name:
                raise AssertionError(f"tier {self.name}: entry {key.hex()[:12]} is misfiled")
            for part_id, nbytes in entry.parts:
                held = holders.setdefault(part_id, [0, nbytes])
                if held[1] != nbytes:
                    raise AssertionError(f"tier {self.name}: part {part_id} has two sizes")
                held[0] += 1
        if holders != self._parts:
            raise AssertionError(f"tier {self.name}: part holders disagree with the entries")
        total = sum(n for _, n in holders.values())
        if total != self.used_bytes:
            raise AssertionError(f"tier {self.name}: used_bytes={self.used_bytes}, parts {total}")
        owners = {part_id: e.tenant for e in self._entries.values() for part_id, _ in e.parts}
        if owners != self._owners:
            raise AssertionError(f"tier {self.name}: a part is charged to the wrong tenant")
        by_tenant: dict[TenantId, int] = {}
        for part_id, (_, nbytes) in holders.items():
            by_tenant[owners[part_id]] = by_tenant.get(owners[part_id], 0) + nbytes
        if by_tenant != self._tenant_bytes:
            raise AssertionError(f"tier {self.name}: bytes per tenant disagree with the entries")
        if self.used_bytes > self.capacity_bytes:
            raise AssertionError(
                f"tier {self.name}: used_bytes={self.used_bytes} > capacity={self.capacity_bytes}"
            )


class DiskTier(Tier):
    """A directory of one file per entry, named by its key; an entry is charged its file size."""

    def __init__(self, directory: Path, capacity_bytes: int) -> None:
        super().__init__("disk", capacity_bytes)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def is_disk(self) -> bool:
        return True

    def path(self, key: BlockHash, suffix: str) -> Path:
        return self.directory / f"{key.hex()}{suffix}"

    def delete(self, key: BlockHash, suffix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key, suffix).unlink()

    def scan(self, codec: KVCodec) -> list[DiskRecord]:
        """Read the header of every stored file, oldest first; no store state is touched, so this
        may run on a worker thread. Unfinished writes (``*.tmp``) are deleted."""
        records: list[DiskRecord] = []
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(".tmp"):  # a write that never finished (a crash): never valid
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if not path.name.endswith(codec.suffix):
                continue
            try:
                metadata = codec.read_metadata(path)
                stat = path.stat()
            except (CorruptPayload, OSError) as exc:
                records.append(DiskRecord(path, None, 0, 0.0, str(exc)))
                continue
            records.append(DiskRecord(path, metadata, stat.st_size, stat.st_mtime, ""))
        records.sort(key=lambda r: r.mtime)
        return records


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """One file found by ``DiskTier.scan``: its metadata, or ``None`` and why it is unusable."""

    path: Path
    metadata: dict[str, str] | None
    size: int
    mtime: float
    error: str


def entry_metadata(entry: Entry) -> dict[str, str]:
    """What a file must remember to index ``entry`` again after a restart (spec §1.12: no
    prompt text, only the key, tenant and sizes)."""
    return {
        f"{_META_PREFIX}key": entry.key.hex(),
        f"{_META_PREFIX}tenant": entry.tenant,
        f"{_META_PREFIX}ttl": entry.ttl,
        f"{_META_PREFIX}num_tokens": str(entry.num_tokens),
        f"{_META_PREFIX}created_at": repr(entry.created_at),
        f"{_META_PREFIX}expires_at": repr(entry.expires_at),
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
    try:
        key = bytes.fromhex(path.name.removesuffix(suffix))
    except ValueError:
        return None
    return BlockHash(key) if len(key) == 32 else None


def disk_part(key: BlockHash) -> PartId:
    """The part id of an entry's file: files are never shared, so the whole key names it."""
    return int.from_bytes(key, "big")


class TierStack:
    """The tiers, fastest first, and the codec that moves payloads between them.

    Without a codec (a stack built before the engine loads, or a single tier in tests) nothing
    can move: an entry that must leave its tier is dropped.
    """

    def __init__(self, tiers: Sequence[Tier], codec: KVCodec | None = None) -> None:
        if not tiers:
            raise ValueError("a tier stack needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names repeat: {names}")
        if any(t.is_disk for t in tiers[:-1]):
            raise ValueError("the disk tier must be the last")
        self.tiers = tuple(tiers)
        self.codec = codec

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    @property
    def top(self) -> Tier:
        """Where the engine's payloads live: new entries start here, hits are promoted here."""
        return self.tiers[0]

    @property
    def disk(self) -> DiskTier | None:
        last = self.tiers[-1]
        return last if isinstance(last, DiskTier) else None

    def tier(self, name: TierName) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    def below(self, tier: Tier) -> Tier | None:
        index = self.tiers.index(tier)
        return self.tiers[index + 1] if index + 1 < len(self.tiers) else None

    def path(self, key: BlockHash) -> Path:
        """The file of ``key`` in the disk tier (which must exist, as must the codec)."""
        disk = self.disk
        assert disk is not None and self.codec is not None
        return disk.path(key, self.codec.suffix)

    def to_memory(self, payload: KVPayload, tier: Tier) -> KVPayload:
        """``payload`` copied into the memory of ``tier`` (``device`` or ``host``)."""
        assert self.codec is not None and not tier.is_disk
        if tier.name == "device":
            return self.codec.to_device(payload)
        return self.codec.to_host(payload)

    def loader(self, entry: Entry) -> Callable[[], KVPayload]:
        """A function that returns ``entry``'s payload in the top tier's memory, reading its file
        when it is on disk. Built on the event loop; the function may run on a worker thread, and
        the entry must stay pinned until it returns. The function raises ``CorruptPayload``."""
        top = self.top
        payload = entry.payload
        if entry.tier == top.name and payload is not None:
            return lambda: payload
        if entry.tier is None:
            raise CorruptPayload("the entry was removed")
        if payload is not None:  # a lower memory tier
            return lambda: self.to_memory(payload, top)
        codec = self.codec
        if codec is None:
            raise CorruptPayload("no codec to read the file with")
        path = self.path(entry.key)

        def load() -> KVPayload:
            return self.to_memory(codec.load(path), top)

        return load


__all__ = [
    "DiskRecord",
    "DiskTier",
    "Parts",
    "Tier",
    "TierStack",
    "disk_part",
    "entry_from_metadata",
    "entry_metadata",
    "key_of",
    "unique_parts",
]
