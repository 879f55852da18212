"""Restore time per MB from each cache tier, next to the raw speed of the same bytes.

A payload of a given size is built in a ``KVPool`` with a real model's KV layout (default:
Llama-3-8B, 32 layers x 8 KV heads x 128 dims in bfloat16, 128 KiB per token; ``--layers``,
``--kv-heads``, ``--head-dim``, ``--dtype`` change it) in blocks of ``--block-tokens``, exactly
as ``PagedEngine`` stores it, its blocks filled with random values. For each size it times, best
of ``--repeats``:

- memcpy        ``torch.clone`` of one tensor of the same bytes on the engine's device
- <top tier>    mapping the resident payload into a sequence as ``PagedEngine`` restores a hit
                (``KVPool.fork``): at a block boundary no byte is copied; a whole-prompt hit
                restores ``N - 1`` tokens (spec §2.5) and copies the partly used last block. The
                top tier is the device on CUDA and host memory on a CPU (the pool's memory).
- to_host       (CUDA only) ``PagedCodec.to_host``: the blocks into pinned host memory (demotion)
- host->device  (CUDA only) one pinned tensor of the same bytes copied to the device
- host tier     (CUDA only) ``PagedCodec.to_pool`` from pinned host blocks, then the mapping
- save          ``PagedCodec.save``: gather the blocks, sha256, write the file (demotion to disk)
- load, warm    ``PagedCodec.load`` alone (read, sha256 check), file in the page cache
- disk (warm)   ``load`` + ``to_pool`` + the mapping, file in the page cache
- disk (cold)   the same after ``posix_fadvise(DONTNEED)`` dropped the file from the page cache
- file read     ``Path.read_bytes`` of the same file, warm and cold (the disk's own speed)
- sha256        hashing the same bytes (the checksum's share of a disk load)

Every restore below the top tier maps ``N - 1`` tokens, like a whole-prompt hit, and reads the
payload into a pool where none of its blocks is resident any more (the pool would otherwise
share the live blocks instead of copying).

::

    .venv/bin/python benchmarks/restore.py [--device cuda] [--sizes-mb 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from promptcache.core.payload import KVPayload
from promptcache.engine.paged.codec import PagedCodec
from promptcache.engine.paged.engine import DEFAULT_BLOCK_TOKENS
from promptcache.engine.paged.pool import KVPool, PoolPayload

MB = 1 << 20
T = TypeVar("T")


def build_pool(args: argparse.Namespace, num_blocks: int, device: torch.device) -> KVPool:
    return KVPool(
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_blocks=num_blocks,
        block_tokens=args.block_tokens,
        dtype=getattr(torch, args.dtype),
        device=device,
    )


def build_payload(pool: KVPool, num_tokens: int) -> PoolPayload:
    """A payload of ``num_tokens`` tokens of random KV in fresh blocks of ``pool``."""
    blocks = pool.allocate(-(-num_tokens // pool.block_tokens))
    for block in blocks:  # block by block: no second payload-sized tensor of random values
        pool.kv[:, :, block].normal_()
    return PoolPayload(pool, blocks, num_tokens)


def restore(pool: KVPool, codec: PagedCodec, payload: KVPayload, reuse: int) -> list[int]:
    """What ``PagedEngine`` does with a hit: the payload into the pool (a no-op when it is
    there), then its first ``reuse`` tokens mapped into a new sequence's block table."""
    pooled = codec.to_pool(payload)  # held until fork took its references: it owns the copies
    return pool.fork(pooled.blocks, reuse)


def timed(
    fn: Callable[[], T],
    device: torch.device,
    repeats: int,
    cleanup: Callable[[T], object] | None = None,
) -> float:
    """Best wall time of ``fn`` in seconds, synchronising the GPU around it. ``cleanup`` gets
    each result outside the timed span (a sequence's blocks go back when it ends, not as part
    of its restore)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        if cleanup is not None:
            cleanup(result)
        del result
    return best


def drop_from_page_cache(path: Path) -> None:
    """Evict ``path``'s pages from the OS page cache (only this file; no privileges needed)."""
    with path.open("rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(
    size_mb: int, args: argparse.Namespace, device: torch.device, workdir: Path
) -> tuple[float, list[tuple[str, float]]]:
    """``(payload MB, [(path, seconds), ...])`` for one payload size; memcpy first."""
    dtype = getattr(torch, args.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    bytes_per_token = args.layers * 2 * args.kv_heads * args.head_dim * element
    num_tokens = max(2, size_mb * MB // bytes_per_token)
    reuse = num_tokens - 1  # a whole-prompt hit: the last token is recomputed for its logits
    num_blocks = -(-num_tokens // args.block_tokens)
    # The payload (or its copy), the sequence's private last block, and the null block.
    pool = build_pool(args, num_blocks + 2, device)
    repeats = args.repeats
    path = workdir / f"{size_mb}.safetensors"
    rows: list[tuple[str, float]] = []

    def release(table: list[int]) -> None:
        pool.decref(table)

    def in_pool() -> tuple[float, KVPayload | None]:
        """The rows that need the resident payload; saves the file, returns the host copy on
        CUDA, and drops the payload on return, so its blocks leave the pool."""
        codec = PagedCodec(pool)
        payload = build_payload(pool, num_tokens)
        flat = torch.empty(payload.nbytes // element, dtype=dtype, device=device)
        rows.append(("memcpy (torch clone)", timed(flat.clone, device, repeats)))
        top = "device" if device.type == "cuda" else "host"
        aligned = num_tokens - num_tokens % args.block_tokens
        if aligned:
            mapped = timed(lambda: restore(pool, codec, payload, aligned), device, repeats, release)
            rows.append((f"{top} tier (map, whole blocks)", mapped))
        mapped = timed(lambda: restore(pool, codec, payload, reuse), device, repeats, release)
        rows.append((f"{top} tier (map N-1, +1 block copy)", mapped))
        host: KVPayload | None = None
        if device.type == "cuda":
            # Each result is dropped before the next call, so every call copies afresh.
            rows.append(
                ("to_host (device->host)", timed(lambda: codec.to_host(payload), device, repeats))
            )
            host = codec.to_host(payload)
            host_flat = torch.empty(flat.shape, dtype=dtype, pin_memory=True)
            rows.append(
                ("host->device memcpy", timed(lambda: host_flat.to(device), device, repeats))
            )
        rows.append(
            (
                "save (gather+sha256+write)",
                timed(lambda: codec.save(payload, path, {}), device, min(repeats, 3)),
            )
        )
        return payload.nbytes / MB, host

    mb, host = in_pool()
    gc.collect()
    assert pool.num_free == pool.num_blocks - 1, "the payload still holds blocks"
    if host is not None:
        codec = PagedCodec(pool)
        seconds = timed(lambda: restore(pool, codec, host, reuse), device, repeats, release)
        rows.insert(-1, ("host tier (to_pool+map)", seconds))  # before save: tiers top down
        del host, codec
        gc.collect()

    def load() -> KVPayload:
        # A fresh codec: no host copy of the blocks is left to share, so the file is read.
        return PagedCodec(pool).load(path)

    def load_restore() -> list[int]:
        return restore(pool, PagedCodec(pool), load(), reuse)

    def cold(fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            drop_from_page_cache(path)
            return fn()

        return run

    release(load_restore())  # warm the page cache
    rows.append(("load, warm (read+sha256)", timed(load, device, repeats)))
    rows.append(
        ("disk tier, warm (load+to_pool+map)", timed(load_restore, device, repeats, release))
    )
    rows.append(("file read, warm", timed(path.read_bytes, device, repeats)))
    rows.append(
        ("disk tier, cold (load+to_pool+map)", timed(cold(load_restore), device, 3, release))
    )
    rows.append(("file read, cold", timed(cold(path.read_bytes), device, 3)))
    data = path.read_bytes()
    rows.append(("sha256 of the file", timed(lambda: hashlib.sha256(data).digest(), device, 3)))
    path.unlink()
    return mb, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes-mb", default="1024", help="payload sizes, comma separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dir", type=Path, default=None, help="where the disk tier's files go")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    bytes_per_token = args.layers * 2 * args.kv_heads * args.head_dim * element
    workdir = Path(tempfile.mkdtemp(prefix="pc-restore-", dir=args.dir))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device} ({name}, {torch.get_num_threads()} CPU threads), {args.layers} layers x "
        f"{args.kv_heads} kv heads x {args.head_dim} dims {args.dtype} = "
        f"{bytes_per_token // 1024} KiB/token, {args.block_tokens}-token blocks, "
        f"best of {args.repeats}"
    )
    header = f"{'MB':>6}  {'path':<35} {'ms':>9} {'MB/s':>9} {'vs memcpy':>10}"
    print(header)
    print("-" * len(header))
    try:
        for size_mb in (int(s) for s in args.sizes_mb.split(",")):
            mb, rows = measure(size_mb, args, device, workdir)
            memcpy = rows[0][1]
            for path_name, seconds in rows:
                print(
                    f"{mb:>6.0f}  {path_name:<35} {seconds * 1e3:>9.2f} {mb / seconds:>9.0f} "
                    f"{seconds / memcpy:>9.1f}x"
                )
            print()
    finally:  # a failed run leaves no gigabyte files behind
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
