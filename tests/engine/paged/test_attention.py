"""``PagedAttention``'s plan: the decode rows' key slots and masks the same from the engine's
kernel (``native.Kernels.decode_plan``) as from the PyTorch index arithmetic it replaces."""

from __future__ import annotations

import pytest
import torch

from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.engine.paged import native
from promptcache.engine.paged.attention import StepSeq


@pytest.mark.skipif(native.kernels() is None, reason="no C++ compiler here")
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
