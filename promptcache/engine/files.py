"""Checked safetensors files for KV payloads: a digest over every tensor, and a header read that
proves the file (or the bytes in memory) is complete. Shared by the engines' codecs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from promptcache.core.payload import CorruptPayload

MAX_HEADER_BYTES = 100 << 20


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and the SHA-256 of its bytes, in name
    order. Tensors are hashed on several threads (hashlib releases the GIL), so the check costs
    a fraction of a single-threaded pass over the file."""
    names = sorted(tensors)

    def one(name: str) -> bytes:
        t = tensors[name].contiguous()
        return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().data).digest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(one, names))
    digest = hashlib.sha256()
    for name, part in zip(names, digests, strict=True):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + part)
    return digest.hexdigest()


def read_header(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header, after checking that
    the file is exactly as long as the header says (a truncated file fails here)."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            raw = f.read(length) if _plausible(length, size) else b""
    except OSError as exc:
        raise CorruptPayload(f"{path.name}: {exc}") from exc
    return _parse_header(path.name, length, raw, size)


def header_of(data: bytes, name: str) -> dict[str, str]:
    """``read_header`` of safetensors bytes in memory (``name`` labels errors)."""
    length = int.from_bytes(data[:8], "little")
    raw = data[8 : 8 + length] if _plausible(length, len(data)) else b""
    return _parse_header(name, length, raw, len(data))


def _plausible(length: int, size: int) -> bool:
    return 0 < length <= min(MAX_HEADER_BYTES, size - 8)


def _parse_header(name: str, length: int, raw: bytes, size: int) -> dict[str, str]:
    """The metadata of a header of ``length`` bytes read as ``raw``, of a file of ``size``."""
    if not _plausible(length, size) or len(raw) != length:
        raise CorruptPayload(f"{name}: bad header length")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptPayload(f"{name}: bad header ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptPayload(f"{name}: bad header")
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptPayload(f"{name}: bad tensor table") from exc
    if 8 + length + end != size:
        raise CorruptPayload(f"{name}: {size} bytes, header says {8 + length + end}")
    if not isinstance(metadata, dict):
        raise CorruptPayload(f"{name}: bad metadata")
    return {str(k): str(v) for k, v in metadata.items()}


__all__ = ["MAX_HEADER_BYTES", "digest", "header_of", "read_header"]
