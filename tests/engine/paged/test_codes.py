"""Decode layers on a GGUF file's own codes (``paged.codes``, ``kernels/codes.h``): the blocks
read as gguf reads them, the kernel multiplies the file's weights, only weights that are the
model's are taken, the layout is kept, and an engine on them decodes alike alone and batched
and keeps hits exact."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.engine.paged import codes, native
from promptcache.engine.paged.codes import Codes, Packed
from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.models.int8 import DecodeInt8Linear
from promptcache.engine.paged.native_decode import VNNI_GROUP, codes_products
from tests.engine.paged.test_int8 import assert_hits_exact
from tests.engine.paged.test_native_decode import (
    alone_and_together,
    one_step,
    quantized_rows,
    tolerance,
)

Q = GGMLQuantizationType
READ = [Q.Q4_0, Q.Q4_1, Q.Q5_0]

KERNELS = native.kernels()
needs_kernel = pytest.mark.skipif(
    KERNELS is None or not codes_products(KERNELS.library), reason="no AVX512-VNNI here"
)


def blocks(weight: np.ndarray, kind: Q) -> np.ndarray:
    """``weight [N, K]`` quantized by gguf into ``kind``'s blocks ``[N, bytes]``."""
    return np.asarray(quants.quantize(weight.astype(np.float32), kind))


def coded(weight: np.ndarray, kind: Q) -> Codes:
    found = codes.decode_blocks(blocks(weight, kind), int(kind), weight.shape[1])
    assert found is not None
    return found


@pytest.mark.parametrize("kind", READ)
def test_blocks_read_as_gguf_dequantizes_them(kind: Q) -> None:
    rng = np.random.default_rng(int(kind))
    weight = rng.standard_normal((48, 128)).astype(np.float32) * 0.05
    raw = blocks(weight, kind)
    found = codes.decode_blocks(raw, int(kind), 128)
    assert found is not None
    assert found.bits == (5 if kind == Q.Q5_0 else 4)
    assert int(found.q.max()) < 2**found.bits
    want = np.asarray(quants.dequantize(raw, kind)).reshape(48, 128)
    assert np.array_equal(found.dequantize(), want)
    assert codes.decode_blocks(blocks(weight, Q.Q8_0), int(Q.Q8_0), 128) is None


def test_parts_fuse_in_one_form_or_not_at_all() -> None:
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((16, 64)).astype(np.float32) for _ in range(2))
    # Q4_0 beside Q5_0: 5-bit codes q + 8 with Q5_0's offset, the same weights.
    both = codes.fused([coded(a, Q.Q4_0), coded(b, Q.Q5_0)])
    assert both is not None and both.bits == 5 and both.offset == 16
    want = np.concatenate([coded(a, Q.Q4_0).dequantize(), coded(b, Q.Q5_0).dequantize()])
    assert np.array_equal(both.dequantize(), want)
    # An offset beside an m: no one form.
    assert codes.fused([coded(a, Q.Q4_1), coded(b, Q.Q5_0)]) is None


def gemv(packed: Packed, x: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    assert KERNELS is not None
    name = "bf16" if x.dtype == torch.bfloat16 else "f32"
    fn = getattr(KERNELS.library, f"pc_gemv_codes_{name}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.restype, fn.argtypes = None, [ptr, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr]
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    scratch = torch.empty(x.numel() * 2 + 64, dtype=torch.uint8)
    fn(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        packed.data.data_ptr(),
        packed.bits,
        packed.offset,
        None if bias is None else bias.data_ptr(),
        n,
        y.data_ptr(),
        scratch.data_ptr(),
    )
    return y


@needs_kernel
@pytest.mark.parametrize("kind", READ)
@pytest.mark.parametrize(("n", "k"), [(16, 64), (48, 576), (96, 640)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_multiplies_the_files_weights(
    kind: Q, n: int, k: int, with_bias: bool, dtype: torch.dtype
) -> None:
    """Rows quantized as the int8 products quantize them (per group of 64) times the file's
    weights: against the same product in float64, to a rounding of the rows' dtype; each row's
    outputs the same bits alone as beside up to 8 others."""
    rng = np.random.default_rng(n + k)
    weight = coded(rng.standard_normal((n, k)).astype(np.float32) * 0.05, kind)
    packed = Packed(codes.pack(weight), weight.bits, weight.offset)
    assert packed.data.numel() == n // 16 * (k // 32) * codes.stride(weight.bits, weight.offset)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=gen).to(dtype)
    x[1, :VNNI_GROUP] = 0  # alpha 0
    x[2, 3] = 300.0  # the rest of its group rounds to a few levels
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    got = gemv(packed, x, n, bias)
    a, alpha = quantized_rows(x, VNNI_GROUP)
    rows = (a.double() * alpha.double()[..., None]).view(9, k)
    want = rows @ torch.from_numpy(weight.dequantize()).double().T
    if bias is not None:
        want = want.to(dtype).double() + bias.double()
    scale = want.abs().max().item()
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-4 * scale * rtol / 8e-3)
    for b in range(1, 9):
        assert torch.equal(gemv(packed, x[:b], n, bias), got[:b])
    for i in range(9):
        assert torch.equal(gemv(packed, x[i : i + 1], n, bias), got[i : i + 1])


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    writer = GGUFWriter(str(path), "llama")
    for name, (weight, kind) in tensors.items():
        writer.add_tensor(name, blocks(weight, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def layer_file(
    tmp_path: Path, heads: tuple[int, int], *, reorder: bool = False
) -> tuple[Path, list[torch.Tensor]]:
    """A one-layer GGUF file (q, k, v Q5_0 / Q4_0; o Q8_0; gate, up Q4_1; down Q4_0) and the
    weights a converter would make of it (the parts dequantized, fused, in bfloat16); with
    ``reorder``, q and k stored in the order llama.cpp's converter writes them."""
    rng = np.random.default_rng(7)
    d, kv = 16, heads[1]

    def w(n: int, k: int) -> np.ndarray:
        return rng.standard_normal((n, k)).astype(np.float32) * 0.05

    parts = {
        "attn_q": (w(heads[0] * d, 64), Q.Q5_0),
        "attn_k": (w(kv * d, 64), Q.Q5_0),
        "attn_v": (w(kv * d, 64), Q.Q4_0),
        "attn_output": (w(64, heads[0] * d), Q.Q8_0),
        "ffn_gate": (w(128, 64), Q.Q4_1),
        "ffn_up": (w(128, 64), Q.Q4_1),
        "ffn_down": (w(64, 128), Q.Q4_0),
    }
    deq = {}
    for name, (weight, kind) in parts.items():
        deq[name] = np.asarray(quants.dequantize(blocks(weight, kind), kind)).reshape(weight.shape)
    stored = dict(parts)
    if reorder:  # the file holds the rows in the order the converter's order undoes
        for name, h in (("attn_q", heads[0]), ("attn_k", heads[1])):
            weight, kind = parts[name]
            order = codes.llama_rows(weight.shape[0], h)
            stored[name] = (weight[np.argsort(order)], kind)
            raw = blocks(stored[name][0], kind)
            deq[name] = np.asarray(quants.dequantize(raw, kind)).reshape(weight.shape)[order]
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {f"blk.0.{name}.weight": value for name, value in stored.items()})

    def bf16(*names: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([deq[n] for n in names])).to(torch.bfloat16)

    weights = [
        bf16("attn_q", "attn_k", "attn_v"),
        bf16("attn_output"),
        bf16("ffn_gate", "ffn_up"),
        bf16("ffn_down"),
    ]
    return path, weights


def test_a_files_tensors_read_as_ggufs_reader_reads_them(tmp_path: Path) -> None:
    path, _ = layer_file(tmp_path, (4, 2))
    mine = codes.gguf_tensors(path)
    theirs = GGUFReader(path).tensors
    assert sorted(mine) == sorted(t.name for t in theirs)
    for t in theirs:
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        assert mine[t.name].kind == int(t.tensor_type)
        assert mine[t.name].dims == tuple(int(x) for x in t.shape)
        assert bytes(mine[t.name].data[: raw.nbytes]) == raw.tobytes()


@pytest.mark.parametrize("reorder", [False, True])
def test_a_files_codes_are_taken_where_they_are_the_models_weights(
    tmp_path: Path, reorder: bool
) -> None:
    path, weights = layer_file(tmp_path, (4, 2), reorder=reorder)
    (found,) = codes.read_layers(path, [weights], (4, 2))
    qkv, o, gate_up, down = found
    assert o is None  # Q8_0: the int8 copy
    assert qkv is not None and qkv.bits == 5 and qkv.offset == 16  # Q4_0 v beside Q5_0 q, k
    assert gate_up is not None and gate_up.offset == 0  # Q4_1
    assert down is not None and down.bits == 4 and down.offset == 8
    for c, weight in zip((qkv, gate_up, down), (weights[0], weights[2], weights[3]), strict=True):
        assert torch.equal(torch.from_numpy(c.dequantize()).to(torch.bfloat16), weight)
    # Weights that are not the file's: not taken.
    other = [w.clone() for w in weights]
    other[2][5, 7] += 1.0
    (found,) = codes.read_layers(path, [other], (4, 2))
    assert found[2] is None and found[3] is not None


def test_the_layout_is_kept_for_the_next_start(tmp_path: Path) -> None:
    path, weights = layer_file(tmp_path, (4, 2))
    cache = tmp_path / "cache"
    first = codes.packed_layers(lambda: path, "sha-of-the-file", [weights], (4, 2), cache)

    def no_file() -> Path:
        raise AssertionError("the kept layout is read, not the file")

    again = codes.packed_layers(no_file, "sha-of-the-file", [weights], (4, 2), cache)
    for a, b in zip(first[0], again[0], strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert torch.equal(a.data, b.data) and (a.bits, a.offset) == (b.bits, b.offset)
    # Another model's weights: made anew, not another model's layout taken.
    smaller = [w[:16] for w in weights]
    redone = codes.packed_layers(lambda: path, "sha-of-the-file", [smaller], (4, 2), cache)
    assert all(item is None for item in redone[0])


def test_a_file_that_cannot_be_read_leaves_the_int8_copies(tmp_path: Path) -> None:
    _, weights = layer_file(tmp_path, (4, 2))
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a GGUF file at all")

    def missing() -> Path:
        raise FileNotFoundError("no such file")

    for finder in (missing, lambda: bad):
        found = codes.packed_layers(finder, "sha", [weights], (4, 2), tmp_path / "cache")
        assert found == [[None] * 4]


WEIGHTS: dict[int, torch.Tensor] = {}
"""The file's weights (float64) of each coded projection of the engines made here, by id."""


@contextlib.contextmanager
def codes_reference() -> Iterator[None]:
    """The PyTorch model's narrow decode projections computing what the decode step computes
    on the codes: the rows quantized per group of 64 (``quantized_rows``) times the file's
    weights, in float64, rounded to the rows' dtype (then the bias added and rounded)."""
    plain = DecodeInt8Linear.forward

    def forward(self: DecodeInt8Linear, x: torch.Tensor) -> torch.Tensor:
        weight = WEIGHTS.get(id(self))
        if weight is None or not self.switch.on:
            return plain(self, x)
        flat = x.reshape(-1, x.shape[-1])
        a, alpha = quantized_rows(flat, VNNI_GROUP)
        rows = (a.double() * alpha.double()[..., None]).view(flat.shape)
        out = (rows @ weight.T).to(x.dtype)
        bias = self.dense.bias
        if bias is not None:
            out = (out.double() + bias.double()).to(x.dtype)
        return out.view(*x.shape[:-1], -1)

    with mock.patch.object(DecodeInt8Linear, "forward", forward):
        yield


def coded_engine(kind: str, dtype: torch.dtype = torch.bfloat16) -> PagedEngine:
    """A tiny engine whose weights are those of a file's blocks (q, k, v and down Q5_0, o
    Q4_0, gate and up Q4_1) and whose decode projections read those blocks."""
    # Plain float32 Linears (no panels): their weights are replaced below.
    engine = build_tiny_engine(kind, dtype=dtype, decode_int8=True, panels=False)
    projections = codes.decode_projections(engine._model)
    assert projections is not None
    forms = (Q.Q5_0, Q.Q4_0, Q.Q4_1, Q.Q5_0)
    packed: list[list[Packed | None]] = []
    for layer in projections:
        row: list[Packed | None] = []
        for proj, kind_ in zip(layer, forms, strict=True):
            c = coded(proj.dense.weight.float().numpy(), kind_)
            # The model's weights become the file's: dense (prompts) and int8 copy alike.
            proj.dense.weight.data.copy_(torch.from_numpy(c.dequantize()).to(dtype))
            proj.int8 = type(proj.int8).from_linear(proj.dense)
            row.append(Packed(codes.pack(c), c.bits, c.offset))
            WEIGHTS[id(proj)] = torch.from_numpy(c.dequantize()).double()
        packed.append(row)
    assert codes.attach_packed(engine._model, packed) == 4 * len(projections)
    # The decode step built again, now reading the codes.
    step = engine.native_decode
    assert step is not None
    engine.native_decode = type(step).build(engine._model, engine._attn, step.max_rows)
    assert engine.native_decode is not None
    assert all(all(layer.codes) for layer in engine.native_decode._layers)
    return engine


@needs_kernel
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_step_on_the_codes_computes_what_the_model_does(
    kind: str, rows: int, dtype: torch.dtype
) -> None:
    """Against the PyTorch model's step computing the same products (``codes_reference``);
    the keys and values both write alike too (``one_step``)."""
    engine = coded_engine(kind, dtype)
    with codes_reference():
        fast, slow = one_step(engine, rows)
    torch.testing.assert_close(fast, slow, **tolerance(dtype))


@needs_kernel
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_engine_on_the_codes_keeps_hits_exact(kind: str, dtype: torch.dtype) -> None:
    engine = coded_engine(kind, dtype)
    assert engine.native_decode is not None
    assert_hits_exact(engine)
    assert engine.native_decode.num_steps > 0


@needs_kernel
def test_a_stream_on_the_codes_decodes_the_same_alone_and_beside_others() -> None:
    alone, together = alone_and_together(coded_engine("gemma3"))
    assert together == alone
    assert all(len(t) > 1 for t in alone)
