"""``Detokenizer``: the text of a growing list of output tokens, at a constant cost per token.

Decoding the whole list again for every new token costs O(n) per token, O(n^2) per answer, on
the event loop that streams every other answer too. Decoding only the new token alone is wrong:
tokenizers join pieces with context (SentencePiece's leading-space marker, byte-level BPE's
multi-byte characters split across tokens). So, as Hugging Face's text-generation-inference
and vLLM do, each step decodes a short window: the tokens since ``prefix`` (a few already
shown) with and without the new ones; the difference is the new text. A window that ends in the
middle of a character (U+FFFD at its end) waits for the next token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_INCOMPLETE = "\ufffd"


class Decodes(Protocol):
    def decode(self, token_ids: Sequence[int]) -> str: ...


class Detokenizer:
    """``push`` token ids one at a time; ``text`` only ever grows."""

    def __init__(self, tokenizer: Decodes) -> None:
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens whose text is already in ``text``

    def push(self, token_id: int) -> str:
        """Add ``token_id``; returns the whole text so far."""
        self.token_ids.append(token_id)
        ids = self.token_ids
        shown = self._tokenizer.decode(ids[self._prefix : self._read])
        window = self._tokenizer.decode(ids[self._prefix :])
        if len(window) > len(shown) and not window.endswith(_INCOMPLETE):
            self.text += window[len(shown) :]
            self._prefix, self._read = self._read, len(ids)
        return self.text

    def finish(self) -> str:
        """The final text: the whole list decoded once, which the incremental text is a prefix
        of (a trailing incomplete character is released here, as U+FFFD)."""
        full = self._tokenizer.decode(self.token_ids)
        if full.startswith(self.text):
            self.text = full
        else:  # pieces that do not compose: keep what was shown (text never shrinks), add the tail
            shown = self._tokenizer.decode(self.token_ids[self._prefix : self._read])
            self.text += self._tokenizer.decode(self.token_ids[self._prefix :])[len(shown) :]
        return self.text


__all__ = ["Detokenizer"]
