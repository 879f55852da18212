"""Per-block tokenization of the canonical prompt into a ``PromptLayout`` (spec §2).

``offset(i)`` is the token offset at the end of block ``i``; a breakpoint on block ``i`` caches
exactly ``tokens[:offset(i)]``. The trailer (closing tokens plus the generation prompt) follows
the last block and is never part of an entry::

    tokens: |-- block 0 --|---- block 1 ----|-- block 2 --|- trailer -|
    ends:                ^e0               ^e1           ^e2          ^N
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from promptcache.core.chatformat import ChatFormat, Piece
from promptcache.core.request import BlockKind, ChatRequest
from promptcache.types import Section


class Tokenizer(Protocol):
    """The tokenizer an engine exposes: text to ids and back."""

    def encode(self, text: str, *, allow_special: bool) -> list[int]:
        """Token ids for ``text`` with no BOS added. ``allow_special`` parses special tokens."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens dropped."""
        ...


@dataclass(frozen=True, slots=True)
class LayoutBlock:
    """A rendered block: what the key chain hashes (spec §1.4) and where the block ends."""

    section: Section
    role: str
    kind: BlockKind
    token_ids: tuple[int, ...]
    end: int


@dataclass(frozen=True, slots=True)
class PromptLayout:
    """The whole prompt's tokens, with each block's end offset and the trailer length."""

    tokens: tuple[int, ...]
    blocks: tuple[LayoutBlock, ...]
    num_trailer_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def _encode_pieces(pieces: list[Piece], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for text, is_structural in pieces:
        if text:
            ids.extend(tokenizer.encode(text, allow_special=is_structural))
    return ids


def render(request: ChatRequest, tokenizer: Tokenizer, chat_format: ChatFormat) -> PromptLayout:
    """Render and tokenize every block on its own, then the trailer."""
    placed = list(request.placed_blocks())
    rendered, trailer = chat_format.render_blocks(placed)
    tokens: list[int] = []
    blocks: list[LayoutBlock] = []
    for item, pieces in zip(placed, rendered, strict=True):
        ids = _encode_pieces(pieces, tokenizer)
        tokens.extend(ids)
        blocks.append(
            LayoutBlock(item.section, item.role, item.block.kind, tuple(ids), len(tokens))
        )
    trailer_ids = _encode_pieces(trailer, tokenizer)
    tokens.extend(trailer_ids)
    return PromptLayout(tuple(tokens), tuple(blocks), len(trailer_ids))


__all__ = ["LayoutBlock", "PromptLayout", "Tokenizer", "render"]
