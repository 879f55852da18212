"""``HFKVCodec``: moves ``HFKVPayload``s between device memory, host memory and safetensors files.

A file is self-contained (every page of the entry, even those shared in memory) and holds::

    page.<k>.<layer>.keys / .values     full-attention pages, k = 0, 1, ...
    tail.<layer>.keys / .values         sliding-window tails
    __metadata__                        the caller's metadata, plus
      kv.format  kv.layout  kv.num_tokens  kv.pages ([[id, start], ...])  kv.tails ({layer: start})
      kv.sha256  (over name, dtype, shape and SHA-256 of the bytes of every tensor, in name order)

safetensors never executes code on load, and its header can be read without the tensors, which
is what a restart scan does. Writes go to ``<name>.tmp`` and are renamed into place, so a crash
leaves no half-written file under a real name. Page ids survive the round trip, so a page loaded
while a copy of it is alive in memory is the same object (``PagePool``), counted once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from promptcache.core.payload import CorruptPayload, KVPayload
from promptcache.engine.hf.kv import (
    HFKVPayload,
    KVLayout,
    KVPage,
    LayerKV,
    PagePool,
    to_device,
    wait_for_copies,
)

FORMAT = "promptcache-hf-kv/1"
_MAX_HEADER_BYTES = 100 << 20
_CPU = torch.device("cpu")


class HFKVCodec:
    """The ``KVCodec`` of one ``HFEngine``: its layer layout, device and page pool."""

    suffix = ".safetensors"

    def __init__(self, layout: KVLayout, device: torch.device, pool: PagePool) -> None:
        self._layout = layout
        self._device = device
        self._pool = pool

    def to_host(self, payload: KVPayload) -> HFKVPayload:
        return self._move(_ours(payload), _CPU)

    def to_device(self, payload: KVPayload) -> HFKVPayload:
        return self._move(_ours(payload), self._device)

    def _move(self, payload: HFKVPayload, device: torch.device) -> HFKVPayload:
        if payload.device == str(device):
            return payload
        tails = [
            None
            if tail is None
            else LayerKV(to_device(tail.keys, device), to_device(tail.values, device), tail.start)
            for tail in payload.tails
        ]
        pages = self._pool.copy_all(payload.pages, device)
        wait_for_copies(device, payload.device)  # the tails
        return HFKVPayload(pages, tails, payload.num_tokens, payload.layout)

    def save(self, payload: KVPayload, path: Path, metadata: Mapping[str, str]) -> None:
        payload = _ours(payload)
        tensors: dict[str, torch.Tensor] = {}
        full = [i for i, w in enumerate(payload.layout.windows) if w is None]
        for k, page in enumerate(payload.pages):
            for keys, values, layer in zip(page.keys, page.values, full, strict=True):
                tensors[f"page.{k}.{layer}.keys"] = _host(keys)
                tensors[f"page.{k}.{layer}.values"] = _host(values)
        for layer, tail in enumerate(payload.tails):
            if tail is not None:
                tensors[f"tail.{layer}.keys"] = _host(tail.keys)
                tensors[f"tail.{layer}.values"] = _host(tail.values)
        header = dict(metadata)
        header.update(
            {
                "kv.format": FORMAT,
                "kv.layout": json.dumps(list(payload.layout.windows)),
                "kv.num_tokens": str(payload.num_tokens),
                "kv.pages": json.dumps([[p.page_id, p.start] for p in payload.pages]),
                "kv.tails": json.dumps(
                    {str(i): t.start for i, t in enumerate(payload.tails) if t is not None}
                ),
                "kv.sha256": _digest(tensors),
            }
        )
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_metadata(self, path: Path) -> dict[str, str]:
        metadata = _read_header(path)
        if metadata.get("kv.format") != FORMAT:
            raise CorruptPayload(f"{path.name}: not a {FORMAT} file")
        return metadata

    def load(self, path: Path) -> HFKVPayload:
        metadata = self.read_metadata(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                tensors: dict[str, torch.Tensor] = {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptPayload(f"{path.name}: {exc}") from exc
        if _digest(tensors) != metadata.get("kv.sha256"):
            raise CorruptPayload(f"{path.name}: checksum mismatch")
        try:
            return self._build(metadata, tensors)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise CorruptPayload(f"{path.name}: {exc}") from exc

    def _build(self, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> HFKVPayload:
        windows = tuple(json.loads(metadata["kv.layout"]))
        if windows != self._layout.windows:
            raise ValueError(f"saved for layout {windows}, this model has {self._layout.windows}")
        full = [i for i, w in enumerate(windows) if w is None]
        pages = []
        for k, (page_id, start) in enumerate(json.loads(metadata["kv.pages"])):
            page = KVPage(
                int(page_id),
                int(start),
                tuple(tensors[f"page.{k}.{layer}.keys"] for layer in full),
                tuple(tensors[f"page.{k}.{layer}.values"] for layer in full),
            )
            pages.append(self._pool.adopt(page))
        starts: dict[str, Any] = json.loads(metadata["kv.tails"])
        tails = [
            None
            if w is None
            else LayerKV(
                tensors[f"tail.{i}.keys"], tensors[f"tail.{i}.values"], int(starts[str(i)])
            )
            for i, w in enumerate(windows)
        ]
        return HFKVPayload(pages, tails, int(metadata["kv.num_tokens"]), self._layout)


def _ours(payload: KVPayload) -> HFKVPayload:
    if not isinstance(payload, HFKVPayload):
        raise TypeError(f"HFKVCodec handles HFKVPayload, not {type(payload).__name__}")
    return payload


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.to(_CPU).contiguous()


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
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


def _read_header(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header, after checking that
    the file is exactly as long as the header says (a truncated file fails here)."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
                raise CorruptPayload(f"{path.name}: bad header length")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise CorruptPayload(f"{path.name}: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptPayload(f"{path.name}: bad header ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptPayload(f"{path.name}: bad header")
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptPayload(f"{path.name}: bad tensor table") from exc
    if 8 + length + end != size:
        raise CorruptPayload(f"{path.name}: {size} bytes, header says {8 + length + end}")
    if not isinstance(metadata, dict):
        raise CorruptPayload(f"{path.name}: bad metadata")
    return {str(k): str(v) for k, v in metadata.items()}


__all__ = ["FORMAT", "HFKVCodec"]
