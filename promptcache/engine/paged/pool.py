"""The paged KV pool: one tensor of fixed-size blocks in the engine's memory, shared by live
sequences and cached entries.

::

    kv  [layers, 2 (K, V), num_blocks, block_tokens, kv_heads, head_dim]

A block holds the keys and values of ``block_tokens`` consecutive positions of one sequence in
every layer (sliding-window layers included: a block is a complete record of its positions, so
a snapshot is just a list of blocks and restores at any offset). Blocks are refcounted: a live
sequence holds its block table, a ``PoolPayload`` (a cached entry's bytes) holds its blocks, and
a block returns to the free list when its last holder lets go. A block is never written once a
payload holds it; a sequence that continues from a partly filled block gets a copy (copy on
write). Each allocation of a block gets a fresh ``PartId``: the cache tiers count a part once,
so nested entries that share blocks are charged once.

Block 0 is reserved and zeroed: padded attention reads point at it, never at stale memory.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch

from promptcache.core.payload import PartId, new_part_id
from promptcache.errors import Overloaded


class PoolExhausted(Overloaded):
    """No free block is left: live sequences and cached entries fill the pool."""


class KVPool:
    """Blocks of KV memory with refcounts. Thread-safe allocation and release (payloads are
    released by the garbage collector on whichever thread drops them)."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks")
        if block_tokens < 1:
            raise ValueError("block_tokens must be positive")
        self.num_layers = num_layers
        self.block_tokens = block_tokens
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        # torch.empty: the OS commits pages as blocks are first written, so an idle pool costs
        # little resident memory on a CPU.
        self.kv = torch.empty(
            (num_layers, 2, num_blocks, block_tokens, num_kv_heads, head_dim),
            dtype=dtype,
            device=device,
        )
        self.kv[:, :, 0].zero_()
        self.block_bytes = self.kv[:, :, 0].numel() * self.kv.element_size()
        # Re-entrant: a payload's finalizer (decref) may run on this very thread while it holds
        # the lock, when a garbage collection starts inside an allocation.
        self._lock = threading.RLock()
        self._refs = [0] * num_blocks
        self._refs[0] = 1  # the null block is never freed
        self._parts: list[PartId] = [0] * num_blocks
        self._by_part: dict[PartId, int] = {}
        self._free = list(range(num_blocks - 1, 0, -1))

    # -- views used by attention -------------------------------------------------------------

    def keys(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys as ``[num_blocks * block_tokens, kv_heads, head_dim]``."""
        return self.kv[layer, 0].flatten(0, 1)

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1].flatten(0, 1)

    # -- accounting ----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    def part_of(self, block: int) -> PartId:
        return self._parts[block]

    def allocate(self, n: int, parts: Sequence[PartId] | None = None) -> list[int]:
        """``n`` fresh blocks, each with one reference (the caller's). ``parts`` gives their part
        ids (a copy of a cached block keeps its id); new ids otherwise. Raises ``PoolExhausted``."""
        with self._lock:
            if n > len(self._free):
                raise PoolExhausted(
                    f"KV pool exhausted: {n} blocks wanted, {len(self._free)} free of "
                    f"{self.num_blocks - 1}"
                )
            blocks = [self._free.pop() for _ in range(n)]
            for i, block in enumerate(blocks):
                part = new_part_id() if parts is None else parts[i]
                self._refs[block] = 1
                self._parts[block] = part
                self._by_part[part] = block
            return blocks

    def find(self, part: PartId) -> int | None:
        """The live block holding ``part``, with a new reference taken for the caller."""
        with self._lock:
            block = self._by_part.get(part)
            if block is not None:
                self._refs[block] += 1
            return block

    def incref(self, blocks: Sequence[int]) -> None:
        with self._lock:
            for block in blocks:
                if self._refs[block] <= 0:
                    raise AssertionError(f"block {block} is free")
                self._refs[block] += 1

    def decref(self, blocks: Sequence[int]) -> None:
        with self._lock:
            freed: list[int] = []
            for block in blocks:
                refs = self._refs[block] - 1
                if refs < 0 or block == 0:
                    raise AssertionError(f"block {block} released too often")
                self._refs[block] = refs
                if refs == 0:
                    part = self._parts[block]
                    if self._by_part.get(part) == block:
                        del self._by_part[part]
                    freed.append(block)
            # Last freed, first taken: pushed in reverse, a released table comes back to the
            # next allocation in its own order, so a run of consecutive blocks stays one (a
            # prefill then reads its keys in place: attention.PagedAttention).
            self._free += reversed(freed)

    def copy_block(self, src: int) -> int:
        """A new block holding ``src``'s contents (copy on write of a partly filled block)."""
        (dst,) = self.allocate(1)
        self.kv[:, :, dst].copy_(self.kv[:, :, src])
        return dst

    def fork(self, blocks: Sequence[int], num_tokens: int) -> list[int]:
        """A block table for positions ``[0, num_tokens)`` of ``blocks``, for a new holder: the
        whole blocks shared (one more reference each) and a private copy of a partly used last
        block, which the new holder may go on writing while the old one still reads it (copy on
        write). Restoring a prefix into a sequence and snapshotting a sequence are both this.
        Raises ``PoolExhausted`` with no reference taken."""
        bt = self.block_tokens
        table = list(blocks[: num_tokens // bt])
        self.incref(table)
        if num_tokens % bt:
            try:
                table.append(self.copy_block(blocks[num_tokens // bt]))
            except BaseException:
                self.decref(table)
                raise
        return table


class PoolPayload:
    """A cached prefix whose KV lives in a ``KVPool``: its blocks, in order. Implements
    ``KVPayload``; immutable. Holds one reference to each block, released when the payload is
    garbage collected (the store dropped the entry and no request still restores it)."""

    __slots__ = ("__weakref__", "_parts", "blocks", "num_tokens", "pool")

    def __init__(self, pool: KVPool, blocks: Sequence[int], num_tokens: int) -> None:
        """Takes over one reference to each of ``blocks`` (the caller's)."""
        if len(blocks) != -(-num_tokens // pool.block_tokens):
            weakref.finalize(self, pool.decref, list(blocks))
            raise ValueError(f"{len(blocks)} blocks for {num_tokens} tokens")
        self.pool = pool
        self.blocks = tuple(blocks)
        self.num_tokens = num_tokens
        self._parts = tuple((pool.part_of(b), pool.block_bytes) for b in self.blocks)
        weakref.finalize(self, pool.decref, list(self.blocks))

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes

    @property
    def parts(self) -> tuple[tuple[PartId, int], ...]:
        return self._parts

    def __repr__(self) -> str:
        return f"PoolPayload(num_tokens={self.num_tokens}, blocks={len(self.blocks)})"


__all__ = ["KVPool", "PoolExhausted", "PoolPayload"]
