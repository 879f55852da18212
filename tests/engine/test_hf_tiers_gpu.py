"""Device -> host -> disk tiers on CUDA through ``Service``: demotions copy pages to pinned host
memory without duplicating shared ones, and hits from every tier give the cold run's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptcache.core.request import ChatRequest, Sampling
from promptcache.core.response import ChatResult
from promptcache.engine.base import EngineRequest
from promptcache.engine.hf.kv import HFKVPayload
from promptcache.engine.hf.testing import build_tiny_engine, prefilled, random_prompt, run_all
from promptcache.service import Service
from tests.conftest import chat, collect, make_service, run_async, text, words

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this host"),
]


def ask(service: Service, *requests: ChatRequest) -> list[ChatResult]:
    async def body() -> list[ChatResult]:
        return [await collect(service.generate(r)) for r in requests]

    return run_async(service, body)


def test_host_copies_share_pages_like_device_ones() -> None:
    engine = build_tiny_engine("gemma3", device="cuda")
    tokens = random_prompt(300)
    events = run_all(engine, EngineRequest(tokens, Sampling(0), snapshot_at=(100, 200, 300)))
    snaps = [prefilled(events).snapshots[x] for x in (100, 200, 300)]
    hosts = [engine.kv_codec.to_host(p) for p in snaps]
    assert all(isinstance(h, HFKVPayload) and h.device == "cpu" for h in hosts)
    short, mid, long = hosts  # type: ignore[misc]
    assert mid.pages[0] is short.pages[0] and long.pages[:6] == mid.pages[:6]
    assert all(t.is_pinned() for page in long.pages for t in page.keys)
    back = engine.kv_codec.to_device(long)
    assert back.pages[0] is snaps[2].pages[0]  # the live device page, not a third copy


def test_hits_from_device_host_and_disk_match_the_cold_run(tmp_path: Path) -> None:
    engine = build_tiny_engine("gemma3", device="cuda", stop_token_ids=())

    def request(seed: int) -> ChatRequest:
        return chat(("user", [text("go on")]), system=[text(words(600 + 20 * seed, seed), "5m")])

    a, b, c = request(1), request(2), request(3)
    cold = ask(make_service(engine, min_cacheable_tokens=10**6), a, b, c)
    probe = make_service(engine, min_cacheable_tokens=256)
    ask(probe, c)
    one = probe.store.tiers.top.used_bytes  # the largest of the three entries
    service = make_service(
        engine,
        min_cacheable_tokens=256,
        capacity_bytes=one,
        host_capacity_bytes=one,
        disk_dir=tmp_path,
    )
    assert [t.name for t in service.store.tiers] == ["device", "host", "disk"]
    results = ask(service, a, b, c, a, c, b)  # a from disk, c from host, b from host
    assert [r.usage.read_tokens > 0 for r in results] == [False] * 3 + [True] * 3
    for result, expected in zip(results, [*cold, cold[0], cold[2], cold[1]], strict=True):
        assert result.content == expected.content
    promotions = service.store.stats.promotions
    assert promotions[("disk", "hit")] >= 1 and promotions[("host", "hit")] >= 1
    for tier in service.store.tiers:
        assert tier.peak_bytes <= tier.capacity_bytes
    service.store.check_integrity()
