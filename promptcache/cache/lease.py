"""``Lease``: what one request holds in the cache while it runs, released exactly once.

A request holds two things: a pin on the entry it reads (the planner pins the deepest hit, so
the entry's bytes cannot move or go while the engine restores them) and the keys it computes
(registered in flight, so concurrent requests for the same prefix wait instead of computing it
too, spec §1.11). Both end at defined moments — the pin once the engine has restored the
prefix, the keys once the written entries are stored — and, whatever happens (a corrupt file,
a cancelled client, an engine failure), at the end of the request. One object owns them so each
is released once, in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

from promptcache.cache.entry import Entry
from promptcache.cache.inflight import InFlight
from promptcache.cache.store import PrefixStore
from promptcache.types import BlockHash


class Lease:
    """A request's pin and in-flight keys. Used on the event loop only."""

    def __init__(self, store: PrefixStore, inflight: InFlight) -> None:
        self._store = store
        self._inflight = inflight
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

    def release(self) -> None:
        """Release whatever is still held (the request's end, however it ends)."""
        self.unpin()
        self.finish()


__all__ = ["Lease"]
