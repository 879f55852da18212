"""A whole narrow decode step in the engine's own CPU kernels (``NativeDecode``): every layer of
the model, for a few decode rows, in one call into ``kernels/steps.h``' ``decode_step``.

A decode step of Gemma 3 270M on two cores streams ~100 MB of int8 weights (~3.5 ms, prefetched
as they stream) and the 4-bit head (~2.7 ms); through PyTorch it took ~17 ms, the
rest being the fixed cost of ~400 small operations and their Python. Here the layers run as
plain loops over the same weights: the int8 products (one pass over each weight, split over
PyTorch's OpenMP threads), norms, rope, the KV write and attention, with no Python between.

It computes what the eager model computes in a narrow decode step (int8 weights, the same
roundings, float additions in another order), and it is taken by the kind of step alone (decode
rows only, at most ``MAX_ROWS``), like the int8 weights themselves: each row's products, norms
and attention are its own, so a sequence's tokens never depend on its neighbours, and a cache
hit decodes as the cold run did. One difference, where AVX512-VNNI is at hand (and on AVX2,
``integer_rows``): rows are quantized to int8 per group of ``VNNI_GROUP`` inputs and multiplied
by the int8 weights in integers (``vpdpbusd``, 64 byte products an instruction, exact; on AVX2
``vpmaddubsw``, the same sums) from a copy laid out for it
(``vnni_weight``: 16 output rows side by side, so each vector lane sums one output and no
horizontal sum is needed), as llama.cpp multiplies its quantized weights (its rows by blocks of
256 for Q4_K weights such as the embedded Gemma 3's). Teacher-forced over this repository's
docs Gemma 3 predicts as well as with bfloat16 rows (log-loss 4.327 vs 4.325,
``benchmarks/decode_quality.py``), and 8 rows' products take ~2/3 of the time. So the step
stays ahead of PyTorch well past a handful of rows (``MAX_ROWS``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from promptcache.engine.paged import native
from promptcache.engine.paged.attention import PagedAttention
from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.gemma3 import Gemma3, Gemma3Layer
from promptcache.engine.paged.models.int8 import DecodeInt8Linear
from promptcache.engine.paged.models.layers import OffsetRMSNorm, RMSNorm, kernel_act
from promptcache.engine.paged.models.llama import Llama, LlamaLayer

_P = ctypes.c_void_p
_MAX_TABLES = 4
"""Rope tables and key windows a step may carry (kernels/steps.h' arrays)."""


class LayerStruct(ctypes.Structure):
    _fields_ = [
        ("w", _P * 4),
        ("vnni", _P * 4),
        ("scales", _P * 4),
        ("bias", _P * 4),
        ("norm_w", _P * 4),
        ("norm_eps", ctypes.c_float * 4),
        ("head_norm", _P),
        ("head_eps", ctypes.c_float),
        ("rope", ctypes.c_int),
        ("window", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("keys", _P),
        ("values", _P),
        ("dense", _P * 4),
        ("dense_block", ctypes.c_int64 * 4),
        ("codes", _P * 4),
        ("code_bits", ctypes.c_int64 * 4),
        ("code_offset", ctypes.c_int64 * 4),
    ]


class ModelStruct(ctypes.Structure):
    _fields_ = [
        ("num_layers", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("norm_mode", ctypes.c_int),
        ("act", ctypes.c_int),
        ("final_norm", _P),
        ("final_eps", ctypes.c_float),
        ("layers", ctypes.POINTER(LayerStruct)),
    ]


class StepStruct(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int64),
        ("x", _P),
        ("cos", _P * _MAX_TABLES),
        ("sin", _P * _MAX_TABLES),
        ("slot_mapping", _P),
        ("slots", _P * _MAX_TABLES),
        ("masks", _P * _MAX_TABLES),
        ("widths", ctypes.c_int64 * _MAX_TABLES),
        ("out", _P),
        ("key_pos", ctypes.c_int64 * _MAX_TABLES),
        ("window_len", ctypes.c_int64 * _MAX_TABLES),
        ("query_pos", ctypes.c_int64),
        ("keep", ctypes.c_int64),
    ]


VNNI_GROUP = 64
"""Inputs per int8 scale of a row quantized for ``gemv_int8_vnni`` (kernels/products.h')."""


def integer_rows(library: Any, dtype: torch.dtype) -> bool:
    """Whether a decode step of a ``dtype`` model multiplies its rows in integers here
    (``gemv_int8_vnni``): bfloat16 or float32 rows wherever the library has the integer
    products (AVX512-VNNI's ``vpdpbusd``, else AVX2's ``vpmaddubsw``, on AVX-512 too). Float32
    is the default on CPUs without bfloat16 arithmetic: AVX2, and AVX-512 without BF16 (Intel's
    Skylake, Cascade Lake and Ice Lake servers), where 8 rows' float products of the int8
    weights took ~4x as long as the integer sums (Gemma 3 270M, 8 streams on Ice Lake's
    instruction set: 276 -> 698 tok/s, docs/benchmarks.md)."""
    if not library.pc_vnni_products():
        return False
    return dtype in (torch.bfloat16, torch.float32)


def step_function(library: Any, kind: str, model: CausalLM, attn: PagedAttention) -> Any:
    """The library's whole-step function ``pc_{kind}_step_*`` (``decode`` or ``prefill``) for
    ``model`` over ``attn``'s pool: the model's dtype, or a float16 pool under a float32 model
    (``--kv-dtype float16``) where the library has it; None where it has none (bfloat16
    prompts without AVX512-BF16, say)."""
    pool = attn.pool.dtype
    if pool == model.dtype and model.dtype in _DTYPES:
        return getattr(library, f"pc_{kind}_step_{_DTYPES[model.dtype]}", None)
    if model.dtype == torch.float32 and pool == torch.float16 and library.pc_kv16_available():
        return getattr(library, f"pc_{kind}_step_f32_kv16", None)
    return None


MAX_ROWS = 64
"""Decode rows up to which a step runs here. Gemma 3 270M on 2 cores, one process, whole engine
steps (head and sampling included) of the native step against PyTorch's path (dense bf16
matmuls past 4 rows), in turns, medians of two: with the integer products 16 rows 20.8 vs 38.1
ms, 24 rows 29.4 vs 48.7, 32 rows 52.5-53.6 vs 64.6-80.1, 48 rows 65-81 vs 89-103, 64 rows
104.8 vs 123.7, 96 rows 127.5 vs 161.4 (with the bfloat16 pairs before them, 32 rows were
even, so the limit was 24). Up to it, a stream's tokens are the same alone and beside others."""

_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeStep:
    """What the whole-step calls share (``NativeDecode``, ``native_prefill.NativePrefill``): the
    model's structs, kept with the tensors they point at, and a step's inputs."""

    def __init__(
        self,
        model: CausalLM,
        attn: PagedAttention,
        fn: Any,
        max_rows: int,
        layers: list[LayerStruct],
        head: ModelStruct,
        keep: list[torch.Tensor],
    ) -> None:
        self._model = model
        self._attn = attn
        self.max_rows = max_rows
        self._layers = (LayerStruct * len(layers))(*layers)
        head.layers = self._layers
        self._head = head
        self._keep = keep  # tensors whose memory the structs point at
        self._windows = windows_of(model)
        self._fn = fn
        self._fn.restype = None
        self._fn.argtypes = [ctypes.POINTER(ModelStruct), ctypes.POINTER(StepStruct)]
        self.num_steps = 0
        """Steps run here."""

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepStruct) -> None:
        """Fill ``step`` with the rows' embeddings, rope tables and slots (tensors held here
        until the call returns) and call the step."""
        model = self._model
        dtype = model.dtype
        if isinstance(model, Gemma3):
            x = torch.nn.functional.embedding(input_ids, model.embed) * model.embed_scale
            ropes: Sequence[tuple[torch.Tensor, torch.Tensor]] = [
                rotary(positions, dtype) for rotary in model.rotaries
            ]
        else:
            assert isinstance(model, Llama)
            x = torch.nn.functional.embedding(input_ids, model.embed)
            ropes = [model.rotary(positions, dtype)]
        step.rows, step.x = x.shape[0], x.data_ptr()
        for i, (cos, sin) in enumerate(ropes):
            step.cos[i], step.sin[i] = cos.data_ptr(), sin.data_ptr()
        step.slot_mapping = self._attn.slot_mapping.data_ptr()
        self._fn(ctypes.byref(self._head), ctypes.byref(step))
        self.num_steps += 1


def windows_of(model: CausalLM) -> list[int | None]:
    """The model's key windows in the order the structs index them (None, full, first)."""
    return sorted({s.window for s in model.attn_specs}, key=lambda w: -1 if w is None else w)


def norm_mode_of(model: CausalLM) -> int | None:
    """kernels/elementwise.h's NormMode for a model the whole-step kernels run (Gemma 3 or the Llama
    family, on a CPU, no attention softcapping, at most four rope tables and key windows);
    None for others. Checks that kernels/steps.h' structs are this module's."""
    kernels = native.kernels()
    if kernels is None or next(model.parameters()).device.type != "cpu":
        return None
    library = kernels.library
    sizes = (library.pc_sizeof_layer(), library.pc_sizeof_model(), library.pc_sizeof_step())
    if sizes != tuple(ctypes.sizeof(s) for s in (LayerStruct, ModelStruct, StepStruct)):
        raise RuntimeError("kernels/steps.h' structs and native_decode's disagree")
    if any(s.softcap is not None for s in model.attn_specs):
        return None
    if len(windows_of(model)) > _MAX_TABLES:
        return None
    if isinstance(model, Gemma3):
        return 0 if len(model.rotaries) <= _MAX_TABLES else None
    return 1 if isinstance(model, Llama) else None


def layers_of(model: CausalLM) -> list[Gemma3Layer | LlamaLayer] | None:
    """The model's layers where every one is of a family the kernels run, else None."""
    if not isinstance(model, (Gemma3, Llama)):
        return None
    stack = [layer for layer in model.layers if isinstance(layer, (Gemma3Layer, LlamaLayer))]
    return stack if len(stack) == len(model.layers) else None


def fill_pool(
    struct: LayerStruct, model: CausalLM, attn: PagedAttention, i: int, windows: list[int | None]
) -> None:
    """Point layer ``i``'s ``struct`` at its part of the pool, its key window and scale."""
    spec = model.attn_specs[i]
    struct.window = windows.index(spec.window)
    struct.scale = spec.scale
    struct.keys = attn.pool.keys(i).data_ptr()
    struct.values = attn.pool.values(i).data_ptr()


def model_struct(
    model: CausalLM,
    layers: list[LayerStruct],
    intermediate: int,
    norm_mode: int,
    act: int,
    keep: list[torch.Tensor],
) -> ModelStruct:
    """The ``ModelStruct`` of ``model``'s ``layers`` (its final norm's weight appended to
    ``keep``)."""
    final = model.norm
    assert isinstance(final, (RMSNorm, OffsetRMSNorm))
    weight, eps = final.kernel_args
    keep.append(weight)
    shape = model.shape
    return ModelStruct(
        num_layers=len(layers),
        hidden=shape.hidden_size,
        heads=shape.num_heads,
        kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        intermediate=intermediate,
        norm_mode=norm_mode,
        act=act,
        final_norm=weight.data_ptr(),
        final_eps=eps,
    )


class NativeDecode(NativeStep):
    """``model``'s forward for narrow decode steps (at most ``max_rows`` decode rows), over the
    pool ``attn`` reads. Build it with ``NativeDecode.build``, which says None where the model
    is not one it runs."""

    @classmethod
    def build(cls, model: CausalLM, attn: PagedAttention, max_rows: int) -> NativeDecode | None:
        """A ``NativeDecode`` for ``model`` where the kernels run here and the model is one
        they do (``norm_mode_of``), in bfloat16 or float32, every projection with int8 decode
        weights (``add_decode_int8``), gelu-tanh or SiLU."""
        norm_mode = norm_mode_of(model)
        kernels = native.kernels()
        if norm_mode is None or kernels is None or model.dtype not in _DTYPES:
            return None
        library = kernels.library
        fn = step_function(library, "decode", model, attn)
        if fn is None:
            return None
        windows = windows_of(model)
        keep: list[torch.Tensor] = []
        layers: list[LayerStruct] = []
        # Rows in integers multiply a copy of the int8 weights laid out for vpdpbusd
        # (kernels/products.h' gemv_int8_vnni; it costs the int8 weights' memory once more).
        vnni = integer_rows(library, model.dtype)
        if vnni:
            library.pc_vnni_group.restype = ctypes.c_int64
            if library.pc_vnni_group() != VNNI_GROUP:
                raise RuntimeError("kernels/products.h' VNNI_GROUP and native_decode's disagree")
        # A GGUF file's own codes (paged.codes, kernels/codes.h): rows in integers by vpdpbusd.
        codes = vnni and codes_products(library)
        act = None
        intermediate = 0
        stack = layers_of(model)
        if stack is None:
            return None
        for i, layer in enumerate(stack):
            struct = LayerStruct()
            layer_act = _fill_layer(struct, layer, norm_mode, keep, vnni=vnni, codes=codes)
            if layer_act is None or (act is not None and layer_act != act):
                return None
            act = layer_act
            fill_pool(struct, model, attn, i, windows)
            layers.append(struct)
            down = layer.mlp.down
            assert isinstance(down, DecodeInt8Linear)
            intermediate = int(down.int8.q.shape[1])
        if act is None or not layers:
            return None
        head = model_struct(model, layers, intermediate, norm_mode, act, keep)
        return cls(model, attn, fn, max_rows, layers, head, keep)

    def covers(self, num_decode: int, num_prefill_tokens: int) -> bool:
        """Whether a step of this kind runs here: decode rows only, at most ``max_rows``."""
        return num_prefill_tokens == 0 and 0 < num_decode <= self.max_rows

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``[rows, hidden]`` of the decode step ``attn`` planned."""
        out = torch.empty(
            (input_ids.shape[0], self._model.shape.hidden_size), dtype=self._model.dtype
        )
        step = StepStruct(out=out.data_ptr())
        for i, (slots, mask) in enumerate(self._attn.decode_keys(self._windows)):
            step.slots[i], step.masks[i] = slots.data_ptr(), _ptr(mask)
            step.widths[i] = slots.shape[1]
        self._run(input_ids, positions, step)
        return out


def codes_products(library: Any) -> bool:
    """Whether the library's decode steps read GGUF codes (``gemv_codes``: AVX512-VNNI, both
    dtypes' rows)."""
    fn = getattr(library, "pc_codes_products", None)
    return bool(fn is not None and fn())


def vnni_weight(q: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` (int8, contiguous) laid out as kernels/products.h' ``gemv_int8_vnni`` reads
    it: ``[N / 16, K / 4, 16, 4]`` bytes, 16 output rows side by side, four input columns
    each, as ``q + 128`` (unsigned: ``vpdpbusd`` multiplies unsigned bytes by signed ones).
    N a multiple of 16, K of 4."""
    n, k = q.shape
    # q + 128 is q's bits with the top one flipped; four inputs move together as one int32.
    biased = q.view(torch.uint8).bitwise_xor(0x80).view(torch.int32)
    return biased.view(n // 16, 16, k // 4).transpose(1, 2).contiguous().view(torch.uint8)


def vnni_twin(proj: DecodeInt8Linear) -> torch.Tensor:
    """``proj``'s int8 weight laid out by ``vnni_weight``, made once and kept on it: the decode
    step and the integer prompt step read the same copy."""
    if proj.vnni is None:
        proj.vnni = vnni_weight(proj.int8.q)
    return proj.vnni


def _fill_layer(
    struct: LayerStruct,
    layer: Gemma3Layer | LlamaLayer,
    norm_mode: int,
    keep: list[torch.Tensor],
    *,
    vnni: bool,
    codes: bool = False,
) -> int | None:
    """Point ``struct`` at ``layer``'s weights (their tensors appended to ``keep``; with
    ``vnni``, a copy of each int8 weight laid out by ``vnni_weight`` too; with ``codes``, a
    projection's GGUF codes where it has them, instead of that copy); returns the
    layer's activation (kernels/elementwise.h's Act), or None when the kernels do not run it."""
    if not fill_norms(struct, layer, norm_mode, keep):
        return None
    attn, mlp = layer.attn, layer.mlp
    for j, proj in enumerate((attn.qkv, attn.o, mlp.gate_up, mlp.down)):
        if not isinstance(proj, DecodeInt8Linear):
            return None
        q, scales, bias = proj.int8.q, proj.int8.scales, proj.int8.bias
        if not q.is_contiguous() or q.dtype != torch.int8:
            return None
        keep += [t for t in (q, scales, bias) if t is not None]
        struct.w[j], struct.scales[j], struct.bias[j] = _ptr(q), _ptr(scales), _ptr(bias)
        if codes and proj.codes is not None and q.shape[1] % VNNI_GROUP == 0:
            # The file's own codes (paged.codes): no vpdpbusd copy of the int8 weight.
            packed = proj.codes
            keep.append(packed.data)
            struct.codes[j], struct.code_bits[j] = packed.data.data_ptr(), packed.bits
            struct.code_offset[j] = packed.offset
        elif vnni and q.shape[0] % 16 == 0 and q.shape[1] % VNNI_GROUP == 0:
            twin = vnni_twin(proj)
            keep.append(twin)
            struct.vnni[j] = twin.data_ptr()
    return kernel_act(mlp.act)


def fill_norms(
    struct: LayerStruct, layer: Gemma3Layer | LlamaLayer, norm_mode: int, keep: list[torch.Tensor]
) -> bool:
    """Point ``struct`` at ``layer``'s norms, q/k norm and rope table (their tensors appended to
    ``keep``); False when the kernels do not run them."""
    attn = layer.attn
    norms: list[RMSNorm | OffsetRMSNorm | None]
    if isinstance(layer, Gemma3Layer):
        norms = [layer.input_norm, layer.post_attn_norm, layer.pre_mlp_norm, layer.post_mlp_norm]
        struct.rope = layer.rope
    else:
        norms = [layer.input_norm, None, layer.post_attn_norm, None]
        struct.rope = 0 if layer.use_rope else -1
    kind = OffsetRMSNorm if norm_mode == 0 else RMSNorm
    if not all(n is None or isinstance(n, kind) for n in norms):
        return False
    head_norm = attn.head_norm
    if head_norm is not None and head_norm.offset != (norm_mode == 0):
        return False
    for j, norm in enumerate(norms):
        if norm is not None:
            weight, eps = norm.kernel_args
            keep.append(weight)
            struct.norm_w[j], struct.norm_eps[j] = weight.data_ptr(), eps
    if head_norm is not None:
        keep.append(head_norm.table)
        struct.head_norm, struct.head_eps = head_norm.table.data_ptr(), head_norm.eps
    return True


__all__ = [
    "MAX_ROWS",
    "LayerStruct",
    "ModelStruct",
    "NativeDecode",
    "NativeStep",
    "StepStruct",
    "codes_products",
    "fill_norms",
    "fill_pool",
    "integer_rows",
    "layers_of",
    "model_struct",
    "norm_mode_of",
    "step_function",
    "vnni_weight",
    "windows_of",
]
