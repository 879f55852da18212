"""``Entry``: the metadata of one cache entry, wherever its bytes sit."""

from __future__ import annotations

from dataclasses import dataclass, field

from promptcache.core.payload import PartId
from promptcache.types import BlockHash, TenantId, TierName, Ttl


@dataclass(slots=True, eq=False)
class Entry:
    """The KV state of the first ``num_tokens`` tokens under key ``key`` (spec §1.5).

    ``tier`` names the tier the entry is served from (``None`` once it is removed); that tier
    holds its bytes (a memory tier its payload, the disk tier its file). ``copies`` names the
    lower tiers that hold a copy of the same bytes as well (the disk tier, written behind), so
    a crash or a demotion loses nothing and writes nothing. ``parts`` are the pieces the entry
    is charged for in ``tier`` (a file counts as one piece); each tier keeps its own charge.
    """

    key: BlockHash
    tenant: TenantId
    num_tokens: int
    ttl: Ttl
    created_at: float
    expires_at: float
    tier: TierName | None = None
    copies: set[TierName] = field(default_factory=set)
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
