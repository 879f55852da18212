"""``Entry``: the metadata of one cache entry, wherever its bytes sit."""

from __future__ import annotations

from dataclasses import dataclass

from promptcache.core.payload import KVPayload, PartId
from promptcache.types import BlockHash, TenantId, TierName, Ttl


@dataclass(slots=True, eq=False)
class Entry:
    """The KV state of the first ``num_tokens`` tokens under key ``key`` (spec §1.5).

    ``tier`` names where the bytes are (``None`` once the entry is removed). In a memory tier
    ``payload`` holds them; on disk it is ``None`` and the tier's file holds them. ``parts`` are
    the pieces the entry is charged for in its tier (a file on disk counts as one piece).
    """

    key: BlockHash
    tenant: TenantId
    num_tokens: int
    ttl: Ttl
    created_at: float
    expires_at: float
    payload: KVPayload | None = None
    tier: TierName | None = None
    parts: tuple[tuple[PartId, int], ...] = ()
    ref_cnt: int = 0
    num_hits: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the entry in its tier, counting pieces it shares with others in full."""
        return sum(n for _, n in self.parts)

    def is_live(self, now: float) -> bool:
        return now < self.expires_at


__all__ = ["Entry"]
