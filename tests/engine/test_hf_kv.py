"""Paged HF payloads and their codec: nested snapshots share pages, files round-trip exactly and
serve the same greedy tokens, damaged files raise ``CorruptPayload``, copies are deduplicated."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from promptcache.core.payload import CorruptPayload
from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest
from promptcache.engine.hf.engine import HFEngine
from promptcache.engine.hf.kv import HFKVPayload
from promptcache.engine.hf.testing import (
    TINY_PAGE_TOKENS,
    prefilled,
    random_prompt,
    run_all,
    token_ids,
)

P = TINY_PAGE_TOKENS
N = 4 * P + 11
OFFSETS = (P + 8, 2 * P + 20, N)  # never on a page boundary


def greedy(max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0)


def snapshots(
    engine: HFEngine, tokens: list[int], offsets: tuple[int, ...] = OFFSETS
) -> list[HFKVPayload]:
    snaps = prefilled(
        run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=offsets))
    ).snapshots
    return [snaps[x] for x in offsets]  # type: ignore[misc]


def unique_bytes(payloads: list[HFKVPayload]) -> int:
    return sum(dict(p for payload in payloads for p in payload.parts).values())


def test_nested_snapshots_of_one_prefill_share_pages(engine: HFEngine) -> None:
    short, mid, long = snapshots(engine, random_prompt(N))
    assert [p.start for p in long.pages] == [0, P, 2 * P, 3 * P, 4 * P]
    assert long.pages[:2] == mid.pages[:2] and mid.pages[0] is short.pages[0]
    assert short.pages[1] is not mid.pages[1]  # short's last page is partial: its own

    def own(p: HFKVPayload) -> int:  # its partial last page and its sliding tails
        return p.pages[-1].nbytes + p.nbytes - sum(page.nbytes for page in p.pages)

    assert unique_bytes([short, mid, long]) == long.nbytes + own(short) + own(mid)


def test_a_request_extending_a_restored_payload_shares_its_pages(engine: HFEngine) -> None:
    tokens = random_prompt(N + 3 * P, seed=2)
    (base,) = snapshots(engine, tokens, (N,))
    events = run_all(engine, EngineRequest(tokens, greedy(0), base, N, snapshot_at=(N + 2 * P,)))
    deep = prefilled(events).snapshots[N + 2 * P]
    assert isinstance(deep, HFKVPayload)
    assert deep.pages[:4] == base.pages[:4]  # complete pages of the restored prefix
    assert deep.pages[4] is not base.pages[4]  # base's partial page was recomputed in full
    whole = run_all(engine, EngineRequest(tokens, greedy(8), deep, N + 2 * P))
    assert token_ids(whole) == token_ids(run_all(engine, EngineRequest(tokens, greedy(8))))


def test_a_file_round_trips_and_serves_the_cold_tokens(engine: HFEngine, tmp_path: Path) -> None:
    tokens = random_prompt(N, seed=3)
    codec = engine.kv_codec
    cold = token_ids(run_all(engine, EngineRequest(tokens, greedy(16))))
    for payload in snapshots(engine, tokens):
        path = tmp_path / f"{payload.num_tokens}{codec.suffix}"
        codec.save(payload, path, {"promptcache.key": "k"})
        assert codec.read_metadata(path)["promptcache.key"] == "k"
        assert not list(tmp_path.glob("*.tmp"))
        loaded = codec.load(path)
        assert loaded.num_tokens == payload.num_tokens and loaded.nbytes == payload.nbytes
        for a, b in zip(loaded.layers, payload.layers, strict=True):
            assert a.start == b.start
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        # Pages still alive in memory are the very same objects: counted once, stored once.
        assert all(x is y for x, y in zip(loaded.pages, payload.pages, strict=True))
        reuse = payload.num_tokens - 1 if payload.num_tokens == N else payload.num_tokens
        warm = run_all(engine, EngineRequest(tokens, greedy(16), loaded, reuse))
        assert token_ids(warm) == cold


def test_a_file_loaded_after_its_pages_died_reads_new_ones(
    gemma_engine: HFEngine, tmp_path: Path
) -> None:
    tokens = random_prompt(N, seed=4)
    codec = gemma_engine.kv_codec
    (payload,) = snapshots(gemma_engine, tokens, (N,))
    path = tmp_path / f"x{codec.suffix}"
    codec.save(payload, path, {})
    ids = [p.page_id for p in payload.pages]
    del payload
    gc.collect()
    loaded = codec.load(path)
    assert [p.page_id for p in loaded.pages] == ids
    cold = run_all(gemma_engine, EngineRequest(tokens, greedy(8)))
    assert token_ids(run_all(gemma_engine, EngineRequest(tokens, greedy(8), loaded, N - 1))) == (
        token_ids(cold)
    )


def test_memory_moves_on_cpu_are_free(llama_engine: HFEngine) -> None:
    (payload,) = snapshots(llama_engine, random_prompt(N, seed=5), (N,))
    assert llama_engine.kv_codec.to_host(payload) is payload
    assert llama_engine.kv_codec.to_device(payload) is payload


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "missing", "foreign"])
def test_damaged_files_raise_corrupt_payload(
    gemma_engine: HFEngine, llama_engine: HFEngine, tmp_path: Path, damage: str
) -> None:
    codec = gemma_engine.kv_codec
    (payload,) = snapshots(gemma_engine, random_prompt(N, seed=6), (N,))
    path = tmp_path / f"x{codec.suffix}"
    codec.save(payload, path, {})
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-7] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-100]))
    elif damage == "header":
        path.write_bytes(b"\x05" + bytes(data[1:]))
    elif damage == "missing":
        path.unlink()
    else:  # a file of another model layout
        (other,) = snapshots(llama_engine, random_prompt(N, seed=6), (N,))
        llama_engine.kv_codec.save(other, path, {})
    with pytest.raises(CorruptPayload):
        codec.load(path)
    if damage in ("truncate", "header", "missing"):
        with pytest.raises(CorruptPayload):  # caught at restart from the header alone
            codec.read_metadata(path)
