"""Protocol-neutral folding of the service's event stream, shared by the non-streaming encoders."""

from __future__ import annotations

from collections.abc import Iterable

from promptcache.core.response import ChatEvent, ChatResult, Finished, TextOut, ToolCallOut
from promptcache.errors import EngineFailure


def collect(events: Iterable[ChatEvent]) -> ChatResult:
    """Fold a whole event sequence into a ``ChatResult``; adjacent text pieces join into one block.

    Raises ``EngineFailure`` when the sequence has no ``Finished`` event.
    """
    content: list[TextOut | ToolCallOut] = []
    for event in events:
        if isinstance(event, TextOut):
            if content and isinstance(content[-1], TextOut):
                content[-1] = TextOut(content[-1].text + event.text)
            elif event.text:
                content.append(event)
        elif isinstance(event, ToolCallOut):
            content.append(event)
        elif isinstance(event, Finished):
            return ChatResult(content, event.stop_reason, event.stop_sequence, event.usage)
    raise EngineFailure("generation ended without a stop reason")


__all__ = ["collect"]
