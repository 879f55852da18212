"""Where the bytes of entries live: a ``TierStack`` of tiers, fastest first, each moving its own.

::

    device  MemoryTier  (accelerator memory; CUDA engines only)   payloads on the engine's device
    host    MemoryTier  (RAM; on a CPU engine this is the top)    payloads in host memory
    disk    DiskTier    (a directory, optional; ``disk.py``)      one self-contained file per entry
    remote  RemoteTier  (Redis, optional; ``remote/tier.py``)     bytes shared by every replica

Every ``Tier`` keeps the same accounting: which entries it holds, least recently used first, and
the bytes they hold, counting a part shared by several entries once (nested prefixes share
pages), in total and per tenant (a part is charged to the tenant of the entry that brought it;
keys are namespaced by tenant, so entries of two tenants never share a part). Subclasses move the
bytes, through the engine's ``KVCodec`` given at construction: ``put`` (store and charge),
``reader`` (read back), ``release`` (uncharge and let go).

A ``CopyTier`` (the disk tier) may also hold *copies*: the bytes of an entry served from a tier
above, written behind the request (``cache/copies.py``), so a crash keeps them and a demotion
needs no write. The shared ``remote`` tier holds copies too (``holds_copies``), written by its
own queue. Policy (what to demote, promote, copy or drop, and when) belongs to
``PrefixStore``; tiers never decide.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from promptcache.cache.entry import Entry
from promptcache.core.payload import KVCodec, KVPayload, PartId
from promptcache.types import BlockHash, TenantId, TierName

log = logging.getLogger(__name__)

Parts = tuple[tuple[PartId, int], ...]
Room = Callable[[Parts], bool]
"""What a tier calls before it charges ``parts``: the store makes room for them (demoting or
dropping others) and says whether they fit now."""


def unique_parts(parts: Iterable[tuple[PartId, int]]) -> Parts:
    """``parts`` with repeated ids dropped (a payload may list a piece once only)."""
    seen: dict[PartId, int] = {}
    for part_id, nbytes in parts:
        seen.setdefault(part_id, nbytes)
    return tuple(seen.items())


class Tier(ABC):
    """One level: a byte budget and the entries it holds, least recently used first.

    The accounting (``add``, ``remove``, ``touch``, ``check_integrity``) is shared: a part held
    by several entries is charged once, and ``add`` raises ``AssertionError`` when the entry does
    not fit (the store makes room first). Subclasses hold the bytes and implement ``put``,
    ``reader`` and ``release``; the store calls only these, never asking what kind a tier is.
    """

    holds_copies: ClassVar[bool] = False
    """Whether the tier may hold copies of entries served from above (``CopyTier``): an entry
    promoted out of it keeps its bytes here as its copy."""

    def __init__(self, name: TierName, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"tier {name}: capacity must be >= 0, got {capacity_bytes}")
        self.name: TierName = name
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        """The most ``used_bytes`` ever reached: tests check it never passed the budget."""
        self._entries: OrderedDict[BlockHash, Entry] = OrderedDict()
        self._charged: dict[BlockHash, Parts] = {}  # key -> the parts it is charged for here
        self._parts: dict[PartId, list[int]] = {}  # id -> [number of holders, bytes]
        self._owners: dict[PartId, TenantId] = {}  # id -> the tenant charged for it
        self._tenant_bytes: dict[TenantId, int] = {}

    # -- bytes (subclasses) ------------------------------------------------------------------

    @abstractmethod
    def put(self, entry: Entry, payload: KVPayload, room: Room) -> bool:
        """Hold ``entry``'s bytes, from ``payload`` (in the memory of any tier), and charge them
        once ``room`` made room. Returns False, holding and charging nothing, when there is no
        room or the bytes could not be stored. Runs on the event loop."""

    @abstractmethod
    def reader(self, entry: Entry) -> Callable[[], KVPayload]:
        """A function returning the payload of ``entry`` (held here) in memory. Built on the
        event loop; the function may run on a worker thread while the entry stays pinned, and
        raises ``CorruptPayload`` when the bytes prove unusable."""

    @abstractmethod
    def release(self, entry: Entry) -> None:
        """Uncharge ``entry`` and let its bytes here go."""

    def payload(self, entry: Entry) -> KVPayload | None:
        """``entry``'s payload when this tier holds it in memory, else None."""
        return None

    def staleness(self, entry: Entry) -> float:
        """Seconds by which the bytes held here understate ``entry``'s expiry (a file written
        before a read refreshed it); 0 where the tier keeps no expiry of its own."""
        return 0.0

    # -- accounting --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, Entry) and self._entries.get(entry.key) is entry

    def entries(self) -> list[Entry]:
        """Entries held, least recently used first (a copy: safe to mutate the tier)."""
        return list(self._entries.values())

    def parts_of(self, entry: Entry) -> Parts:
        """The parts ``entry`` is charged for here (``()`` when it is not held)."""
        return self._charged.get(entry.key, ()) if entry in self else ()

    def tenant_bytes(self, tenant: TenantId) -> int:
        """Bytes charged to ``tenant`` in this tier."""
        return self._tenant_bytes.get(tenant, 0)

    def tenants(self) -> set[TenantId]:
        """The tenants holding bytes here."""
        return set(self._tenant_bytes)

    def added_bytes(self, parts: Iterable[tuple[PartId, int]]) -> int:
        """Bytes that ``parts`` would add: those not already held by an entry here."""
        return sum(n for part_id, n in unique_parts(parts) if part_id not in self._parts)

    def fits(self, parts: Iterable[tuple[PartId, int]]) -> bool:
        return self.used_bytes + self.added_bytes(parts) <= self.capacity_bytes

    def add(self, entry: Entry, parts: Iterable[tuple[PartId, int]]) -> None:
        """Charge ``entry`` for ``parts`` here. Where it is served from (``entry.tier``) is the
        store's to say: this may be its home or a copy."""
        parts = unique_parts(parts)
        if not self.fits(parts):
            raise AssertionError(f"tier {self.name}: entry does not fit; make room first")
        if entry.key in self._entries:
            raise AssertionError(f"tier {self.name}: key {entry.key.hex()[:12]} already held")
        for part_id, nbytes in parts:
            held = self._parts.get(part_id)
            if held is None:
                self._parts[part_id] = [1, nbytes]
                self.used_bytes += nbytes
                self._owners[part_id] = entry.tenant
                self._tenant_bytes[entry.tenant] = self.tenant_bytes(entry.tenant) + nbytes
            else:
                held[0] += 1
        self._charged[entry.key] = parts
        self._entries[entry.key] = entry
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def remove(self, entry: Entry) -> None:
        """Uncharge ``entry``'s parts (its bytes are the subclass's to let go)."""
        if self._entries.get(entry.key) is not entry:
            raise AssertionError(f"tier {self.name}: entry {entry.key.hex()[:12]} not held")
        del self._entries[entry.key]
        for part_id, _ in self._charged.pop(entry.key):
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
        if self._charged.keys() != self._entries.keys():
            raise AssertionError(f"tier {self.name}: charges and entries disagree")
        for key, entry in self._entries.items():
            if key != entry.key or (entry.tier != self.name and self.name not in entry.copies):
                raise AssertionError(f"tier {self.name}: entry {key.hex()[:12]} is misfiled")
            for part_id, nbytes in self._charged[key]:
                held = holders.setdefault(part_id, [0, nbytes])
                if held[1] != nbytes:
                    raise AssertionError(f"tier {self.name}: part {part_id} has two sizes")
                held[0] += 1
        if holders != self._parts:
            raise AssertionError(f"tier {self.name}: part holders disagree with the entries")
        total = sum(n for _, n in holders.values())
        if total != self.used_bytes:
            raise AssertionError(f"tier {self.name}: used_bytes={self.used_bytes}, parts {total}")
        owners = {
            part_id: self._entries[key].tenant
            for key, parts in self._charged.items()
            for part_id, _ in parts
        }
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


class MemoryTier(Tier):
    """``device`` or ``host`` memory: holds payloads. An entry is charged its payload's parts,
    each part once however many entries share it (copies keep the ids, so the charge is real
    memory)."""

    def __init__(self, name: TierName, capacity_bytes: int, codec: KVCodec) -> None:
        if name not in ("device", "host"):
            raise ValueError(f"a memory tier is device or host, not {name!r}")
        super().__init__(name, capacity_bytes)
        self.codec = codec
        self._payloads: dict[BlockHash, KVPayload] = {}

    def admit(self, payload: KVPayload) -> KVPayload:
        """``payload`` copied into this tier's memory (itself when it is there already). No
        accounting: safe on a worker thread (a hit read from a lower tier is admitted there)."""
        if self.name == "device":
            return self.codec.to_device(payload)
        return self.codec.to_host(payload)

    def put(self, entry: Entry, payload: KVPayload, room: Room) -> bool:
        if not room(unique_parts(payload.parts)):
            return False
        try:
            held = self.admit(payload)
        except Exception:  # e.g. out of memory on the way: the store tries the next tier
            log.exception("copying a cache entry to %s failed", self.name)
            return False
        self.add(entry, held.parts)
        self._payloads[entry.key] = held
        return True

    def reader(self, entry: Entry) -> Callable[[], KVPayload]:
        payload = self._payloads[entry.key]
        return lambda: payload

    def release(self, entry: Entry) -> None:
        self.remove(entry)
        del self._payloads[entry.key]

    def payload(self, entry: Entry) -> KVPayload | None:
        return self._payloads.get(entry.key) if entry in self else None

    def check_integrity(self) -> None:
        super().check_integrity()
        if self._payloads.keys() != self._entries.keys():
            raise AssertionError(f"tier {self.name}: payloads and entries disagree")
        for key, payload in self._payloads.items():
            if unique_parts(payload.parts) != self._charged[key]:
                raise AssertionError(f"tier {self.name}: {key.hex()[:12]} charged other parts")


@dataclass(frozen=True, slots=True)
class CopyJob:
    """A copy to write behind: ``entry``'s bytes (``payload``, referenced so they stay valid
    while written, wherever the entry moves meanwhile) into ``tier``, stamped with the expiry
    the entry had when the job was taken."""

    entry: Entry
    tier: CopyTier
    payload: KVPayload
    expires_at: float


@dataclass(frozen=True, slots=True)
class Copy:
    """A copy ``CopyTier.write_copy`` wrote and the store has not kept yet: nothing is charged
    for it and nothing reads it. ``handle`` is the tier's own (the disk tier's staged file)."""

    key: BlockHash
    parts: Parts
    expires_at: float
    handle: object


@dataclass(frozen=True, slots=True)
class Found:
    """An entry a ``CopyTier`` found at start (``scan``): its metadata, or ``None`` and why it is
    unusable, and the parts it is charged for."""

    key: BlockHash
    entry: Entry | None
    parts: Parts
    error: str = ""


class CopyTier(Tier):
    """A tier below memory whose bytes outlive the process: it may hold an entry's only bytes
    (the entry is served from here) or a *copy* of those of an entry served from above.

    Copies are written behind requests in two steps: ``write_copy`` (async, off the event loop:
    the bytes are stored but invisible and uncharged), then on the event loop the store either
    ``keep``s it (charged, it becomes the entry's copy) or ``abandon``s it (the entry went or
    moved meanwhile). Only the event loop touches an entry's visible bytes, so a write that
    races with a removal or a demotion never leaves a file indexed for an entry that is gone.

    ``shared``: copies outlive the local entry (a remote tier other replicas read: a local
    eviction leaves them to their own expiry). The disk tier's are not: they go with the entry.
    """

    holds_copies: ClassVar[bool] = True
    shared: ClassVar[bool] = False

    def __init__(self, name: TierName, capacity_bytes: int) -> None:
        super().__init__(name, capacity_bytes)
        self._written: dict[BlockHash, float] = {}  # key -> the expiry its bytes here say

    def accepts(self, payload: KVPayload) -> bool:
        """Whether a copy of ``payload`` could ever fit here (checked before writing one)."""
        return True

    @abstractmethod
    def stage(self, job: CopyJob) -> Copy:
        """Write ``job``'s bytes where nothing reads them yet (blocking: a worker thread).
        Raises ``OSError`` (or another exception) when the write fails; nothing is left."""

    async def write_copy(self, job: CopyJob) -> Copy:
        """``stage`` on a worker thread. A tier whose client is async (remote) overrides it."""
        return await asyncio.to_thread(self.stage, job)

    @abstractmethod
    def publish(self, copy: Copy) -> None:
        """Make a staged copy the bytes of its key here (on the event loop, no charge).
        Raises ``OSError`` when it cannot; the copy is then abandoned."""

    @abstractmethod
    def abandon(self, copy: Copy) -> None:
        """Let a staged copy go (on the event loop)."""

    @abstractmethod
    def erase(self, key: BlockHash) -> None:
        """Delete the bytes stored under ``key`` here, charged or not (a leftover, a file found
        corrupt or expired at start)."""

    def scan(self) -> list[Found]:
        """What an earlier run left here, oldest first (blocking: a worker thread; no store
        state is touched). A tier that finds entries by lookup, not by listing, returns []."""
        return []

    def keep(self, entry: Entry, copy: Copy) -> None:
        """Publish ``copy`` and charge it as ``entry``'s bytes here (the store made room)."""
        self.publish(copy)
        self.add(entry, copy.parts)
        self._written[entry.key] = copy.expires_at

    def adopt(self, found: Found) -> None:
        """Charge an entry found by ``scan`` (the store made room)."""
        assert found.entry is not None
        self.add(found.entry, found.parts)

    def add(self, entry: Entry, parts: Iterable[tuple[PartId, int]]) -> None:
        super().add(entry, parts)
        self._written[entry.key] = entry.expires_at

    def remove(self, entry: Entry) -> None:
        super().remove(entry)
        self._written.pop(entry.key, None)

    def release(self, entry: Entry) -> None:
        """Uncharge ``entry`` and delete its bytes here (a shared tier keeps them)."""
        self.remove(entry)
        if not self.shared:
            self.erase(entry.key)

    def staleness(self, entry: Entry) -> float:
        written = self._written.get(entry.key)
        return 0.0 if written is None or entry not in self else entry.expires_at - written

    def check_integrity(self) -> None:
        super().check_integrity()
        if self._written.keys() != self._entries.keys():
            raise AssertionError(f"tier {self.name}: written expiries and entries disagree")


class TierStack:
    """The tiers, fastest first: memory tiers (the first one, ``top``, is where the engine's
    payloads live), then tiers that hold copies.

    A stack without tiers is what the service shows before its engine loads: it holds nothing,
    and an entry cannot be stored (``top`` raises ``LookupError``).
    """

    def __init__(self, tiers: Sequence[Tier]) -> None:
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names repeat: {names}")
        if tiers and not isinstance(tiers[0], MemoryTier):
            raise ValueError("the first tier must be a memory tier")
        kinds = [isinstance(t, MemoryTier) for t in tiers]
        if kinds != sorted(kinds, reverse=True):
            raise ValueError("memory tiers must come first, tiers that hold copies last")
        self.tiers = tuple(tiers)

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    @property
    def top(self) -> MemoryTier:
        """Where the engine's payloads live: new entries start here, hits are promoted here."""
        if not self.tiers:
            raise LookupError("no tiers: the engine has not loaded")
        top = self.tiers[0]
        assert isinstance(top, MemoryTier)
        return top

    @property
    def copy_tiers(self) -> tuple[CopyTier, ...]:
        """The tiers that hold copies (written behind) and outlive the process."""
        return tuple(t for t in self.tiers if isinstance(t, CopyTier))

    def tier(self, name: TierName) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    def index(self, tier: Tier) -> int:
        return self.tiers.index(tier)

    def below(self, tier: Tier) -> Tier | None:
        index = self.tiers.index(tier)
        return self.tiers[index + 1] if index + 1 < len(self.tiers) else None


__all__ = [
    "Copy",
    "CopyJob",
    "CopyTier",
    "Found",
    "MemoryTier",
    "Parts",
    "Room",
    "Tier",
    "TierStack",
    "unique_parts",
]
