"""Chained, namespaced SHA-256 keys for every block of the canonical prompt (spec §1.4).

``h_0 = H("promptcache/v1" || enc(namespace))`` and ``h_i = H(h_{i-1} || enc(block_i))``: the key
of the entry at block ``i`` covers every block before it, so changing a tool invalidates every
later position without extra code (the hierarchy of §1.2).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from promptcache.core.layout import LayoutBlock
from promptcache.types import BlockHash, TenantId

_ROOT = b"promptcache/v1"


@dataclass(frozen=True, slots=True)
class Namespace:
    """What isolates entries: tenant, served model, weights revision, adapter and partition."""

    tenant: TenantId
    model_id: str
    revision: str
    adapter: str = ""
    partition: str = ""


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _str(value: str) -> bytes:
    return _field(value.encode("utf-8"))


def root_hash(namespace: Namespace) -> BlockHash:
    """``h_0``: the seed of the chain, unique per namespace."""
    enc = b"".join(
        _str(part)
        for part in (
            namespace.tenant,
            namespace.model_id,
            namespace.revision,
            namespace.adapter,
            namespace.partition,
        )
    )
    return BlockHash(hashlib.sha256(_field(_ROOT) + enc).digest())


def encode_block(block: LayoutBlock) -> bytes:
    """Length-prefixed, deterministic encoding of section, role, kind and token ids."""
    ids = struct.pack(f">{len(block.token_ids)}I", *block.token_ids)
    return _str(block.section) + _str(block.role) + _str(block.kind) + _field(ids)


def block_hashes(blocks: Sequence[LayoutBlock], namespace: Namespace) -> list[BlockHash]:
    """``[h_1, ..., h_n]``: the key of the prefix ending with each block."""
    keys: list[BlockHash] = []
    parent = root_hash(namespace)
    for block in blocks:
        parent = BlockHash(hashlib.sha256(parent + encode_block(block)).digest())
        keys.append(parent)
    return keys


__all__ = ["Namespace", "block_hashes", "encode_block", "root_hash"]
