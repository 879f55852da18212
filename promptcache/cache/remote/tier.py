"""``RemoteTier``: the shared Redis tier as one more tier of the store, below the local ones.

It is not a ``CopyTier``: nothing is listed at start (entries are found by lookup) and its
writes do not go through the local ``CopyWriter``, whose one task also writes the disk copies
that crash safety depends on and must not wait on a slow network. Instead:

- **writes** go behind the request through the ``RemoteWriter``'s own bounded queue (``write``):
  the payload is encoded on a worker thread when its turn comes (``KVCodec.encode``, the disk
  file's format), stored under the entry's key with the entry's metadata and Redis's own expiry
  at the entry's; a full queue drops the write and counts it;
- **lookups** (``lookup``): one ``metas`` round trip for the keys a request could read; the
  entries found are indexed in the store as served from here, charged nothing locally
  (``PrefixStore.adopt``), so the planner reads them as any other tier's;
- **reads** (``reader``): the bytes from Redis (checked there by SHA-256), decoded and checked
  against the entry on a worker thread; a value that proves foreign or damaged is deleted and is
  a miss (``CorruptPayload``). The store promotes the hit into local memory and keeps this tier
  as its copy;
- **refreshes** (``touch``): a read that moves an entry's expiry later moves Redis's too
  (``extend`` never shortens);
- **locks** (``try_lock``, ``unlock_soon``, ``wait``): single flight across replicas (spec
  §1.11): a replica about to compute a prefix locks its key with an expiry; the others wait for
  the entry to appear (or the lock to lapse) and read it.

A local eviction leaves the Redis value alone (``release`` only uncharges): other replicas read
it, and Redis drops it at its expiry. Redis down or slow: every operation answers at once as a
miss or a no-op (``RemoteStore``), so the replica serves from its local tiers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterable
from typing import ClassVar

from promptcache.cache.disk import entry_from_metadata, entry_metadata
from promptcache.cache.entry import Entry
from promptcache.cache.remote.store import FIELD_EXPIRES_AT, RemoteStore
from promptcache.cache.remote.writer import RemoteWriter
from promptcache.cache.tiers import Room, Tier
from promptcache.core.payload import CorruptPayload, KVCodec, KVPayload
from promptcache.types import BlockHash, TenantId

log = logging.getLogger(__name__)

POLL_S = 0.02
"""How often a replica waiting for another's entry asks Redis whether it is there yet."""
READ_TIMEOUT_S = 30.0
"""The most a read waits for the event loop to fetch its bytes (the store's own deadline, which
grows with the bytes, normally ends it first)."""
_KEY_FIELD = "promptcache.key"


def namespace(model_id: str, revision: str, layout: str) -> str:
    """The Redis namespace of a model's entries: replicas share exactly when their weights and
    byte layout match (tenants and revisions are in the keys too; this keeps foreign bytes out
    of reach at all). Braces are Redis Cluster hash tags: replaced."""
    name = f"{model_id}@{revision}/{layout}"
    return name.replace("{", "(").replace("}", ")")


def replica_id() -> str:
    """A name for this process among the replicas: host, pid and a random part (a restarted
    process never takes over its predecessor's locks)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class RemoteTier(Tier):
    """The ``remote`` tier: entries in the Redis of ``store``, written by ``writer``."""

    holds_copies: ClassVar[bool] = True

    def __init__(self, store: RemoteStore, codec: KVCodec, writer: RemoteWriter | None = None):
        # Charged nothing: its bytes are Redis's memory, which Redis's own policy bounds.
        super().__init__("remote", 0)
        self.store = store
        self.codec = codec
        self.writer = writer or RemoteWriter(store)
        self.owner = replica_id()
        self._locks = 0
        self._unlocks: set[asyncio.Task[bool]] = set()

    # -- the tier ----------------------------------------------------------------------------

    def put(self, entry: Entry, payload: KVPayload, room: Room) -> bool:
        """Never: entries reach Redis by write-behind only (``write``), so a local demotion
        does not wait on the network. One whose write is done is served from here already."""
        return False

    def reader(self, entry: Entry) -> Callable[[], KVPayload]:
        """A function for a worker thread: the bytes fetched on the event loop (built here, on
        it), then decoded and checked there. Raises ``CorruptPayload`` when the value is gone
        (expired, evicted by Redis, Redis down) or unusable (then it is deleted)."""
        loop = asyncio.get_running_loop()
        key, num_tokens = entry.key, entry.num_tokens

        def read() -> KVPayload:
            future = asyncio.run_coroutine_threadsafe(self.store.get(key), loop)
            try:
                found = future.result(READ_TIMEOUT_S)
            except concurrent.futures.TimeoutError as exc:
                future.cancel()
                raise CorruptPayload("the shared tier did not answer") from exc
            if found is None:
                raise CorruptPayload("the entry is no longer in the shared tier")
            try:
                payload, stored = self.codec.decode(found[1])
                if stored.get(_KEY_FIELD) != key.hex() or payload.num_tokens != num_tokens:
                    raise CorruptPayload("the shared tier's value is another entry's")
            except CorruptPayload:
                # Deleted before the miss is reported: the request's next lookup must not
                # find it again.
                deleting = asyncio.run_coroutine_threadsafe(self.store.delete(key), loop)
                with contextlib.suppress(Exception):
                    deleting.result(READ_TIMEOUT_S)
                raise
            return payload

        return read

    def release(self, entry: Entry) -> None:
        """Uncharge only: the value stays in Redis, for the other replicas, until its expiry."""
        self.remove(entry)

    def touch(self, entry: Entry) -> None:
        """A read refreshed ``entry``: extend its value in Redis to the new expiry (never
        shorter; a key Redis does not hold is left alone). Queued, never awaited."""
        super().touch(entry)
        self.writer.submit_extend(entry.key, entry.expires_at)

    # -- writes and lookups ------------------------------------------------------------------

    def write(
        self,
        entry: Entry,
        payload: KVPayload,
        on_done: Callable[[bool], None] | None = None,
    ) -> bool:
        """Queue ``entry``'s bytes (``payload``, encoded on a worker thread when the write
        runs) for Redis, expiring with the entry. False when the queue dropped it (counted);
        otherwise ``on_done`` is told, on the event loop, whether it was stored."""
        meta = entry_metadata(entry)
        codec = self.codec
        return self.writer.submit_put(
            entry.key,
            lambda: codec.encode(payload, meta),
            meta,
            entry.expires_at,
            nbytes=payload.nbytes,
            on_done=on_done,
        )

    async def lookup(self, keys: Collection[BlockHash], tenant: TenantId) -> list[Entry]:
        """The entries Redis holds under ``keys`` (one round trip), rebuilt from their metadata
        with Redis's expiry where a refresh moved it later; values of another tenant or with
        bad metadata are left out (a read would delete them)."""
        found = await self.store.metas(list(keys))
        entries = []
        for key, meta in found.items():
            try:
                entry = entry_from_metadata(meta, key)
                remote_expiry = float(meta.get(FIELD_EXPIRES_AT, "0"))
            except (CorruptPayload, ValueError):
                continue
            if entry.tenant != tenant:
                continue
            entry.expires_at = max(entry.expires_at, remote_expiry)
            entries.append(entry)
        return entries

    # -- single flight across replicas -------------------------------------------------------

    def lock_owner(self) -> str:
        """A fresh owner name for one request's locks (unlocks compare it)."""
        self._locks += 1
        return f"{self.owner}/{self._locks}"

    async def try_lock(self, key: BlockHash, owner: str, ttl_s: float) -> bool:
        """Lock ``key`` for ``owner`` for ``ttl_s``; True also when Redis cannot be asked."""
        return await self.store.try_lock(key, owner, max(1, round(ttl_s * 1000)))

    def unlock_soon(self, key: BlockHash, owner: str) -> None:
        """Release ``owner``'s lock on ``key`` in the background (a sync caller: the lease)."""
        task = asyncio.get_running_loop().create_task(self.store.unlock(key, owner))
        self._unlocks.add(task)
        task.add_done_callback(self._unlocks.discard)

    async def wait(
        self, keys: Iterable[BlockHash], timeout_s: float, ready: Callable[[BlockHash], bool]
    ) -> set[BlockHash]:
        """Wait until each of ``keys`` (locked by other replicas) has its entry, locally
        (``ready``) or in Redis, or its lock is gone (the holder finished, failed or died and
        its lock lapsed), polling every ``POLL_S``. Returns the keys still locked and absent
        after ``timeout_s``: the caller computes those itself."""
        waiting = set(keys)
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            waiting = {k for k in waiting if not ready(k)}
            if not waiting:
                break
            waiting -= set(await self.store.metas(list(waiting)))
            for key in list(waiting):
                if await self.store.lock_holder(key) is None:
                    waiting.discard(key)
        if waiting:
            log.warning(
                "waited %.0f s for another replica's cache entry; computing it here too", timeout_s
            )
        return waiting

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Run the queued writes for up to ``timeout_s`` (the rest are dropped and counted),
        release the locks still held, and close the connections."""
        await self.writer.stop(timeout_s)
        if self._unlocks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._unlocks, return_exceptions=True)
        await self.store.close()


__all__ = ["POLL_S", "RemoteTier", "namespace", "replica_id"]
