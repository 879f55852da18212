"""A vocabulary projection that reads int4 weights, then rescores its best rows exactly
(``RescoredHead``).

The lm_head of a large-vocabulary model is the biggest matmul of a CPU decode step (Gemma 3's
262k x 640 is 168 MB in int8, against ~100 MB for all its layers), and a step of one token is
bound by the bytes it reads. Group-wise int4 (PyTorch's own ``_weight_int4pack_mm_for_cpu``)
reads half of int8's bytes, but int4 alone would move the logits that decide the next token.
So the head computes every logit in int4, takes the ``candidates`` highest, and recomputes
those with the dense weight, in place: the tokens that can win are scored exactly as without
quantization, and only the tail of the distribution (which greedy decoding never picks and
sampling reaches with vanishing probability) keeps int4 values.

Each row is computed on its own, with the same weights whatever else is in the batch and
whether its step was a prefill or a decode: a cache hit and a cold run score their first token
alike, and so do a sequence alone and one in a batch.

Two ways to compute the approximate scores, each one kernel for every row count. Where the
engine's own kernels run with AVX512-VNNI or AVX2 (``kernels/head.h``' ``int4_logits``): the
activations quantized to int8 per group of 64 and multiplied by the 4-bit weights in integers
(``vpdpbusd``) from a layout of its own (``pack_int4_native``), prefetched as it streams; Gemma
3's head on 2 cores: one row 2.7 ms, 8 rows 4.0 ms. Elsewhere an int8 copy through PyTorch's
quantized engine (``quantized.linear_dynamic``: fbgemm on x86, qnnpack on ARM; one row 4.6 ms,
8 rows 6.6 ms), each row scaled to one fixed range first (``int8_logits``), else PyTorch's
``_weight_int4pack_mm_for_cpu`` (one row 4.5 ms, 8 rows 16 ms).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from promptcache.engine import threads
from promptcache.engine.paged import native
from promptcache.engine.paged.models.layers import Linear, frozen

GROUP_SIZE = 64
"""Weights per int4 scale. The scales are read with the weights (bfloat16 scale and zero per
group: at 32, 21 MB beside Gemma 3's 84 MB of packed weights); 64 halves them for 0.4 ms less a
one-row step, and the dense winner stays inside the 32 candidates (docs/benchmarks.md). Gemma
3 270M's 640 and SmolLM2's 576 features both divide by 64."""

CANDIDATES = 32
"""Rows rescored with the dense weight. The dense winner falls outside int4's top 32 only when
int4's error exceeds the gap between the winner and the 32nd logit; on Gemma 3 270M's head it
never did (docs/benchmarks.md: the int4 head's agreement with the dense one)."""


def _quantize_int4(
    weight: torch.Tensor, group_size: int, *, as_stored: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scales, low)``: ``q [out, in / group, group]`` in 0..15 (uint8) with ``w ≈ q *
    scale + low`` per group of ``group_size`` inputs; ``scales`` and ``low [out, in / group]``
    in float32. The output rows are padded with zeros to a multiple of 16 (what both int4
    kernels take). ``as_stored``: the scales and lows rounded to bfloat16 first, and ``q``
    rounded against them."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"{in_features} input features are not a multiple of {group_size}")
    w = weight.detach().float()
    if out_features % 16:
        w = torch.cat([w, w.new_zeros(16 - out_features % 16, in_features)])
        out_features = w.shape[0]
    w = w.reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-6)
    if as_stored:
        scales = scales.to(torch.bfloat16).float()
        low = low.to(torch.bfloat16).float()
    q = ((w - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q, scales, low


def pack_int4_native(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scale_low)`` for ``kernels/head.h``' ``int4_logits`` (the layout is described
    there): groups of 64 inputs, 16 output rows side by side, two inputs a byte; the scale and
    low of each group in bfloat16, the 4-bit values rounded against them as stored."""
    q, scales, low = _quantize_int4(weight, native.INT4_GROUP, as_stored=True)
    blocks, groups = q.shape[0] // 16, q.shape[1]
    # [block, row, group, step, half, input] -> [block, group, step, half, row, input]
    q = q.view(blocks, 16, groups, 8, 2, 4).permute(0, 2, 3, 4, 1, 5)
    packed = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(blocks, groups, 8, 64).contiguous()
    scale_low = torch.stack([scales, low]).view(2, blocks, 16, groups).permute(1, 3, 0, 2)
    return packed, scale_low.to(torch.bfloat16).contiguous()


def pack_int4(
    weight: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scales_and_zeros)`` for ``_weight_int4pack_mm_for_cpu``: asymmetric int4 per
    group of ``group_size`` input columns, ``w ≈ (q - 8) * scale + zero`` (gpt-fast's and
    torchao's convention); ``scales_and_zeros`` is ``[in / group, out, 2]`` in bfloat16. The
    kernel takes a multiple of 16 output rows: more are padded with zeros (their outputs are
    dropped by the caller)."""
    q, scales, low = _quantize_int4(weight, group_size)
    zeros = low + scales * 8
    packed = torch._convert_weight_to_int4pack_for_cpu(
        q.to(torch.int32).reshape(q.shape[0], weight.shape[1]), 1
    )
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16)


def pack_int4_cached(
    weight: torch.Tensor,
    directory: Path | None,
    group_size: int = GROUP_SIZE,
    *,
    layout: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_int4(weight)`` (``layout="torch"``) or ``pack_int4_native(weight)``
    (``"native"``, its own group size), kept in ``directory`` (None: not kept) for the next
    start: packing Gemma 3's 262k-row head takes ~3.4 s of a 2-core CPU, reading the file ~0.1
    s. The file is named by the weight (its shape, dtype and a sample of its rows), the layout,
    the group size and the PyTorch version (the torch layout is the kernel's own)."""

    def pack() -> tuple[torch.Tensor, torch.Tensor]:
        return pack_int4(weight, group_size) if layout == "torch" else pack_int4_native(weight)

    if layout not in ("torch", "native"):
        raise ValueError(f"unknown int4 layout {layout!r}")
    if directory is None:
        return pack()
    rows = weight.detach()[:: max(1, weight.shape[0] // 256)].contiguous()
    key = hashlib.sha256(
        "\0".join(
            (str(tuple(weight.shape)), str(weight.dtype), str(group_size), torch.__version__)
            + (() if layout == "torch" else (layout, str(native.INT4_GROUP)))
        ).encode()
        + rows.view(torch.uint8).numpy().tobytes()
    ).hexdigest()[:24]
    path = directory / f"head-int4-{key}.safetensors"
    if path.exists():
        try:
            saved = safetensors.torch.load_file(path)
            return saved["packed"], saved["scales_and_zeros"]
        except (OSError, KeyError, safetensors.SafetensorError):
            pass  # unreadable: pack again and replace it
    packed, scales_and_zeros = pack()
    with contextlib.suppress(OSError):  # a read-only cache directory: pack at every start
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
        try:
            tensors = {"packed": packed, "scales_and_zeros": scales_and_zeros}
            safetensors.torch.save_file(tensors, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return packed, scales_and_zeros


def int4_supported(linear: Linear) -> bool:
    """Whether ``linear`` can take int4 weights here: a CPU weight whose input width divides
    into groups (the output rows are padded as needed)."""
    return linear.weight.device.type == "cpu" and linear.weight.shape[1] % GROUP_SIZE == 0


def int8_width(in_features: int) -> int:
    """The input width of ``pack_int8_fbgemm``'s copy: two more columns (``int8_logits``'
    range markers), rounded up to a multiple of 8 (fbgemm's kernels took ~2x as long at 642)."""
    return (in_features + 2 + 7) // 8 * 8


def quantized_engine() -> bool:
    """Whether this PyTorch has a quantized engine for ``quantized.linear_dynamic`` (fbgemm on
    x86, qnnpack on ARM)."""
    return any(
        e in ("fbgemm", "x86", "qnnpack") for e in torch.backends.quantized.supported_engines
    )


def pack_int8_fbgemm(weight: torch.Tensor) -> Any | None:
    """``weight`` packed for ``quantized.linear_dynamic`` (int8, one scale per output row),
    with zero columns up to ``int8_width`` for ``int8_logits``' range markers, or None where
    this PyTorch has no quantized engine. PyTorch deprecates its quantized tensor type (it
    warns on creating one); the packed weight is all this keeps of it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            w = weight.detach()
            scales = (w.abs().amax(dim=1).float() / 127.0).clamp(min=1e-12)
            q = torch.zeros(w.shape[0], int8_width(w.shape[1]), dtype=torch.int8)
            # Out of place: for a float32 weight ``float()`` is the weight itself (the model's
            # embedding table, when the head is tied to it).
            q[:, : w.shape[1]] = torch.round(w.float() / scales[:, None]).clamp_(-128, 127)
            zeros = torch.zeros(w.shape[0], dtype=torch.long)
            qt = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(qt, None)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def int8_logits(flat: torch.Tensor, packed: Any) -> torch.Tensor:
    """``flat [rows, in] @ weight^T`` in float32 through ``pack_int8_fbgemm``'s copy, each row
    the same whatever the others.

    ``linear_dynamic`` rounds its activations to 8 bits over one range for the whole batch
    (its minimum and maximum), so a row alone and the same row beside others rounded
    differently (logits 2.1 apart on Gemma 3's head). Here every row is divided by its largest
    magnitude and carries two more inputs, -1 and +1, against zero weights: every batch's range
    is then exactly [-1, 1], each row rounds alone, and its products are multiplied back."""
    rows, width = flat.shape
    x = flat.float()
    peak = x.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    wide = x.new_zeros(rows, int8_width(width))
    torch.div(x, peak, out=wide[:, :width])
    wide[:, width] = -1.0
    wide[:, width + 1] = 1.0
    out: torch.Tensor = torch.ops.quantized.linear_dynamic(wide, packed)
    return out.mul_(peak)


TOP_BLOCK = native.INT4_TOP_BLOCK
"""Logits per block in ``top_indices``' first pass."""


def top_indices(
    scores: torch.Tensor, k: int, block_max: torch.Tensor | None = None
) -> torch.Tensor:
    """The columns of the ``k`` highest scores of each row of ``scores [rows, n]`` (in no
    particular order), as ``topk`` finds them, 3-4x sooner over a large vocabulary.

    Two passes: the ``k`` blocks of ``TOP_BLOCK`` columns with the highest maxima, then the top
    ``k`` of those blocks' columns. Exact: a value among a row's ``k`` highest lies in one of
    those blocks, or else ``k`` block maxima, all at least as high, would join it above it.
    ``block_max [rows, n / TOP_BLOCK]``: those maxima, where the scores' kernel found them."""
    rows, n = scores.shape
    if n % TOP_BLOCK or n < 4 * k * TOP_BLOCK:
        return scores.topk(k, dim=-1).indices
    blocks = scores.view(rows, n // TOP_BLOCK, TOP_BLOCK)
    if block_max is None:
        block_max = blocks.amax(dim=-1)
    best = block_max.topk(k, dim=-1).indices  # [rows, k] block numbers
    picked = torch.gather(blocks, 1, best[:, :, None].expand(-1, -1, TOP_BLOCK))
    local = picked.view(rows, k * TOP_BLOCK).topk(k, dim=-1).indices
    return best.gather(1, local // TOP_BLOCK) * TOP_BLOCK + local % TOP_BLOCK


class RescoredHead(nn.Module):
    """``dense(x)`` for the ``candidates`` highest logits of each row, approximate values
    elsewhere; float32 out. Keeps the dense weight (tied to the embedding, it costs nothing
    more) and adds one cheaper copy, read for every row count: the engine's own int4 kernel's
    where it runs, else an int8 one through PyTorch's quantized engine (``int8_logits``), else
    PyTorch's int4 kernel. So a row's every logit is the same alone and in a batch."""

    def __init__(
        self,
        dense: Linear,
        candidates: int = CANDIDATES,
        *,
        int8_in_background: bool = False,
        cache: Path | None = None,
        native_kernel: bool = True,
        int8: bool = True,
    ) -> None:
        """``int8_in_background``: pack the int8 copy on a thread of its own (3.5 s for Gemma
        3's head, which would otherwise delay the server's start); a step that needs it before
        waits for it. ``cache``: a directory that keeps an int4 copy between starts
        (``pack_int4_cached``). ``native_kernel``: use the engine's own int4 kernel where it
        runs; ``int8``: else the int8 copy where PyTorch has a quantized engine (False:
        PyTorch's int4 kernel)."""
        super().__init__()
        if not int4_supported(dense):
            raise ValueError("the int4 head needs a CPU weight with a multiple of 32 columns")
        self.dense = dense
        self.candidates = min(candidates, dense.out_features)
        self._cache = cache
        self.int8: Any | None = None
        self.int4: tuple[torch.Tensor, torch.Tensor] | None = None
        """PyTorch's int4 copy (``pack_int4``), where neither kernel above is at hand."""
        self.ready = threading.Event()
        """Set once the copy this head reads is packed."""
        kernels = native.kernels() if native_kernel else None
        self.native: tuple[torch.Tensor, torch.Tensor] | None = None
        """The copy the engine's kernel reads (``pack_int4_native``), where it runs."""
        if kernels is not None and kernels.int4_head:
            packed, scale_low = pack_int4_cached(dense.weight, cache, layout="native")
            self.native = (frozen(packed), frozen(scale_low))
            self.ready.set()
        elif int8 and quantized_engine() and int8_in_background:
            threading.Thread(
                target=self._pack, args=(True,), name="promptcache-pack", daemon=True
            ).start()
        else:
            self._pack(False, int8=int8)

    def _pack(self, aside: bool, *, int8: bool = True) -> None:
        """The int8 copy where PyTorch can make one, else the int4 copy."""
        try:
            if aside:
                # One PyTorch thread: no thread team beside the engine's (engine/threads.py).
                threads.confine()
            self.int8 = pack_int8_fbgemm(self.dense.weight) if int8 else None
            if self.int8 is None:
                packed, scales_and_zeros = pack_int4_cached(self.dense.weight, self._cache)
                self.int4 = (frozen(packed), frozen(scales_and_zeros))
        finally:
            self.ready.set()

    def approximate(self, flat: torch.Tensor) -> torch.Tensor:
        """Every logit of the rows of ``flat``, float32, from the cheaper copy."""
        return self._approximate(flat)[0]

    def _approximate(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``approximate``, and each row's maxima over blocks of ``TOP_BLOCK`` columns where
        the engine's kernel finds them on the way (else None)."""
        vocab = self.dense.out_features
        if self.native is not None:
            kernels = native.kernels()
            block_max = None
            if vocab % TOP_BLOCK == 0 and self.native[0].shape[0] * 16 == vocab:
                block_max = torch.empty((flat.shape[0], vocab // TOP_BLOCK))
            found = None
            if kernels is not None:
                found = kernels.int4_logits(flat, *self.native, block_max=block_max)
            if found is None:  # the kernels switched off (``native.disabled``): exact scores
                return F.linear(flat, self.dense.weight).float(), None
            if found.shape[1] != vocab:
                return found[:, :vocab].contiguous(), None
            return found, block_max
        # Scored by the copy, never by whichever was ready: a row's scores do not depend on
        # when it came (the first request after a start may wait for the packing).
        self.ready.wait()
        if self.int8 is not None:
            return int8_logits(flat, self.int8), None
        if self.int4 is None:  # packing failed: exact scores, slower
            return F.linear(flat, self.dense.weight).float(), None
        # The int4 kernel takes bfloat16 activations contiguous in their last dim.
        act = flat.to(torch.bfloat16).contiguous()
        out = torch._weight_int4pack_mm_for_cpu(act, self.int4[0], GROUP_SIZE, self.int4[1])
        return out[:, :vocab].float(), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores_and_greedy(x)[0]

    def scores_and_greedy(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``forward(x)``, and the index of each row's highest logit in it, the first on ties
        (``torch.argmax``), found from the block maxima the engine's kernel took as it made
        the scores, where it did (8 rows of Gemma 3's: ~0.5 -> 0.05 ms): only the blocks the
        rescoring rewrote are searched again. Where the kernels run, the candidates, their
        exact logits and the argmax are one call (``native.Kernels.int4_rescore``)."""
        flat = x.reshape(-1, x.shape[-1])
        approx, block_max = self._approximate(flat)
        bias = self.dense.bias
        if bias is not None:  # the copies carry no bias: rank with it all the same
            approx += bias.float()
            block_max = None
        weight = self.dense.weight
        kernels = native.kernels()
        if kernels is not None and block_max is not None:
            # The rest in one call (native.Kernels.int4_rescore): the same candidates, their
            # logits the dense ones summed in another order.
            found = kernels.int4_rescore(approx, block_max, flat, weight, self.candidates)
            if found is not None:
                return approx.view(*x.shape[:-1], -1), found
        top = top_indices(approx, self.candidates, block_max)  # [rows, k]
        # Exact logits of the candidates: each row against its own k rows of the weight, in the
        # weight's dtype, rounded as the dense matmul rounds its output; one product a row, so
        # a row's are the same bits in any batch (a float32 ``bmm`` of 8 rows summed in
        # another order than one row's).
        rows = flat.to(weight.dtype)
        exact = torch.stack([torch.mv(weight[t], r) for t, r in zip(top, rows, strict=True)])
        if bias is not None:
            exact = exact + bias[top]
        approx.scatter_(1, top, exact.float())
        greedy = None
        if kernels is not None:
            if block_max is not None:
                greedy = kernels.argmax_blocks(approx, block_max, top)
            else:
                greedy = kernels.argmax(approx)
        if greedy is None:
            greedy = torch.argmax(approx, dim=-1).tolist()
        return approx.view(*x.shape[:-1], -1), greedy


__all__ = [
    "CANDIDATES",
    "GROUP_SIZE",
    "RescoredHead",
    "int4_supported",
    "int8_logits",
    "int8_width",
    "pack_int4",
    "pack_int4_cached",
    "pack_int8_fbgemm",
    "quantized_engine",
    "top_indices",
]
