"""Turn generated text into content pieces: stop sequences and fenced tool calls.

Text is released as soon as it cannot be the start of a stop sequence or of a tool-call fence;
the rest is held back until the next token decides. A tool call is the fenced block the chat
format teaches the model (see ``chatformat.TOOLS_PREAMBLE``)::

    ```tool_call
    {"name": "get_weather", "input": {"city": "Paris"}}
    ```
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

from promptcache.core.chatformat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from promptcache.core.response import TextOut, ToolCallOut

_ID_CHARS = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """``prefix`` followed by random alphanumerics, as the hosted APIs' ids look."""
    return prefix + "".join(secrets.choice(_ID_CHARS) for _ in range(length))


@dataclass(slots=True)
class OutputStop:
    """Why the parser asked generation to stop."""

    reason: str  # "stop_sequence" | "tool_use"
    sequence: str | None = None


class OutputParser:
    """Feed it the text decoded so far; it returns what may be shown and notices stops."""

    def __init__(self, stop_sequences: tuple[str, ...], tool_names: frozenset[str]) -> None:
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.tool_names = tool_names
        self.stop: OutputStop | None = None
        self._consumed = 0  # chars of the full text already turned into pieces
        self._in_tool = False

    def _markers(self) -> list[str]:
        return [*self.stop_sequences, *([TOOL_CALL_OPEN] if self.tool_names else [])]

    def feed(self, full_text: str, *, final: bool = False) -> list[TextOut | ToolCallOut]:
        """Pieces newly decided by ``full_text`` (which only ever grows). With ``final``, release
        everything held back."""
        out: list[TextOut | ToolCallOut] = []
        while self.stop is None:
            pending = full_text[self._consumed :]
            if self._in_tool:
                end = pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    if final:
                        out.append(TextOut(TOOL_CALL_OPEN + pending))
                        self._consumed = len(full_text)
                    break
                call = self._parse_call(pending[:end])
                self._consumed += end + len(TOOL_CALL_CLOSE)
                self._in_tool = False
                if call is None:
                    out.append(TextOut(TOOL_CALL_OPEN + pending[: end + len(TOOL_CALL_CLOSE)]))
                    continue
                out.append(call)
                self.stop = OutputStop("tool_use")
                break
            hit = min(
                ((pending.find(m), m) for m in self._markers() if m in pending),
                default=None,
            )
            if hit is not None:
                index, marker = hit
                if index > 0:
                    out.append(TextOut(pending[:index]))
                self._consumed += index + len(marker)
                if marker == TOOL_CALL_OPEN and marker not in self.stop_sequences:
                    self._in_tool = True
                    continue
                self.stop = OutputStop("stop_sequence", marker)
                break
            keep = 0 if final else self._held_back(pending)
            if len(pending) - keep > 0:
                out.append(TextOut(pending[: len(pending) - keep]))
                self._consumed += len(pending) - keep
            break
        return out

    def _held_back(self, pending: str) -> int:
        """Length of the longest suffix of ``pending`` that could start a marker."""
        longest = 0
        for marker in self._markers():
            for size in range(min(len(marker) - 1, len(pending)), longest, -1):
                if marker.startswith(pending[-size:]):
                    longest = size
                    break
        # An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
        partial = len(pending) - len(pending.rstrip("\ufffd"))
        return max(longest, partial)

    def _parse_call(self, raw: str) -> ToolCallOut | None:
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("name") not in self.tool_names:
            return None
        args = data.get("input", data.get("arguments", {}))
        if not isinstance(args, dict):
            return None
        return ToolCallOut(new_id("toolu_"), str(data["name"]), args)


__all__ = ["OutputParser", "OutputStop", "new_id"]
