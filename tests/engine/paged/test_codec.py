"""Pool payloads and their codec: nested snapshots share blocks (counted once), files round-trip
exactly and serve the same greedy tokens, damaged files raise ``CorruptPayload``, a file loaded
while its blocks are alive shares them."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from promptcache.core.payload import CorruptPayload
from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest
from promptcache.engine.hf.testing import (
    TINY_BLOCK_TOKENS,
    prefilled,
    random_prompt,
    run_all,
    token_ids,
)
from promptcache.engine.paged.codec import HostPayload
from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.pool import PoolPayload

B = TINY_BLOCK_TOKENS
N = 9 * B + 3
OFFSETS = (2 * B + 5, 5 * B + 2, N)  # never on a block boundary


def greedy(max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0)


def snapshots(
    engine: PagedEngine, tokens: list[int], offsets: tuple[int, ...] = OFFSETS
) -> list[PoolPayload]:
    snaps = prefilled(
        run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=offsets))
    ).snapshots
    return [snaps[x] for x in offsets]  # type: ignore[misc]


def unique_bytes(payloads: list[PoolPayload]) -> int:
    return sum(dict(p for payload in payloads for p in payload.parts).values())


def test_nested_snapshots_share_whole_blocks(engine: PagedEngine) -> None:
    snaps = snapshots(engine, random_prompt(N, seed=1))
    longest = snaps[-1]
    # The shorter snapshots add only their private partial last block.
    extra = unique_bytes(snaps) - longest.nbytes
    assert extra == (len(OFFSETS) - 1) * engine.pool.block_bytes
    assert unique_bytes(snaps) <= 1.1 * sum(p.nbytes for p in snaps[-1:]) + extra


def test_a_request_extending_a_payload_shares_its_blocks(engine: PagedEngine) -> None:
    tokens = random_prompt(N, seed=2)
    (first,) = snapshots(engine, tokens, (OFFSETS[1],))
    events = run_all(engine, EngineRequest(tokens, greedy(0), first, OFFSETS[1], snapshot_at=(N,)))
    deeper = prefilled(events).snapshots[N]
    shared = {p for p, _ in first.parts} & {p for p, _ in deeper.parts}
    assert len(shared) == OFFSETS[1] // B  # every whole block below the restore point


def test_memory_moves_on_cpu_stay_in_the_pool(llama_engine: PagedEngine) -> None:
    (payload,) = snapshots(llama_engine, random_prompt(N, seed=5), (N,))
    assert llama_engine.kv_codec.to_host(payload) is payload
    assert llama_engine.kv_codec.to_device(payload) is payload


def test_a_file_round_trips_and_serves_the_cold_tokens(engine: PagedEngine, tmp_path: Path) -> None:
    tokens = random_prompt(N, seed=3)
    cold = token_ids(run_all(engine, EngineRequest(tokens, greedy(12))))
    (payload,) = snapshots(engine, tokens, (OFFSETS[1],))
    codec = engine.kv_codec
    path = tmp_path / f"x{codec.suffix}"
    codec.save(payload, path, {"k": "v"})
    assert codec.read_metadata(path)["k"] == "v"
    loaded = codec.load(path)
    assert isinstance(loaded, HostPayload)
    assert loaded.parts == list(payload.parts)  # ids survive, so tiers count bytes once
    saved = payload.pool.kv[:, :, list(payload.blocks)].clone()
    # While the payload lives, loading shares its blocks instead of copying them.
    free = engine.pool.num_free
    again = codec.to_pool(loaded)
    assert again.blocks == payload.blocks and engine.pool.num_free == free
    del payload, again
    gc.collect()
    fresh = codec.to_pool(loaded)  # now the blocks are copied in anew
    assert torch.equal(fresh.pool.kv[:, :, list(fresh.blocks)], saved)
    warm = run_all(engine, EngineRequest(tokens, greedy(12), fresh, OFFSETS[1]))
    assert token_ids(warm) == cold


def test_a_float16_pools_file_round_trips_and_no_other_pool_reads_it(tmp_path: Path) -> None:
    """A float16 pool (``--kv-dtype float16``) writes half the bytes and reads its own files
    back exactly; a float32 pool of the same model refuses them (other bits, not converted)."""
    from promptcache.engine.hf.testing import build_tiny_engine

    half = build_tiny_engine("gemma3", kv_dtype=torch.float16)
    wide = build_tiny_engine("gemma3")
    tokens = random_prompt(N, seed=3)
    cold = token_ids(run_all(half, EngineRequest(tokens, greedy(12))))
    (payload,) = snapshots(half, tokens, (OFFSETS[1],))
    (wide_payload,) = snapshots(wide, tokens, (OFFSETS[1],))
    assert payload.nbytes * 2 == wide_payload.nbytes
    path = tmp_path / f"x{half.kv_codec.suffix}"
    half.kv_codec.save(payload, path, {})
    saved = payload.pool.kv[:, :, list(payload.blocks)].clone()
    del payload
    gc.collect()
    fresh = half.kv_codec.to_pool(half.kv_codec.load(path))
    assert torch.equal(fresh.pool.kv[:, :, list(fresh.blocks)], saved)
    warm = run_all(half, EngineRequest(tokens, greedy(12), fresh, OFFSETS[1]))
    assert token_ids(warm) == cold
    with pytest.raises(CorruptPayload):
        wide.kv_codec.load(path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "missing", "foreign"])
def test_damaged_files_raise_corrupt_payload(
    gemma_engine: PagedEngine, llama_engine: PagedEngine, tmp_path: Path, damage: str
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


def test_bytes_round_trip_and_are_the_file(engine: PagedEngine, tmp_path: Path) -> None:
    """A saved file holds what ``encode`` makes, and ``decode`` reads both back. (Not byte for
    byte: safetensors writes the metadata map in hash order.)"""
    tokens = random_prompt(N, seed=7)
    (payload,) = snapshots(engine, tokens, (OFFSETS[1],))
    codec = engine.kv_codec
    data = codec.encode(payload, {"k": "v"})
    path = tmp_path / f"x{codec.suffix}"
    codec.save(payload, path, {"k": "v"})
    assert len(path.read_bytes()) == len(data)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    decoded, metadata = codec.decode(data)
    assert metadata == codec.read_metadata(path) == codec.decode(path.read_bytes())[1]
    assert metadata["k"] == "v"
    assert isinstance(decoded, HostPayload)
    assert decoded.num_tokens == payload.num_tokens
    assert decoded.parts == list(payload.parts)
    kv = payload.pool.kv[:, :, list(payload.blocks)]
    assert torch.equal(torch.stack([b.data for b in decoded.blocks], dim=2), kv)
    loaded = codec.load(path)
    assert isinstance(loaded, HostPayload) and loaded.parts == decoded.parts


@pytest.mark.parametrize("damage", ["flip", "flip header", "truncate", "empty", "foreign"])
def test_damaged_bytes_raise_corrupt_payload(
    gemma_engine: PagedEngine, llama_engine: PagedEngine, damage: str
) -> None:
    codec = gemma_engine.kv_codec
    (payload,) = snapshots(gemma_engine, random_prompt(N, seed=8), (N,))
    data = bytearray(codec.encode(payload, {"k": "v"}))
    if damage == "flip":
        data[-7] ^= 0x01
    elif damage == "flip header":
        data[12] ^= 0x20
    elif damage == "truncate":
        data = data[:-100]
    elif damage == "empty":
        data = bytearray()
    else:  # bytes of another model layout
        (other,) = snapshots(llama_engine, random_prompt(N, seed=8), (N,))
        data = bytearray(llama_engine.kv_codec.encode(other, {}))
        assert llama_engine.kv_codec.layout != codec.layout
    with pytest.raises(CorruptPayload):
        codec.decode(bytes(data))
