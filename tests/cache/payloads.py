"""Payloads for store and tier tests: ``FakePayload``s whose pages nested prefixes share.

A payload of ``n`` tokens in chain ``c`` holds the pages ``(c, 0), (c, 1), ...`` of ``PAGE``
tokens, so payloads of one chain share their common pages exactly as nested snapshots of one
prompt do, plus a partial last page of its own. ``BPT`` bytes per token.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from promptcache.cache.disk import DiskTier
from promptcache.cache.store import PrefixStore
from promptcache.cache.tiers import MemoryTier, Tier, TierStack
from promptcache.engine.fake import FakeCodec, FakePayload
from promptcache.types import BlockHash, TenantId

PAGE = 10
BPT = 64
T = TenantId("t")
_tails = itertools.count(1 << 40)


def key(n: int) -> BlockHash:
    return BlockHash(n.to_bytes(32, "big"))


def payload(num_tokens: int, chain: int = 0) -> FakePayload:
    tokens = tuple((chain * 31 + i) % 251 for i in range(num_tokens))
    pages = tuple(chain * 1000 + k for k in range(num_tokens // PAGE))
    states = tuple(bytes([chain % 256]) * 32 for _ in range(num_tokens + 1))
    return FakePayload(tokens, states, BPT, pages, PAGE, next(_tails))


def stack(
    device: int, host: int | None = None, disk: Path | None = None, disk_bytes: int = 0
) -> TierStack:
    """A ``TierStack`` with the fake codec: ``device`` [-> ``host``] [-> ``disk``]."""
    codec = FakeCodec()
    tiers: list[Tier] = [MemoryTier("device", device, codec)]
    if host is not None:
        tiers.append(MemoryTier("host", host, codec))
    if disk is not None:
        tiers.append(DiskTier(disk, disk_bytes, codec))
    return TierStack(tiers)


def host_store(capacity_bytes: int, tenant_share: float | None = None) -> PrefixStore:
    """A store of a single ``host`` tier (a CPU engine without a disk tier)."""
    tiers = TierStack([MemoryTier("host", capacity_bytes, FakeCodec())])
    return PrefixStore(tiers, tenant_share=tenant_share)
