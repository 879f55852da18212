"""Turn-based chat formats rendered one block at a time (spec §2.1).

A ``ChatFormat`` is the handful of strings a chat template is made of. ``render_blocks`` walks
the canonical blocks and gives each one its own pieces, so a block's tokens depend only on what
precedes it, never on what follows (the prefix-stability the cache needs)::

    block 0 (tools[0])   <bos><start_of_turn>user\\n# Tools ... {tool 0 json}
    block 1 (system[0])  \\n\\n{system text}
    block 2 (user text)  \\n\\n{user text}        <- Gemma: system opens the first user turn
    block 3 (assistant)  <end_of_turn>\\n<start_of_turn>model\\n{text}   <- close goes to next
    trailer              <end_of_turn>\\n<start_of_turn>model\\n

Each piece is ``(text, is_structural)``: structural pieces may contain special tokens, content
pieces are tokenized with special tokens treated as plain text, so user text cannot forge a turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from promptcache.core.request import Block, PlacedBlock

Piece = tuple[str, bool]

TOOLS_PREAMBLE = (
    "# Tools\n"
    "You can call the tools below. To call one, answer with a fenced block:\n"
    "```tool_call\n"
    '{"name": "<tool name>", "input": {<arguments>}}\n'
    "```\n"
    "Available tools:\n"
)
TOOL_CALL_OPEN = "```tool_call\n"
TOOL_CALL_CLOSE = "\n```"


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """The strings of a turn-based chat template.

    ``turn_open`` is formatted with ``role``. With ``system_in_first_user`` (Gemma), tools and
    system open a user turn that the first user message continues, as Gemma's template does.
    """

    name: str
    bos: str
    turn_open: str
    turn_close: str
    assistant_role: str = "assistant"
    system_role: str = "system"
    system_in_first_user: bool = False
    block_sep: str = "\n\n"

    @property
    def generation_prompt(self) -> str:
        return self.turn_open.format(role=self.assistant_role)

    def _role_name(self, role: str) -> str:
        if role == "assistant":
            return self.assistant_role
        if role == "system":
            return "user" if self.system_in_first_user else self.system_role
        return role

    def render_blocks(self, blocks: Iterable[PlacedBlock]) -> tuple[list[list[Piece]], list[Piece]]:
        """Pieces for every block in render order, then the trailer (spec §2.1).

        The trailer closes the last turn and opens the assistant's, unless the last turn already
        is the assistant's (prefill): then it is empty and generation continues that turn.
        """
        rendered: list[list[Piece]] = []
        turn: str | None = None  # wire role of the open turn
        prev: PlacedBlock | None = None
        for placed in blocks:
            pieces: list[Piece] = []
            role = placed.role
            if prev is None:
                pieces.append((self.bos + self.turn_open.format(role=self._role_name(role)), True))
                turn = role
            elif self._same_turn(turn, role):
                sep = self._separator(prev, placed)
                if sep:
                    pieces.append((sep, False))
            else:
                pieces.append(
                    (self.turn_close + self.turn_open.format(role=self._role_name(role)), True)
                )
                turn = role
            if placed.section == "tools" and (prev is None or prev.section != "tools"):
                pieces.append((TOOLS_PREAMBLE, False))
            pieces.extend(_body(placed.block, prev.block if prev else None))
            rendered.append(pieces)
            prev = placed
        if prev is None:
            trailer: list[Piece] = [(self.bos + self.generation_prompt, True)]
        elif turn == "assistant":
            trailer = []
        else:
            trailer = [(self.turn_close + self.generation_prompt, True)]
        return rendered, trailer

    def _same_turn(self, turn: str | None, role: str) -> bool:
        if turn == role:
            return True
        # Gemma has no system turn: the first user message continues the one system opened.
        return self.system_in_first_user and turn == "system" and role == "user"

    def _separator(self, prev: PlacedBlock, placed: PlacedBlock) -> str:
        if placed.section == "tools" and prev.section == "tools":
            return "\n"
        if (
            placed.block.kind == "tool_result"
            and prev.block.kind == "tool_result"
            and placed.block.ref_id == prev.block.ref_id
        ):
            return "\n"
        return self.block_sep


def _body(block: Block, prev: Block | None) -> list[Piece]:
    if block.kind == "tool_use":
        call = json.dumps({"name": block.name, "input": "__INPUT__"}, ensure_ascii=False)
        head, _, tail = call.partition('"__INPUT__"')
        return [(TOOL_CALL_OPEN + head + block.text + tail + TOOL_CALL_CLOSE, False)]
    if block.kind == "tool_result":
        continues = prev is not None and prev.kind == "tool_result" and prev.ref_id == block.ref_id
        if continues:
            return [(block.text, False)]
        status = " error" if block.is_error else ""
        return [(f"[tool_result{status} for {block.ref_id}]\n{block.text}", False)]
    if block.kind in ("thinking", "redacted_thinking"):
        return [(f"<thinking>{block.text}</thinking>", False)]
    return [(block.text, False)]


GEMMA = ChatFormat(
    name="gemma",
    bos="<bos>",
    turn_open="<start_of_turn>{role}\n",
    turn_close="<end_of_turn>\n",
    assistant_role="model",
    system_in_first_user=True,
)
"""Gemma 2/3: ``<start_of_turn>user`` / ``model`` turns, system text inside the first user turn."""

CHATML = ChatFormat(
    name="chatml",
    bos="",
    turn_open="<|im_start|>{role}\n",
    turn_close="<|im_end|>\n",
)
"""ChatML, the fallback for models that ship no template we recognise."""

PLAIN = ChatFormat(
    name="plain",
    bos="",
    turn_open="### {role}:\n",
    turn_close="\n",
)
"""Plain text turns for tokenizers without special tokens (tests, byte tokenizers)."""

FORMATS = {f.name: f for f in (GEMMA, CHATML, PLAIN)}

__all__ = ["CHATML", "FORMATS", "GEMMA", "PLAIN", "ChatFormat", "Piece"]
