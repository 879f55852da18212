"""A deterministic engine without torch, for tests of the cache, service and API layers.

Its "KV state" is a chain of SHA-256 digests over the tokens, so a restored prefix must be the
right one: restoring a payload whose tokens differ from the prompt raises, and the generated
text depends on every prompt token, exactly as with a real model. It counts prefilled tokens.

Like the paged engine it stores KV in pages shared by nested snapshots (``FakePayload.parts``), and
``FakeCodec`` writes real bytes and files with a checksum, so tier, persistence and remote-store
tests need no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptcache.core.chatformat import PLAIN, ChatFormat
from promptcache.core.payload import (
    CorruptPayload,
    KVPayload,
    PartId,
    new_part_id,
    read_saved,
    write_atomically,
)
from promptcache.core.tokenizer import ByteTokenizer
from promptcache.engine.base import (
    EngineEvent,
    EngineInfo,
    EngineRequest,
    Prefilled,
    PrefillProgress,
    SeqId,
    Stopped,
    TokenOut,
    check_request,
)
from promptcache.engine.stepper import GeneratorEngine

_ALPHABET = b"abcdefghijklmnopqrstuvwxyz     ."
_LETTERS = 26


@dataclass(frozen=True, slots=True)
class FakePayload:
    """The token ids and chained states of a prefix; ``nbytes`` is what a real KV would take.

    Its bytes come in pages of ``page_tokens``: ``page_ids`` name the complete pages (shared with
    nested payloads of the same prompt) and ``tail_id`` the partial last one (its own).
    """

    tokens: tuple[int, ...]
    states: tuple[bytes, ...]
    bytes_per_token: int
    page_ids: tuple[PartId, ...]
    page_tokens: int
    tail_id: PartId

    def __post_init__(self) -> None:
        if len(self.page_ids) != len(self.tokens) // self.page_tokens:
            raise ValueError("page_ids must name every complete page")
        if len(self.states) != len(self.tokens) + 1:
            raise ValueError("states must hold the state before and after every token")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    @property
    def parts(self) -> list[tuple[PartId, int]]:
        page = self.page_tokens * self.bytes_per_token
        parts = [(page_id, page) for page_id in self.page_ids]
        rest = self.num_tokens % self.page_tokens
        if rest:
            parts.append((self.tail_id, rest * self.bytes_per_token))
        return parts


_MAGIC = b"PCFAKEKV1\n"
_PREFIX = len(_MAGIC) + 8
_STATE_BYTES = 32


class FakeCodec:
    """Bytes and files for ``FakePayload``: a magic line, a length-prefixed JSON header (metadata,
    tokens, page ids, body checksum) and a body of the states padded to ``nbytes``, so a file is
    about the size a real KV would be. Memory tiers are all host memory: moves return the
    payload."""

    suffix = ".fakekv"
    layout = "promptcache-fake-kv/1"

    def to_host(self, payload: KVPayload) -> KVPayload:
        return payload

    def to_device(self, payload: KVPayload) -> KVPayload:
        return payload

    def encode(self, payload: KVPayload, metadata: Mapping[str, str]) -> bytes:
        if not isinstance(payload, FakePayload):
            raise TypeError("FakeCodec encodes only FakePayload")
        body = b"".join(payload.states)
        body += bytes(max(0, payload.nbytes - len(body)))
        header = json.dumps(
            {
                "metadata": dict(metadata),
                "tokens": list(payload.tokens),
                "bytes_per_token": payload.bytes_per_token,
                "page_ids": list(payload.page_ids),
                "page_tokens": payload.page_tokens,
                "tail_id": payload.tail_id,
                "body_bytes": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode()
        return _MAGIC + len(header).to_bytes(8, "little") + header + body

    def save(self, payload: KVPayload, path: Path, metadata: Mapping[str, str]) -> None:
        write_atomically(path, self.encode(payload, metadata))

    def read_metadata(self, path: Path) -> dict[str, str]:
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(_PREFIX)
                length = int.from_bytes(prefix[len(_MAGIC) :], "little")
                head = prefix + (f.read(length) if length <= size else b"")
        except OSError as exc:
            raise CorruptPayload(f"{path.name}: {exc}") from exc
        header = _parse_header(head, size, path.name)
        return {str(k): str(v) for k, v in header["metadata"].items()}

    def load(self, path: Path) -> FakePayload:
        payload, _ = self._decode(read_saved(path), path.name)
        return payload

    def decode(self, data: bytes) -> tuple[FakePayload, dict[str, str]]:
        return self._decode(data, "payload")

    def _decode(self, data: bytes, name: str) -> tuple[FakePayload, dict[str, str]]:
        header = _parse_header(data, len(data), name)
        body = data[_PREFIX + int.from_bytes(data[len(_MAGIC) : _PREFIX], "little") :]
        if hashlib.sha256(body).hexdigest() != header["sha256"]:
            raise CorruptPayload(f"{name}: checksum mismatch")
        try:
            n = len(header["tokens"])
            if len(body) < (n + 1) * _STATE_BYTES:
                raise ValueError(f"{len(body)} body bytes for {n} tokens")
            states = tuple(body[i * _STATE_BYTES : (i + 1) * _STATE_BYTES] for i in range(n + 1))
            payload = FakePayload(
                tuple(int(t) for t in header["tokens"]),
                states,
                int(header["bytes_per_token"]),
                tuple(int(i) for i in header["page_ids"]),
                int(header["page_tokens"]),
                int(header["tail_id"]),
            )
            metadata = {str(k): str(v) for k, v in header["metadata"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptPayload(f"{name}: {exc}") from exc
        return payload, metadata


def _parse_header(head: bytes, size: int, name: str) -> dict[str, Any]:
    """The JSON header at the start of ``head`` (at least the magic, the length and the header),
    checking that a whole encoding is ``size`` bytes as the header says."""
    if len(head) < _PREFIX or not head.startswith(_MAGIC):
        raise CorruptPayload(f"{name}: not a fake KV payload")
    length = int.from_bytes(head[len(_MAGIC) : _PREFIX], "little")
    if _PREFIX + length > min(size, len(head)):
        raise CorruptPayload(f"{name}: header longer than the payload")
    try:
        header = json.loads(head[_PREFIX : _PREFIX + length])
        if not isinstance(header, dict) or not isinstance(header["metadata"], dict):
            raise ValueError("not an object")
        body_bytes = int(header["body_bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptPayload(f"{name}: bad header ({exc})") from exc
    if size != _PREFIX + length + body_bytes:
        raise CorruptPayload(f"{name}: truncated or padded")
    return header


def _step(state: bytes, token: int) -> bytes:
    return hashlib.sha256(state + token.to_bytes(4, "big")).digest()


class FakeEngine(GeneratorEngine):
    """Deterministic stand-in for a model. ``reply_tokens`` bounds each reply's length."""

    def __init__(
        self,
        *,
        max_context_tokens: int = 32768,
        kv_bytes_per_token: int = 64,
        reply_tokens: int = 12,
        fail_after_prefill: bool = False,
        prefill_gate: threading.Event | None = None,
        kv_page_tokens: int = 64,
        device: str = "cpu",
        prefill_chunk_tokens: int | None = None,
    ) -> None:
        """``device`` is a label only (payloads are Python objects): ``"cuda"`` makes the service
        build a device tier above host memory, for tier tests. ``prefill_chunk_tokens`` makes a
        prefill take one step per chunk of that many tokens, with ``PrefillProgress`` between
        them, as a batched engine does; by default a prefill takes one step."""
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be positive")
        super().__init__()
        self._tokenizer = ByteTokenizer()
        self._info = EngineInfo(
            model_id="fake",
            revision="fake-1",
            max_context_tokens=max_context_tokens,
            device=device,
            dtype="none",
            kv_bytes_per_token=kv_bytes_per_token,
        )
        self.reply_tokens = reply_tokens
        self.fail_after_prefill = fail_after_prefill
        self.prefill_gate = prefill_gate
        """When set, each prefill waits for this event: tests hold a writer mid-flight with it."""
        self.num_prefill_tokens_total = 0
        self.eos_id = self._tokenizer.token_id("<end_of_turn>")
        self.page_tokens = kv_page_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._codec = FakeCodec()

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    @property
    def chat_format(self) -> ChatFormat:
        return PLAIN

    @property
    def kv_codec(self) -> FakeCodec:
        return self._codec

    def add(self, request: EngineRequest) -> SeqId:
        self._check(request)
        return super().add(request)

    def _check(self, request: EngineRequest) -> None:
        """Reject what a real engine cannot run, as ``PagedEngine`` does, at ``add``: the fake's
        hash chain could restore all ``N`` tokens or ignore a missing payload, a model cannot."""
        check_request(request, self._info.max_context_tokens, _is_fake)

    def generate(self, request: EngineRequest) -> Generator[EngineEvent, None, None]:
        if self.prefill_gate is not None:
            self.prefill_gate.wait(timeout=60)
        tokens = list(request.tokens)
        states: list[bytes] = [b"\x00" * 32]
        pages: list[PartId] = []  # complete pages of this prompt, shared by its snapshots
        if request.reuse is not None and request.reuse_tokens > 0:
            payload = request.reuse
            if not isinstance(payload, FakePayload):
                raise TypeError("FakeEngine restores only FakePayload")
            if list(payload.tokens[: request.reuse_tokens]) != tokens[: request.reuse_tokens]:
                raise AssertionError("restored prefix does not match the prompt")
            states = list(payload.states[: request.reuse_tokens + 1])
            if payload.page_tokens == self.page_tokens:
                pages = list(payload.page_ids[: request.reuse_tokens // self.page_tokens])
        end = len(tokens)
        if request.sampling.max_tokens == 0:
            end = max(request.snapshot_at, default=len(states) - 1)
        start = len(states) - 1
        chunk = self.prefill_chunk_tokens or max(1, end - start)
        for done in range(start, end, chunk):
            if done > start:
                yield PrefillProgress(done - start, end - start)
            for token in tokens[done : min(done + chunk, end)]:
                states.append(_step(states[-1], token))
            self.num_prefill_tokens_total += min(chunk, end - done)
        snapshots: dict[int, KVPayload] = {}
        for offset in sorted(request.snapshot_at):
            num_pages = offset // self.page_tokens
            pages += [new_part_id() for _ in range(num_pages - len(pages))]
            snapshots[offset] = FakePayload(
                tuple(tokens[:offset]),
                tuple(states[: offset + 1]),
                self._info.kv_bytes_per_token,
                tuple(pages[:num_pages]),
                self.page_tokens,
                new_part_id(),
            )
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
            # A reply starts with a letter: a client that checks for visible output (Claude
            # Code asks again after a blank reply) sees some, so one question is one request.
            letters = _LETTERS if i == 0 else len(_ALPHABET)
            token = _ALPHABET[state[1] % letters]
            yield TokenOut(token)
            state = _step(state, token)
            position += 1
        yield Stopped("max_tokens")


def _is_fake(payload: KVPayload) -> bool:
    return isinstance(payload, FakePayload)


def fake_tokens(tokens: Sequence[int]) -> bytes:
    """The final state after ``tokens``: handy in tests to compare runs."""
    state = b"\x00" * 32
    for token in tokens:
        state = _step(state, token)
    return state


__all__ = ["FakeCodec", "FakeEngine", "FakePayload", "fake_tokens"]
