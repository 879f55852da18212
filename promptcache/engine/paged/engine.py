"""``PagedEngine``: continuous batching over one paged KV pool that the cache shares.

Each ``step`` computes every running sequence's next decode token plus prefill chunks, up to
``max_batch_tokens``: decoding sequences go first (a long prefill never stalls a stream),
then prompt chunks in turns: the oldest prompt being read every other step, the steps between
to those with the fewest tokens left (a hit's suffix gets a step of its own). Where the model
has int8 decode weights, or the engine's prefill kernels take each chunk, the step runs in
parts: the decode rows, then each chunk, each as a step of its own (``_forward_parts``; with
int8 decode weights the rows then take nothing from the chunks' ``max_batch_tokens``). A
chunk ends at the next snapshot offset, so every snapshot is taken exactly where the prompt
was cut (spec §2.4), and the logits of a sequence are computed only for the row that is
sampled.

Sequences and cached entries are block lists in the same ``KVPool``::

    restore R from payload P     table = P.blocks[:R // bt] (shared) + copy of P's block at R
    snapshot at X                payload = table[:X // bt] (shared) + copy of the block at X
    finish / cancel              the sequence's references are released

Nothing is copied per step except the step's own new keys and values.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from promptcache.core.chatformat import ChatFormat
from promptcache.core.layout import Tokenizer
from promptcache.core.payload import KVPayload
from promptcache.engine.base import (
    EngineEvent,
    EngineInfo,
    EngineRequest,
    Prefilled,
    PrefillProgress,
    SeqId,
    StepResult,
    Stopped,
    TokenOut,
    check_request,
)
from promptcache.engine.paged import native
from promptcache.engine.paged.attention import PagedAttention, StepSeq
from promptcache.engine.paged.codec import PagedCodec
from promptcache.engine.paged.compiled import CompiledDecode
from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.int8 import DecodeSwitch
from promptcache.engine.paged.native_decode import MAX_ROWS, NativeDecode
from promptcache.engine.paged.native_prefill import MAX_ROWS as PREFILL_ROWS
from promptcache.engine.paged.native_prefill import NativePrefill
from promptcache.engine.paged.pool import KVPool, PoolExhausted, PoolPayload
from promptcache.engine.sampling import make_generator, sample_token, top_k_threshold

log = logging.getLogger("promptcache.engine")

KV_FORMAT = "paged-kv-1"
"""Bumped whenever the payload layout or KV numerics of this engine change (part of revisions)."""

IDLE_BEFORE_COMPILE_S = 2.0
"""The compiled decode step compiles its graphs only after the engine has had nothing to do
for this long (``CompiledDecode.start``): requests that come right after the start, or one after
another, run eagerly at full speed instead of beside the compiler."""

DEFAULT_BLOCK_TOKENS = 32
DEFAULT_MAX_BATCH_TOKENS = 256


@dataclass(eq=False)
class _Seq:
    """One running sequence."""

    seq_id: SeqId
    tokens: list[int]
    request: EngineRequest
    end: int  # prefill runs to here: the prompt, or the last snapshot when nothing is decoded
    table: list[int] = field(default_factory=list)
    computed: int = 0  # positions whose KV is in the table
    start: int = 0  # the restored prefix
    cuts: list[int] = field(default_factory=list)  # snapshot offsets still ahead, ascending
    snapshots: dict[int, KVPayload] = field(default_factory=dict)
    produced: int = 0
    pending: int | None = None  # the sampled token to feed at the next step
    generator: torch.Generator | None = None
    capture: bool = False  # keep the last prompt logits (prompt_logits)
    logits: torch.Tensor | None = None

    @property
    def decoding(self) -> bool:
        return self.pending is not None


@dataclass(frozen=True)
class _Forward:
    """One forward's rows: ``decode`` sequences (one token each) then ``prefill`` chunks,
    their token ``ids`` and ``positions`` packed so, and the ``rows`` whose output is kept."""

    decode: list[_Seq]
    prefill: list[tuple[_Seq, int]]
    ids: list[int]
    positions: list[int]
    rows: list[int]


class PagedEngine:
    """A lean ``CausalLM`` behind the batched ``Engine`` protocol. Not thread-safe, except the
    codec (the cache moves payloads on other threads)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        chat_format: ChatFormat,
        model_id: str,
        revision: str | None,
        max_context_tokens: int,
        stop_token_ids: Collection[int],
        *,
        pool_bytes: int,
        kv_dtype: torch.dtype | None = None,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        decode_switch: DecodeSwitch | None = None,
        compile_decode: bool = False,
        prompt_tokens_beside_streams: int | None = None,
        stream_time_share: float = 0.0,
        integer_prompts: bool = False,
    ) -> None:
        """``pool_bytes`` sizes the KV pool (cached entries plus live sequences); the model
        must already sit on its device in its compute dtype. ``kv_dtype``: the pool's (None:
        the model's; ``check_kv_dtype`` says which others work). ``decode_switch`` is set before
        each step when the model has int8 decode weights (``add_decode_int8``).
        ``compile_decode``: compile the forward of decode-only steps (``compiled.CompiledDecode``;
        it needs the switch's int8 weights), on a thread of its own; eager until it is ready.
        ``prompt_tokens_beside_streams``: the most prompt tokens of a step that also decodes
        (default ``max_batch_tokens``): a smaller chunk is a shorter wait between the streams'
        tokens while a long prompt is read. ``stream_time_share``: the share of the time, while
        a long prompt is read beside decoding streams, that goes to steps of the streams alone
        (0: none; each such step then carries the streams' rows and a chunk).
        ``integer_prompts``: prompt chunks' products in the decode step's integers over the
        int8 decode copies, every chunk (``native_prefill.integer_ready`` says where they run;
        elsewhere the dense weights, as without it; the revision says which)."""
        if not 0.0 <= stream_time_share < 1.0:
            raise ValueError("stream_time_share must be in [0, 1)")
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self._model = model
        shape = model.shape
        param = next(model.parameters())
        self._device = param.device
        dtype = model.dtype
        kv_dtype = check_kv_dtype(dtype, kv_dtype or dtype)
        per_block = shape.num_layers * 2 * block_tokens * shape.num_kv_heads * shape.head_dim
        per_block *= torch.empty((), dtype=kv_dtype).element_size()
        self._pool = KVPool(
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            num_blocks=max(2, pool_bytes // per_block),
            block_tokens=block_tokens,
            dtype=kv_dtype,
            device=self._device,
        )
        self._attn = PagedAttention(self._pool, model.attn_specs)
        self._codec = PagedCodec(self._pool)
        self._tokenizer = tokenizer
        self._chat_format = chat_format
        self._stop_ids = frozenset(int(i) for i in stop_token_ids)
        self._max_batch = max_batch_tokens
        self._beside_streams = prompt_tokens_beside_streams or max_batch_tokens
        # Seconds of decode-only steps owed to the streams: each step that reads a long prompt
        # beside them adds its time * share / (1 - share); each decode-only step pays its own.
        self._stream_ratio = stream_time_share / (1.0 - stream_time_share)
        self._owed_s = 0.0
        # Whether the last step passed over the oldest prompt being read (this one reads it).
        self._oldest_waited = False
        self.clock = time.perf_counter  # replaceable: tests step a clock of their own
        self._decode_switch = decode_switch
        self._last_step = 0.0
        # Narrow decode steps run in the engine's own kernels where they can (int8 weights, a
        # CPU with them): one call for the whole model instead of ~400 operations.
        self.native_decode: NativeDecode | None = None
        if decode_switch is not None:
            self.native_decode = NativeDecode.build(model, self._attn, MAX_ROWS)
        # Steps of one short prompt chunk (a hit's suffix) likewise, where the model allows.
        # In integers, every chunk a step can carry: through PyTorch's dense forward one would
        # be another computation of its tokens' keys and values than a hit's suffix here.
        self.native_prefill = NativePrefill.build(
            model,
            self._attn,
            max(PREFILL_ROWS, max_batch_tokens) if integer_prompts else PREFILL_ROWS,
            integer=integer_prompts,
        )
        if integer_prompts and self.native_prefill is None:
            self.native_prefill = NativePrefill.build(model, self._attn, PREFILL_ROWS)
        self.compiled: CompiledDecode | None = None
        if compile_decode:
            if decode_switch is None:
                raise ValueError("the compiled decode step needs the int8 decode switch")
            self.compiled = CompiledDecode(model, decode_switch.max_rows)
        dtype_name = str(dtype).removeprefix("torch.")
        if revision is None:
            kv_part = () if kv_dtype == dtype else (f"kv {kv_dtype}",)
            revision = parameter_revision(model, chat_format.name, dtype_name, *kv_part)
        if self.native_prefill is not None and self.native_prefill.integer:
            # Prompts' keys and values in integers are other bits than the dense weights give.
            revision = hashlib.sha256(f"{revision}\0int8-prompts".encode()).hexdigest()[:32]
        self._info = EngineInfo(
            model_id=model_id,
            revision=revision,
            max_context_tokens=max_context_tokens,
            device=str(self._device),
            dtype=dtype_name,
            kv_bytes_per_token=per_block // block_tokens,
            kv_dtype=str(kv_dtype).removeprefix("torch."),
        )
        self._seqs: dict[SeqId, _Seq] = {}
        self._last_id: SeqId = 0
        self.num_prefill_tokens_total = 0
        """Every token run through the model in prefill, over the engine's lifetime."""
        if self.compiled is not None:
            # Last: the compile thread reads the engine's state (``_idle``) from its start.
            self.compiled.start(self._pool.kv, self._idle)

    # -- facts ---------------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def chat_format(self) -> ChatFormat:
        return self._chat_format

    @property
    def kv_codec(self) -> PagedCodec:
        return self._codec

    @property
    def pool(self) -> KVPool:
        return self._pool

    @property
    def model(self) -> CausalLM:
        return self._model

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_ids

    @property
    def num_running(self) -> int:
        return len(self._seqs)

    def _idle(self) -> bool:
        """Nothing running and no step for ``IDLE_BEFORE_COMPILE_S`` (the compile thread's
        cue; read from that thread, so it only reads)."""
        quiet = time.monotonic() - self._last_step >= IDLE_BEFORE_COMPILE_S
        return not self._seqs and quiet

    # -- requests ------------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> SeqId:
        return self._add(request, capture=False).seq_id

    def _add(self, request: EngineRequest, *, capture: bool) -> _Seq:
        tokens = list(map(int, request.tokens))
        check_request(request, self._info.max_context_tokens, self._codec.accepts)
        decode = request.sampling.max_tokens > 0
        end = len(tokens) if decode or capture else max(request.snapshot_at, default=0)
        self._last_id += 1
        seq = _Seq(
            self._last_id,
            tokens,
            request,
            end=max(end, request.reuse_tokens),
            cuts=sorted({x for x in request.snapshot_at if x <= end}),
            generator=make_generator(request.sampling, self._device) if decode else None,
            capture=capture,
        )
        if request.reuse_tokens > 0:
            assert request.reuse is not None
            self._restore(seq, request.reuse, request.reuse_tokens)
        self._seqs[seq.seq_id] = seq
        return seq

    def cancel(self, seq: SeqId) -> None:
        state = self._seqs.pop(seq, None)
        if state is not None:
            self._release(state)

    def _release(self, seq: _Seq) -> None:
        table, seq.table = seq.table, []
        self._pool.decref(table)

    def _restore(self, seq: _Seq, payload: KVPayload, reuse: int) -> None:
        """Map ``payload``'s blocks for positions ``[0, reuse)`` into ``seq``: shared whole
        blocks, and a private copy of a partly used last block (it will be written)."""
        pooled = self._codec.to_pool(payload)
        seq.table = self._pool.fork(pooled.blocks, reuse)
        seq.computed = seq.start = reuse

    def _snapshot(self, seq: _Seq, offset: int) -> PoolPayload:
        return PoolPayload(self._pool, self._pool.fork(seq.table, offset), offset)

    def _newest_prefilling(self) -> _Seq | None:
        for seq in reversed(self._seqs.values()):
            if not seq.decoding and seq.table:
                return seq
        return None

    def _reserve(self, seq: _Seq, upto: int) -> None:
        """Blocks for positions ``[0, upto)``. Raises ``PoolExhausted``."""
        need = -(-upto // self._pool.block_tokens) - len(seq.table)
        if need > 0:
            seq.table += self._pool.allocate(need)

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> StepResult:
        self._last_step = time.monotonic()
        out: StepResult = []
        decode: list[_Seq] = []
        prefill: list[tuple[_Seq, int]] = []
        stuck: list[tuple[_Seq, PoolExhausted]] = []
        budget = self._max_batch
        for seq in list(self._seqs.values()):
            if not seq.decoding or seq.seq_id not in self._seqs:
                continue
            while True:
                try:
                    self._reserve(seq, seq.computed + 1)
                    break
                except PoolExhausted as exc:
                    # A stream that is already answering goes on: the newest request still in
                    # its prefill gives way (Overloaded, before its first token), else this one.
                    victim = self._newest_prefilling() or seq
                    out.append((victim.seq_id, exc))
                    self.cancel(victim.seq_id)
                    if victim is seq:
                        break
            if seq.seq_id in self._seqs:
                decode.append(seq)
                # Where decode rows run as a forward of their own beside the chunks (int8
                # decode weights, ``_in_parts``) they take nothing from a chunk: a prompt is
                # cut into the same chunks beside streams as alone, and so computes the same
                # bits through PyTorch's matmuls too, which block by the chunk's shape.
                budget -= self._decode_switch is None
        # Prompt chunks in turns: the oldest prompt being read gets every other step (so none
        # ever starves), and the others go to the prompts with the fewest tokens left: the short
        # ones (a rest that fits in half a step: a hit's suffix) together, else the shortest
        # alone, with no longer prompt beside them. A hit sent behind another user's cold prompt
        # is so answered after the chunk in flight and its own few tokens, not after a full step
        # of the long one beside it (~6x sooner on a CPU), and one with a longer suffix after a
        # few steps rather than the whole other prompt. Beside decoding streams a step reads
        # fewer prompt tokens, and where the streams are owed time (``stream_time_share``) only
        # short ones.
        if decode:
            budget = min(budget, self._beside_streams)
        reading = [s for s in self._seqs.values() if not s.decoding and s.computed < s.end]
        short = {s.seq_id for s in reading if s.end - s.computed <= self._max_batch // 2}
        long_waiting = len(short) < len(reading)
        if not (decode and long_waiting):
            self._owed_s = 0.0
        owed = self._owed_s > 0.0
        by_rest = sorted(reading, key=lambda s: s.end - s.computed)  # stable: arrival order
        oldest = reading[0] if reading else None
        oldest_turn = not owed and (self._oldest_waited or by_rest[:1] == [oldest])  # identity
        if oldest_turn and oldest is not None:  # the others take what it leaves, fewest first
            by_rest = [oldest, *(s for s in by_rest if s is not oldest)]
        for seq in by_rest:
            if budget <= 0:
                break
            if not oldest_turn and seq.seq_id not in short and (owed or prefill):
                break  # short ones only; where none could go, the shortest
            stop = seq.cuts[0] if seq.cuts else seq.end
            n = min(stop - seq.computed, budget)
            if n <= 0:
                continue
            # As much of the chunk as free blocks allow; none: wait for others to free some.
            room = (len(seq.table) + self._pool.num_free) * self._pool.block_tokens
            n = min(n, room - seq.computed)
            if n <= 0:
                stuck.append((seq, PoolExhausted("KV pool exhausted: no free block")))
                continue
            self._reserve(seq, seq.computed + n)
            prefill.append((seq, n))
            budget -= n
        self._oldest_waited = oldest is not None and all(seq is not oldest for seq, _ in prefill)
        finished = [s for s in self._seqs.values() if not s.decoding and s.computed >= s.end]
        for seq in finished:  # nothing to compute: a prefill-only request restored it all
            out += self._prefilled(seq, None)
        if not decode and not prefill:
            if stuck and not finished:
                # Nothing can move: the newest waiting prefill gives up its blocks (Overloaded)
                # so that the older ones can finish.
                waiting, full = stuck[-1]
                out.append((waiting.seq_id, full))
                self.cancel(waiting.seq_id)
            return out
        started = self.clock()
        out += self._forward(decode, prefill)
        if decode and long_waiting and self._stream_ratio:
            took = self.clock() - started
            if any(seq.seq_id not in short for seq, _ in prefill):
                self._owed_s += took * self._stream_ratio
            else:
                self._owed_s = max(0.0, self._owed_s - took)
        return out

    def _forward(self, decode: list[_Seq], prefill: list[tuple[_Seq, int]]) -> StepResult:
        ids: list[int] = []
        positions: list[int] = []
        for seq in decode:
            assert seq.pending is not None
            ids.append(seq.pending)
            positions.append(seq.computed)
        for seq, n in prefill:
            ids += seq.tokens[seq.computed : seq.computed + n]
            positions += range(seq.computed, seq.computed + n)
        # Rows whose logits are sampled: every decode token, and the last token of a prefill
        # that completes its prompt in this step.
        rows = list(range(len(decode)))
        sampled: list[_Seq] = list(decode)
        offset = len(decode)
        for seq, n in prefill:
            offset += n
            if seq.computed + n == len(seq.tokens) and (
                seq.request.sampling.max_tokens or seq.capture
            ):
                rows.append(offset - 1)
                sampled.append(seq)
        with torch.inference_mode():
            step = _Forward(decode, prefill, ids, positions, rows)
            in_parts = self._in_parts(decode, prefill)
            hidden = self._forward_parts(step) if in_parts else self._hidden(step)
            logits, greedy = self._model.logits_and_greedy(hidden) if rows else (None, None)
        return self._advance(decode, prefill, sampled, logits, greedy)

    def _in_parts(self, decode: list[_Seq], prefill: list[tuple[_Seq, int]]) -> bool:
        """Whether the step runs as parts (``_forward_parts``): decode rows beside prompt
        chunks where the model has int8 decode weights, and several chunks where the engine's
        prefill kernels take each."""
        if not prefill or len(decode) + len(prefill) < 2:
            return False
        if decode and self._decode_switch is not None:
            return True
        natively = self.native_prefill
        return natively is not None and all(natively.covers(0, [n]) for _, n in prefill)

    def _forward_parts(self, step: _Forward) -> torch.Tensor:
        """The sampled rows' final hidden states of a step run in parts, each planned and
        computed as a step of its own (their sequences share no keys): the decode rows
        together, then each prompt chunk.

        So a stream's rows are computed alike whether or not a prompt is being read beside
        them (in one forward with a prompt chunk they took the dense weights, alone the int8
        ones: the stream's tokens depended on other users' traffic), and each chunk as alone,
        in the engine's prefill kernels where they take it (a prompt arriving while streams
        decode, or a hit's suffix beside a long prompt, went through PyTorch's forward of the
        whole mixed batch: ~10% slower for Gemma 3 270M on a CPU)."""
        parts: list[torch.Tensor] = []
        ids, positions, rows = step.ids, step.positions, step.rows
        offset = len(step.decode)
        if step.decode:
            head = slice(0, offset)
            parts.append(
                self._hidden(_Forward(step.decode, [], ids[head], positions[head], rows[head]))
            )
        for seq, n in step.prefill:
            keep = [n - 1] if offset + n - 1 in rows else []
            chunk = slice(offset, offset + n)
            parts.append(self._hidden(_Forward([], [(seq, n)], ids[chunk], positions[chunk], keep)))
            offset += n
        return torch.cat(parts)

    def _hidden(self, step: _Forward) -> torch.Tensor:
        """The final hidden states of ``step``'s kept rows, one forward over its decode rows
        then its prompt chunks, by the fastest path that computes it: the engine's decode or
        prefill kernels, the compiled decode graph, else the model's PyTorch forward."""
        decode, prefill, rows = step.decode, step.prefill, step.rows
        # Index tensors as the compiled step was traced with (under inference mode).
        self._attn.plan(
            [StepSeq(s.table, s.computed, 1) for s in decode],
            [StepSeq(s.table, s.computed, n) for s, n in prefill],
            keep=rows,
        )
        if self._decode_switch is not None:
            self._decode_switch.set_step(len(decode), sum(n for _, n in prefill))
        input_ids = torch.tensor(step.ids, dtype=torch.long, device=self._device)
        pos = torch.tensor(step.positions, dtype=torch.long, device=self._device)
        num_prompt = len(step.ids) - len(decode)
        chunks = [n for _, n in prefill]
        # A step of decode rows only samples every row: no gather of them (~1% of a step).
        if self.native_decode is not None and self.native_decode.covers(len(decode), num_prompt):
            return self.native_decode(input_ids, pos)
        if self.compiled is not None and self.compiled.covers(len(decode), num_prompt):
            whole = self.compiled(input_ids, pos, self._attn)
            if whole is not None:
                return whole
        if self.native_prefill is not None and self.native_prefill.covers(len(decode), chunks):
            # The chunk's last row where it is sampled, as the model's forward with keep.
            return self.native_prefill(input_ids, pos, bool(rows))
        # The last layer finishes only the sampled rows (``CausalLM.forward``).
        keep = torch.tensor(rows, dtype=torch.long, device=self._device)
        hidden: torch.Tensor = self._model(input_ids, pos, self._attn, keep)
        return hidden

    def _advance(
        self,
        decode: list[_Seq],
        prefill: list[tuple[_Seq, int]],
        sampled: list[_Seq],
        logits: torch.Tensor | None,
        greedy: list[int] | None,
    ) -> StepResult:
        """The step's sequences moved on by what it computed: tokens sampled and emitted,
        snapshots taken where a chunk ended at one, progress and prefills reported."""
        by_seq = {s.seq_id: i for i, s in enumerate(sampled)}
        out: StepResult = []
        for seq in decode:
            seq.computed += 1
        for seq, n in prefill:
            seq.computed += n
            self.num_prefill_tokens_total += n
        tokens = self._sample(sampled, logits, greedy)
        for seq in decode:
            out += self._emit(seq, tokens[by_seq[seq.seq_id]])
        for seq, _ in prefill:
            if seq.cuts and seq.cuts[0] == seq.computed:
                seq.cuts.pop(0)
                try:
                    seq.snapshots[seq.computed] = self._snapshot(seq, seq.computed)
                except PoolExhausted as exc:  # this request fails, not the whole step
                    out.append((seq.seq_id, exc))
                    self.cancel(seq.seq_id)
                    continue
            if seq.computed < seq.end:
                out.append(
                    (seq.seq_id, PrefillProgress(seq.computed - seq.start, seq.end - seq.start))
                )
                continue
            row = by_seq.get(seq.seq_id)
            if seq.capture and logits is not None and row is not None:
                seq.logits = logits[row].float().cpu().clone()
            out += self._prefilled(seq, None if row is None else tokens[row])
        return out

    def _sample(
        self, seqs: list[_Seq], logits: torch.Tensor | None, greedy: list[int] | None = None
    ) -> list[int]:
        """One token per row of ``logits``: greedy rows in one argmax (``greedy``: the argmax
        of each row, where the head found it already), the rest one by one."""
        if logits is None or not seqs:
            return []
        with torch.inference_mode():
            if greedy is None:
                # In float32: argmax over bfloat16 takes 4x longer on a CPU (262k vocabularies).
                scores = logits.float()
                fast = native.kernels() if scores.device.type == "cpu" else None
                greedy = None if fast is None else fast.argmax(scores)
                if greedy is None:
                    greedy = torch.argmax(scores, dim=-1).tolist()
            tokens = [int(t) for t in greedy]
            drawn = [
                i
                for i, seq in enumerate(seqs)
                if not seq.request.sampling.is_greedy and seq.request.sampling.max_tokens > 0
            ]
            if drawn:
                self._draw(tokens, [seqs[i] for i in drawn], drawn, logits)
        return tokens

    def _draw(
        self, tokens: list[int], seqs: list[_Seq], rows: list[int], logits: torch.Tensor
    ) -> None:
        """Sampled tokens into ``tokens[rows]``: in one call of the engine's kernel (each row
        its own uniform draw from its generator), as ``sampling.sample_token`` would draw them:
        temperature, top-k (its threshold found here by ``torch.topk``, the kernel keeping the
        logits at or above it) and top-p (the kernel's nucleus: ~25 ms a token over 262k
        logits through ``torch.sort``, ~1 ms there); no kernel: ``sample_token``."""
        fast = native.kernels() if logits.device.type == "cpu" else None
        found = None
        if fast is not None and rows:
            scores = logits if rows == list(range(logits.shape[0])) else logits[rows]
            scores = scores.float().contiguous()
            uniforms = [
                float(torch.rand(1, dtype=torch.float64, generator=seq.generator)) for seq in seqs
            ]
            settings = [seq.request.sampling for seq in seqs]
            top_ps = [1.0 if s.top_p is None else min(s.top_p, 1.0) for s in settings]
            thresholds = [
                top_k_threshold(scores[i], s.top_k) if s.top_k else None
                for i, s in enumerate(settings)
            ]
            floors = [float("-inf") if t is None else float(t) for t in thresholds]
            found = fast.sample(
                scores,
                [s.temperature for s in settings],
                uniforms,
                top_ps if any(p < 1.0 for p in top_ps) else None,
                floors if any(t is not None for t in thresholds) else None,
            )
        drawn = dict(zip(rows, found, strict=True)) if found else {}
        for row, seq in zip(rows, seqs, strict=True):
            token = drawn.get(row)
            if token is None:
                token = sample_token(logits[row], seq.request.sampling, seq.generator)
            tokens[row] = token

    def _prefilled(self, seq: _Seq, token: int | None) -> StepResult:
        """``Prefilled`` for ``seq``, then its first token (or its end)."""
        out: StepResult = [(seq.seq_id, Prefilled(dict(seq.snapshots), seq.computed - seq.start))]
        seq.snapshots.clear()
        if token is None or seq.request.sampling.max_tokens == 0 or seq.capture:
            out.append((seq.seq_id, Stopped("max_tokens")))
            self.cancel(seq.seq_id)
            return out
        return out + self._emit(seq, token, first=True)

    def _emit(self, seq: _Seq, token: int, *, first: bool = False) -> StepResult:
        """The events of a sampled ``token`` at position ``seq.computed``."""
        events: list[EngineEvent] = []
        limit = self._info.max_context_tokens
        if seq.computed >= limit:
            events.append(Stopped("model_context_window_exceeded"))
        elif token in self._stop_ids:
            events.append(Stopped("end_turn"))
        else:
            events.append(TokenOut(token))
            seq.produced += 1
            if seq.produced >= seq.request.sampling.max_tokens:
                events.append(Stopped("max_tokens"))
            elif seq.computed + 1 >= limit:
                # The sampled token would sit at the window's end: no room to feed it back.
                events.append(Stopped("model_context_window_exceeded"))
            else:
                seq.pending = token
        if isinstance(events[-1], Stopped):
            self.cancel(seq.seq_id)
        return [(seq.seq_id, e) for e in events]

    # -- checks --------------------------------------------------------------------------------

    def prompt_logits(
        self, request: EngineRequest, *, batch_with: Sequence[EngineRequest] = ()
    ) -> torch.Tensor:
        """Logits (float32, on CPU) for the position after ``request.tokens``, computed exactly
        as a request would be (restore, chunked prefill): for fidelity checks and benchmarks.
        Alone, or with ``batch_with`` decoding in the same steps (they are added first, run
        until they all decode, then cancelled once the logits are there). Nothing else may be
        running."""
        if self._seqs:
            raise RuntimeError("prompt_logits needs an idle engine")
        if request.reuse_tokens >= len(request.tokens):
            raise ValueError("prompt_logits needs at least one token to compute")
        others = [self.add(r) for r in batch_with]
        try:
            while any(not self._seqs[o].decoding for o in others if o in self._seqs):
                self._raise_for(self.step(), others)
            seq = self._add(request, capture=True)
            while seq.seq_id in self._seqs:
                self._raise_for(self.step(), [seq.seq_id])
        finally:
            for other in (*others, self._last_id):
                self.cancel(other)
        assert seq.logits is not None
        return seq.logits

    @staticmethod
    def _raise_for(results: StepResult, seqs: Sequence[SeqId]) -> None:
        for got, item in results:
            if got in seqs and isinstance(item, Exception):
                raise item


def check_kv_dtype(model_dtype: torch.dtype, kv_dtype: torch.dtype) -> torch.dtype:
    """``kv_dtype`` where a pool of it works under a ``model_dtype`` model: the model's own, or
    float16 under float32 (llama.cpp's default: half the bytes a cached token, and decode
    attention reads half as much; converted where written and read, on the engine's kernels
    and PyTorch's paths alike). Raises ``ValueError`` otherwise."""
    if kv_dtype == model_dtype or (model_dtype == torch.float32 and kv_dtype == torch.float16):
        return kv_dtype
    model_name = str(model_dtype).removeprefix("torch.")
    raise ValueError(
        f"a {str(kv_dtype).removeprefix('torch.')} KV pool does not work under a {model_name} "
        f"model; choose {model_name}" + (" or float16" if model_dtype == torch.float32 else "")
    )


def parameter_revision(model: torch.nn.Module, *parts: str) -> str:
    """A digest of a few parameter tensors plus ``parts``: for models built in process."""
    digest = hashlib.sha256(KV_FORMAT.encode())
    for part in parts:
        digest.update(b"\0" + part.encode())
    params = list(model.named_parameters())
    for name, param in params[:4] + params[-4:]:
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "DEFAULT_MAX_BATCH_TOKENS",
    "KV_FORMAT",
    "PagedEngine",
    "check_kv_dtype",
]
