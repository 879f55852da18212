"""The ``Engine`` protocol: the one seam between the service and a model runtime.

An engine turns a token sequence into generated tokens. It can start from a restored KV prefix
(``reuse``) and export the KV state at given offsets of the prompt (``snapshot_at``); both are
opaque ``KVPayload`` handles to everyone but the engine itself. The service drives ``generate``
one step at a time from its worker thread, so the generator is the unit of scheduling::

    gen = engine.generate(EngineRequest(tokens, reuse, reuse_tokens, snapshot_at, sampling))
    PrefillProgress(num_done_tokens, num_total_tokens)                 # zero or more
    Prefilled(snapshots={offset: payload, ...}, num_computed_tokens)   # always, once
    TokenOut(token_id)                                                 # zero or more
    Stopped(reason)                                                    # last item
    gen.close()                                                        # cancels at any point
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from promptcache.core.chatformat import ChatFormat
from promptcache.core.layout import Tokenizer
from promptcache.core.payload import KVCodec, KVPayload
from promptcache.core.request import Sampling


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Facts learned when the model loads.

    ``revision`` must change whenever weights, tokenizer, chat format or KV numerics change: it is
    part of every cache key's namespace (spec §1.4).
    """

    model_id: str
    revision: str
    max_context_tokens: int
    device: str
    dtype: str
    kv_bytes_per_token: int


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation.

    ``reuse`` holds the KV state of at least ``reuse_tokens`` prompt tokens; the engine restores
    exactly ``tokens[:reuse_tokens]`` from it (fewer than the payload holds when the whole prompt
    is cached and the last token must be recomputed for its logits, spec §2.5) and computes the
    rest. ``snapshot_at`` lists offsets in ``(reuse_tokens, len(tokens)]`` whose state must be
    exported. With ``sampling.max_tokens == 0`` the engine only prefills what the snapshots need.
    """

    tokens: Sequence[int]
    sampling: Sampling
    reuse: KVPayload | None = None
    reuse_tokens: int = 0
    snapshot_at: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class PrefillProgress:
    """A prefill chunk is done; more follow. Long prompts prefill over many steps, so other
    requests keep streaming meanwhile and a cancelled request stops within one chunk."""

    num_done_tokens: int
    num_total_tokens: int


@dataclass(frozen=True, slots=True)
class Prefilled:
    """The prompt is processed. ``num_computed_tokens`` counts tokens actually prefilled."""

    snapshots: Mapping[int, KVPayload]
    num_computed_tokens: int


@dataclass(frozen=True, slots=True)
class TokenOut:
    """One sampled token."""

    token_id: int


@dataclass(frozen=True, slots=True)
class Stopped:
    """Generation ended: an end-of-turn token, ``max_tokens``, or the context window."""

    reason: Literal["end_turn", "max_tokens", "model_context_window_exceeded"]


EngineEvent = PrefillProgress | Prefilled | TokenOut | Stopped


class Engine(Protocol):
    """A model runtime. Not thread-safe: the service calls it from one worker thread.

    ``generate`` returns a generator that does no work until first advanced. Payloads it yields
    are immutable: restoring one never changes it (spec §1.5). A snapshot may share pages with
    ``request.reuse`` and with the other snapshots of the same call (``KVPayload.parts``).
    Closing the generator frees its working state. Errors raised while advancing it are reported
    to that request only.
    """

    @property
    def info(self) -> EngineInfo: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def chat_format(self) -> ChatFormat: ...

    @property
    def kv_codec(self) -> KVCodec:
        """Moves this engine's payloads between device memory, host memory and files."""
        ...

    def generate(self, request: EngineRequest) -> Generator[EngineEvent, None, None]: ...


__all__ = [
    "Engine",
    "EngineEvent",
    "EngineInfo",
    "EngineRequest",
    "PrefillProgress",
    "Prefilled",
    "Stopped",
    "TokenOut",
]
