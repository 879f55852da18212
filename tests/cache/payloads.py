"""Payloads for store and tier tests: ``FakePayload``s whose pages nested prefixes share.

A payload of ``n`` tokens in chain ``c`` holds the pages ``(c, 0), (c, 1), ...`` of ``PAGE``
tokens, so payloads of one chain share their common pages exactly as nested snapshots of one
prompt do, plus a partial last page of its own. ``BPT`` bytes per token.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from promptcache.cache.tiers import DiskTier, Tier, TierStack
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
    tiers: list[Tier] = [Tier("device", device)]
    if host is not None:
        tiers.append(Tier("host", host))
    if disk is not None:
        tiers.append(DiskTier(disk, disk_bytes))
    return TierStack(tiers, FakeCodec())
