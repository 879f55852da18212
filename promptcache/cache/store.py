"""``PrefixStore``: every cache entry's metadata, its TTL and pins, and where its bytes live.

The store keeps one index of entries. Each entry is served from one tier of its ``TierStack``
(``cache/tiers.py``), its *home*, and may have copies in lower tiers that hold copies (the disk
tier). Tiers move the bytes; the store decides, and never asks what kind a tier is. Policy, per
tier (spec §1.13):

- room is made in a tier by reclaiming its expired, unpinned entries first, then dropping the
  copies it holds (only copies: their entries stay where they are served from), then demoting
  its least recently used unpinned entries one tier down; the last tier drops them
  (``capacity``). A demotion to a tier that holds the entry's copy writes nothing: the copy
  becomes its home;
- with a tenant share ``F`` (``tenant_share``, set when credentials are configured), a tenant
  holding more than ``F`` of a tier's budget (counting the entry being placed) is over its share:
  its entries move first (``tenant_share``), and a tenant over its share never moves the entries
  of one within it; an entry that cannot get room otherwise goes to a lower tier or is refused
  (``tenant_share``). A tenant alone in a tier may fill it (spec §1.13);
- a new entry starts in the top tier, or the first tier below it that can hold it; with
  write-behind on (``write_behind``, the queue's length) a copy of it is queued for each tier
  below that holds copies (``cache/copies.py``);
- a hit in a lower tier is promoted to the top when the engine has read it (``promote``); a tier
  that holds copies keeps its bytes as the entry's copy. Bytes that turn out corrupt or truncated
  are a miss and the entry is removed (``discard``);
- pinned entries (in use by a running request) never move and are never dropped, nor are their
  copies;
- removing an entry (expiry, eviction, ``clear``) deletes its copies too;
- expiry is strict (§1.7): an expired entry is never returned, even before its bytes go.

All methods run on one thread (the service's event loop). Moves between tiers call the engine's
codec there; only ``loader`` functions (reads for a hit) and ``CopyTier.write_copy`` (the write
of a copy, between ``take_copy`` and ``copied``) run elsewhere.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from promptcache.cache.copies import CopyQueue
from promptcache.cache.entry import Entry
from promptcache.cache.misses import Tombstone, Tombstones
from promptcache.cache.tiers import (
    Copy,
    CopyJob,
    CopyTier,
    Found,
    Parts,
    Tier,
    TierStack,
    unique_parts,
)
from promptcache.core.payload import CorruptPayload, KVPayload
from promptcache.types import TTL_SECONDS, BlockHash, TenantId, TierName, Ttl

log = logging.getLogger(__name__)

EvictReason = Literal["expired", "capacity", "tenant_share", "cleared", "rejected", "corrupt"]
MoveReason = Literal["capacity", "tenant_share", "shutdown", "hit"]
CopyOutcome = Literal["written", "skipped", "no_room", "abandoned", "failed", "dropped"]
"""What became of a copy: ``written`` (kept), ``skipped`` (the queue was full, or the entry is
larger than the tier), ``no_room`` (room could not be made for it), ``abandoned`` (the entry went
or moved while it was written), ``failed`` (the write failed), ``dropped`` (a kept copy deleted to
make room)."""

REFRESH_COPY_AFTER = 0.5
"""A copy whose expiry lags its entry's (refreshed by reads) by more than this share of the TTL
is written again, so that after a crash the entry lives on at least that much of a TTL."""


@dataclass(slots=True)
class StoreStats:
    """Cumulative counters, read by metrics. Moves and drops are keyed ``(tier, reason)``, where
    the tier is the one the entry left; copies ``(tier, outcome)``, the tier of the copy."""

    num_hits: int = 0
    num_misses: int = 0
    num_commits: int = 0
    evictions: Counter[tuple[TierName, EvictReason]] = field(default_factory=Counter)
    demotions: Counter[tuple[TierName, MoveReason]] = field(default_factory=Counter)
    promotions: Counter[tuple[TierName, MoveReason]] = field(default_factory=Counter)
    copies: Counter[tuple[TierName, CopyOutcome]] = field(default_factory=Counter)


class PrefixStore:
    """Entries by key, least recently used first, spread over the tiers of a ``TierStack``.

    ``tenant_share`` (0 < F <= 1, or None for plain LRU) is the share of each tier's budget a
    tenant may hold when others need room. ``write_behind`` is how many copies may wait to be
    written behind (``cache/copies.py``; 0: none are, entries reach lower tiers when demoted or
    at shutdown).
    """

    def __init__(
        self,
        tiers: TierStack,
        *,
        tenant_share: float | None = None,
        write_behind: int = 0,
    ) -> None:
        if tenant_share is not None and not 0 < tenant_share <= 1:
            raise ValueError(f"tenant_share must be in (0, 1], got {tenant_share}")
        self.tenant_share = tenant_share
        self.tiers = tiers
        self.copy_queue = CopyQueue(write_behind)
        self._entries: OrderedDict[BlockHash, Entry] = OrderedDict()
        self._copy_failing = False
        self.stats = StoreStats()
        self.tombstones = Tombstones()
        """Removed keys, so a miss can say expired or evicted (``cache/misses.py``)."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        """Bytes held, summed over the tiers (copies included)."""
        return sum(t.used_bytes for t in self.tiers)

    @property
    def capacity_bytes(self) -> int:
        return sum(t.capacity_bytes for t in self.tiers)

    def entries(self) -> list[Entry]:
        """A snapshot of every entry, least recently used first."""
        return list(self._entries.values())

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: BlockHash, now: float) -> Entry | None:
        """The live entry under ``key`` in any tier, or None. Does not mutate, except to reclaim
        the entry when it has expired and is not pinned."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.is_live(now):
            return entry
        if entry.ref_cnt == 0:
            self._remove(entry, "expired")
        return None

    def peek(self, key: BlockHash) -> Entry | None:
        """The entry under ``key``, live or not; never mutates (for explaining misses)."""
        return self._entries.get(key)

    def touch(self, entry: Entry, t0: float) -> None:
        """A read: refresh the expiry from request start ``t0`` (never shortening it, §1.7)
        and mark the entry most recently used (in every tier holding it)."""
        entry.expires_at = max(entry.expires_at, t0 + TTL_SECONDS[entry.ttl])
        entry.num_hits += 1
        self.stats.num_hits += 1
        if self._entries.get(entry.key) is entry:
            self._entries.move_to_end(entry.key)
            for tier in self.tiers:
                tier.touch(entry)
            self._queue_stale_copies(entry)

    def pin(self, entry: Entry) -> None:
        """Protect ``entry`` (and its copies) from moves and eviction until ``unpin``; its bytes
        stay valid meanwhile."""
        entry.ref_cnt += 1

    def unpin(self, entry: Entry) -> None:
        if entry.ref_cnt <= 0:
            raise RuntimeError("unpin of an entry that is not pinned")
        entry.ref_cnt -= 1

    def is_resident(self, entry: Entry) -> bool:
        """Whether the engine can use ``entry``'s payload as it is (it is in the top tier)."""
        return bool(self.tiers) and entry.tier == self.tiers.top.name

    def resident(self, entry: Entry) -> KVPayload | None:
        """``entry``'s payload when it is in the top tier (the engine's memory), else None."""
        return self.tiers.top.payload(entry) if self.is_resident(entry) else None

    def loader(self, entry: Entry) -> Callable[[], KVPayload]:
        """A function that returns ``entry``'s payload in the top tier's memory, reading it from
        the tier it is served from. Built on the event loop; the function may run on a worker
        thread, and the entry must stay pinned until it returns. It raises ``CorruptPayload``."""
        if entry.tier is None:
            raise CorruptPayload("the entry was removed")
        source, top = self._tier_of(entry), self.tiers.top
        read = source.reader(entry)
        if source is top:
            return read
        return lambda: top.admit(read())

    # -- writes and moves --------------------------------------------------------------------

    def put(
        self, key: BlockHash, payload: KVPayload, ttl: Ttl, t0: float, tenant: TenantId, now: float
    ) -> Entry | None:
        """Store a new entry expiring at ``t0 + ttl`` from ``payload`` (in the top tier's memory).

        Returns it, the live entry already under ``key`` (entries are immutable), or None when no
        tier can make room (counted as ``rejected``).
        """
        existing = self.get(key, now)
        if existing is not None:
            return existing
        stale = self._entries.get(key)
        if stale is not None:  # expired but pinned: replace the mapping, the reader keeps its ref
            self._remove(stale, "expired")
        entry = Entry(key, tenant, payload.num_tokens, ttl, t0, t0 + TTL_SECONDS[ttl])
        top = self.tiers.top
        if not self._place(entry, payload, 0, now):
            parts = unique_parts(payload.parts)
            if self._over_share(top, tenant, tenant, top.added_bytes(parts)):
                self.tombstones.add(
                    key, Tombstone(tenant, "tenant_share", top.name, entry.expires_at)
                )
                self.stats.evictions[top.name, "tenant_share"] += 1
                log.info(
                    "cache entry of %d bytes not stored: its tenant is over its share of %s",
                    payload.nbytes,
                    top.name,
                )
                return None
            self.tombstones.add(key, Tombstone(tenant, "rejected", top.name, entry.expires_at))
            self.stats.evictions[top.name, "rejected"] += 1
            log.warning("cache entry of %d bytes fits no tier; not stored", payload.nbytes)
            return None
        self._entries[key] = entry
        self.tombstones.discard(key)
        self.stats.num_commits += 1
        for tier in self._copy_tiers_below(entry):
            self._queue_copy(entry, tier)
        return entry

    def promote(self, entry: Entry, payload: KVPayload, now: float) -> bool:
        """Move ``entry`` to the top tier, holding ``payload`` (its bytes as ``loader`` read
        them), when room can be made there. Returns whether it is in the top tier now; when
        not, it stays where it was and the caller may still use ``payload`` this once. A tier
        that holds copies keeps the bytes it served as the entry's copy."""
        if self._entries.get(entry.key) is not entry or entry.tier is None:
            return False
        top = self.tiers.top
        source = self._tier_of(entry)
        if source is top:
            return True

        def room(parts: Parts) -> bool:
            # Making room may move the entry itself when it is not pinned: then it stays put.
            return self._room(top, parts, entry, now) and entry.tier == source.name

        if not top.put(entry, payload, room):
            return False
        if source.holds_copies:
            entry.copies.add(source.name)
        else:
            source.release(entry)
        self._settle(entry, top)
        self.stats.promotions[source.name, "hit"] += 1
        self._queue_stale_copies(entry)
        return True

    def demote(self, entry: Entry, now: float, reason: MoveReason = "capacity") -> bool:
        """Move an unpinned ``entry`` down a tier (dropping it from the last). Returns whether it
        moved down: False when it is pinned, gone or was dropped."""
        if self._entries.get(entry.key) is not entry or entry.ref_cnt > 0:
            return False
        return self._demote(entry, self._tier_of(entry), now, reason)

    def discard(self, entry: Entry, reason: EvictReason = "corrupt") -> bool:
        """Remove ``entry`` whatever its pins (its bytes proved unusable). False when it was
        already gone or replaced."""
        if self._entries.get(entry.key) is not entry:
            return False
        self._remove(entry, reason)
        return True

    def evict_expired(self, now: float) -> int:
        """Reclaim every expired, unpinned entry in every tier. Returns how many went."""
        expired = [e for e in self._entries.values() if not e.is_live(now) and e.ref_cnt == 0]
        for entry in expired:
            self._remove(entry, "expired")
        return len(expired)

    def clear(self) -> int:
        """Drop every unpinned entry (admin call). Returns how many were removed."""
        victims = [e for e in self._entries.values() if e.ref_cnt == 0]
        for entry in victims:
            self._remove(entry, "cleared")
        return len(victims)

    # -- copies written behind ---------------------------------------------------------------

    def take_copy(self, now: float) -> CopyJob | None:
        """The next queued copy still wanted, as a job holding the entry's payload as it is now;
        None when none is. For the ``CopyWriter``: the job goes back through ``copied`` or
        ``copy_failed``."""
        while (waiting := self.copy_queue.pop()) is not None:
            entry, tier = waiting
            if not self._wants_copy(entry, tier, now):
                continue
            payload = self._tier_of(entry).payload(entry)
            if payload is None:
                continue
            if not tier.accepts(payload):
                self.stats.copies[tier.name, "skipped"] += 1
                continue
            return CopyJob(entry, tier, payload, entry.expires_at)
        return None

    def copied(self, job: CopyJob, copy: Copy, now: float) -> bool:
        """Keep the copy ``job`` wrote, charged in its tier (room is made as for any entry, the
        tier's other copies going first), when its entry still wants it; otherwise, or when
        there is no room, the copy is abandoned. Returns whether it was kept."""
        entry, tier = job.entry, job.tier
        wanted = self._wants_copy(entry, tier, now)
        replacing = wanted and tier.name in entry.copies
        if replacing and entry.expires_at - tier.staleness(entry) >= copy.expires_at:
            wanted = False  # the copy it has is as fresh (written meanwhile)
        if not wanted:
            tier.abandon(copy)
            self.stats.copies[tier.name, "abandoned"] += 1
            return False
        if replacing:  # uncharge the stale copy; publishing the new one replaces its bytes
            tier.remove(entry)
            entry.copies.discard(tier.name)
        outcome: CopyOutcome = "written"
        if not self._room(tier, copy.parts, entry, now):
            outcome = "no_room"
        else:
            try:
                tier.keep(entry, copy)
            except OSError as exc:
                log.warning("keeping a copy of a cache entry in %s failed: %s", tier.name, exc)
                outcome = "failed"
        self.stats.copies[tier.name, outcome] += 1
        if outcome != "written":
            tier.abandon(copy)
            if replacing:
                tier.erase(entry.key)
            return False
        entry.copies.add(tier.name)
        self._copy_failing = False
        return True

    def copy_failed(self, job: CopyJob, error: BaseException) -> None:
        """The write of ``job`` raised ``error``: counted, and logged once until one succeeds
        (a full or broken disk would otherwise log every entry)."""
        self.stats.copies[job.tier.name, "failed"] += 1
        if not self._copy_failing:
            self._copy_failing = True
            log.warning("writing a copy of a cache entry to %s failed: %s", job.tier.name, error)

    # -- persistence -------------------------------------------------------------------------

    def persist(self, now: float) -> int:
        """Move every live, unpinned memory entry to the first tier that holds copies (the disk),
        least recently used first so the most recent win when it is full (shutdown). An entry
        whose copy is there already just lets its memory go; a copy whose expiry a read has
        since refreshed is written again. Returns how many moved."""
        targets = self.tiers.copy_tiers
        if not targets:
            return 0
        target = targets[0]
        start = self.tiers.index(target)
        moved = 0
        for entry in self.entries():
            if entry.ref_cnt > 0 or not entry.is_live(now) or entry.tier is None:
                continue
            source = self._tier_of(entry)
            if self.tiers.index(source) >= start:
                continue
            stale = target.name in entry.copies and target.staleness(entry) > 0
            if stale:  # written again below: the file is replaced, not deleted first
                target.remove(entry)
                entry.copies.discard(target.name)
            if self._place(entry, source.payload(entry), start, now):
                source.release(entry)
                self.stats.demotions[source.name, "shutdown"] += 1
                moved += 1
            elif stale:
                target.erase(entry.key)
        return moved

    def restore(self, tier: CopyTier, found: Sequence[Found], now: float) -> int:
        """Index the entries ``tier.scan()`` found (oldest first). Expired, corrupt and surplus
        ones are erased (TTLs are wall-clock: what expired while the server was down is gone).
        Returns how many entries the tier holds now (the newest win when they do not all fit)."""
        for record in found:
            known = self._entries.get(record.key)
            if known is not None:
                if known.tier != tier.name and tier.name not in known.copies:
                    tier.erase(record.key)  # a leftover under the key of a newer entry
                continue  # otherwise these very bytes are indexed already (a second start)
            entry = record.entry
            reason: EvictReason | None = None
            if entry is None:
                reason = "corrupt"
            elif not entry.is_live(now):
                reason = "expired"
            elif not self._room(tier, record.parts, entry, now):
                reason = "capacity"
            if reason is not None or entry is None:
                reason = reason or "corrupt"
                log.info(
                    "dropping stored cache entry %s from %s (%s%s)",
                    record.key.hex()[:16],
                    tier.name,
                    reason,
                    f": {record.error}" if record.error else "",
                )
                tier.erase(record.key)
                self.stats.evictions[tier.name, reason] += 1
                continue
            tier.adopt(record)
            self._settle(entry, tier)
            self._entries[record.key] = entry
        return len(tier)

    # -- tiers found by lookup (shared) ------------------------------------------------------

    def adopt(self, tier: Tier, entry: Entry, now: float, parts: Parts = ()) -> bool:
        """Index ``entry``, found in ``tier`` by a lookup (the shared tier, on a local miss), as
        served from there and charged ``parts`` (``()`` for the shared tier: its bytes cost
        this replica nothing). A hit on it is read and promoted like any lower tier's. False
        when it has expired, a live entry is known under its key, or there is no room."""
        if not entry.is_live(now) or self.get(entry.key, now) is not None:
            return False
        stale = self._entries.get(entry.key)
        if stale is not None:  # expired but pinned: replace the mapping, the reader keeps its ref
            self._remove(stale, "expired")
        if not self._room(tier, parts, entry, now):
            return False
        tier.add(entry, parts)
        self._settle(entry, tier)
        self._entries[entry.key] = entry
        self.tombstones.discard(entry.key)
        return True

    def shared(self, entry: Entry, tier: Tier) -> bool:
        """Record that ``tier`` (below the entry's home, charged nothing) now holds a copy of
        ``entry``'s bytes: its write to the shared tier is done. An entry that later leaves
        the local tiers is then served from there instead of dropped. False when the entry is
        gone or served from ``tier`` or below."""
        if self._entries.get(entry.key) is not entry or entry.tier is None:
            return False
        if tier.name in entry.copies:
            return True
        if self.tiers.index(tier) <= self.tiers.index(self._tier_of(entry)):
            return False
        tier.add(entry, ())
        entry.copies.add(tier.name)
        return True

    # -- checks ------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` when tiers, bytes, copies or pins disagree with the index."""
        for tier in self.tiers:
            tier.check_integrity()  # its accounting, and that it holds the bytes it charges
            for entry in tier.entries():
                if self._entries.get(entry.key) is not entry:
                    raise AssertionError(f"{tier.name} holds {entry.key.hex()[:12]}, unindexed")
        for key, entry in self._entries.items():
            name = key.hex()[:12]
            if key != entry.key or entry.tier is None:
                raise AssertionError(f"entry {name} is misfiled")
            home = self._tier_of(entry)
            if entry.parts != home.parts_of(entry):
                raise AssertionError(f"entry {name}: its parts are not those of its tier")
            for tier in self.tiers:
                if (entry in tier) != (tier is home or tier.name in entry.copies):
                    raise AssertionError(f"entry {name}: {tier.name} disagrees with its copies")
            for copy in entry.copies:
                tier = self.tiers.tier(copy)
                if not tier.holds_copies or self.tiers.index(tier) <= self.tiers.index(home):
                    raise AssertionError(f"entry {name}: a copy in {copy} is not below it")
            if entry.ref_cnt < 0:
                raise AssertionError(f"entry {name} has ref_cnt {entry.ref_cnt}")

    # -- internals ---------------------------------------------------------------------------

    def _tier_of(self, entry: Entry) -> Tier:
        assert entry.tier is not None
        return self.tiers.tier(entry.tier)

    def _settle(self, entry: Entry, tier: Tier) -> None:
        """Make ``tier`` (which holds and charges ``entry``) the one it is served from."""
        entry.tier = tier.name
        entry.parts = tier.parts_of(entry)

    def _place(self, entry: Entry, payload: KVPayload | None, start: int, now: float) -> bool:
        """Make ``entry`` served from the first tier from index ``start`` down that holds its
        copy (nothing is written) or can hold ``payload``. Its current tier, if any, is the
        caller's to release."""
        for tier in self.tiers.tiers[start:]:
            if tier.name in entry.copies:
                entry.copies.discard(tier.name)
                self._settle(entry, tier)
                return True
            if payload is None:
                continue

            def room(parts: Parts, tier: Tier = tier) -> bool:
                return self._room(tier, parts, entry, now)

            if tier.put(entry, payload, room):
                self._settle(entry, tier)
                return True
        return False

    def _room(self, tier: Tier, parts: Parts, entry: Entry, now: float) -> bool:
        """Whether ``parts`` of ``entry`` fit in ``tier`` once room is made (never by moving
        ``entry`` itself)."""
        if tier.added_bytes(parts) > tier.capacity_bytes:
            return False
        return self._make_room(tier, parts, entry, now)

    def _make_room(self, tier: Tier, parts: Parts, placing: Entry, now: float) -> bool:
        """Free ``tier`` until ``parts`` (of ``placing``) fit: expired entries first, then the
        copies it holds, then unpinned entries move down a tier (or go, from the last), least
        recently used first, those of tenants over their share before any other."""
        if tier.fits(parts):
            return True
        for entry in tier.entries():
            if entry is not placing and entry.ref_cnt == 0 and not entry.is_live(now):
                self._remove(entry, "expired")
        while not tier.fits(parts):
            copy = next(
                (
                    e
                    for e in tier.entries()
                    if e is not placing and e.ref_cnt == 0 and e.tier != tier.name
                ),
                None,
            )
            if copy is not None:
                self._drop_copy(copy, tier)
                continue
            choice = self._victim(tier, parts, placing)
            if choice is None:
                return False
            victim, reason = choice
            self._demote(victim, tier, now, reason)
        return True

    def _victim(self, tier: Tier, parts: Parts, placing: Entry) -> tuple[Entry, MoveReason] | None:
        """The next entry to leave ``tier`` to make room for ``parts`` of ``placing``, or None.

        Without a share, or with one tenant alone in the tier, that is plain LRU. Otherwise the
        least recently used entry of a tenant over its share goes first; an entry of a tenant
        within its share goes only when the placing tenant itself stays within its share. A
        flood by one tenant thus pushes out its own entries, never its neighbours' (§1.13).
        """
        movable = [  # least recently used first
            e for e in tier.entries() if e.ref_cnt == 0 and e is not placing and e.tier == tier.name
        ]
        if not movable:
            return None
        tenant = placing.tenant
        if self.tenant_share is None or tier.tenants() <= {tenant}:
            return movable[0], "capacity"
        added = tier.added_bytes(parts)
        over = {t for t in tier.tenants() | {tenant} if self._over_share(tier, t, tenant, added)}
        for entry in movable:
            if entry.tenant in over:
                return entry, "tenant_share"
        if tenant in over:
            return None
        return movable[0], "capacity"

    def _over_share(self, tier: Tier, tenant: TenantId, placing: TenantId, added: int) -> bool:
        """Whether ``tenant`` holds more than its share of ``tier`` once the ``added`` bytes of
        an entry of ``placing`` are counted. Never without a share, nor for a tenant alone in the
        tier (``placing`` counts as present: its arrival is what makes the others share)."""
        if self.tenant_share is None or tier.tenants() | {placing} <= {tenant}:
            return False
        extra = added if placing == tenant else 0
        return tier.tenant_bytes(tenant) + extra > self.tenant_share * tier.capacity_bytes

    def _demote(self, entry: Entry, source: Tier, now: float, reason: MoveReason) -> bool:
        below = self.tiers.below(source)
        if below is not None:
            start = self.tiers.index(below)
            if self._place(entry, source.payload(entry), start, now):
                source.release(entry)
                self.stats.demotions[source.name, reason] += 1
                log.debug("demoted a cache entry from %s to %s", source.name, entry.tier)
                return True
        if entry.is_live(now):
            # A live entry goes before its TTL: this breaks the minimum-lifetime promise.
            log.warning(
                "evicting live cache entry (%d tokens, %.0f s left) from %s under pressure",
                entry.num_tokens,
                entry.expires_at - now,
                source.name,
            )
        source.release(entry)
        self._forget(entry, source.name, "tenant_share" if reason == "tenant_share" else "capacity")
        return False

    def _remove(self, entry: Entry, reason: EvictReason) -> None:
        tier = self._tier_of(entry)
        tier.release(entry)
        self._forget(entry, tier.name, reason)

    def _forget(self, entry: Entry, tier: TierName, reason: EvictReason) -> None:
        """Drop ``entry`` (released from its tier ``tier`` already) and its copies."""
        for name in sorted(entry.copies):
            self.tiers.tier(name).release(entry)
        entry.copies.clear()
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self.copy_queue.discard(entry)
        entry.tier = None
        entry.parts = ()
        self.tombstones.add(entry.key, Tombstone(entry.tenant, reason, tier, entry.expires_at))
        self.stats.evictions[tier, reason] += 1

    def _drop_copy(self, entry: Entry, tier: Tier) -> None:
        tier.release(entry)
        entry.copies.discard(tier.name)
        self.stats.copies[tier.name, "dropped"] += 1

    def _copy_tiers_below(self, entry: Entry) -> list[CopyTier]:
        """The tiers that could hold a copy of ``entry``, from the bytes of its home."""
        if entry.tier is None or self.copy_queue.limit == 0:
            return []
        home = self._tier_of(entry)
        if home.payload(entry) is None:
            return []  # its bytes are not in memory: nothing to write a copy from
        index = self.tiers.index(home)
        return [t for t in self.tiers.copy_tiers if self.tiers.index(t) > index]

    def _queue_copy(self, entry: Entry, tier: CopyTier) -> None:
        if not self.copy_queue.offer(entry, tier):
            self.stats.copies[tier.name, "skipped"] += 1

    def _queue_stale_copies(self, entry: Entry) -> None:
        """Queue a new copy where the one held lags the entry's refreshed expiry too far."""
        lag = REFRESH_COPY_AFTER * TTL_SECONDS[entry.ttl]
        for tier in self._copy_tiers_below(entry):
            if tier.name in entry.copies and tier.staleness(entry) > lag:
                self._queue_copy(entry, tier)

    def _wants_copy(self, entry: Entry, tier: CopyTier, now: float) -> bool:
        """Whether ``entry`` is live, indexed, served from above ``tier`` and has no copy
        there, or a stale one."""
        if self._entries.get(entry.key) is not entry or not entry.is_live(now):
            return False
        if entry.tier is None or self.tiers.index(tier) <= self.tiers.index(self._tier_of(entry)):
            return False
        return tier.name not in entry.copies or tier.staleness(entry) > 0


__all__ = [
    "CopyOutcome",
    "Entry",
    "EvictReason",
    "MoveReason",
    "PrefixStore",
    "StoreStats",
]
