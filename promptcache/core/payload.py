"""The opaque handle to KV bytes that the cache layer stores and the engine produces, and the codec
that moves those bytes between tiers, files and bytes (for a remote store).

The cache layer never looks inside a payload: it needs its size to keep each tier's budget, the
pieces it shares with other payloads (so shared bytes are counted once), and the number of prompt
tokens whose KV state it holds. The engine supplies the implementation and its ``KVCodec``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

PartId = int
"""Names one piece of KV memory. Equal ids mean the same bytes, in whatever tier they sit."""


def new_part_id() -> PartId:
    """A fresh part id. Random, not counted: ids are written into files and must not collide with
    those of an earlier process when a file is read back."""
    return secrets.randbits(63)


class CorruptPayload(Exception):
    """A stored payload cannot be used: its file is missing, truncated, damaged, or was written by
    another model layout. The caller treats the entry as a miss and removes it."""


@runtime_checkable
class KVPayload(Protocol):
    """KV state of the first ``num_tokens`` tokens of a prompt, immutable once created."""

    @property
    def num_tokens(self) -> int:
        """Tokens whose state the payload restores."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes the payload references; the sum of its ``parts``."""
        ...

    @property
    def parts(self) -> Sequence[tuple[PartId, int]]:
        """The payload's memory as ``(part id, bytes)`` pieces.

        Payloads of nested prefixes may share pieces (the pages of their common prefix): a tier
        counts each part id once however many of its entries hold it. A copy to another tier keeps
        the ids, and the codec never keeps two copies of one part in one kind of memory, so the
        count is exact.
        """
        ...


class KVCodec(Protocol):
    """Moves an engine's payloads between device memory, host memory, files and bytes.

    Supplied by the engine (it alone knows the tensors); the cache layer decides when to call it.
    Methods may run on a worker thread while the event loop uses other payloads; none of them
    changes the payload it is given (payloads are immutable), they return new ones.

    A payload has one serialized form: ``encode`` makes it, ``decode`` checks and reads it, and a
    file written by ``save`` holds exactly those bytes, so a file's bytes and a remote store's
    value are interchangeable.
    """

    @property
    def suffix(self) -> str:
        """File name suffix of saved payloads, e.g. ``".safetensors"``."""
        ...

    @property
    def layout(self) -> str:
        """Names the shape of the KV bytes (format version, dtype, per-token geometry): bytes
        encoded by one codec decode in another exactly when their layouts are equal. Meant for
        the namespace of a store shared by several processes."""
        ...

    def to_host(self, payload: KVPayload) -> KVPayload:
        """The payload in host memory (itself when it is there already)."""
        ...

    def to_device(self, payload: KVPayload) -> KVPayload:
        """The payload in the engine's device memory (itself when it is there already)."""
        ...

    def encode(self, payload: KVPayload, metadata: Mapping[str, str]) -> bytes:
        """``payload`` and ``metadata`` as self-contained bytes, with a checksum of the KV
        bytes and the layout they were written for."""
        ...

    def decode(self, data: bytes) -> tuple[KVPayload, dict[str, str]]:
        """Bytes made by ``encode`` as a payload in host memory and its metadata (the ``metadata``
        given to ``encode`` plus the codec's own keys, as ``read_metadata`` returns them),
        verifying checksum and layout. Raises ``CorruptPayload`` when the bytes are truncated,
        damaged or foreign."""
        ...

    def save(self, payload: KVPayload, path: Path, metadata: Mapping[str, str]) -> None:
        """Write ``encode(payload, metadata)`` to ``path`` atomically (``write_atomically``).
        Raises ``OSError`` when the write fails; no partial file is left at ``path``."""
        ...

    def load(self, path: Path) -> KVPayload:
        """Read a payload saved by ``save`` into host memory, verifying its checksum and layout
        like ``decode``. Raises ``CorruptPayload`` when the file is missing, truncated, damaged or
        foreign."""
        ...

    def read_metadata(self, path: Path) -> dict[str, str]:
        """The metadata ``decode`` would return, reading only the file's header, after checking
        that the file is as long as its header says. Raises ``CorruptPayload`` like ``load``."""
        ...


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file named ``<path>.tmp`` and a rename, so a
    reader (or a restart after a crash) never sees a partial file at ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_saved(path: Path) -> bytes:
    """The bytes ``write_atomically`` wrote at ``path``; a file that cannot be read (gone,
    unreadable) is a ``CorruptPayload``, a miss like a damaged one."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CorruptPayload(f"{path.name}: {exc}") from exc


__all__ = [
    "CorruptPayload",
    "KVCodec",
    "KVPayload",
    "PartId",
    "new_part_id",
    "read_saved",
    "write_atomically",
]
