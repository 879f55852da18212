"""Tiny random-weight engines for tests: real transformers models, built in process, no files,
served by the ``PagedEngine`` through the lean model code.

``build_tiny_engine("llama")`` is full attention only; ``build_tiny_engine("gemma3")`` mixes
sliding-window and full-attention layers (window 16), the case that makes snapshots subtle.
Both use ``ByteTokenizer`` and the PLAIN chat format and stop on ``<end_of_turn>`` / ``<eos>``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any, Literal

import torch

from promptcache.core.chatformat import PLAIN
from promptcache.core.tokenizer import ByteTokenizer
from promptcache.engine.base import (
    Engine,
    EngineEvent,
    EngineRequest,
    Prefilled,
    PrefillProgress,
    Stopped,
    TokenOut,
)
from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.models import from_hf
from promptcache.engine.paged.models.int8 import add_decode_int8
from promptcache.engine.paged.models.packed import pack_linears
from promptcache.engine.paged.models.panels import panel_linears, panels_available

TinyKind = Literal["llama", "gemma3"]
TINY_SLIDING_WINDOW = 16
TINY_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention")
TINY_BLOCK_TOKENS = 8


BASE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
"""The special tokens ``fast_tokenizer`` names, first in a tiny vocabulary (ids 0-3)."""


def fast_tokenizer(backend: Any, extra_specials: Sequence[str] = ()) -> Any:
    """A ``tokenizers.Tokenizer`` wrapped as transformers wraps one, with ``BASE_SPECIALS`` as
    its pad, EOS, BOS and unknown tokens and ``extra_specials`` as more special tokens."""
    from transformers import PreTrainedTokenizerFast

    pad, eos, bos, unk = BASE_SPECIALS
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        unk_token=unk,
        additional_special_tokens=list(extra_specials),
    )


def build_tiny_model(kind: str, *, seed: int = 0, **config: Any) -> Any:
    """A tiny ``LlamaForCausalLM`` or ``Gemma3ForCausalLM`` in float32, weights from ``seed``.

    ``config`` overrides config fields (``vocab_size``, special token ids, ...); the defaults fit
    ``ByteTokenizer``.
    """
    byte = ByteTokenizer()
    # A wide init spreads the logits, so greedy argmax is never a near-tie that float noise
    # between a cold and a warm run could flip.
    common: dict[str, Any] = {
        "vocab_size": byte.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "initializer_range": 0.5,
        "attn_implementation": "sdpa",
        "pad_token_id": byte.token_id("<pad>"),
        "eos_token_id": byte.token_id("<eos>"),
        "bos_token_id": byte.token_id("<bos>"),
    }
    common.update(config)
    # fork_rng: seed the weights without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(kind, common)


def _build(kind: str, common: dict[str, Any]) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    if kind == "llama":
        model: Any = LlamaForCausalLM(LlamaConfig(**{"num_hidden_layers": 2, **common}))
        return model.eval()
    if kind == "gemma3":
        gemma: dict[str, Any] = {
            "num_hidden_layers": len(TINY_LAYER_TYPES),
            "sliding_window": TINY_SLIDING_WINDOW,
            "layer_types": list(TINY_LAYER_TYPES),
            # Tied embeddings plus Gemma's sqrt(hidden) input scale make a random model echo its
            # last input token forever; untied, its greedy output varies.
            "tie_word_embeddings": False,
        }
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{**gemma, **common}))
        return model.eval()
    raise ValueError(f"unknown tiny model kind {kind!r}")


def build_tiny_engine(
    kind: str,
    *,
    seed: int = 0,
    max_context_tokens: int = 4096,
    stop_token_ids: Collection[int] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_batch_tokens: int = 64,
    block_tokens: int = TINY_BLOCK_TOKENS,
    pool_bytes: int = 64 << 20,
    kv_dtype: torch.dtype | None = None,
    decode_int8: bool = False,
    compile_decode: bool = False,
    packed: bool = False,
    panels: bool | None = None,
    prompt_tokens_beside_streams: int | None = None,
    stream_time_share: float = 0.0,
    integer_prompts: bool = False,
) -> PagedEngine:
    """A ``PagedEngine`` over a tiny random model (``kind``: ``"llama"`` or ``"gemma3"``).

    Blocks are small (``TINY_BLOCK_TOKENS``) so that short test prompts span several, and so is
    the step (``max_batch_tokens``), so that prompts prefill in several chunks. ``packed``:
    the layers' projections in oneDNN's layout, as the loader packs bf16 ones on a CPU
    (``models.packed``). ``panels``: float32 projections on the engine's own product
    (``models.panels``); by default where the loader would use it.
    """
    tokenizer = ByteTokenizer()
    model = build_tiny_model(kind, seed=seed).to(device)
    if stop_token_ids is None:
        stop_token_ids = (tokenizer.token_id("<end_of_turn>"), tokenizer.token_id("<eos>"))
    lean = from_hf(model, dtype)
    switch = add_decode_int8(lean) if decode_int8 else None
    if packed:
        pack_linears(lean)
    if panels is None:
        panels = panels_available(torch.device(device), dtype)
    if panels:
        panel_linears(lean)
    return PagedEngine(
        lean,
        tokenizer,
        PLAIN,
        model_id=f"tiny-{kind}",
        revision=None,
        max_context_tokens=max_context_tokens,
        stop_token_ids=stop_token_ids,
        pool_bytes=pool_bytes,
        kv_dtype=kv_dtype,
        block_tokens=block_tokens,
        max_batch_tokens=max_batch_tokens,
        decode_switch=switch,
        compile_decode=compile_decode,
        prompt_tokens_beside_streams=prompt_tokens_beside_streams,
        stream_time_share=stream_time_share,
        integer_prompts=integer_prompts,
    )


def random_prompt(n: int, seed: int = 1) -> list[int]:
    """``n`` pseudo-random byte tokens (valid ids for every tiny model)."""
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def run_all(engine: Engine, request: EngineRequest, *, progress: bool = False) -> list[EngineEvent]:
    """Every event of one generation run alone (``PrefillProgress`` only when ``progress``)."""
    seq = engine.add(request)
    events: list[EngineEvent] = []
    while engine.num_running:
        for got, item in engine.step():
            if got != seq:
                continue
            if isinstance(item, Exception):
                raise item
            events.append(item)
    return events if progress else [e for e in events if not isinstance(e, PrefillProgress)]


def prefilled(events: Sequence[EngineEvent]) -> Prefilled:
    """The ``Prefilled`` event, after any ``PrefillProgress`` (asserting that order)."""
    for event in events:
        if isinstance(event, Prefilled):
            return event
        if not isinstance(event, PrefillProgress):
            raise AssertionError(f"{event!r} before Prefilled")
    raise AssertionError("no Prefilled event")


def token_ids(events: Sequence[EngineEvent]) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenOut)]


def stop_reason(events: Sequence[EngineEvent]) -> str:
    """The reason of the final ``Stopped`` event (asserting it is there)."""
    last = events[-1]
    if not isinstance(last, Stopped):
        raise AssertionError(f"last event is {last!r}, not Stopped")
    return last.reason


__all__ = [
    "BASE_SPECIALS",
    "TINY_BLOCK_TOKENS",
    "TINY_SLIDING_WINDOW",
    "TinyKind",
    "build_tiny_engine",
    "build_tiny_model",
    "fast_tokenizer",
    "prefilled",
    "random_prompt",
    "run_all",
    "stop_reason",
    "token_ids",
]
