"""A deterministic engine without torch, for tests of the cache, service and API layers.

Its "KV state" is a chain of SHA-256 digests over the tokens, so a restored prefix must be the
right one: restoring a payload whose tokens differ from the prompt raises, and the generated
text depends on every prompt token, exactly as with a real model. It counts prefilled tokens.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

from promptcache.core.chatformat import PLAIN, ChatFormat
from promptcache.core.tokenizer import ByteTokenizer
from promptcache.engine.base import (
    EngineEvent,
    EngineInfo,
    EngineRequest,
    Prefilled,
    Stopped,
    TokenOut,
)

_ALPHABET = b"abcdefghijklmnopqrstuvwxyz     ."


@dataclass(frozen=True, slots=True)
class FakePayload:
    """The token ids and chained states of a prefix; ``nbytes`` is what a real KV would take."""

    tokens: tuple[int, ...]
    states: tuple[bytes, ...]
    bytes_per_token: int

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.bytes_per_token


def _step(state: bytes, token: int) -> bytes:
    return hashlib.sha256(state + token.to_bytes(4, "big")).digest()


class FakeEngine:
    """Deterministic stand-in for a model. ``reply_tokens`` bounds each reply's length."""

    def __init__(
        self,
        *,
        max_context_tokens: int = 32768,
        kv_bytes_per_token: int = 64,
        reply_tokens: int = 12,
        fail_after_prefill: bool = False,
        prefill_gate: threading.Event | None = None,
    ) -> None:
        self._tokenizer = ByteTokenizer()
        self._info = EngineInfo(
            model_id="fake",
            revision="fake-1",
            max_context_tokens=max_context_tokens,
            device="cpu",
            dtype="none",
            kv_bytes_per_token=kv_bytes_per_token,
        )
        self.reply_tokens = reply_tokens
        self.fail_after_prefill = fail_after_prefill
        self.prefill_gate = prefill_gate
        """When set, every prefill waits for this event: tests use it to hold a writer mid-flight."""
        self.num_prefill_tokens_total = 0
        self.eos_id = self._tokenizer.token_id("<end_of_turn>")

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    @property
    def chat_format(self) -> ChatFormat:
        return PLAIN

    def generate(self, request: EngineRequest) -> Generator[EngineEvent, None, None]:
        if self.prefill_gate is not None:
            self.prefill_gate.wait(timeout=60)
        tokens = list(request.tokens)
        states: list[bytes] = [b"\x00" * 32]
        if request.reuse is not None and request.reuse_tokens > 0:
            payload = request.reuse
            if not isinstance(payload, FakePayload):
                raise TypeError("FakeEngine restores only FakePayload")
            if list(payload.tokens[: request.reuse_tokens]) != tokens[: request.reuse_tokens]:
                raise AssertionError("restored prefix does not match the prompt")
            states = list(payload.states[: request.reuse_tokens + 1])
        end = len(tokens)
        if request.sampling.max_tokens == 0:
            end = max(request.snapshot_at, default=len(states) - 1)
        start = len(states) - 1
        for token in tokens[start:end]:
            states.append(_step(states[-1], token))
        self.num_prefill_tokens_total += max(0, end - start)
        snapshots = {
            offset: FakePayload(
                tuple(tokens[:offset]), tuple(states[: offset + 1]), self._info.kv_bytes_per_token
            )
            for offset in request.snapshot_at
        }
        yield Prefilled(snapshots, max(0, end - start))
        if request.sampling.max_tokens == 0:
            yield Stopped("max_tokens")
            return
        if self.fail_after_prefill:
            raise RuntimeError("fake engine failure")
        yield from self._decode(states[-1], len(tokens), request.sampling.max_tokens)

    def _decode(self, state: bytes, position: int, max_tokens: int) -> Iterator[EngineEvent]:
        length = 1 + int.from_bytes(state[:8], "big") % self.reply_tokens
        for i in range(max_tokens):
            if position >= self._info.max_context_tokens:
                yield Stopped("model_context_window_exceeded")
                return
            if i >= length:
                yield Stopped("end_turn")
                return
            token = _ALPHABET[state[1] % len(_ALPHABET)]
            yield TokenOut(token)
            state = _step(state, token)
            position += 1
        yield Stopped("max_tokens")


def fake_tokens(tokens: Sequence[int]) -> bytes:
    """The final state after ``tokens``: handy in tests to compare runs."""
    state = b"\x00" * 32
    for token in tokens:
        state = _step(state, token)
    return state


__all__ = ["FakeEngine", "FakePayload", "fake_tokens"]
