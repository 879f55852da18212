"""``Lease``: what one request holds in the cache while it runs, released exactly once.

A request holds up to three things: a pin on the entry it reads (the planner pins the deepest
hit, so the entry's bytes cannot move or go while the engine restores them), the keys it
computes (registered in flight, so concurrent requests for the same prefix wait instead of
computing it too, spec §1.11) and, with a shared tier, the Redis locks on those keys that make
other replicas wait too. Each ends at a defined moment — the pin once the engine has restored
the prefix, the keys once the written entries are stored, a lock once its entry's write to
Redis is done (``hand_over``: the write releases it) — and, whatever happens (a corrupt file, a
cancelled client, an engine failure), at the end of the request. One object owns them so each
is released once, in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

from promptcache.cache.entry import Entry
from promptcache.cache.inflight import InFlight
from promptcache.cache.remote.tier import RemoteTier
from promptcache.cache.store import PrefixStore
from promptcache.types import BlockHash


class Lease:
    """A request's pin and in-flight keys. Used on the event loop only."""

    def __init__(
        self, store: PrefixStore, inflight: InFlight, remote: RemoteTier | None = None
    ) -> None:
        self._store = store
        self._inflight = inflight
        self._remote = remote
        self.owner = remote.lock_owner() if remote is not None else ""
        """The name this request's Redis locks are held under."""
        self.locked: list[BlockHash] = []
        """Keys locked in Redis for this request, until released or handed over."""
        self.hit: Entry | None = None
        """The pinned entry, until ``unpin``."""
        self.keys: list[BlockHash] = []
        """The keys this request computes, until ``finish``."""

    def hold(self, hit: Entry | None, writes: Iterable[BlockHash]) -> None:
        """Take over the planner's pin on ``hit`` (replacing none: unpin first) and register
        ``writes`` in flight; keys another request already computes are not this one's."""
        if self.hit is not None:
            raise RuntimeError("the lease still holds a pin")
        self.hit = hit
        self.keys += self._inflight.begin(writes)

    def unpin(self) -> Entry | None:
        """Release the pin (the engine has the bytes, or they proved unusable). Returns the
        entry that was pinned."""
        hit, self.hit = self.hit, None
        if hit is not None:
            self._store.unpin(hit)
        return hit

    def finish(self) -> None:
        """Release the keys: their entries are stored, or will not be; waiters plan again."""
        keys, self.keys = self.keys, []
        for key in keys:
            self._inflight.finish(key)

    def locked_remote(self, key: BlockHash) -> None:
        """Record that this request now holds ``key``'s Redis lock."""
        self.locked.append(key)

    def hand_over(self, key: BlockHash) -> str | None:
        """Give up ``key``'s Redis lock to whoever releases it later (the write of its entry):
        its owner name, or None when this lease does not hold it."""
        if key not in self.locked:
            return None
        self.locked.remove(key)
        return self.owner

    def unlock(self, keys: Iterable[BlockHash] | None = None) -> None:
        """Release the Redis locks on ``keys`` (all when None) that this lease holds, in the
        background."""
        drop = set(self.locked if keys is None else keys) & set(self.locked)
        if not drop:
            return
        self.locked = [k for k in self.locked if k not in drop]
        assert self._remote is not None
        for key in drop:
            self._remote.unlock_soon(key, self.owner)

    def release(self) -> None:
        """Release whatever is still held (the request's end, however it ends)."""
        self.unpin()
        self.finish()
        self.unlock()


__all__ = ["Lease"]
