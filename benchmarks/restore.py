"""Restore time per MB from each cache tier, next to the raw speed of the same bytes.

A payload of a given size is built with a real model's KV layout (default: Llama-3-8B, 32 full
layers x 8 KV heads x 128 dims in bfloat16, 128 KiB per token; ``--layers``, ``--kv-heads``,
``--head-dim``, ``--dtype`` change it) in 256-token pages, exactly as ``HFEngine`` stores it.
For each size it times, best of ``--repeats``:

- memcpy        ``torch.clone`` of one tensor of the same bytes on the engine's device
- <top tier>    ``restore_cache`` from a resident payload (joins its pages into a live cache)
- host          (CUDA only) ``to_device`` from pinned host memory, then restore
- disk (warm)   ``HFKVCodec.load`` (read, sha256 check) [+ ``to_device``] + restore, file in the
                page cache
- disk (cold)   the same after ``posix_fadvise(DONTNEED)`` dropped the file from the page cache
- file read     ``Path.read_bytes`` of the same file, warm and cold (the disk's own speed)
- sha256        hashing the same bytes (the checksum's share of a disk load)

::

    .venv/bin/python benchmarks/restore.py [--device cuda] [--sizes-mb 16,64,256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from promptcache.engine.hf.codec import HFKVCodec
from promptcache.engine.hf.kv import HFKVPayload, KVLayout, KVPage, PagePool, restore_cache

from promptcache.core.payload import new_part_id

PAGE_TOKENS = 256
MB = 1 << 20


def build_payload(
    num_tokens: int,
    layout: KVLayout,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> HFKVPayload:
    """A payload of random KV in ``PAGE_TOKENS`` pages (full-attention layers only)."""
    num_layers = len(layout.windows)
    pages = []
    for start in range(0, num_tokens, PAGE_TOKENS):
        length = min(PAGE_TOKENS, num_tokens - start)
        shape = (1, kv_heads, length, head_dim)
        keys = tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(num_layers))
        values = tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(num_layers))
        pages.append(KVPage(new_part_id(), start, keys, values))
    return HFKVPayload(pages, [None] * num_layers, num_tokens, layout)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of ``fn`` in seconds, synchronising the GPU around it."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def drop_from_page_cache(path: Path) -> None:
    """Evict ``path``'s pages from the OS page cache (only this file; no privileges needed)."""
    with path.open("rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(
    size_mb: int, layout: KVLayout, args: argparse.Namespace, device: torch.device, workdir: Path
) -> tuple[float, list[tuple[str, float]]]:
    """``(payload MB, [(path, seconds), ...])`` for one payload size; memcpy first."""
    dtype = getattr(torch, args.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    bytes_per_token = args.layers * 2 * args.kv_heads * args.head_dim * element
    num_tokens = max(1, size_mb * MB // bytes_per_token)
    path = workdir / f"{size_mb}.safetensors"

    def in_memory() -> tuple[float, list[tuple[str, float]]]:
        """The memory tiers; saves the file and drops the payload on return, so a later load
        reads the file instead of finding the live pages in a pool."""
        codec = HFKVCodec(layout, device, PagePool())
        payload = build_payload(num_tokens, layout, args.kv_heads, args.head_dim, dtype, device)
        flat = torch.empty(payload.nbytes // element, dtype=dtype, device=device)
        rows = [("memcpy (torch clone)", timed(flat.clone, device, repeats))]
        top = "device" if device.type == "cuda" else "host"
        restore = timed(lambda: restore_cache(payload, num_tokens, layout), device, repeats)
        rows.append((f"{top} tier (restore)", restore))
        if device.type == "cuda":
            host = codec.to_host(payload)
            host_flat = torch.empty(flat.shape, dtype=dtype, pin_memory=True)
            rows.append(
                ("host->device memcpy", timed(lambda: host_flat.to(device), device, repeats))
            )

            def host_restore() -> None:
                # A fresh pool: the shared one would hand back the live device pages.
                moved = HFKVCodec(layout, device, PagePool()).to_device(host)
                restore_cache(moved, num_tokens, layout)

            rows.append(("host tier (copy+restore)", timed(host_restore, device, repeats)))
        codec.save(payload, path, {})
        return payload.nbytes / MB, rows

    repeats = args.repeats
    mb, rows = in_memory()

    def load_restore() -> None:
        fresh = HFKVCodec(layout, device, PagePool())
        restore_cache(fresh.to_device(fresh.load(path)), num_tokens, layout)

    def cold(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            drop_from_page_cache(path)
            return fn()

        return run

    load_restore()  # warm the page cache
    rows.append(("disk tier, warm (load+restore)", timed(load_restore, device, repeats)))
    rows.append(("file read, warm", timed(path.read_bytes, device, repeats)))
    rows.append(("disk tier, cold (load+restore)", timed(cold(load_restore), device, 3)))
    rows.append(("file read, cold", timed(cold(path.read_bytes), device, 3)))
    data = path.read_bytes()
    rows.append(("sha256 of the file", timed(lambda: hashlib.sha256(data).digest(), device, 3)))
    path.unlink()
    return mb, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes-mb", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
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
    layout = KVLayout((None,) * args.layers)
    workdir = Path(tempfile.mkdtemp(prefix="pc-restore-", dir=args.dir))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device} ({name}, {torch.get_num_threads()} CPU threads), {args.layers} layers x "
        f"{args.kv_heads} kv heads x {args.head_dim} dims {args.dtype} = "
        f"{bytes_per_token // 1024} KiB/token, {PAGE_TOKENS}-token pages, best of {args.repeats}"
    )
    header = f"{'MB':>6}  {'path':<31} {'ms':>9} {'MB/s':>9} {'vs memcpy':>10}"
    print(header)
    print("-" * len(header))
    for size_mb in (int(s) for s in args.sizes_mb.split(",")):
        mb, rows = measure(size_mb, layout, args, device, workdir)
        memcpy = rows[0][1]
        for path_name, seconds in rows:
            print(
                f"{mb:>6.0f}  {path_name:<31} {seconds * 1e3:>9.2f} {mb / seconds:>9.0f} "
                f"{seconds / memcpy:>9.1f}x"
            )
        print()
    workdir.rmdir()


if __name__ == "__main__":
    main()
