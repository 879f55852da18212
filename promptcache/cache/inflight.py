"""Single flight (spec §1.11): keys whose entry one request is computing right now.

A request that plans writes registers their keys here in the same event-loop step as its
lookup, so no other lookup can miss in between. A later request whose probe meets such a key
waits for it instead of computing the same prefix again; when the writer stores the entry,
fails or is cancelled, ``finish`` wakes the waiters, who plan again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from promptcache.types import BlockHash


class InFlight:
    """Pending keys and their waiters. Used from the event loop only."""

    def __init__(self) -> None:
        self._events: dict[BlockHash, asyncio.Event] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._events

    def __len__(self) -> int:
        return len(self._events)

    def begin(self, keys: Iterable[BlockHash]) -> list[BlockHash]:
        """Mark ``keys`` in flight; returns the ones this caller now owns (not already pending)."""
        owned = []
        for key in keys:
            if key not in self._events:
                self._events[key] = asyncio.Event()
                owned.append(key)
        return owned

    def finish(self, key: BlockHash) -> None:
        """The entry for ``key`` is stored, or will not be: wake its waiters."""
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, key: BlockHash, timeout_s: float) -> bool:
        """Wait until ``key`` is finished. False on timeout."""
        event = self._events.get(key)
        if event is None:
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Pending:
    """The keys of ``inflight``, less ``ignored`` (a request's own, or those a timed-out waiter
    no longer waits for): what the planner treats as being computed by someone else."""

    inflight: InFlight
    ignored: set[BlockHash]

    def __contains__(self, key: object) -> bool:
        return key in self.inflight and key not in self.ignored


__all__ = ["InFlight", "Pending"]
