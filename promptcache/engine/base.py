"""The ``Engine`` protocol: the one seam between the service and a model runtime.

An engine turns token sequences into generated tokens. It can start a sequence from a restored
KV prefix (``reuse``) and export the KV state at given offsets of the prompt (``snapshot_at``);
both are opaque ``KVPayload`` handles to everyone but the engine itself. The engine is driven by
one loop (the service's ``EngineWorker`` thread): requests join between steps, and each
``step`` advances every running sequence at once (a batched engine runs one forward over all
of them), returning the events it produced::

    seq = engine.add(EngineRequest(tokens, sampling, reuse, reuse_tokens, snapshot_at))
    engine.step() -> [(seq, event), ...]    per sequence, in order:
        PrefillProgress(num_done_tokens, num_total_tokens)                 # zero or more
        Prefilled(snapshots={offset: payload, ...}, num_computed_tokens)   # always, once
        TokenOut(token_id)                                                 # zero or more
        Stopped(reason)                                                    # last: seq is gone
    engine.cancel(seq)                                                     # at any point
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from promptcache.core.chatformat import ChatFormat
from promptcache.core.layout import Tokenizer
from promptcache.core.payload import KVCodec, KVPayload
from promptcache.core.request import Sampling
from promptcache.errors import PromptTooLong


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
    kv_dtype: str = ""
    """The KV cache's element type (the model's ``dtype`` or, under a float32 model on a CPU,
    float16); empty where the engine keeps no tensors."""


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

SeqId = int
"""Names one running sequence of an engine, from ``add`` until its ``Stopped`` (or ``cancel``)."""

StepResult = list[tuple[SeqId, EngineEvent | Exception]]
"""What one ``step`` produced. An ``Exception`` ends that sequence only (its state is freed);
so does a ``Stopped`` event."""


class Engine(Protocol):
    """A model runtime. Not thread-safe: the service calls it from one worker thread.

    ``add`` validates a request (raising ``ValueError`` or ``PromptTooLong``) and queues it; no
    model work happens until ``step``. Payloads it hands out are immutable: restoring one never
    changes it (spec §1.5). A snapshot may share pages with ``request.reuse`` and with the other
    snapshots of the same sequence (``KVPayload.parts``). ``cancel`` frees a sequence's working
    state at once; cancelling an unknown or finished sequence does nothing. An error in one
    sequence is reported to that sequence only.
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

    def add(self, request: EngineRequest) -> SeqId: ...

    def cancel(self, seq: SeqId) -> None: ...

    def step(self) -> StepResult:
        """Advance every running sequence once: a prefill chunk (within the engine's token
        budget) or one decode token each. Returns ``[]`` when nothing is running."""
        ...

    @property
    def num_running(self) -> int:
        """Sequences added and not yet finished or cancelled."""
        ...


def check_request(
    request: EngineRequest, max_context_tokens: int, accepts: Callable[[KVPayload], bool]
) -> None:
    """Reject at ``add`` what no engine can run: ``PromptTooLong`` past the context window,
    ``ValueError`` for the rest (a restore without a payload of this engine's layout (as
    ``accepts`` judges it) or beyond what it holds, all ``N`` tokens restored when logits are
    needed, snapshot offsets outside ``(reuse, N]``, negative ``max_tokens``)."""
    n = len(request.tokens)
    if request.sampling.max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    if n > max_context_tokens:
        raise PromptTooLong(
            f"prompt is {n} tokens long; the model's context window is {max_context_tokens} tokens"
        )
    reuse = request.reuse_tokens
    if reuse < 0 or reuse > n:
        raise ValueError(f"reuse_tokens {reuse} outside [0, {n}]")
    if reuse > 0:
        if request.reuse is None or not accepts(request.reuse):
            raise ValueError("reuse_tokens > 0 needs a payload of this engine's KV layout")
        if reuse > request.reuse.num_tokens:
            raise ValueError(f"payload holds {request.reuse.num_tokens} < {reuse} tokens")
    if request.sampling.max_tokens > 0 and reuse >= n:
        # The last prompt token's logits are needed: restore at most N - 1 (spec §2.5).
        raise ValueError(f"cannot generate with all {n} prompt tokens restored")
    bad = [x for x in request.snapshot_at if not reuse < x <= n]
    if bad:
        raise ValueError(f"snapshot offsets {bad} outside ({reuse}, {n}]")


__all__ = [
    "Engine",
    "EngineEvent",
    "EngineInfo",
    "EngineRequest",
    "PrefillProgress",
    "Prefilled",
    "SeqId",
    "StepResult",
    "Stopped",
    "TokenOut",
    "check_request",
]
