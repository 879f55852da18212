"""``PagedAttention``: the models' ``Attention`` backend over the ``KVPool``, for one step.

A step packs the tokens of several sequences: first one decode token per decoding sequence,
then each prefilling sequence's chunk. ``plan`` turns their block tables into index tensors
once per step; every layer then

1. writes the step's keys and values into their slots (``index_copy_``, no growth),
2. attends: the decode tokens together, one SDPA call over their keys gathered from the pool and
   padded to the longest (padding reads the zeroed null block and is masked out); each prefill
   chunk with its own call over its sequence's keys, causal from its offset. On a CPU with
   AVX512-BF16 a bfloat16 chunk is one call of the engine's kernel (``kernels/prefill_attention.h``'
   ``prefill_attention``: keys read through the slots, each query's result independent of the
   chunk it came in); elsewhere a chunk whose keys sit in consecutive slots (a sequence whose
   blocks were handed out in a run, as the pool tends to: ``KVPool.decref``) reads them in
   place, a view of the pool, and others are gathered.

Sliding-window layers gather only the window (the last ``window`` positions a query can see),
so their cost stays bounded however long the context. The pool keeps every position of every
layer, so what a layer reads is chosen here, by the layer's ``AttnSpec``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from promptcache.engine.paged import native
from promptcache.engine.paged.models.base import AttnSpec
from promptcache.engine.paged.pool import KVPool


@dataclass(frozen=True, slots=True)
class StepSeq:
    """One sequence's part of a step: ``num_new`` tokens at positions ``start ..``."""

    blocks: Sequence[int]
    start: int
    num_new: int


@dataclass(slots=True)
class _Keys:
    """Where one group of queries reads its keys: slots ``[B, L]`` and a mask, or causal."""

    slots: torch.Tensor
    mask: torch.Tensor | None
    num_queries: int = 1
    """Queries of the chunk (a ``mask`` of None with several queries means plain causal)."""
    first: int | None = None
    """For a prefill chunk whose key slots are consecutive: the first (its keys are read in
    place, a view of the pool, not gathered)."""
    positions: tuple[int, int] = (0, 0)
    """For a prefill chunk: the positions of its first key and its first query."""
    _additive: dict[tuple[torch.dtype, bool], torch.Tensor | None] = field(default_factory=dict)

    def additive(self, dtype: torch.dtype, *, causal: bool = False) -> torch.Tensor | None:
        """The mask as 0 / -inf in ``dtype``, made once a step: SDPA would otherwise convert the
        boolean mask again in every layer. With ``causal``, a plain causal chunk's mask too
        (for kernels that take no ``is_causal``)."""
        key = (dtype, causal)
        if key not in self._additive:
            mask = self.mask
            if mask is None and causal:
                n = self.num_queries
                mask = torch.ones(n, n, dtype=torch.bool, device=self.slots.device).tril()
            additive = None
            if mask is not None:
                zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
                additive = zeros.masked_fill(~mask, float("-inf"))
            self._additive[key] = additive
        return self._additive[key]


class PagedAttention:
    """Implements ``Attention`` for the step planned last."""

    def __init__(self, pool: KVPool, specs: Sequence[AttnSpec]) -> None:
        self._pool = pool
        self._specs = tuple(specs)
        self._windows = sorted({s.window for s in specs}, key=lambda w: -1 if w is None else w)
        self._device = pool.device
        self.slot_mapping = torch.empty(0, dtype=torch.long)
        self._num_decode = 0
        self._decode: dict[int | None, _Keys] = {}
        self._prefill: list[tuple[int, int, dict[int | None, _Keys]]] = []
        self._tables: dict[int, torch.Tensor] = {}
        self._keep: frozenset[int] | None = None
        # On a CPU, decode reads keys in widths rounded up to KEY_BUCKET (see there).
        self._bucket = 1 if self._device.type == "cuda" else KEY_BUCKET

    def plan(
        self,
        decode: Sequence[StepSeq],
        prefill: Sequence[StepSeq],
        keep: Collection[int] | None = None,
    ) -> None:
        """Index tensors for a step of ``decode`` sequences (one token each, packed first) and
        ``prefill`` chunks (packed after them, in order). ``keep``: the rows whose output the
        model keeps (its forward's ``keep``); the last layer then attends only from those
        prefill rows, and a chunk with none of them only stores its keys and values."""
        self._tables.clear()
        self._keep = None if keep is None else frozenset(keep)
        new = [self._slots(seq, seq.start, seq.start + seq.num_new) for seq in prefill]
        self._decode = {}
        if decode:
            # The decode rows' indices for the whole batch at once: a few operations a step,
            # not a few per sequence (8 streams: ~1 ms of planning a step before).
            tables, starts = self._decode_tables(decode)
            bt = self._pool.block_tokens
            new.insert(
                0, torch.tensor([s.blocks[s.start // bt] * bt + s.start % bt for s in decode])
            )
            lasts = [s.start for s in decode]
            self._decode = {w: self._decode_keys(tables, starts, lasts, w) for w in self._windows}
        self.slot_mapping = torch.cat(new).to(self._device)
        self._num_decode = len(decode)
        self._prefill = []
        offset = len(decode)
        for seq in prefill:
            keys = {w: self._prefill_keys(seq, w) for w in self._windows}
            self._prefill.append((offset, seq.num_new, keys))
            offset += seq.num_new

    @property
    def pool(self) -> KVPool:
        return self._pool

    def decode_keys(
        self, windows: Sequence[int | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """For a step of decode tokens only: per window in ``windows``, the key slots
        ``[B, W]`` each token reads and their additive float32 mask ``[B, 1, 1, W]``, None
        where nothing is masked."""
        keys = [self._decode[w] for w in windows]
        return [(k.slots, k.additive(torch.float32)) for k in keys]

    def decode_inputs(
        self, windows: Sequence[int | None]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For a step of decode tokens only: per window in ``windows``, the key slots
        ``[B, W]`` each token reads and their additive float32 mask ``[B, 1, 1, W]`` (zeros
        where nothing is masked), as ``compiled.decode_attention`` takes them."""
        slots, masks = [], []
        for keys, mask in self.decode_keys(windows):
            if mask is None:
                b, w = keys.shape
                mask = torch.zeros((b, 1, 1, w), device=keys.device)
            slots.append(keys)
            masks.append(mask)
        return slots, masks

    def chunk_keys(
        self, windows: Sequence[int | None]
    ) -> list[tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]]:
        """For a step of one prefill chunk only: per window in ``windows``, the slots of the
        keys the chunk reads ``[L]``, the positions of its first key and first query, and its
        last query's additive float32 mask over those keys ``[1, L]`` (None: it sees them
        all), as ``native_prefill`` takes them."""
        ((_, _, plans),) = self._prefill
        out = []
        for window in windows:
            plan = plans[window]
            last = _Keys(plan.slots, None if plan.mask is None else plan.mask[-1:])
            out.append((plan.slots[0], plan.positions, last.additive(torch.float32)))
        return out

    def _table(self, seq: StepSeq) -> torch.Tensor:
        """``seq``'s block table as a CPU tensor (made once a step)."""
        table = self._tables.get(id(seq))
        if table is None:
            table = self._tables[id(seq)] = torch.tensor(seq.blocks, dtype=torch.long)
        return table

    def _slots(self, seq: StepSeq, lo: int, hi: int) -> torch.Tensor:
        """Pool slots of ``seq``'s positions ``[lo, hi)`` (a CPU tensor)."""
        table = self._table(seq)
        bt = self._pool.block_tokens
        fast = native.kernels()
        if fast is not None:
            return fast.prefill_plan(table, bt, lo, lo, hi, 0, mask=False)[0]
        pos = torch.arange(lo, hi)
        return table[pos // bt] * bt + pos % bt

    def _decode_tables(self, decode: Sequence[StepSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' block tables, padded with the null block to one width ``[B, N]``,
        and their query positions ``[B]`` (CPU tensors)."""
        width = max(len(seq.blocks) for seq in decode)
        tables = [[*seq.blocks, *[0] * (width - len(seq.blocks))] for seq in decode]
        starts = [seq.start for seq in decode]
        return torch.tensor(tables, dtype=torch.long), torch.tensor(starts, dtype=torch.long)

    def _table_slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool slots of ``positions [B, W]`` of the rows of ``tables`` (positions past a
        table's end read its padding: the null block)."""
        bt = self._pool.block_tokens
        blocks = (positions // bt).clamp_(max=tables.shape[1] - 1)
        return tables.gather(1, blocks) * bt + positions % bt

    def _decode_keys(
        self, tables: torch.Tensor, starts: torch.Tensor, lasts: list[int], window: int | None
    ) -> _Keys:
        """Each decode row's keys ``[lo, start]`` (the last ``window`` positions, or all), packed
        from the left in a width rounded up to the bucket; padding reads the null block,
        masked. ``lasts``: ``starts`` as a list."""
        lengths = [last + 1 if window is None else min(last + 1, window) for last in lasts]
        width = -(-max(lengths) // self._bucket) * self._bucket
        same = all(n == width for n in lengths)
        fast = native.kernels() if self._device.type == "cpu" else None
        if fast is not None:
            # One call for the index arithmetic below (a decode step's plan 0.32 -> 0.20 ms).
            bt = self._pool.block_tokens
            slots, valid, additive = fast.decode_plan(tables, starts, bt, window or 0, width)
            if same:
                return _Keys(slots, None)
            keys = _Keys(slots, valid[:, None, None, :])
            keys._additive[torch.float32, False] = additive[:, None, None, :]
            return keys
        ends = starts + 1  # the query at position start sees [lo, start]
        lo = torch.zeros_like(starts) if window is None else (ends - window).clamp_(min=0)
        offsets = torch.arange(width)
        valid = offsets[None, :] < (ends - lo)[:, None]
        slots = self._table_slots(tables, lo[:, None] + offsets[None, :]).masked_fill_(~valid, 0)
        mask = None if same else valid[:, None, None, :].to(self._device)
        return _Keys(slots.to(self._device), mask)

    def _prefill_keys(self, seq: StepSeq, window: int | None) -> _Keys:
        end = seq.start + seq.num_new
        lo = 0 if window is None else max(0, seq.start - window + 1)
        first = self._first_slot(seq.blocks, lo, end)
        positions = (lo, seq.start)
        # Plain causal (SDPA's own mask) when the chunk's keys are its own queries'.
        causal = lo == seq.start and (window is None or seq.num_new <= window)
        fast = native.kernels() if self._device.type == "cpu" else None
        if fast is not None:
            # One call for the index arithmetic below (a hit's plan at 4,096 + 64: ~0.4 ms).
            bt = self._pool.block_tokens
            found, allowed = fast.prefill_plan(
                self._table(seq), bt, lo, seq.start, end, window or 0, mask=not causal
            )
            return _Keys(found.unsqueeze(0), allowed, seq.num_new, first, positions)
        slots = self._slots(seq, lo, end).unsqueeze(0)
        if causal:
            return _Keys(slots.to(self._device), None, seq.num_new, first, positions)
        q_pos = torch.arange(seq.start, end).unsqueeze(1)
        k_pos = torch.arange(lo, end).unsqueeze(0)
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        mask = mask.to(self._device)
        return _Keys(slots.to(self._device), mask, seq.num_new, first, positions)

    def _first_slot(self, blocks: Sequence[int], lo: int, hi: int) -> int | None:
        """The slot of position ``lo`` when positions ``[lo, hi)`` sit in consecutive slots
        (their blocks are consecutive), else None."""
        bt = self._pool.block_tokens
        run = blocks[lo // bt : (hi - 1) // bt + 1]
        if any(b != run[0] + i for i, b in enumerate(run)):
            return None
        return run[0] * bt + lo % bt

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        spec = self._specs[layer]
        keys = self._pool.keys(layer)
        values = self._pool.values(layer)
        # A float16 pool under a float32 model stores them rounded (as the kernels do) and
        # every read below sees them converted back: a prompt attends to its own keys as a hit
        # later restores them.
        keys.index_copy_(0, self.slot_mapping, k.to(keys.dtype))
        values.index_copy_(0, self.slot_mapping, v.to(values.dtype))
        out = torch.empty_like(q)
        d = self._num_decode
        if d:
            plan = self._decode[spec.window]
            if not q.is_cuda and spec.softcap is None:
                mask = plan.additive(torch.float32)
                out[:d] = decode_attend(q[:d], keys, values, plan.slots, mask, spec.scale)
            else:
                kk = keys[plan.slots].transpose(1, 2).to(q.dtype)  # [D, kv_heads, L, head_dim]
                vv = values[plan.slots].transpose(1, 2).to(q.dtype)
                o = _sdpa(q[:d].unsqueeze(2), kk, vv, plan, False, spec)
                out[:d] = o.squeeze(2)
        # The last layer attends only from kept rows: a chunk's last query, over what its row
        # of the chunk's mask allows (every key of a plain causal chunk), or nothing at all.
        keep = self._keep if layer == len(self._specs) - 1 else None
        fast = native.kernels() if keep is None and spec.softcap is None else None
        for offset, n, plans in self._prefill:
            plan = plans[spec.window]
            if fast is not None and fast.prefill_attention(
                q[offset : offset + n],
                keys,
                values,
                plan.slots[0],
                plan.positions,
                spec.window,
                spec.scale,
                out[offset : offset + n],
            ):
                continue
            causal = plan.mask is None
            if keep is not None:
                if offset + n - 1 not in keep:
                    continue
                offset, n, causal = offset + n - 1, 1, False
                plan = _Keys(
                    plan.slots, None if plan.mask is None else plan.mask[-1:], first=plan.first
                )
                if not q.is_cuda and spec.softcap is None:
                    # One query over the whole context: the decode rows' attention, whose kernel
                    # shares a long row's keys between the threads (4k keys: ~0.6 -> ~0.1 ms).
                    mask = plan.additive(torch.float32)
                    if mask is not None:
                        mask = mask.view(1, 1, 1, -1)
                    row = q[offset : offset + 1]
                    out[offset] = decode_attend(row, keys, values, plan.slots, mask, spec.scale)[0]
                    continue
            if plan.first is not None:
                # Consecutive slots: the pool's own rows, laid out as a gathered copy would be
                # (the same strides, so the same kernels and roundings), without the copy.
                span = slice(plan.first, plan.first + plan.slots.shape[1])
                kk = keys[span].transpose(0, 1).unsqueeze(0).to(q.dtype)
                vv = values[span].transpose(0, 1).unsqueeze(0).to(q.dtype)
            else:
                # index_select: see decode_attend.
                kk = keys.index_select(0, plan.slots[0]).transpose(0, 1).unsqueeze(0)
                vv = values.index_select(0, plan.slots[0]).transpose(0, 1).unsqueeze(0)
                kk, vv = kk.to(q.dtype), vv.to(q.dtype)
            qq = q[offset : offset + n].transpose(0, 1).unsqueeze(0)
            o = _sdpa(qq, kk, vv, plan, causal, spec)
            out[offset : offset + n] = o[0].transpose(0, 1)
        return out


KEY_BUCKET = 64
"""Decode steps on a CPU read their keys padded (masked, from the null block) to a multiple of
this many: oneDNN builds a kernel for each new matmul shape, and a width that grew by one every
step cost 0.6 ms per matmul shape per step (docs/benchmarks.md), against 36 us for a shape it
has seen."""

MATH_MAX_SCORES = 16 << 20
"""On a CPU, attention whose score matrix has at most this many elements (64 MiB in float32)
runs as two matmuls and a softmax (``grouped``); larger ones, long prefill chunks over long
contexts, use SDPA's flash kernel, which never holds the scores."""


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: _Keys,
    causal: bool,
    spec: AttnSpec,
) -> torch.Tensor:
    """Attention of ``q [B, H, Lq, D]`` over ``k, v [B, Hkv, Lk, D]`` (grouped-query)."""
    if spec.softcap is None:
        if not q.is_cuda and q.numel() // q.shape[-1] * k.shape[2] <= MATH_MAX_SCORES:
            return grouped(q, k, v, keys.additive(torch.float32, causal=causal), spec.scale)
        mask = keys.additive(q.dtype)
        if mask is not None and q.is_cuda and k.shape[1] != q.shape[1]:
            # CUDA's kernels that take a mask (memory-efficient) do not take grouped heads, and
            # SDPA would fall back to its math path; one copy of the gathered heads is cheaper.
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=spec.scale, enable_gqa=True
        )
    # Softcapping needs the scores themselves: the plain formula, in float32.
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * spec.scale
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    allowed = keys.mask
    if causal:
        lq, lk = scores.shape[-2:]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def decode_attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Decode attention on a CPU: each row ``q [B, heads, D]`` over the keys and values at its
    ``slots [B, W]`` of the pool's ``keys, values [slots, kv_heads, D]``, with the additive
    float32 ``mask [B, 1, 1, W]`` (None: nothing masked). The same arithmetic as ``grouped``
    (products in the model dtype, softmax in float32), in fewer operations: a decode step
    calls this once per layer, and on a small model each operation's fixed cost is most of
    its time; where the engine's own kernel runs (``native``), it does all of it in one
    pass. Gathering along the pool's first dimension (``index_select``) copies a key at a
    time; indexing or selecting along another dimension was 3-40x slower over long contexts
    (docs/benchmarks.md)."""
    fast = native.kernels()
    if fast is not None:
        out = fast.decode_attention(q, keys, values, slots, mask, scale)
        if out is not None:
            return out
    b, h, d = q.shape
    w = slots.shape[1]
    kv_heads = keys.shape[1]
    g = h // kv_heads
    flat = slots.reshape(-1)
    kk = keys.index_select(0, flat).view(b, w, kv_heads, d).to(q.dtype)
    vv = values.index_select(0, flat).view(b, w, kv_heads, d).to(q.dtype)
    if b * h * w > MATH_MAX_SCORES:  # long contexts in wide batches: never hold the scores
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            kk.transpose(1, 2),
            vv.transpose(1, 2),
            attn_mask=None if mask is None else mask.to(q.dtype),
            scale=scale,
            enable_gqa=True,
        )
        return out.squeeze(2)
    if b == 1 and kv_heads == 1:
        # One stream of a one-KV-head model: ``linear`` multiplies by the keys as gathered.
        scores = F.linear(q.view(g, d), kk.view(w, d)).view(1, 1, g, w)
    else:
        scores = torch.matmul(q.view(b, kv_heads, g, d), kk.permute(0, 2, 3, 1))
    if mask is None:
        weights = scores.float().mul_(scale)
    else:  # scale and mask in one pass, in float32
        weights = torch.add(mask.view(b, 1, 1, w), scores, alpha=scale)
    probs = torch.softmax(weights, dim=-1).to(q.dtype)  # [B, kv_heads, G, W]
    out = torch.matmul(probs, vv.transpose(1, 2))  # [B, kv_heads, G, D]
    return out.view(b, h, d)


def grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v``: products in the model dtype, the softmax in float32
    (as transformers' eager attention), and each key head read once for the query heads that
    share it (they become rows of one matmul). On a CPU, for decode tokens and short chunks,
    this is 2-17x faster than SDPA's flash kernel (docs/benchmarks.md)."""
    b, h, lq, d = q.shape
    kv = k.shape[1]
    rows = q.reshape(b, kv, (h // kv) * lq, d)
    if b == 1:
        # One sequence (a prefill chunk, or one stream decoding): ``linear`` multiplies by the
        # keys as stored, where ``matmul`` would first copy them transposed (2x faster over 4k
        # keys, the same result). Batches keep one ``matmul``: stacking their heads costs more.
        heads = [F.linear(rows[0, j], k[0, j]) for j in range(kv)]
        stacked = heads[0] if kv == 1 else torch.stack(heads)
        raw = stacked.view(b, h, lq, -1)
    else:
        raw = torch.matmul(rows, k.transpose(-1, -2)).view(b, h, lq, -1)
    fast = native.kernels()
    probs = None if fast is None else fast.scale_mask_softmax(raw, mask, scale)
    if probs is None:
        scores = raw.float()
        scores.mul_(scale)
        if mask is not None:
            scores.add_(mask)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(b, kv, (h // kv) * lq, -1), v)
    return out.view(b, h, lq, d)


__all__ = [
    "KEY_BUCKET",
    "MATH_MAX_SCORES",
    "PagedAttention",
    "StepSeq",
    "decode_attend",
    "grouped",
]
