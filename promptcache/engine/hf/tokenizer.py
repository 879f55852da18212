"""The engine's tokenizers behind the ``Tokenizer`` protocol (core/layout.py).

``HFTokenizer`` adapts a transformers tokenizer; ``BackendTokenizer`` calls the Rust
``tokenizers.Tokenizer`` under a transformers 5 tokenizer directly, as transformers itself does
(``encode_batch`` with its ``encode_special_tokens`` flag, ``decode``), so both give the same
ids and text. ``BackendTokenizer`` can be saved and loaded without transformers building it
again: Gemma 3's took ~6.5 s of a 2-core machine's start through ``from_pretrained`` (Python
parsing its 33 MB tokenizer.json, then converting it) and ~2 s from the saved backend.

Content pieces are encoded with special tokens split (``allow_special=False``): a user who types
``<start_of_turn>`` gets the characters, never the control token, so text cannot forge a turn.
No BOS/EOS is ever added; the chat format writes BOS itself.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BACKEND_FILE = "tokenizer.backend.json"
"""A ``BackendTokenizer``'s Rust tokenizer, as ``tokenizers`` serializes it."""
BACKEND_META = "tokenizer.backend.meta.json"
"""Its EOS id and the versions that built it (written last: no meta, no saved tokenizer)."""


class HFTokenizer:
    """Adapter over a ``PreTrainedTokenizerBase`` (fast tokenizers in transformers 5)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    @property
    def hf_tokenizer(self) -> Any:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_token_id(self) -> int | None:
        eos = self._tok.eos_token_id
        return eos if isinstance(eos, int) else None

    def encode(self, text: str, *, allow_special: bool) -> list[int]:
        """Token ids of ``text``; special-token strings are parsed only if ``allow_special``."""
        if not text:
            return []
        encoded = self._tok(
            text,
            add_special_tokens=False,
            split_special_tokens=not allow_special,
            return_attention_mask=False,
        )
        return [int(i) for i in encoded["input_ids"]]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens dropped."""
        return str(
            self._tok.decode(
                list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def token_id(self, token: str) -> int | None:
        """The id of a single (special) token, or ``None`` if the vocabulary lacks it."""
        tid = self._tok.convert_tokens_to_ids(token)
        if tid is None or (tid == self._tok.unk_token_id and token != self._tok.unk_token):
            return None
        return int(tid)


class BackendTokenizer:
    """A transformers 5 tokenizer's Rust backend, called directly (see the module docstring)."""

    def __init__(self, backend: Any, eos_token_id: int | None) -> None:
        self._backend = backend
        self._eos = eos_token_id
        # encode_special_tokens is the backend's own flag: set and encode as one step, so two
        # threads encoding at once cannot take each other's.
        self._lock = threading.Lock()

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> BackendTokenizer | None:
        """The backend of ``tokenizer``, or None where it has none (a Python tokenizer)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        eos = tokenizer.eos_token_id
        return cls(backend, eos if isinstance(eos, int) else None)

    @classmethod
    def load(cls, directory: Path) -> BackendTokenizer | None:
        """The tokenizer ``save`` left in ``directory``, or None where there is none or it was
        built by other versions of transformers or tokenizers than these."""
        from tokenizers import Tokenizer

        try:
            meta = json.loads((directory / BACKEND_META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("versions") != _versions():
            return None
        try:
            backend = Tokenizer.from_file(str(directory / BACKEND_FILE))
        except Exception:  # tokenizers raises its own errors for a damaged file
            return None
        eos = meta.get("eos_token_id")
        return cls(backend, eos if isinstance(eos, int) else None)

    def save(self, directory: Path) -> None:
        """Write this tokenizer into ``directory`` for ``load``: each file under a temporary
        name first, the meta last, so a concurrent start reads a whole tokenizer or none."""
        meta = {"eos_token_id": self._eos, "versions": _versions()}
        files = ((BACKEND_FILE, self._backend.to_str()), (BACKEND_META, json.dumps(meta)))
        for name, text in files:
            tmp = directory / f".{name}.tmp-{os.getpid()}"
            try:
                tmp.write_text(text)
                os.replace(tmp, directory / name)
            finally:
                tmp.unlink(missing_ok=True)

    @property
    def vocab_size(self) -> int:
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    def encode(self, text: str, *, allow_special: bool) -> list[int]:
        """Token ids of ``text``; special-token strings are parsed only if ``allow_special``."""
        if not text:
            return []
        with self._lock:
            self._backend.encode_special_tokens = not allow_special
            encoding = self._backend.encode(text, add_special_tokens=False)
        return [int(i) for i in encoding.ids]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens dropped."""
        return str(self._backend.decode(list(token_ids), skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        """The id of a single (special) token, or ``None`` if the vocabulary lacks it."""
        tid = self._backend.token_to_id(token)
        return None if tid is None else int(tid)


def _versions() -> dict[str, str]:
    """The versions a saved backend depends on: transformers builds it, tokenizers reads it."""
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "tokenizers")}


__all__ = ["BACKEND_FILE", "BACKEND_META", "BackendTokenizer", "HFTokenizer"]
