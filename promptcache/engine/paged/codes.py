"""Decode layers that read a GGUF file's own 4- and 5-bit codes (``kernels/codes.h``).

A decode step on a CPU is bound by the weight bytes it streams. The int8 copies of the layers
(``models.int8``) are ~8 bits a weight; the file the model came from holds most of them in
fewer: SmolLM2-135M's every layer in Q4_1 (5 bits a weight with its scales), Gemma 3 270M's
q, k, gate and up (and half of its v) in Q5_0. ``gemv_codes`` multiplies the rows, quantized
as the int8 products quantize them, by those codes as they are (exact integer sums per block
of 32, then the block's scale and offset): the decode weights are exactly the file's, in ~6
bits. Where a projection has a part in another format (Gemma's Q4_K / Q6_K / Q8_0 ones), it
keeps its int8 copy.

The codes are checked against the model's weights (each part dequantized and rounded to the
model's dtype must be its rows, bit for bit, as the converter made them; for the Llama family
after the converter's reordering of q and k rows), and laid out once; the layout is kept in
the cache directory, so a later start reads neither the GGUF file nor its blocks again.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.int8 import DecodeInt8Linear

log = logging.getLogger(__name__)

BLOCK = 32
"""Inputs per block of the file's scale and offset (Q4_0, Q4_1, Q5_0)."""

LAYOUT = "codes-v1"
"""The kept layout's name: a change of ``pack`` or of the kernel's reading is a new name."""

# GGML type numbers (gguf.GGMLQuantizationType) of the formats read here: bytes a block.
Q4_0, Q4_1, Q5_0 = 2, 3, 6
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22}

PARTS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))
"""The file's tensors of each projection the decode step computes (qkv, o, gate_up, down), in
the order the model fuses them."""


@dataclass(frozen=True)
class Codes:
    """A weight ``[N, K]`` as the file's blocks hold it: ``w = d q + m`` per row and block of
    32 inputs, ``q`` (uint8, 0 .. 31) of ``bits`` bits, ``d`` and ``m`` float16 ``[N, K / 32]``;
    with an ``offset`` (Q4_0's 8, Q5_0's 16), ``m = -offset d`` (exact in float16), which the
    layout then leaves out."""

    q: np.ndarray
    d: np.ndarray
    m: np.ndarray
    bits: int
    offset: int

    def rows(self, order: np.ndarray) -> Codes:
        """These rows in ``order``."""
        return Codes(self.q[order], self.d[order], self.m[order], self.bits, self.offset)

    def dequantize(self) -> np.ndarray:
        """The weight in float32, as gguf's ``dequantize`` computes it (``d q + m`` is exact
        there for the symmetric formats: ``d (q - 8)`` and ``d q - 8 d`` are the same float)."""
        n, k = self.q.shape
        d = self.d.astype(np.float32).repeat(BLOCK, axis=1)
        m = self.m.astype(np.float32).repeat(BLOCK, axis=1)
        return (d * self.q.astype(np.float32) + m).reshape(n, k)


def decode_blocks(raw: np.ndarray, kind: int, k: int) -> Codes | None:
    """The codes of a tensor's rows ``raw [N, K / 32 * bytes]`` (uint8) of GGML type ``kind``,
    or None for a format read elsewhere."""
    if kind not in BLOCK_BYTES:
        return None
    n = raw.shape[0]
    blocks = raw.reshape(n, k // BLOCK, BLOCK_BYTES[kind])
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
    offset = {Q4_0: 8, Q4_1: 0, Q5_0: 16}[kind]
    if kind == Q4_1:
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[:, :, 4:20]
    else:
        qs = blocks[:, :, 2:18] if kind == Q4_0 else blocks[:, :, 6:22]
        m = _times(d, -offset)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # inputs 0..15 low, 16..31 high
    bits = 4
    if kind == Q5_0:
        qh = blocks[:, :, 2:6].copy().view("<u4")[..., 0]
        fifth = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
        q = q | (fifth.astype(np.uint8) << 4)
        bits = 5
    return Codes(q.reshape(n, k).astype(np.uint8), d, m, bits, offset)


def _times(d: np.ndarray, power_of_two: int) -> np.ndarray:
    """``d * power_of_two`` in float16: exact."""
    return (d.astype(np.float32) * power_of_two).astype(np.float16)


def pack(codes: Codes) -> torch.Tensor:
    """``codes`` laid out as ``kernels/codes.h`` reads them: per 16 output rows and block of
    32 inputs, 256 bytes of low nibbles (vector j of four, lane r, byte i: row r's input 4 j + i
    low, 4 (j + 4) + i high), for 5 bits 64 bytes of fifth bits (lane r, byte i, bit j: input
    4 j + i's), then the 16 rows' d (float16) and, with no offset, their m. N a multiple of
    16."""
    n, k = codes.q.shape
    nb, t = n // 16, k // BLOCK
    q = codes.q.reshape(nb, 16, t, 8, 4).transpose(0, 2, 3, 1, 4)  # [nb, t, j, r, i]
    low = (q[:, :, :4] & 0x0F) | ((q[:, :, 4:] & 0x0F) << 4)
    parts: list[np.ndarray] = [low.reshape(nb, t, 256)]
    if codes.bits == 5:
        fifth = (q >> 4) & 1
        high = np.zeros((nb, t, 16, 4), dtype=np.uint8)
        for j in range(8):
            high |= fifth[:, :, j] << j
        parts.append(high.reshape(nb, t, 64))
    for scale in (codes.d,) if codes.offset else (codes.d, codes.m):
        rows = scale.reshape(nb, 16, t).transpose(0, 2, 1)  # [nb, t, r]
        parts.append(np.ascontiguousarray(rows).view(np.uint8).reshape(nb, t, 32))
    return torch.from_numpy(np.concatenate(parts, axis=-1).reshape(-1).copy())


class Packed(NamedTuple):
    """A projection's codes laid out by ``pack``, as the decode step reads them."""

    data: torch.Tensor
    bits: int
    offset: int


def llama_rows(n: int, heads: int) -> np.ndarray:
    """The order in which the Hugging Face converter puts a Llama GGUF's q or k rows (``heads``
    of them): the file interleaves each head's two rotary halves for llama.cpp's rope."""
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


def fused(parts: Sequence[Codes]) -> Codes | None:
    """One projection's parts side by side (rows), in one form the kernel reads: Q4_0 parts
    beside Q5_0 ones as 5-bit codes ``q + 8`` with Q5_0's offset (the same weights); None where
    parts with an offset and parts with an m meet."""
    if len({p.offset == 0 for p in parts}) > 1:
        return None
    if any(p.bits == 5 for p in parts):
        parts = [p if p.bits == 5 else Codes(p.q + 8, p.d, _times(p.d, -16), 5, 16) for p in parts]
    return Codes(
        np.concatenate([p.q for p in parts]),
        np.concatenate([p.d for p in parts]),
        np.concatenate([p.m for p in parts]),
        parts[0].bits,
        parts[0].offset,
    )


def matches(codes: Codes | None, weight: torch.Tensor) -> bool:
    """Whether ``codes`` dequantized and rounded to ``weight``'s dtype are its rows."""
    if codes is None or tuple(codes.q.shape) != tuple(weight.shape):
        return False
    return torch.equal(torch.from_numpy(codes.dequantize()).to(weight.dtype), weight.cpu())


class Tensor(NamedTuple):
    """A GGUF file's tensor: GGML type, dimensions (innermost first), its bytes onward."""

    kind: int
    dims: tuple[int, ...]
    data: memoryview


def gguf_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a GGUF file (version 2 or 3), by name, their bytes mapped from the
    file. Its metadata is skipped, not parsed: gguf's own reader builds every value of it (a
    262k-token vocabulary: ~25 s, where this takes a fraction of a second)."""
    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    at = 0

    def take(fmt: str) -> Any:
        nonlocal at
        values = struct.unpack_from("<" + fmt, buf, at)
        at += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def text() -> str:
        nonlocal at
        n = take("Q")
        at += n
        return bytes(buf[at - n : at]).decode("utf-8", "replace")

    # The metadata's value types: fixed sizes, 8 a string, 9 an array.
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(kind: int) -> Any:
        nonlocal at
        if kind == 8:
            return text()
        if kind == 9:
            inner, count = take("I"), take("Q")
            if inner in sizes:
                at += sizes[inner] * count
            else:
                for _ in range(count):
                    skip(inner)
            return None
        value = buf[at : at + sizes[kind]]
        at += sizes[kind]
        return int.from_bytes(value, "little") if kind in (4, 10) else None

    magic, version, n_tensors, n_kv = take("4sIQQ")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{path}: not a GGUF file of version 2 or 3")
    alignment = 32
    for _ in range(n_kv):
        key = text()
        value = skip(take("I"))
        if key == "general.alignment" and isinstance(value, int):
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = text()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, take("I"), dims, take("Q")))
    start = -(-at // alignment) * alignment
    return {name: Tensor(kind, dims, buf[start + off :]) for name, kind, dims, off in infos}


def read_layers(
    gguf: Path, weights: Sequence[Sequence[torch.Tensor]], heads: tuple[int, int]
) -> list[list[Codes | None]]:
    """Per layer, per projection (``PARTS``), its codes where every part is in a format read
    here and they are the projection's ``weights`` (``[layer][projection]``); ``heads``: the
    model's query and key heads, for the Llama family's row order."""
    tensors = gguf_tensors(gguf)
    out: list[list[Codes | None]] = []
    for i, layer in enumerate(weights):
        row: list[Codes | None] = []
        for names, weight in zip(PARTS, layer, strict=True):
            parts = []
            for name in names:
                t = tensors.get(f"blk.{i}.{name}.weight")
                codes = None
                if t is not None and t.kind in BLOCK_BYTES and len(t.dims) == 2:
                    k, n = t.dims
                    size = n * k // BLOCK * BLOCK_BYTES[t.kind]
                    raw = np.frombuffer(t.data, np.uint8, size).reshape(n, -1)
                    codes = decode_blocks(raw, t.kind, k)
                if codes is None:
                    break
                parts.append(codes)
            if len(parts) < len(names):
                row.append(None)
                continue
            whole = fused(parts)
            if not matches(whole, weight) and names[0] == "attn_q":
                # The Llama family's q and k rows, reordered as the converter reorders them.
                q_rows, k_rows = (parts[0].q.shape[0], parts[1].q.shape[0])
                for p, h, rows in ((0, heads[0], q_rows), (1, heads[1], k_rows)):
                    parts[p] = parts[p].rows(llama_rows(rows, h))
                whole = fused(parts)
            row.append(whole if matches(whole, weight) else None)
        out.append(row)
    return out


def packed_layers(
    gguf: Callable[[], Path],
    source: str,
    weights: Sequence[Sequence[torch.Tensor]],
    heads: tuple[int, int],
    cache: Path | None,
) -> list[list[Packed | None]]:
    """``read_layers``' codes packed (``pack``) with their bits, kept in ``cache`` under the
    file's ``source`` digest: a later start reads that file alone. ``gguf``: finds the file
    (assembling an embedded one), called only when nothing is kept."""
    path = None if cache is None else cache / f"{LAYOUT}-{source[:24]}.safetensors"
    if path is not None and path.exists():
        try:
            return _unflatten(safetensors.torch.load_file(path), weights)
        except (OSError, KeyError, ValueError, safetensors.SafetensorError):
            pass  # unreadable: make it again and replace it
    try:
        read = read_layers(gguf(), weights, heads)
    except (OSError, ValueError, KeyError, struct.error) as exc:  # the file gone or not GGUF
        log.warning("the GGUF file's codes are not read (%s): decode keeps int8 copies", exc)
        return [[None] * len(layer) for layer in weights]
    log.info(
        "decode layers: %d of %d projections read the GGUF file's own codes",
        sum(c is not None for layer in read for c in layer),
        sum(len(layer) for layer in read),
    )
    packed = [
        [None if c is None else Packed(pack(c), c.bits, c.offset) for c in layer] for layer in read
    ]
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only cache: pack at every start
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            try:
                safetensors.torch.save_file(_flatten(packed), tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return packed


def decode_projections(model: CausalLM) -> list[list[DecodeInt8Linear]] | None:
    """Per layer, the int8 decode projections the decode step computes (qkv, o, gate_up,
    down), or None where the model has none or is not a family the kernels run."""
    from promptcache.engine.paged.native_decode import layers_of

    stack = layers_of(model)
    if stack is None:
        return None
    out: list[list[DecodeInt8Linear]] = []
    for layer in stack:
        row: list[nn.Module] = [layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down]
        kept = [p for p in row if isinstance(p, DecodeInt8Linear)]
        if len(kept) < len(row):
            return None
        out.append(kept)
    return out


def attach_packed(model: CausalLM, packed: Sequence[Sequence[Packed | None]]) -> int:
    """Give ``model``'s decode projections these codes (``[layer][projection]``, None: keep
    the int8 copy); returns how many have them."""
    projections = decode_projections(model) or []
    count = 0
    for layer, codes in zip(projections, packed, strict=True):
        for proj, item in zip(layer, codes, strict=True):
            proj.codes = item
            count += item is not None
    return count


def attach(model: CausalLM, gguf: Callable[[], Path], source: str, cache: Path | None) -> int:
    """Give ``model``'s int8 decode projections the codes of the GGUF file it was converted
    from (``packed_layers``) where they are read here; returns how many projections have them."""
    projections = decode_projections(model)
    if projections is None:
        return 0
    weights = [[p.dense.weight for p in layer] for layer in projections]
    shape = model.shape
    heads = (shape.num_heads, shape.num_kv_heads)
    return attach_packed(model, packed_layers(gguf, source, weights, heads, cache))


def _flatten(packed: list[list[Packed | None]]) -> dict[str, torch.Tensor]:
    out = {"layers": torch.tensor([len(packed)])}
    for i, layer in enumerate(packed):
        for j, item in enumerate(layer):
            if item is not None:
                out[f"{i}.{j}"] = item.data
                out[f"{i}.{j}.form"] = torch.tensor([item.bits, item.offset])
    return out


def _unflatten(
    saved: dict[str, torch.Tensor], weights: Sequence[Sequence[torch.Tensor]]
) -> list[list[Packed | None]]:
    if int(saved["layers"][0]) != len(weights):
        raise KeyError("another model's codes")
    out: list[list[Packed | None]] = []
    for i, layer in enumerate(weights):
        row: list[Packed | None] = []
        for j, weight in enumerate(layer):
            item = saved.get(f"{i}.{j}")
            if item is None:
                row.append(None)
                continue
            bits, offset = (int(v) for v in saved[f"{i}.{j}.form"])
            n, k = weight.shape
            if item.numel() != n // 16 * (k // BLOCK) * stride(bits, offset):
                raise KeyError("another model's codes")
            row.append(Packed(item, bits, offset))
        out.append(row)
    return out


def stride(bits: int, offset: int) -> int:
    """Bytes of one block of 16 rows (``kernels/codes.h``' ``codes_stride``)."""
    return 256 + (64 if bits == 5 else 0) + 32 + (32 if offset == 0 else 0)


__all__ = [
    "BLOCK",
    "Codes",
    "Packed",
    "Tensor",
    "attach",
    "attach_packed",
    "decode_blocks",
    "decode_projections",
    "fused",
    "gguf_tensors",
    "llama_rows",
    "matches",
    "pack",
    "packed_layers",
    "read_layers",
    "stride",
]
