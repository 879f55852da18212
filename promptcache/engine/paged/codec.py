"""``PagedCodec``: moves payloads between the engine's ``KVPool``, host memory and files.

::

    PoolPayload   blocks in the pool (the engine's memory: device tier on CUDA, host on a CPU)
    HostPayload   one host tensor per block [layers, 2, block_tokens, kv_heads, head_dim]
    bytes, file   safetensors: "kv" [layers, 2, blocks, block_tokens, kv_heads, head_dim] and
                  __metadata__ kv.format kv.shape kv.dtype kv.num_tokens kv.parts kv.sha256 + the
                  caller's; a file holds exactly the bytes ``encode`` returns

Part ids survive every move, so one block's bytes are counted once in each tier however many
entries share them: copies into the pool reuse a live block holding the same part, and host
copies are shared through a weak map by part id. On a CPU engine the pool *is* host memory:
``to_host`` and ``to_device`` both return pool payloads.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from promptcache.core.payload import (
    CorruptPayload,
    KVPayload,
    PartId,
    read_saved,
    write_atomically,
)
from promptcache.engine.files import digest, header_of, read_header
from promptcache.engine.paged.pool import KVPool, PoolPayload

FORMAT = "promptcache-paged-kv/1"
_CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class HostBlock:
    """One block's KV in host memory: ``[layers, 2, block_tokens, kv_heads, head_dim]``."""

    part: PartId
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class HostPayload:
    """A cached prefix held in host memory, block by block. Implements ``KVPayload``."""

    __slots__ = ("__weakref__", "blocks", "num_tokens")

    def __init__(self, blocks: Sequence[HostBlock], num_tokens: int) -> None:
        self.blocks = tuple(blocks)
        self.num_tokens = num_tokens

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def parts(self) -> list[tuple[PartId, int]]:
        return [(b.part, b.nbytes) for b in self.blocks]

    def __repr__(self) -> str:
        return f"HostPayload(num_tokens={self.num_tokens}, blocks={len(self.blocks)})"


class PagedCodec:
    """The ``KVCodec`` of one paged engine."""

    suffix = ".safetensors"

    def __init__(self, pool: KVPool) -> None:
        self._pool = pool
        self._host: weakref.WeakValueDictionary[PartId, HostBlock] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    @property
    def shape(self) -> list[int]:
        """``[layers, 2, block_tokens, kv_heads, head_dim]`` of one block."""
        return list(self._pool.kv[:, :, 0].shape)

    @property
    def layout(self) -> str:
        """Format, dtype and block shape: what ``decode`` checks."""
        return f"{FORMAT} {self._pool.dtype} {json.dumps(self.shape)}"

    def accepts(self, payload: KVPayload | None) -> bool:
        """Whether ``payload`` holds KV of this engine's layout (its pool, or host blocks of
        the same shape and dtype)."""
        if isinstance(payload, PoolPayload):
            return payload.pool is self._pool
        if isinstance(payload, HostPayload):
            return all(
                list(b.data.shape) == self.shape and b.data.dtype == self._pool.dtype
                for b in payload.blocks
            )
        return False

    def to_host(self, payload: KVPayload) -> KVPayload:
        if self._pool.device.type == "cpu":
            return self.to_pool(payload)
        if isinstance(payload, HostPayload):
            return payload
        pool_payload = self._ours(payload)
        blocks = []
        for block in pool_payload.blocks:
            part = self._pool.part_of(block)
            with self._lock:
                host = self._host.get(part)
            if host is None:
                data = torch.empty(self.shape, dtype=self._pool.dtype, pin_memory=True)
                data.copy_(self._pool.kv[:, :, block], non_blocking=True)
                host = HostBlock(part, data)
                with self._lock:
                    host = self._host.setdefault(part, host)
            blocks.append(host)
        if self._pool.device.type == "cuda":
            torch.cuda.current_stream(self._pool.device).synchronize()
        return HostPayload(blocks, pool_payload.num_tokens)

    def to_device(self, payload: KVPayload) -> KVPayload:
        return self.to_pool(payload)

    def to_pool(self, payload: KVPayload) -> PoolPayload:
        """``payload`` with its blocks in the pool: live blocks of the same parts are shared,
        the others copied in. Raises ``PoolExhausted`` when the pool has no room."""
        if isinstance(payload, PoolPayload) and payload.pool is self._pool:
            return payload
        if not isinstance(payload, HostPayload):
            raise TypeError(f"PagedCodec handles pool and host payloads, not {payload!r}")
        blocks: list[int] = []
        try:
            for host in payload.blocks:
                block = self._pool.find(host.part)
                if block is None:
                    (block,) = self._pool.allocate(1, [host.part])
                    self._pool.kv[:, :, block].copy_(host.data, non_blocking=host.data.is_pinned())
                blocks.append(block)
        except BaseException:
            self._pool.decref(blocks)
            raise
        if self._pool.device.type == "cuda":
            torch.cuda.current_stream(self._pool.device).synchronize()
        return PoolPayload(self._pool, blocks, payload.num_tokens)

    def encode(self, payload: KVPayload, metadata: Mapping[str, str]) -> bytes:
        parts, data = self._gather(payload)
        tensors = {"kv": data}
        header = dict(metadata)
        header.update(
            {
                "kv.format": FORMAT,
                "kv.shape": json.dumps(self.shape),
                "kv.dtype": str(self._pool.dtype),
                "kv.num_tokens": str(payload.num_tokens),
                "kv.parts": json.dumps(parts),
                "kv.sha256": digest(tensors),
            }
        )
        return save(tensors, metadata=header)

    def save(self, payload: KVPayload, path: Path, metadata: Mapping[str, str]) -> None:
        write_atomically(path, self.encode(payload, metadata))

    def _gather(self, payload: KVPayload) -> tuple[list[PartId], torch.Tensor]:
        """The payload's part ids and its blocks stacked on the CPU along dim 2."""
        if isinstance(payload, HostPayload):
            parts = [b.part for b in payload.blocks]
            data = torch.stack([b.data for b in payload.blocks], dim=2)
            return parts, data
        ours = self._ours(payload)
        index = torch.tensor(ours.blocks, dtype=torch.long, device=self._pool.device)
        data = self._pool.kv.index_select(2, index).to(_CPU)
        return [self._pool.part_of(b) for b in ours.blocks], data.contiguous()

    def read_metadata(self, path: Path) -> dict[str, str]:
        return self._check_format(read_header(path), path.name)

    def load(self, path: Path) -> KVPayload:
        self.read_metadata(path)  # a foreign or truncated file fails before it is read whole
        payload, _ = self._decode(read_saved(path), path.name)
        return payload

    def decode(self, data: bytes) -> tuple[KVPayload, dict[str, str]]:
        return self._decode(data, "payload")

    def _check_format(self, metadata: dict[str, str], name: str) -> dict[str, str]:
        if metadata.get("kv.format") != FORMAT:
            raise CorruptPayload(f"{name}: not a {FORMAT} file")
        return metadata

    def _decode(self, data: bytes, name: str) -> tuple[HostPayload, dict[str, str]]:
        metadata = self._check_format(header_of(data, name), name)
        if metadata.get("kv.shape") != json.dumps(self.shape) or metadata.get("kv.dtype") != str(
            self._pool.dtype
        ):
            raise CorruptPayload(f"{name}: saved for another KV layout")
        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as exc:
            raise CorruptPayload(f"{name}: {exc}") from exc
        if digest(tensors) != metadata.get("kv.sha256"):
            raise CorruptPayload(f"{name}: checksum mismatch")
        try:
            parts = [int(p) for p in json.loads(metadata["kv.parts"])]
            num_tokens = int(metadata["kv.num_tokens"])
            kv = tensors["kv"]
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptPayload(f"{name}: {exc}") from exc
        if len(parts) != -(-num_tokens // self.shape[2]):
            raise CorruptPayload(f"{name}: {len(parts)} blocks for {num_tokens} tokens")
        expected = [*self.shape[:2], len(parts), *self.shape[2:]]
        if list(kv.shape) != expected or kv.dtype != self._pool.dtype:
            raise CorruptPayload(f"{name}: kv is {kv.dtype} {list(kv.shape)}, not {expected}")
        pinned = self._pool.device.type == "cuda"
        blocks = []
        for i, part in enumerate(parts):
            with self._lock:
                host = self._host.get(part)
            if host is None:
                # A copy either way (a block never aliases the decoded buffer), pinned on CUDA
                # so copies into the pool run asynchronously.
                block = kv[:, :, i].clone(memory_format=torch.contiguous_format)
                host = HostBlock(part, block.pin_memory() if pinned else block)
                with self._lock:
                    host = self._host.setdefault(part, host)
            blocks.append(host)
        return HostPayload(blocks, num_tokens), metadata

    def _ours(self, payload: KVPayload) -> PoolPayload:
        if not isinstance(payload, PoolPayload) or payload.pool is not self._pool:
            raise TypeError(f"not a payload of this engine's pool: {payload!r}")
        return payload


__all__ = ["FORMAT", "HostBlock", "HostPayload", "PagedCodec"]
