"""``PrefixStore`` as a state machine (hypothesis): random writes, reads (with promotion), pins,
clock jumps, sweeps, demotions, damaged files, copies written behind (taken, written and kept
in any order with the other steps, so they race with moves and removals), restarts and crashes
over device -> host -> disk tiers, for two tenants sharing the budget (``tenant_share``), with
``check_integrity()``, the serving invariants and "no file the index does not know" checked after
every step."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from promptcache.cache.disk import DiskTier
from promptcache.cache.entry import Entry
from promptcache.cache.store import PrefixStore
from promptcache.cache.tiers import Copy, CopyJob
from promptcache.core.payload import CorruptPayload
from promptcache.engine.fake import FakePayload
from promptcache.types import TenantId, Ttl
from tests.cache.payloads import BPT, PAGE, key, payload, stack

NUM_KEYS = 9
DEVICE, HOST, DISK = 100 * BPT, 140 * BPT, 300 * BPT


def spec(k: int) -> tuple[int, int]:
    """Key ``k``: ``(num_tokens, chain)``. Three chains of three nested prefixes each, so
    entries share pages, and a partial last page of their own."""
    return (k % 3 + 1) * 2 * PAGE + 5, k // 3


def tenant(k: int) -> TenantId:
    """Chain 0 is tenant ``a``'s, chains 1 and 2 are ``b``'s (a chain never spans tenants)."""
    return TenantId("a" if k // 3 == 0 else "b")


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="pc-store-"))
        self.now = 0.0
        self.store = self._open()
        self.pinned: list[tuple[Entry, str | None]] = []
        self.damaged: dict[int, bytes] = {}  # key -> the damaged file's bytes
        self.corrupt: list[Entry] = []  # removed for a damaged file, possibly while pinned
        # id(entry) -> (entry, last expires_at seen); holding the entry keeps its id unique
        self.expiry: dict[int, tuple[Entry, float]] = {}
        self.writing: list[tuple[CopyJob, Copy]] = []  # copies written, not yet kept

    def _open(self) -> PrefixStore:
        tiers = stack(DEVICE, HOST, self.dir, DISK)
        return PrefixStore(tiers, tenant_share=0.5, write_behind=4)

    @property
    def _disk(self) -> DiskTier:
        disk = self.store.tiers.tier("disk")
        assert isinstance(disk, DiskTier)
        return disk

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _entry(self, k: int) -> Entry | None:
        return self.store.get(key(k), self.now)

    @rule(k=st.integers(0, NUM_KEYS - 1), ttl=st.sampled_from(["5m", "1h"]))
    def write(self, k: int, ttl: Ttl) -> None:
        n, chain = spec(k)
        entry = self.store.put(key(k), payload(n, chain), ttl, self.now, tenant(k), self.now)
        if entry is not None:
            assert entry.num_tokens == n and entry.is_live(self.now)

    @rule(k=st.integers(0, NUM_KEYS - 1))
    def read(self, k: int) -> None:
        entry = self._entry(k)
        if entry is None:
            return
        assert entry.is_live(self.now), "an expired entry was served"
        self.store.touch(entry, self.now)
        self.store.pin(entry)
        try:
            loaded = self.store.loader(entry)()
        except CorruptPayload:
            self.store.unpin(entry)
            assert self.store.discard(entry)
            self.corrupt.append(entry)
            return
        n, chain = spec(k)
        assert isinstance(loaded, FakePayload)
        assert loaded.tokens == payload(n, chain).tokens, "wrong bytes for the key"
        self.store.promote(entry, loaded, self.now)
        self.store.unpin(entry)

    @rule(k=st.integers(0, NUM_KEYS - 1))
    def promote(self, k: int) -> None:
        """A read's move alone: bytes to the top tier, no refresh."""
        entry = self._entry(k)
        if entry is None or self.store.is_resident(entry):
            return
        self.store.pin(entry)
        try:
            loaded = self.store.loader(entry)()
        except CorruptPayload:
            loaded = None
        finally:
            self.store.unpin(entry)
        if loaded is not None and self.store.promote(entry, loaded, self.now):
            assert entry.tier == "device" and self.store.is_resident(entry)

    @rule(k=st.integers(0, NUM_KEYS - 1))
    def pin(self, k: int) -> None:
        entry = self._entry(k)
        if entry is not None:
            self.store.pin(entry)
            self.pinned.append((entry, entry.tier))

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.pinned) - 1))
        entry, _ = self.pinned.pop(index)
        self.store.unpin(entry)

    @rule(seconds=st.sampled_from([1.0, 60.0, 299.0, 301.0, 3599.0, 3601.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def sweep(self) -> None:
        self.store.evict_expired(self.now)
        assert all(e.is_live(self.now) or e.ref_cnt > 0 for e in self.store.entries())

    @rule(k=st.integers(0, NUM_KEYS - 1))
    def demote(self, k: int) -> None:
        entry = self._entry(k)
        if entry is not None:
            self.store.demote(entry, self.now)

    @rule(k=st.integers(0, NUM_KEYS - 1))
    def damage(self, k: int) -> None:
        entry = self._entry(k)
        while entry is not None and entry.tier != "disk" and self.store.demote(entry, self.now):
            pass  # push it down to its file first
        if entry is None or (entry.tier != "disk" and "disk" not in entry.copies):
            return  # a copy may be damaged too: it serves once its entry is demoted
        path = self._disk.path(entry.key)
        data = bytearray(path.read_bytes())
        data[-1] = (data[-1] + 1) % 256  # never undone by a second damage
        path.write_bytes(bytes(data))
        self.damaged[k] = bytes(data)

    @precondition(lambda self: self.damaged)
    @rule(data=st.data())
    def read_damaged(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(self.damaged)))
        damaged = self.damaged.pop(k)
        entry = self._entry(k)
        path = self._disk.path(key(k))
        broken = entry is not None and entry.tier == "disk" and path.read_bytes() == damaged
        self.read(k)
        if broken:
            # A damaged file never serves: the read failed and took the entry and its file away.
            assert self._entry(k) is None and not self._disk.path(key(k)).exists()

    @rule()
    def clear(self) -> None:
        self.store.clear()
        assert all(e.ref_cnt > 0 for e in self.store.entries())

    @rule()
    def write_copy(self) -> None:
        """The writer takes the next queued copy and writes it (off the loop, in the service)."""
        job = self.store.take_copy(self.now)
        if job is not None:
            assert job.entry.tier in ("device", "host") and job.tier.name == "disk"
            self.writing.append((job, job.tier.stage(job)))

    @precondition(lambda self: self.writing)
    @rule(data=st.data())
    def keep_copy(self, data: st.DataObject) -> None:
        job, copy = self.writing.pop(data.draw(st.integers(0, len(self.writing) - 1)))
        if self.store.copied(job, copy, self.now):
            entry = job.entry
            assert "disk" in entry.copies and entry.tier in ("device", "host")
            k = int.from_bytes(entry.key, "big")
            loaded = self._disk.codec.load(self._disk.path(entry.key))
            assert isinstance(loaded, FakePayload)
            assert loaded.tokens == payload(*spec(k)).tokens, "a copy of other bytes"

    @precondition(lambda self: not self.pinned)
    @rule()
    def restart(self) -> None:
        while self.writing:  # the writer finishes its write before the shutdown's persist
            self.store.copied(*self.writing.pop(), self.now)
        live = {e.key for e in self.store.entries() if e.is_live(self.now)}
        self.store.persist(self.now)
        self.store = self._open()
        self.store.restore(self._disk, self._disk.scan(), self.now)
        assert {e.key for e in self.store.entries()} <= live
        assert all(e.tier == "disk" for e in self.store.entries())

    @precondition(lambda self: not self.pinned)
    @rule()
    def crash(self) -> None:
        """kill -9: no persist, copies being written are left as they are. What was on disk
        (served from there, or a copy) comes back, with the expiry its file recorded."""
        disk = self._disk
        durable = {
            e.key
            for e in self.store.entries()
            if e in disk and e.expires_at - disk.staleness(e) > self.now
        }
        self.writing.clear()  # their staged files are *.tmp: the scan deletes them
        self.store = self._open()
        self.store.restore(self._disk, self._disk.scan(), self.now)
        assert {e.key for e in self.store.entries()} == durable
        assert not [p for p in self.dir.iterdir() if p.name.endswith(".tmp")]

    @invariant()
    def consistent(self) -> None:
        self.store.check_integrity()
        # No orphan: every file is one the disk tier charges (or a copy still being written).
        files = {p.name for p in self.dir.iterdir() if not p.name.endswith(".tmp")}
        assert files == {self._disk.path(e.key).name for e in self._disk.entries()}
        for tier in self.store.tiers:
            assert tier.peak_bytes <= tier.capacity_bytes
        for entry in self.store.entries():
            _, previous = self.expiry.get(id(entry), (entry, entry.expires_at))
            assert entry.expires_at >= previous, "a refresh shortened an expiry"
            self.expiry[id(entry)] = (entry, entry.expires_at)
        for entry, tier in self.pinned:
            # Pinned entries never move down or out (a reader may promote them); the only way out
            # is expiry and a rewrite of the key.
            assert entry.tier in (tier, "device") or (
                entry.tier is None and (not entry.is_live(self.now) or entry in self.corrupt)
            )


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
