"""A prompt chunk's whole forward in the engine's own kernels (``NativePrefill``): every layer
of the model for a step of one prefill chunk of at most ``MAX_ROWS`` tokens, in one call into
``kernels/steps.h``' ``prefill_step``.

A cache hit's suffix (64 tokens at a 4k prefix of Gemma 3 270M) spent ~13 of its ~64 ms in
what is not arithmetic: ~400 Python-level operations, the calls into the kernels around them
and the threads' start at each. Here the layers are one C++ loop over the kernels the PyTorch
forward calls (norms, rope, ``prefill_attention``, the sampled row's ``decode_attention``, the
gated activation) with the products by ``gemm_bf16``, which sums each output as oneDNN's packed
matmul does: the inputs cut into blocks, each block summed from 0, the blocks added in order.
The block is found for every weight when the model loads, by comparing the two on random rows
(``_calibrate``); a model whose products it does not reproduce bit for bit does not run here.
So a chunk computed here is the same bits as through PyTorch: a hit's suffix and the cold
prompt's chunk agree exactly whichever way each went (tested).

It takes the steps that are one prefill chunk and nothing else (a hit's suffix, a short
prompt, each chunk of a long one while no stream decodes), of models of the Gemma 3 and Llama
families without biases: bfloat16 ones on CPUs with AVX512-BF16, keeping a copy of the
layers' dense weights laid out for its products (``pair_dense``), so only for models whose
layers are at most ``MAX_BYTES``; and float32 ones wherever the kernels run (AVX2 included),
whose projections are already the engine's own (``models.panels``: ``gemm_f32``, read in
place, and ``prefill_attention_f32``), so the same bits by construction, no calibration.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from promptcache.engine.paged import native
from promptcache.engine.paged.attention import PagedAttention
from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.gemma3 import Gemma3Layer
from promptcache.engine.paged.models.int8 import DecodeInt8Linear
from promptcache.engine.paged.models.layers import Linear, kernel_act
from promptcache.engine.paged.models.llama import LlamaLayer
from promptcache.engine.paged.models.packed import PackedLinear
from promptcache.engine.paged.models.panels import PanelLinear
from promptcache.engine.paged.native_decode import (
    VNNI_GROUP,
    LayerStruct,
    NativeStep,
    StepStruct,
    fill_norms,
    fill_pool,
    layers_of,
    model_struct,
    norm_mode_of,
    step_function,
    vnni_twin,
    windows_of,
)

MAX_ROWS = 512
"""Chunk tokens up to which a step runs here: every chunk of a CPU's default step (256
tokens) and of one of 512. Hits at 4,096 + n on Gemma 3 270M, native against PyTorch in
turns: n = 128 120.7 vs 122.9 ms, 192 170.8 vs 176.8, 256 209.8 vs 222.3; a cold 4,160-token
prompt in 512-token chunks 2.63 vs 2.92 s (with ``gemm_bf16``'s memory fixes; before them,
3.07 vs 2.99 s)."""

MAX_BYTES = 1 << 30
"""The most bytes of dense layer weights copied for ``gemm_bf16``."""

_BLOCKS = (1024, 512, 256, 128, 64, 32)
"""Blocks of input pairs tried, after none (one sum over all the inputs)."""

CALIBRATION_ROWS = 1024
"""Random rows on which a shape's block must give oneDNN's bits (``_calibrate``): a wrong one
differs in ~1 of 60,000 outputs, so on the ~590,000 outputs of the smallest shape here (576 x
576) it shows ~10 times (a start spends ~0.13 s more than on 64 rows)."""


class NativePrefill(NativeStep):
    """``model``'s forward for steps of one prefill chunk, over the pool ``attn`` reads. Build
    it with ``NativePrefill.build``, which says None where the model is not one it runs."""

    integer = False
    """Whether the products are the decode step's integers (``build``'s ``integer``)."""

    @classmethod
    def build(
        cls, model: CausalLM, attn: PagedAttention, max_rows: int, *, integer: bool = False
    ) -> NativePrefill | None:
        """A ``NativePrefill`` for ``model`` where it runs (see the module's docstring). With
        ``integer``, its products are ``gemm_int8_vnni`` over its int8 decode copies, where
        ``integer_ready`` says they can be, else None."""
        norm_mode = norm_mode_of(model)
        kernels = native.kernels()
        if norm_mode is None or kernels is None:
            return None
        fn = step_function(kernels.library, "prefill", model, attn)
        if fn is None:
            return None
        if model.dtype == torch.bfloat16 and kernels.prefill is None:
            return None
        shape = model.shape
        groups, rest = divmod(shape.num_heads, shape.num_kv_heads)
        # prefill_attention's limits, and the last layer's query rows (multiples of 16).
        if rest or groups > 32 or shape.head_dim % 16 or (shape.num_heads * shape.head_dim) % 16:
            return None
        stack = layers_of(model)
        if stack is None:
            return None
        keep: list[torch.Tensor] = []
        fill: Fill | None = None
        if integer:
            fill = _twins(model, keep)
        elif model.dtype == torch.float32:
            fill = _panels(keep)
        elif model.dtype == torch.bfloat16:
            fill = _pairs(kernels.library, stack, keep)
        if fill is None:
            return None
        filled = _fill_layers(model, attn, stack, norm_mode, keep, fill)
        if filled is None:
            return None
        layers, act = filled
        width = _inputs(_projections(stack[0])[3])  # down's: the MLP's
        head = model_struct(model, layers, width, norm_mode, act, keep)
        built = cls(model, attn, fn, max_rows, layers, head, keep)
        built.integer = integer
        return built

    def covers(self, num_decode: int, chunks: list[int]) -> bool:
        """Whether a step of this kind runs here: one prefill chunk of at most ``max_rows``
        tokens, no decode rows."""
        return num_decode == 0 and len(chunks) == 1 and 0 < chunks[0] <= self.max_rows

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, sampled: bool
    ) -> torch.Tensor:
        """The final hidden state of the chunk ``attn`` planned: ``[1, hidden]`` for its last
        row where it is ``sampled``, else ``[0, hidden]`` (its keys and values written)."""
        hidden = self._model.shape.hidden_size
        out = torch.empty((1 if sampled else 0, hidden), dtype=self._model.dtype)
        step = StepStruct(out=out.data_ptr(), keep=int(sampled))
        chunk = self._attn.chunk_keys(self._windows)
        for i, (window, (slots, (key_pos, query_pos), mask)) in enumerate(
            zip(self._windows, chunk, strict=True)
        ):
            step.slots[i], step.widths[i] = slots.data_ptr(), slots.shape[0]
            step.masks[i] = None if mask is None else mask.data_ptr()
            step.key_pos[i], step.window_len[i] = key_pos, window or 0
            step.query_pos = query_pos
        self._run(input_ids, positions, step)
        return out


def integer_ready(model: CausalLM) -> bool:
    """Whether ``NativePrefill.build(..., integer=True)`` computes ``model``'s prompts in the
    decode step's integers: a model whose projections all have int8 decode copies the kernels
    take (no bias; outputs a multiple of 16, inputs of ``VNNI_GROUP``), on a CPU whose kernels
    multiply int8 rows (AVX512-VNNI or AVX2) and have its dtype's prompt step (bfloat16:
    AVX512-BF16; float32: AVX2 or AVX-512)."""
    kernels = native.kernels()
    if kernels is None or not kernels.library.pc_vnni_products():
        return False
    if model.dtype == torch.bfloat16:
        if kernels.prefill is None:
            return False
    elif model.dtype != torch.float32:
        return False
    if norm_mode_of(model) is None:
        return False
    stack = layers_of(model)
    if stack is None:
        return False
    for layer in stack:
        for proj in _projections(layer):
            if not isinstance(proj, DecodeInt8Linear) or proj.int8.bias is not None:
                return False
            q = proj.int8.q
            if q.dtype != torch.int8 or q.shape[0] % 16 or q.shape[1] % VNNI_GROUP:
                return False
    return True


def pair_dense(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (bfloat16, contiguous) laid out as ``gemm_bf16`` reads it: ``[N / 32,
    K / 2, 32, 2]``, 32 outputs side by side, two inputs each (by the engine's kernel where it
    runs: a PyTorch transpose of Gemma 3 270M's layers took ~0.4 s of every start)."""
    n, k = weight.shape
    kernels = native.kernels()
    if kernels is not None and kernels.prefill is not None:
        out = torch.empty(n // 32, k // 2, 32, 2, dtype=torch.bfloat16)
        fn = kernels.library.pc_pair_dense
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn(weight.data_ptr(), n, k // 2, out.data_ptr())
        return out
    return weight.view(n // 32, 32, k // 2, 2).permute(0, 2, 1, 3).contiguous()


Fill = Callable[[LayerStruct, int, nn.Module], bool]
"""Puts projection ``j`` of a layer in its struct (keeping what it points at), or says False
for one the prompt step does not take (``_fill_layers``)."""


def _pairs(
    library: Any, stack: list[Gemma3Layer | LlamaLayer], keep: list[torch.Tensor]
) -> Fill | None:
    """A bfloat16 model's: each projection's dense weight paired for ``gemm_bf16``, with the
    block that gives oneDNN's bits (``_calibrate``); None where a layer's is not one it
    computes or the copies would pass ``MAX_BYTES``."""
    shapes = [_shape(p) for layer in stack for p in _projections(layer)]
    if any(s is None for s in shapes):
        return None
    if sum(n * k * 2 for n, k in (s for s in shapes if s is not None)) > MAX_BYTES:
        return None
    gemm = library.pc_gemm_bf16
    gemm.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemm.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64]
    found: dict[tuple[int, int], tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def paired(struct: LayerStruct, j: int, proj: nn.Module) -> bool:
        # Each dense copy dropped once paired: the next one reuses its memory, and the
        # start pays for ~200 MB of fresh pages rather than ~400 (~0.3 s).
        pairs = pair_dense(_dense(proj))
        block = _calibrate(gemm, _module(proj), pairs, found)
        if block is None:
            return False
        keep.append(pairs)
        struct.dense[j], struct.dense_block[j] = pairs.data_ptr(), block
        return True

    return paired


def _twins(model: CausalLM, keep: list[torch.Tensor]) -> Fill | None:
    """Integer products (a bfloat16 or float32 model's), over the int8 decode copies shared
    with the decode step (``vnni_twin``): no dense copy, no calibration; None where
    ``integer_ready`` says they cannot be."""
    if not integer_ready(model):
        return None

    def twin(struct: LayerStruct, j: int, proj: nn.Module) -> bool:
        assert isinstance(proj, DecodeInt8Linear)  # integer_ready
        vnni, scales = vnni_twin(proj), proj.int8.scales
        keep.extend((vnni, scales))
        struct.vnni[j], struct.scales[j] = vnni.data_ptr(), scales.data_ptr()
        return True

    return twin


def _panels(keep: list[torch.Tensor]) -> Fill:
    """A float32 model's: its layers' projections are ``PanelLinear`` (the products the
    PyTorch forward computes by ``gemm_f32``), read where they are, no copy."""

    def panels(struct: LayerStruct, j: int, proj: nn.Module) -> bool:
        module = _module(proj)
        if not isinstance(module, PanelLinear) or module.bias is not None:
            return False
        keep.append(module.panels)
        struct.dense[j], struct.dense_block[j] = module.panels.data_ptr(), 0
        return True

    return panels


def _fill_layers(
    model: CausalLM,
    attn: PagedAttention,
    stack: list[Gemma3Layer | LlamaLayer],
    norm_mode: int,
    keep: list[torch.Tensor],
    fill: Fill,
) -> tuple[list[LayerStruct], int] | None:
    """Every layer's struct (norms, activation, pool) with its projection ``j`` put in by
    ``fill`` (which keeps what it points at in ``keep``, and says False for one the step does
    not take), and the layers' activation; None where the step does not run the model."""
    windows = windows_of(model)
    layers: list[LayerStruct] = []
    act: int | None = None
    for i, layer in enumerate(stack):
        started = _layer_struct(layer, norm_mode, keep, act)
        if started is None:
            return None
        struct, act = started
        for j, proj in enumerate(_projections(layer)):
            if not fill(struct, j, proj):
                return None
        fill_pool(struct, model, attn, i, windows)
        layers.append(struct)
    if act is None or not layers:
        return None
    return layers, act


def _layer_struct(
    layer: Gemma3Layer | LlamaLayer, norm_mode: int, keep: list[torch.Tensor], act: int | None
) -> tuple[LayerStruct, int] | None:
    """A layer's struct with its norms filled, and its activation's code; None where the
    kernels do not compute its norms or activation, or it is not the layers' one ``act``."""
    struct = LayerStruct()
    if not fill_norms(struct, layer, norm_mode, keep):
        return None
    layer_act = kernel_act(layer.mlp.act)
    if layer_act is None or (act is not None and layer_act != act):
        return None
    return struct, layer_act


def _projections(layer: Gemma3Layer | LlamaLayer) -> tuple[nn.Module, ...]:
    attn, mlp = layer.attn, layer.mlp
    return (attn.qkv, attn.o, mlp.gate_up, mlp.down)


def _module(proj: nn.Module) -> nn.Module:
    """What computes ``proj`` for prompt tokens (an int8 decode copy's dense twin)."""
    return proj.dense if isinstance(proj, DecodeInt8Linear) else proj


def _inputs(proj: nn.Module) -> int:
    """``proj``'s input width."""
    module = _module(proj)
    if isinstance(module, (PackedLinear, PanelLinear)):
        return module.in_features
    assert isinstance(module, Linear)
    return int(module.weight.shape[1])


def _shape(proj: nn.Module) -> tuple[int, int] | None:
    """``proj``'s weight shape ``(N, K)`` where ``gemm_bf16`` computes it (bfloat16, no bias,
    N a multiple of 32, K even), else None."""
    module = _module(proj)
    if getattr(module, "bias", None) is not None:
        return None
    if isinstance(module, PackedLinear):
        n, k = module.out_features, module.in_features
    elif isinstance(module, Linear) and module.weight.dtype == torch.bfloat16:
        n, k = module.weight.shape
    else:
        return None
    return (n, k) if n % 32 == 0 and k % 2 == 0 else None


def _dense(proj: nn.Module) -> torch.Tensor:
    """``proj``'s dense bfloat16 weight ``[N, K]`` (from oneDNN's packing where that is all
    there is); ``_shape`` said it is one ``gemm_bf16`` computes."""
    module = _module(proj)
    if isinstance(module, PackedLinear):
        weight: torch.Tensor = module.packed.to_dense()
    else:
        assert isinstance(module, Linear)
        weight = module.weight.detach()
    return weight.contiguous()


def _calibrate(
    gemm: Any,
    module: nn.Module,
    paired: torch.Tensor,
    found: dict[tuple[int, int], tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]],
) -> int | None:
    """The block of input pairs with which ``gemm_bf16`` computes what ``module`` (oneDNN)
    computes, the same bits on random rows, or None. ``found``: per shape, the block found
    before and a probe of 64 rows, tried first (for the next layer's weight of that shape).

    A wrong block changes a float32 sum in its last bits, which the rounding to bfloat16 hides
    but for ~1 output in 60,000: the first weight of a shape is probed with
    ``CALIBRATION_ROWS`` rows (SmolLM2's 576 x 960 took one sum over all its inputs for
    oneDNN's blocks of 256 pairs on 64 rows, then differed from oneDNN in every prompt of 60 tokens
    or more); the later ones of that shape with the block known, on 64."""
    n, k = paired.shape[0] * 32, paired.shape[1] * 2
    known = found.get((n, k))
    if known is None:
        gen = torch.Generator().manual_seed(n * 8191 + k)
        rows = [torch.randn(r, k, generator=gen).to(torch.bfloat16) for r in (CALIBRATION_ROWS, 5)]
        candidates = [k // 2, *(b for b in _BLOCKS if b < k // 2)]
    else:
        rows = [known[1][0][0]]
        candidates = [known[0], k // 2, *(b for b in _BLOCKS if b < k // 2 and b != known[0])]
    with torch.inference_mode():
        probes = [(x, module(x)) for x in rows]
    for block in candidates:
        if all(_same(gemm, x, want, paired, block) for x, want in probes):
            found[(n, k)] = (block, [(x[:64], want[:64]) for x, want in probes[:1]])
            return block
    return None


def _same(gemm: Any, x: torch.Tensor, want: torch.Tensor, paired: torch.Tensor, block: int) -> bool:
    """Whether ``gemm_bf16`` of ``x`` with ``block`` is ``want``, bit for bit."""
    rows, k = x.shape
    n = paired.shape[0] * 32
    got = torch.empty(rows, n, dtype=torch.bfloat16)
    gemm(x.data_ptr(), k, rows, k, paired.data_ptr(), n, block, got.data_ptr(), n)
    return torch.equal(got, want)


__all__ = ["MAX_BYTES", "MAX_ROWS", "NativePrefill", "pair_dense"]
