"""``HFTokenizer``: a transformers tokenizer behind the ``Tokenizer`` protocol (core/layout.py).

Content pieces are encoded with ``split_special_tokens=True``: a user who types
``<start_of_turn>`` gets the characters, never the control token, so text cannot forge a turn.
No BOS/EOS is ever added; the chat format writes BOS itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


__all__ = ["HFTokenizer"]
