"""Weight-only int8 quantization of a lean model's projections (``quantize_int8``).

Symmetric, one scale per output channel: ``W ≈ q * s`` with ``q`` int8 and ``s`` in the model
dtype. On CPU the matmul is PyTorch's own ``torch._weight_int8pack_mm`` (int8 weights read
directly, so decode moves half the bytes of bf16; float32 rows as bfloat16 where its kernels
want them, ``kernel_dtype``). Elsewhere it falls back to dequantizing per call, which saves
memory but not time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.int4 import RescoredHead, int4_supported
from promptcache.engine.paged.models.layers import Linear, frozen

if TYPE_CHECKING:
    from promptcache.engine.paged.codes import Packed


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: ``q [out, in]`` int8 and ``scales [out]`` in ``dtype`` with
    ``q * scales ≈ weight``. Rounding uses the scales as stored, so ``q * scales`` is exactly the
    weight the kernel multiplies by. ``q`` is symmetric, -127..127 (a scale rounded to its dtype
    may sit below max / 127, but by less than half a step): ``q + 128`` fits a byte and a group's
    integer sum an exact float (native_decode.vnni_weight, kernels/products.h')."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rows of ``dtype`` are multiplied in by ``torch._weight_int8pack_mm`` on a CPU:
    bfloat16 for float32 rows where PyTorch runs its x86 kernels (AVX2, AVX-512: vector code
    for bfloat16 and half rows only; float32 rows take a scalar loop, 5x slower than the dense
    float32 matmul the copy stands in for: Gemma 3 270M decoded 15 tok/s with it, 43 with the
    rows rounded to bfloat16), else ``dtype`` (its ARM kernel is vector code for all three)."""
    if dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return torch.bfloat16
    return dtype


class Int8Linear(nn.Module):
    """``y = x (q * s)^T + b`` with int8 ``q`` and per-output-channel ``s``. On a CPU float32
    rows may be multiplied as bfloat16 (``kernel_dtype``): their inputs and outputs rounded to
    8 bits of mantissa, an error of the order of the int8 weight's own (per-channel: up to
    1/254 of the channel's largest weight)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.q = frozen(q)
        self.scales = frozen(scales)
        self.bias = None if bias is None else frozen(bias)
        dtype = kernel_dtype(scales.dtype)
        self.kernel_scales: torch.Tensor = (
            self.scales if dtype == scales.dtype else scales.to(dtype)
        )
        """The scales in the dtype the CPU kernel multiplies this layer's rows in (a CPU
        kernel's: not a parameter, never moved to another device)."""

    @classmethod
    def from_linear(cls, linear: Linear) -> Int8Linear:
        dtype = linear.weight.dtype
        q, scales = quantize_weight(linear.weight, dtype)
        return cls(q, scales, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, ``[out, in]`` in the scales' dtype."""
        return self.q.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            # The kernel takes a 2-D activation, contiguous in its last dim, and scales of the
            # activation's dtype: for the model's own dtype chosen at construction (a compiled
            # graph traces this, and ``kernel_dtype``'s CPU query does not trace).
            scales = self.kernel_scales
            if x.dtype != self.scales.dtype:
                scales = self.scales.to(kernel_dtype(x.dtype))
            flat = x.reshape(-1, x.shape[-1]).to(scales.dtype)
            if flat.stride(-1) != 1:
                flat = flat.contiguous()
            out = torch._weight_int8pack_mm(flat, self.q, scales).view(*x.shape[:-1], -1)
            out = out.to(x.dtype)
        else:
            out = F.linear(x, self.q.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias


class DecodeSwitch:
    """Whether the step in hand is a narrow decode step: set by the engine before each forward,
    read by every ``DecodeInt8Linear`` of its model."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.on = False

    def set_step(self, num_decode: int, num_prefill_tokens: int) -> None:
        """A step of ``num_decode`` decode tokens and ``num_prefill_tokens`` prompt tokens."""
        self.on = num_prefill_tokens == 0 and 0 < num_decode <= self.max_rows


class DecodeInt8Linear(nn.Module):
    """A projection with both weights: int8 in narrow decode steps (at most a few tokens, all
    of them decode tokens: a CPU matmul of so few rows is bound by the bytes of the weight it
    reads, and int8 halves them), the dense weight in every step that carries prompt tokens and
    in wide batches (where int8's kernel is slower than the dense one).

    The choice depends on the kind of step, never on a row's neighbours in it, so prompt tokens
    are always computed with the dense weights: a cache hit reproduces the cold run's KV and
    first token exactly. Costs the int8 copy's memory on top of the dense weight."""

    def __init__(self, dense: Linear, switch: DecodeSwitch, *, by_rows: bool = False) -> None:
        """``by_rows``: choose by this call's own row count instead of the step's kind (the
        lm_head, which sees only the sampled rows: one per sequence, the same number for a
        sequence alone whether its step was a prefill or a decode)."""
        super().__init__()
        self.dense = dense
        self.int8 = Int8Linear.from_linear(dense)
        self.switch = switch
        self.by_rows = by_rows
        self.codes: Packed | None = None
        """The GGUF file's own codes of this weight laid out for the engine's decode step
        (``paged.codes.Packed``), where they are at hand: it reads them instead of the int8
        copy."""
        self.vnni: torch.Tensor | None = None
        """The int8 weight laid out for the engine's integer products (``native_decode.
        vnni_twin``, made once for the decode and prompt steps that read it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.by_rows or torch.compiler.is_dynamo_compiling():
            # Compiled graphs run decode steps only (``compiled.CompiledDecode``): the row count
            # decides there, a guard on the shape, where one on the switch would tie the graph
            # to a value the engine's thread changes. ``is_dynamo_compiling`` is True only in
            # code Dynamo traces: ``is_compiling`` reads a process-wide flag, True on the
            # engine's thread too while the compile thread traces.
            narrow = x.numel() // x.shape[-1] <= self.switch.max_rows
        else:
            narrow = self.switch.on
        out: torch.Tensor = self.int8(x) if narrow else self.dense(x)
        return out


NARROW_ROWS = 4
"""Decode rows up to which PyTorch's int8 kernel multiplies a step's projections: past ~8
bfloat16 rows it is slower than the dense matmul (Gemma 3 270M's projections on 2 cores: 8 rows
27 vs 29 ms, 16 rows 44 vs 32 ms). The engine's own decode step (``native_decode``) has its own
bound."""

NARROW_ROWS_AS_BF16 = 64
"""The same for a float32 model whose rows the kernel takes as bfloat16 (``kernel_dtype``): the
dense float32 matmul reads twice the bytes of bfloat16 weights and four times int8's, and at 64
rows it is still the slower (168 vs 123 ms)."""


def narrow_rows(dtype: torch.dtype) -> int:
    """``NARROW_ROWS`` for a model of ``dtype``, or ``NARROW_ROWS_AS_BF16``."""
    if dtype == torch.float32 and kernel_dtype(dtype) != dtype:
        return NARROW_ROWS_AS_BF16
    return NARROW_ROWS


def add_decode_int8(
    model: CausalLM, *, max_rows: int | None = None, head_cache: Path | None = None
) -> DecodeSwitch:
    """Give every projection an int8 copy for narrow decode steps of at most ``max_rows`` tokens
    (``DecodeInt8Linear``; None: ``narrow_rows`` of the model's dtype), in place, and the
    lm_head a cheaper copy with exact rescoring of its best rows (``RescoredHead``, on a CPU,
    an int4 copy kept in ``head_cache`` between starts). Returns the switch the engine sets
    before each step."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    if max_rows is None:
        max_rows = narrow_rows(targets[0][1].weight.dtype) if targets else NARROW_ROWS
    switch = DecodeSwitch(max_rows)
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement: nn.Module
        if name == "lm_head" and int4_supported(module):
            replacement = RescoredHead(module, int8_in_background=True, cache=head_cache)
        else:
            replacement = DecodeInt8Linear(module, switch, by_rows=name == "lm_head")
        setattr(parent, attr, replacement)
    return switch


def quantize_int8(model: CausalLM, *, lm_head: bool = False) -> CausalLM:
    """Replace ``model``'s projections (q/k/v, o, gate/up, down) with ``Int8Linear`` in place,
    and the lm_head too when ``lm_head`` (for Gemma's 262k vocabulary it is the largest matmul
    of a decode step; with tied embeddings it becomes a separate int8 copy, the embedding table
    stays as it is). Embeddings and norms are never quantized. Returns ``model``.

    The replaced weights are freed once nothing else holds them: a transformers model that
    ``from_hf`` shared storage with still does, so drop it first to get the memory back.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Linear) and (lm_head or name != "lm_head")
    ]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(module))
    return model
