"""``RemoteWriter``: the shared tier's writes, off the request path.

A request that computed or refreshed an entry submits its put or extend and goes on; one
background task runs them in order (a put before a later extend of the same key). The queue is
bounded by count and by bytes: when Redis is slower than the traffic, writes are dropped and
counted, never buffered without end and never awaited by a request. A dropped write costs a
later miss on another replica, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from promptcache.cache.remote.store import RemoteStore
from promptcache.types import BlockHash

log = logging.getLogger(__name__)

Data = bytes | Callable[[], bytes]
"""A value, or a function that makes it (run on a worker thread, e.g. ``KVCodec.encode``)."""


@dataclass(frozen=True, slots=True)
class _Put:
    key: BlockHash
    data: Data
    meta: Mapping[str, str]
    expires_at: float
    nbytes: int
    on_done: Callable[[bool], None] | None = None


@dataclass(frozen=True, slots=True)
class _Extend:
    key: BlockHash
    expires_at: float
    nbytes: int = 0
    on_done: None = None


class RemoteWriter:
    """Runs ``store.put`` and ``store.extend`` from a bounded queue on one task.

    ``submit_put`` and ``submit_extend`` never await: they queue the write, or drop it (counted
    in ``store.stats.dropped``) when ``max_items`` writes or ``max_bytes`` bytes are already
    waiting, or the writer is stopped. Submitting before ``start`` queues; ``start`` runs them.
    """

    def __init__(self, store: RemoteStore, *, max_items: int = 256, max_bytes: int = 1 << 30):
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be positive")
        self.store = store
        self.max_bytes = max_bytes
        self._queue: asyncio.Queue[_Put | _Extend] = asyncio.Queue(max_items)
        self._bytes = 0
        self._pending = 0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def pending(self) -> int:
        """Writes waiting or running."""
        return self._pending

    @property
    def pending_bytes(self) -> int:
        """Bytes of the puts waiting or running (their ``nbytes`` while not yet made)."""
        return self._bytes

    def submit_put(
        self,
        key: BlockHash,
        data: Data,
        meta: Mapping[str, str],
        expires_at: float,
        *,
        nbytes: int | None = None,
        on_done: Callable[[bool], None] | None = None,
    ) -> bool:
        """Queue ``store.put(key, data, meta, expires_at)``. ``data`` may be a function making
        the bytes (then ``nbytes``, their expected size, is required: it is what the queue's
        byte bound counts). False when dropped. ``on_done`` (on the event loop) is told once
        whether the value was stored when a queued put has run, failed or been dropped at
        ``stop``; never when this returns False (the caller knows then)."""
        if nbytes is None:
            if not isinstance(data, bytes):
                raise TypeError("nbytes is required when data is made later")
            nbytes = len(data)
        return self._submit(_Put(key, data, dict(meta), expires_at, nbytes, on_done))

    def submit_extend(self, key: BlockHash, expires_at: float) -> bool:
        """Queue ``store.extend(key, expires_at)``. False when dropped."""
        return self._submit(_Extend(key, expires_at))

    def _submit(self, job: _Put | _Extend) -> bool:
        if self._stopped or self._bytes + job.nbytes > self.max_bytes:
            self.store.stats.dropped += 1
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.store.stats.dropped += 1
            return False
        self._bytes += job.nbytes
        self._pending += 1
        return True

    def start(self) -> None:
        """Start the background task on the running event loop."""
        if self._task is None:
            self._stopped = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="remote-writer")

    async def flush(self) -> None:
        """Wait until every write submitted so far has run (``start`` first)."""
        await self._queue.join()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Refuse new writes, run those queued for up to ``timeout_s``, then drop the rest
        (counted) and end the task."""
        self._stopped = True
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._done(job, False)
            self.store.stats.dropped += 1

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            stored = False
            try:
                stored = await self._write(job)
            except asyncio.CancelledError:  # stopped before it was done
                self.store.stats.dropped += 1
                raise
            except Exception:  # a failing encoder must not end the writer
                self.store.stats.errors += 1
                log.exception("shared cache write of %s failed", job.key.hex()[:12])
            finally:
                self._done(job, stored)

    async def _write(self, job: _Put | _Extend) -> bool:
        if isinstance(job, _Extend):
            return await self.store.extend(job.key, job.expires_at)
        if job.expires_at <= self.store.clock.now():
            return False  # expired while it waited
        if isinstance(job.data, bytes):
            data = job.data
        elif self.store.available:
            data = await asyncio.to_thread(job.data)
        else:  # the store would drop it at once: spare the encoding
            self.store.stats.skipped += 1
            return False
        return await self.store.put(job.key, data, job.meta, job.expires_at)

    def _done(self, job: _Put | _Extend, stored: bool) -> None:
        self._bytes -= job.nbytes
        self._pending -= 1
        self._queue.task_done()
        if job.on_done is not None:
            try:
                job.on_done(stored)
            except Exception:  # the caller's bug: logged, and the writer goes on
                log.exception("after the shared cache write of %s", job.key.hex()[:12])


__all__ = ["Data", "RemoteWriter"]
