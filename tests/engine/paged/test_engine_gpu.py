"""The paged engine on CUDA: cold, partial hit and whole-prompt hit agree (spec §1.15), in
float32 and bfloat16; host and disk round trips through the codec."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest
from promptcache.engine.hf.testing import (
    TINY_SLIDING_WINDOW,
    build_tiny_engine,
    prefilled,
    random_prompt,
    run_all,
    token_ids,
)
from promptcache.engine.paged.codec import HostPayload
from promptcache.engine.paged.pool import PoolPayload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this host"),
]

W = TINY_SLIDING_WINDOW
N = 5 * W + 3
OFFSETS = (W + 5, 3 * W - 3, N)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_fidelity_on_cuda(kind: str) -> None:
    engine = build_tiny_engine(kind, device="cuda")
    assert engine.info.device.startswith("cuda")
    tokens = random_prompt(N)
    greedy = Sampling(max_tokens=24, temperature=0.0)
    cold = run_all(engine, EngineRequest(tokens, greedy, snapshot_at=OFFSETS))
    cold_logits = engine.prompt_logits(EngineRequest(tokens, greedy))
    for x, payload in prefilled(cold).snapshots.items():
        assert isinstance(payload, PoolPayload) and payload.pool.kv.is_cuda
        before = payload.pool.kv[:, :, list(payload.blocks)].clone()
        reuse_tokens = x - 1 if x == N else x
        warm = run_all(engine, EngineRequest(tokens, greedy, payload, reuse_tokens))
        assert token_ids(warm) == token_ids(cold)
        assert prefilled(warm).num_computed_tokens == N - reuse_tokens
        logits = engine.prompt_logits(EngineRequest(tokens, greedy, payload, reuse_tokens))
        torch.testing.assert_close(logits, cold_logits, atol=1e-4, rtol=0)
        assert torch.equal(payload.pool.kv[:, :, list(payload.blocks)], before)


def test_seeded_sampling_on_cuda() -> None:
    engine = build_tiny_engine("gemma3", device="cuda")
    sampling = Sampling(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=5)
    request = EngineRequest(random_prompt(40), sampling)
    assert token_ids(run_all(engine, request)) == token_ids(run_all(engine, request))


def test_bf16_hits_match_cold_and_batches_match_solo() -> None:
    engine = build_tiny_engine("gemma3", device="cuda", dtype=torch.bfloat16)
    tokens = random_prompt(N)
    greedy = Sampling(max_tokens=24, temperature=0.0)
    cold = run_all(engine, EngineRequest(tokens, greedy, snapshot_at=OFFSETS))
    for x, payload in prefilled(cold).snapshots.items():
        reuse_tokens = x - 1 if x == N else x
        warm = run_all(engine, EngineRequest(tokens, greedy, payload, reuse_tokens))
        assert token_ids(warm) == token_ids(cold)


def test_host_and_disk_round_trips_on_cuda(tmp_path: Path) -> None:
    engine = build_tiny_engine("llama", device="cuda")
    tokens = random_prompt(N)
    greedy = Sampling(max_tokens=16, temperature=0.0)
    cold = run_all(engine, EngineRequest(tokens, greedy, snapshot_at=(40,)))
    payload = prefilled(cold).snapshots[40]
    codec = engine.kv_codec
    host = codec.to_host(payload)
    assert isinstance(host, HostPayload) and host.parts == list(payload.parts)
    codec.save(host, tmp_path / "x.safetensors", {})
    loaded = codec.load(tmp_path / "x.safetensors")
    del payload, cold, host
    gc.collect()
    back = codec.to_device(loaded)
    warm = run_all(engine, EngineRequest(tokens, greedy, back, 40))
    assert token_ids(warm) == token_ids(run_all(engine, EngineRequest(tokens, greedy)))
