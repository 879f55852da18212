"""A byte-level tokenizer with no dependencies, for tests and the fake engine.

Ids 0..255 are the bytes; the named special tokens follow. It is what tiny random test models
use, so the whole suite runs without downloading a tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")


class ByteTokenizer:
    """One token per UTF-8 byte, plus special tokens parsed only in structural text."""

    def __init__(self, specials: Sequence[str] = DEFAULT_SPECIALS) -> None:
        self.specials = tuple(specials)
        self.special_ids = {name: 256 + i for i, name in enumerate(self.specials)}
        self._by_id = {i: name for name, i in self.special_ids.items()}
        self._pattern = re.compile("|".join(re.escape(s) for s in self.specials))

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    def token_id(self, name: str) -> int:
        return self.special_ids[name]

    def encode(self, text: str, *, allow_special: bool) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        pos = 0
        for match in self._pattern.finditer(text):
            ids.extend(text[pos : match.start()].encode("utf-8"))
            ids.append(self.special_ids[match.group()])
            pos = match.end()
        ids.extend(text[pos:].encode("utf-8"))
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        data = bytes(i for i in token_ids if i < 256)
        return data.decode("utf-8", errors="replace")


__all__ = ["DEFAULT_SPECIALS", "ByteTokenizer"]
