"""The engine's tokenizers: transformers' adapter and its Rust backend called directly give the
same ids and text; a saved backend loads back only when whole and built by these versions."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from promptcache.engine.hf.testing import BASE_SPECIALS, fast_tokenizer
from promptcache.engine.hf.tokenizer import (
    BACKEND_FILE,
    BACKEND_META,
    BackendTokenizer,
    HFTokenizer,
)

SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<|im_start|>"]


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    """A byte-level BPE tokenizer trained on a few sentences, with special tokens, as
    transformers wraps one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "hello world, héllo wörld", "日本語のテキスト", "a b"] * 9
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[*BASE_SPECIALS, *SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    return fast_tokenizer(backend, SPECIALS)


def texts() -> list[str]:
    rng = random.Random(0)
    pieces = [*SPECIALS, "<bos>", "<eos>", "<unk>", "the ", "cat", "é", "日", "😀", " ", "\n", "<"]
    out = ["", "<start_of_turn>user\nthe cat<end_of_turn>", "  two  spaces ", "<bos><eos>"]
    out += ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30))) for _ in range(300)]
    return out


def test_the_backend_encodes_and_decodes_as_transformers_does(hf_tok: Any) -> None:
    adapter = HFTokenizer(hf_tok)
    backend = BackendTokenizer.from_transformers(hf_tok)
    assert backend is not None
    for text in texts():
        for allow in (True, False):
            ids = adapter.encode(text, allow_special=allow)
            assert backend.encode(text, allow_special=allow) == ids
            assert backend.decode([*ids, 1, 2, 4]) == adapter.decode([*ids, 1, 2, 4])
    # Typed text never becomes a control token; parsed where allowed.
    start = backend.token_id("<start_of_turn>")
    assert start is not None
    assert start not in backend.encode("<start_of_turn>", allow_special=False)
    assert backend.encode("<start_of_turn>", allow_special=True) == [start]
    for token in [*SPECIALS, "<unk>", "<eos>", "no-such-token"]:
        assert backend.token_id(token) == adapter.token_id(token)
    assert backend.vocab_size == adapter.vocab_size == len(hf_tok)
    assert backend.eos_token_id == adapter.eos_token_id == hf_tok.eos_token_id


def test_a_saved_backend_loads_back_the_same(hf_tok: Any, tmp_path: Path) -> None:
    backend = BackendTokenizer.from_transformers(hf_tok)
    assert backend is not None
    assert BackendTokenizer.load(tmp_path) is None  # nothing saved yet
    backend.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([BACKEND_FILE, BACKEND_META])
    loaded = BackendTokenizer.load(tmp_path)
    assert loaded is not None
    for text in texts():
        for allow in (True, False):
            assert loaded.encode(text, allow_special=allow) == backend.encode(
                text, allow_special=allow
            )
    assert loaded.eos_token_id == backend.eos_token_id


def test_a_saved_backend_of_other_versions_or_damaged_is_not_loaded(
    hf_tok: Any, tmp_path: Path
) -> None:
    backend = BackendTokenizer.from_transformers(hf_tok)
    assert backend is not None
    backend.save(tmp_path)
    meta_path = tmp_path / BACKEND_META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "versions": {"transformers": "0.0.1"}}))
    assert BackendTokenizer.load(tmp_path) is None  # transformers may build it otherwise now
    meta_path.write_text(json.dumps(meta))
    (tmp_path / BACKEND_FILE).write_text('{"version": "1.0", "model": ')
    assert BackendTokenizer.load(tmp_path) is None
    meta_path.write_text("not json")
    assert BackendTokenizer.load(tmp_path) is None


def test_threads_encoding_at_once_each_get_their_own_mode(hf_tok: Any) -> None:
    """The backend's special-token flag is shared: one thread's mode never leaks into another's
    encoding."""
    backend = BackendTokenizer.from_transformers(hf_tok)
    assert backend is not None
    text = "<start_of_turn>the cat<end_of_turn>"
    want = {allow: backend.encode(text, allow_special=allow) for allow in (True, False)}
    assert want[True] != want[False]
    wrong: list[bool] = []

    def work(allow: bool) -> None:
        for _ in range(300):
            if backend.encode(text, allow_special=allow) != want[allow]:
                wrong.append(allow)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
