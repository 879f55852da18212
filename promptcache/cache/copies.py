"""Write-behind: copies of memory entries written to the tiers that hold copies (the disk tier),
soon after the entries are created, off the request path, so a crash (kill -9) loses at most
the last few seconds.

``CopyQueue`` is the bounded list of entries waiting for a copy; the store fills it (a new
memory entry, a copy gone stale by a refresh) and skips, counting, when it is full. The
``CopyWriter`` task drains it one copy at a time: the store hands out a ``CopyJob`` (the entry's
payload as it stands), the tier writes it off the event loop (``CopyTier.write_copy``), and the
store then keeps the copy or, when the entry went or moved meanwhile, abandons it
(``PrefixStore.take_copy`` and ``copied``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from promptcache.cache.entry import Entry
from promptcache.cache.tiers import CopyTier
from promptcache.types import BlockHash, TierName

if TYPE_CHECKING:
    from promptcache.cache.store import PrefixStore

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 64
"""Copies waiting at most. Each waits as an entry reference only (its payload is taken when its
write starts), so a full queue holds no memory; it bounds how far the writer may fall behind."""


class CopyQueue:
    """Entries waiting for a copy, oldest first, at most ``limit`` (0: write-behind is off).

    ``wake`` (set by the writer) is called when one is queued.
    """

    def __init__(self, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError(f"copy queue limit must be >= 0, got {limit}")
        self.limit = limit
        self.wake: Callable[[], None] | None = None
        self._waiting: OrderedDict[tuple[BlockHash, TierName], tuple[Entry, CopyTier]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._waiting)

    def offer(self, entry: Entry, tier: CopyTier) -> bool:
        """Queue a copy of ``entry`` in ``tier``. False when the queue is full (it is skipped);
        True when it is queued or already was."""
        slot = (entry.key, tier.name)
        waiting = self._waiting.get(slot)
        if waiting is not None and waiting[0] is entry:
            return True
        if waiting is None and len(self._waiting) >= self.limit:
            return False
        self._waiting[slot] = (entry, tier)  # an earlier entry under the key is replaced
        if self.wake is not None:
            self.wake()
        return True

    def pop(self) -> tuple[Entry, CopyTier] | None:
        """The oldest waiting copy, or None."""
        if not self._waiting:
            return None
        return self._waiting.popitem(last=False)[1]

    def discard(self, entry: Entry) -> None:
        """Forget the copies ``entry`` waits for (it was removed)."""
        for slot in [s for s, (e, _) in self._waiting.items() if e is entry]:
            del self._waiting[slot]


class CopyWriter:
    """The task that writes a store's queued copies, one at a time, on the running loop.

    ``stop`` lets the write in progress finish (its copy is kept or abandoned as usual) and
    leaves the rest queued: the shutdown's ``persist`` writes what has no copy yet.
    """

    def __init__(self, store: PrefixStore, now: Callable[[], float]) -> None:
        self._store = store
        self._now = now
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._store.copy_queue.wake = self._wake.set
        self._task = asyncio.create_task(self._run(), name="promptcache-copy-writer")

    async def stop(self) -> None:
        self._closing = True
        self._store.copy_queue.wake = None
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def idle(self, poll_s: float = 0.005) -> None:
        """Wait until no copy is queued or being written (for tests and benchmarks)."""
        while self._task is not None and not self._task.done():
            if self._idle.is_set() and not self._wake.is_set() and not self._store.copy_queue:
                return
            await asyncio.sleep(poll_s)

    async def _run(self) -> None:
        while not self._closing:
            job = self._store.take_copy(self._now())
            if job is None:
                self._wake.clear()
                self._idle.set()
                await self._wake.wait()
                continue
            self._idle.clear()
            try:
                copy = await job.tier.write_copy(job)
            except Exception as exc:
                self._store.copy_failed(job, exc)
                continue
            try:
                self._store.copied(job, copy, self._now())
            except Exception:  # a bug: logged, and the copies after this one still get written
                log.exception("keeping a copy of a cache entry failed")
                job.tier.abandon(copy)


__all__ = ["DEFAULT_QUEUE", "CopyQueue", "CopyWriter"]
