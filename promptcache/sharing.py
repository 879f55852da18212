"""``Sharing``: a request's side of the shared tier (``--redis-url``), for the service.

Before a request plans, ``prepare`` indexes what Redis holds for its prompt (one round trip) and
locks there the keys it will write, so other replicas wait for this one's prefill instead of
repeating it (spec §1.11, across replicas). After the prefill, ``write`` queues each new entry
for Redis behind the request. The byte layer is ``cache/remote/``; the request's locks live in
its ``Lease``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from promptcache.cache import planner
from promptcache.cache.clock import Clock
from promptcache.cache.entry import Entry
from promptcache.cache.inflight import InFlight, Pending
from promptcache.cache.lease import Lease
from promptcache.cache.policy import Breakpoint, ModelCachePolicy
from promptcache.cache.remote.tier import RemoteTier
from promptcache.cache.store import PrefixStore
from promptcache.types import BlockHash, TenantId


@dataclass(frozen=True, slots=True)
class Prompt:
    """What ``prepare`` needs of a rendered request."""

    keys: Sequence[BlockHash]
    block_ends: Sequence[int]
    breakpoints: Sequence[Breakpoint]
    policy: ModelCachePolicy
    tenant: TenantId


class Sharing:
    """The shared tier as requests use it. On the event loop only."""

    def __init__(
        self,
        remote: RemoteTier,
        store: Callable[[], PrefixStore],
        inflight: InFlight,
        clock: Clock,
        timeout_s: float,
    ) -> None:
        self.remote = remote
        self._store = store
        self._inflight = inflight
        self._clock = clock
        self._timeout_s = timeout_s

    async def prepare(self, prompt: Prompt, lease: Lease, given_up: set[BlockHash]) -> None:
        """Index the entries Redis holds deeper than the local hit, then lock the keys the plan
        will write.

        A key another replica holds locked is waited for (its entry appears in Redis, or its
        lock goes: the holder failed, or died and the lock lapsed), bounded by the single-flight
        timeout, and everything is looked up again; a key waited for in vain joins
        ``given_up`` and is computed here without a lock. Keys computed by a request of this
        replica are left to local single flight. With Redis down nothing waits: lookups miss
        and locks are granted at once.
        """
        store, remote, timeout = self._store(), self.remote, self._timeout_s
        while True:
            pending = Pending(self._inflight, set(lease.keys))
            found = planner.reach(
                keys=prompt.keys,
                block_ends=prompt.block_ends,
                breakpoints=prompt.breakpoints,
                policy=prompt.policy,
                store=store,
                now=self._clock.now(),
                pending=pending,
            )
            read = found.read
            if found.probe:
                entries = await remote.lookup(found.probe, prompt.tenant)
                now = self._clock.now()
                for entry in entries:
                    if store.adopt(remote, entry, now):
                        read = max(read, entry.num_tokens)
            wanted = [
                key
                for key in found.writes(read)
                if key not in pending and key not in given_up and key not in lease.locked
            ]
            busy = []
            for key in wanted:
                if await remote.try_lock(key, lease.owner, timeout):
                    lease.locked_remote(key)
                else:
                    busy.append(key)
            if not busy:
                return
            # Another replica computes part of this prefix. Release what this request took
            # (no two replicas ever wait on each other), wait for it, and look again.
            lease.unlock()
            given_up |= await remote.wait(busy, timeout, self._live)

    def _live(self, key: BlockHash) -> bool:
        return self._store().get(key, self._clock.now()) is not None

    def write(self, entry: Entry, lease: Lease | None) -> None:
        """Queue the new ``entry`` for Redis (behind the request). Once stored, Redis counts as
        its copy; its lock, handed over by ``lease``, goes when the write is done or dropped."""
        store, remote = self._store(), self.remote
        owner = lease.hand_over(entry.key) if lease is not None else None
        key = entry.key

        def done(stored: bool) -> None:
            if stored:
                store.shared(entry, remote)
            if owner is not None:
                remote.unlock_soon(key, owner)

        payload = store.tiers.tier(entry.tier).payload(entry) if entry.tier else None
        queued = payload is not None and remote.write(entry, payload, done)
        if not queued and owner is not None:
            remote.unlock_soon(key, owner)


__all__ = ["Prompt", "Sharing"]
