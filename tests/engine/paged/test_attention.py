"""``PagedAttention``'s plan: the decode rows' key slots and masks the same from the engine's
kernel (``native.Kernels.decode_plan``) as from the PyTorch index arithmetic it replaces."""

from __future__ import annotations

import pytest
import torch

from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.engine.paged import native
from promptcache.engine.paged.attention import StepSeq


@pytest.mark.skipif(
    native.kernels() is None, reason="no kernels here (no C++ compiler, or no AVX-512 or AVX2)"
)
@pytest.mark.parametrize("lengths", [[1], [5, 70, 33], [40, 40]], ids=["one", "ragged", "even"])
def test_decode_keys_are_the_same_from_the_kernel(lengths: list[int]) -> None:
    """Rows of several lengths (within and past the tiny gemma's sliding window, one a
    bucket's multiple), their blocks out of order: the same slots, the same boolean mask and
    the same additive mask per window, and the same slots written."""
    engine = build_tiny_engine("gemma3", dtype=torch.float32)
    attn, pool = engine._attn, engine._pool
    bt = pool.block_tokens
    blocks = pool.allocate(sum(-(-(n + 1) // bt) for n in lengths))
    try:
        blocks.reverse()  # no run of consecutive blocks
        seqs, taken = [], 0
        for n in lengths:
            need = -(-(n + 1) // bt)
            seqs.append(StepSeq(blocks[taken : taken + need], n, 1))
            taken += need
        plans = []
        for off in (False, True):
            with native.disabled() if off else torch.inference_mode():
                attn.plan(seqs, [])
            plans.append((dict(attn._decode), attn.slot_mapping.clone()))
        (fast, fast_map), (slow, slow_map) = plans
        assert torch.equal(fast_map, slow_map)
        assert set(fast) == set(slow) and len(fast) == 2  # full and sliding layers
        for window, keys in fast.items():
            other = slow[window]
            assert torch.equal(keys.slots, other.slots)
            assert (keys.mask is None) == (other.mask is None)
            if keys.mask is not None:
                assert torch.equal(keys.mask, other.mask)
            a, b = keys.additive(torch.float32), other.additive(torch.float32)
            assert (a is None and b is None) or (
                a is not None and b is not None and torch.equal(a, b)
            )
    finally:
        pool.decref(blocks)


@pytest.mark.skipif(
    native.kernels() is None, reason="no kernels here (no C++ compiler, or no AVX-512 or AVX2)"
)
@pytest.mark.parametrize(
    ("start", "num_new"),
    [(0, 40), (0, 200), (37, 5), (150, 64), (300, 100)],
    ids=["first", "past-window", "short", "hit-like", "long-context"],
)
def test_prefill_keys_are_the_same_from_the_kernel(start: int, num_new: int) -> None:
    """A prefill chunk (first or later, shorter or longer than the tiny gemma's sliding window)
    beside a decode row: the same slots, masks (None for a plain causal chunk), first slots and
    positions per window from ``Kernels.prefill_plan`` as from PyTorch's arithmetic."""
    engine = build_tiny_engine("gemma3", dtype=torch.float32)
    attn, pool = engine._attn, engine._pool
    bt = pool.block_tokens
    need = -(-(start + num_new) // bt)
    blocks = pool.allocate(need + -(-21 // bt))
    try:
        chunk = StepSeq(blocks[:need][::-1], start, num_new)  # blocks out of order
        row = StepSeq(blocks[need:], 20, 1)
        plans = []
        for off in (False, True):
            with native.disabled() if off else torch.inference_mode():
                attn.plan([row], [chunk])
            plans.append((list(attn._prefill), attn.slot_mapping.clone()))
        (fast, fast_map), (slow, slow_map) = plans
        assert torch.equal(fast_map, slow_map)
        ((offset, n, keys),) = fast
        assert (offset, n) == slow[0][:2] == (1, num_new)
        assert set(keys) == set(slow[0][2]) and len(keys) == 2
        for window, got in keys.items():
            want = slow[0][2][window]
            assert torch.equal(got.slots, want.slots)
            assert (got.mask is None) == (want.mask is None)
            if got.mask is not None:
                assert torch.equal(got.mask, want.mask)
            assert (got.first, got.positions, got.num_queries) == (
                want.first,
                want.positions,
                want.num_queries,
            )
    finally:
        pool.decref(blocks)
