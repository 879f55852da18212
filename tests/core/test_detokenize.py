"""``Detokenizer`` against decoding the whole list, with the kinds of tokenizer served: byte
tokens (characters split over several tokens), SentencePiece-style (``▁`` for spaces, Gemma,
Llama 2) and byte-level BPE (GPT-2 style, Llama 3, Qwen, SmolLM2)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from promptcache.core.detokenize import Detokenizer
from promptcache.core.tokenizer import ByteTokenizer

CORPUS = [
    "The capital of France is Paris. Ça coûte 12 € — naïve café, 東京 and 🙂 emoji.",
    "def add(a, b):\n    return a + b  # tabs\tand  double  spaces",
    "Prompt caching reads the prefix; a miss writes it. Ünïcödé everywhere: ß, ø, 日本語.",
]


class HF:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)


def byte_level_bpe() -> HF:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return HF(tok)


def sentencepiece_like() -> HF:
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return HF(tok)


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_like], ids=["bpe", "spm"])
def test_incremental_text_equals_the_whole_decode(make: object) -> None:
    tokenizer = make()  # type: ignore[operator]
    for text in CORPUS:
        ids = tokenizer.encode(text)
        detok = Detokenizer(tokenizer)
        seen = ""
        for token in ids:
            now = detok.push(token)
            assert now.startswith(seen)  # text only grows: the parser relies on it
            assert tokenizer.decode(ids).startswith(now)
            seen = now
        assert detok.finish() == tokenizer.decode(ids)


def test_split_characters_wait_for_their_last_byte() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("a🙂b", allow_special=False)
    detok = Detokenizer(tokenizer)
    shown = [detok.push(i) for i in ids]
    assert shown == ["a", "a", "a", "a", "a🙂", "a🙂b"]
    assert "\ufffd" not in "".join(shown)


def test_random_tokens_never_shrink_and_end_exact() -> None:
    tokenizer = ByteTokenizer()
    rng = random.Random(7)
    ids = [rng.randrange(256) for _ in range(400)]  # invalid UTF-8 too
    detok = Detokenizer(tokenizer)
    previous = ""
    for token in ids:
        now = detok.push(token)
        assert now.startswith(previous)
        previous = now
    final = detok.finish()
    assert final.startswith(previous)
    assert final == tokenizer.decode(ids)
