"""Small shared types: ids, hashes and the TTL classes of the spec (§1.7)."""

from __future__ import annotations

from typing import Final, Literal, NewType

Ttl = Literal["5m", "1h"]
"""A cache TTL class. Every marker without a ``ttl`` counts as ``5m``."""

TTL_SECONDS: Final[dict[Ttl, float]] = {"5m": 300.0, "1h": 3600.0}
TTL_RANK: Final[dict[Ttl, int]] = {"1h": 0, "5m": 1}
"""Render order must never go from a higher rank to a lower one (longer TTLs first, §1.10)."""

BlockHash = NewType("BlockHash", bytes)
"""SHA-256 digest that names a prefix of the canonical prompt (§1.4)."""

TenantId = NewType("TenantId", str)
"""The tenant a credential maps to; part of every entry's namespace (§1.12)."""

DEFAULT_TENANT: Final = TenantId("default")

TierName = Literal["device", "host", "disk", "remote"]
"""Where an entry's bytes sit: the engine's accelerator memory, host RAM, files on disk, or the
Redis every replica shares (``--redis-url``). On a CPU engine the engine's memory is host RAM, so
its stack is ``host``, then ``disk`` and ``remote`` where configured."""

Section = Literal["tools", "system", "messages"]
Role = Literal["user", "assistant"]

__all__ = [
    "DEFAULT_TENANT",
    "TTL_RANK",
    "TTL_SECONDS",
    "BlockHash",
    "Role",
    "Section",
    "TenantId",
    "TierName",
    "Ttl",
]
