"""KVPool: allocation order (freed tables come back in their own order, so runs of consecutive
blocks survive reuse) and refcounts."""

from __future__ import annotations

import pytest
import torch

from promptcache.engine.paged.pool import KVPool, PoolExhausted


def pool(num_blocks: int = 16) -> KVPool:
    return KVPool(
        num_layers=1,
        num_kv_heads=1,
        head_dim=4,
        num_blocks=num_blocks,
        block_tokens=2,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def test_a_fresh_pool_hands_out_consecutive_blocks() -> None:
    p = pool()
    assert p.allocate(3) + p.allocate(2) == [1, 2, 3, 4, 5]


def test_a_released_table_comes_back_in_its_own_order() -> None:
    p = pool()
    table = p.allocate(6)
    p.decref(table)
    assert p.allocate(6) == table
    # Released in pieces, the last piece released is taken first, each in its order.
    first, second = p.allocate(3), p.allocate(3)
    p.decref(first)
    p.decref(second)
    assert p.allocate(3) == second
    assert p.allocate(3) == first


def test_a_shared_block_is_freed_by_its_last_holder_only() -> None:
    p = pool()
    blocks = p.allocate(2)
    p.incref(blocks[:1])
    free = p.num_free
    p.decref(blocks)
    assert p.num_free == free + 1
    p.decref(blocks[:1])
    assert p.num_free == free + 2
    with pytest.raises(AssertionError):
        p.decref(blocks[:1])


def test_exhaustion() -> None:
    p = pool(4)
    p.allocate(3)
    with pytest.raises(PoolExhausted):
        p.allocate(1)
