"""``FakeEngine``'s replies: deterministic per prompt, and never blank (a client such as Claude
Code asks again after a reply with no visible text, which would make one question two requests)."""

from __future__ import annotations

from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest, TokenOut
from promptcache.engine.fake import FakeEngine


def reply(engine: FakeEngine, prompt: bytes) -> bytes:
    request = EngineRequest(tokens=list(prompt), sampling=Sampling(max_tokens=64))
    return bytes(e.token_id for e in engine.generate(request) if isinstance(e, TokenOut))


def test_every_reply_starts_with_a_letter_and_repeats() -> None:
    engine = FakeEngine()
    replies = [reply(engine, f"prompt {i}".encode()) for i in range(500)]
    assert all(r[:1].isalpha() for r in replies)
    assert any(b" " in r for r in replies)  # later tokens still draw from the whole alphabet
    assert reply(engine, b"prompt 7") == replies[7]
