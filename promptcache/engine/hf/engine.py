"""``HFEngine``: the ``Engine`` protocol on a transformers causal LM with a real KV cache.

The model is driven by hand, never through ``model.generate``: chunked prefill from an optional
restored prefix, then one token per forward. Every forward asks for the logits of its last
position only (``logits_to_keep=1``): Gemma's vocabulary is 262k, and full-prompt logits would
cost gigabytes. Positions are passed explicitly as ``position_ids`` (transformers 5 derives the
query offset from the cache length, which a restored cache sets to ``reuse_tokens``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Generator, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from promptcache.core.chatformat import ChatFormat
from promptcache.core.layout import Tokenizer
from promptcache.engine.base import (
    EngineEvent,
    EngineInfo,
    EngineRequest,
    Prefilled,
    PrefillProgress,
    Stopped,
    TokenOut,
)
from promptcache.engine.hf.codec import HFKVCodec
from promptcache.engine.hf.kv import (
    DEFAULT_PAGE_TOKENS,
    HFKVPayload,
    KVLayout,
    KVPage,
    PagePool,
    export_snapshot,
    new_cache,
    restore_cache,
)
from promptcache.engine.sampling import make_generator, sample_token
from promptcache.errors import PromptTooLong

DEFAULT_PREFILL_CHUNK = 512
KV_FORMAT = "hf-kv-3"
"""Bumped whenever the payload layout or KV numerics of this engine change (part of revisions)."""


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:n]``; a clear error when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this host")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} (use 'cpu' or 'cuda')")
    return dev


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: tensors report an index, and page copies are keyed by it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Live KV bytes per token: layers x (K and V) x kv heads x head dim x element size."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    element = torch.empty((), dtype=dtype).element_size()
    return int(text.num_hidden_layers) * 2 * kv_heads * head_dim * element


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


class HFEngine:
    """A transformers causal LM behind the ``Engine`` protocol. Not thread-safe."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        chat_format: ChatFormat,
        model_id: str,
        revision: str | None,
        max_context_tokens: int,
        stop_token_ids: Collection[int],
        device: str = "cpu",
        *,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
        kv_page_tokens: int = DEFAULT_PAGE_TOKENS,
    ) -> None:
        """Wrap ``model`` (moved to ``device``, set to eval).

        ``revision`` of ``None`` derives one from the parameters, format and dtype.
        ``stop_token_ids`` end the turn; the stop token itself is never yielded.
        ``kv_page_tokens`` is the page size of snapshots' full-attention KV.
        """
        if prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be positive")
        if kv_page_tokens < 1:
            raise ValueError("kv_page_tokens must be positive")
        self._device = resolve_device(device)
        self._model = model.to(self._device).eval()
        self._tokenizer = tokenizer
        self._chat_format = chat_format
        self._stop_ids = frozenset(int(i) for i in stop_token_ids)
        self._chunk = prefill_chunk_tokens
        self._layout = KVLayout.from_config(model.config)
        self._page_tokens = kv_page_tokens
        self._pool = PagePool()
        self._codec = HFKVCodec(self._layout, _indexed(self._device), self._pool)
        dtype: torch.dtype = self._model.dtype
        if revision is None:
            revision = parameter_revision(self._model, chat_format.name, dtype_name(dtype))
        self._info = EngineInfo(
            model_id=model_id,
            revision=revision,
            max_context_tokens=max_context_tokens,
            device=str(self._device),
            dtype=dtype_name(dtype),
            kv_bytes_per_token=kv_bytes_per_token(model.config, dtype),
        )
        self.num_prefill_tokens_total = 0
        """Every token run through the model in prefill, over the engine's lifetime."""

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
    def model(self) -> Any:
        return self._model

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_ids

    @property
    def kv_layout(self) -> KVLayout:
        return self._layout

    @property
    def kv_codec(self) -> HFKVCodec:
        return self._codec

    @property
    def kv_page_tokens(self) -> int:
        return self._page_tokens

    def generate(self, request: EngineRequest) -> Generator[EngineEvent, None, None]:
        """Prefill (restoring ``request.reuse``), export snapshots, then decode.

        A generator function: nothing runs until it is first advanced, and closing it simply
        drops the live cache. Torch's inference mode is entered per step, never across a
        ``yield``, so the caller's code between steps runs in its normal autograd mode.
        """
        tokens = [int(t) for t in request.tokens]
        sampling = request.sampling
        self._check(request, tokens)
        decode = sampling.max_tokens > 0
        end = len(tokens) if decode else max(request.snapshot_at, default=request.reuse_tokens)

        cache, logits, snapshots = yield from self._prefill(request, tokens, end)
        yield Prefilled(snapshots=snapshots, num_computed_tokens=end - request.reuse_tokens)
        if not decode:
            yield Stopped("max_tokens")
            return

        generator = make_generator(sampling, self._device)
        position = len(tokens)  # position of the token about to be sampled
        produced = 0
        while True:
            if position >= self._info.max_context_tokens:
                yield Stopped("model_context_window_exceeded")
                return
            assert logits is not None
            with torch.inference_mode():
                token = sample_token(logits, sampling, generator)
            if token in self._stop_ids:
                yield Stopped("end_turn")
                return
            yield TokenOut(token)
            produced += 1
            if produced >= sampling.max_tokens:
                yield Stopped("max_tokens")
                return
            position += 1
            if position >= self._info.max_context_tokens:
                # The sampled token would sit at the window's end: no room to feed it back.
                yield Stopped("model_context_window_exceeded")
                return
            with torch.inference_mode():
                logits = self._forward(cache, [token], position - 1)

    def prompt_logits(self, request: EngineRequest) -> torch.Tensor:
        """Logits (float32, on CPU) for the position after ``request.tokens``, computed exactly as
        ``generate`` would (restore, chunked prefill): for fidelity checks and benchmarks."""
        tokens = [int(t) for t in request.tokens]
        self._check(request, tokens)
        if request.reuse_tokens >= len(tokens):
            raise ValueError("prompt_logits needs at least one token to compute")
        steps = self._prefill(request, tokens, len(tokens))
        while True:
            try:
                next(steps)
            except StopIteration as done:
                logits: torch.Tensor | None = done.value[1]
                break
        with torch.inference_mode():
            assert logits is not None
            return logits.float().cpu().clone()

    def _check(self, request: EngineRequest, tokens: Sequence[int]) -> None:
        n = len(tokens)
        if request.sampling.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if n > self._info.max_context_tokens:
            raise PromptTooLong(
                f"prompt is {n} tokens long; the model's context window is "
                f"{self._info.max_context_tokens} tokens"
            )
        reuse = request.reuse_tokens
        if reuse < 0 or reuse > n:
            raise ValueError(f"reuse_tokens {reuse} outside [0, {n}]")
        if reuse > 0:
            if not isinstance(request.reuse, HFKVPayload):
                raise ValueError("reuse_tokens > 0 needs an HFKVPayload from this engine")
            if reuse > request.reuse.num_tokens:
                raise ValueError(f"payload holds {request.reuse.num_tokens} < {reuse} tokens")
        if request.sampling.max_tokens > 0 and reuse >= n:
            # The last prompt token's logits are needed: restore at most N - 1 (spec §2.5).
            raise ValueError(f"cannot generate with all {n} prompt tokens restored")
        bad = [x for x in request.snapshot_at if not reuse < x <= n]
        if bad:
            raise ValueError(f"snapshot offsets {bad} outside ({reuse}, {n}]")

    def _prefill(
        self, request: EngineRequest, tokens: Sequence[int], end: int
    ) -> Generator[
        PrefillProgress, None, tuple[DynamicCache, torch.Tensor | None, dict[int, HFKVPayload]]
    ]:
        """Restore ``tokens[:reuse_tokens]``, run ``tokens[reuse_tokens:end]`` in chunks, and
        export a snapshot at each requested offset.

        Chunks break at snapshot offsets: a sliding layer holds only its window, so its state at
        an offset exists only at the moment that offset is a chunk boundary (spec §2.4).
        """
        start = request.reuse_tokens
        # Complete pages whose values the live cache holds: snapshots share them, not copy them.
        shared: dict[int, KVPage] = {}
        if start > 0:
            assert isinstance(request.reuse, HFKVPayload)
            cache = restore_cache(request.reuse, start, self._layout)
            shared = request.reuse.reusable_pages(start, self._page_tokens)
        else:
            cache = new_cache(self._layout)
        wanted = set(request.snapshot_at)
        cuts = set(range(start + self._chunk, end, self._chunk))
        cuts.update(x for x in wanted if start < x < end)
        cuts.add(end)
        logits: torch.Tensor | None = None
        snapshots: dict[int, HFKVPayload] = {}
        pos = start
        for cut in sorted(c for c in cuts if c > start):
            if pos > start:
                # One chunk per step: other requests interleave and a cancel takes effect here.
                yield PrefillProgress(pos - start, end - start)
            with torch.inference_mode():
                logits = self._forward(cache, tokens[pos:cut], pos)
            self.num_prefill_tokens_total += cut - pos
            pos = cut
            if cut in wanted:
                snapshots[cut] = export_snapshot(
                    cache,
                    cut,
                    self._layout,
                    page_tokens=self._page_tokens,
                    shared=shared,
                    pool=self._pool,
                )
        return cache, logits, snapshots

    def _forward(self, cache: DynamicCache, ids: Sequence[int], position: int) -> torch.Tensor:
        """Run ``ids`` at ``position`` onwards through the model; the last position's logits."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
        positions = torch.arange(position, position + len(ids), device=self._device).unsqueeze(0)
        out = self._model(
            input_ids=input_ids,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[0, -1]
        return logits


__all__ = ["KV_FORMAT", "HFEngine", "kv_bytes_per_token", "parameter_revision", "resolve_device"]
