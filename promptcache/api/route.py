"""Route plumbing every protocol shares, in one place: the guarded route, the body limit (from
the config), and the two ways a generation is answered, whole or streamed.

``Surface`` is one protocol's: its error ``Envelope`` and body limit. ``complete`` drains a
whole generation; ``stream`` takes the first event before the status line (validation errors are
still plain HTTP errors then) and returns the frames. Both read the ``Started`` event and set the
``x-promptcache-cache`` header on the ``Call``, which ``guarded`` adds to the response, so the
header is written here once for every surface, streams included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.routing import Route

from promptcache.api.cacheheader import CACHE_HEADER, cache_header
from promptcache.api.guard import Call, Envelope, Handler, guarded
from promptcache.api.http import read_body
from promptcache.api.streaming import drain, event_frames, first_event
from promptcache.core.response import ChatEvent, Started


@dataclass(frozen=True, slots=True)
class Surface:
    """One protocol's routes: errors in ``envelope``, bodies up to ``max_body_bytes``."""

    envelope: Envelope
    max_body_bytes: int

    def route(self, path: str, handler: Handler, methods: Sequence[str] = ("POST",)) -> Route:
        """A Starlette route running ``handler`` under this protocol's error guard."""
        return Route(path, guarded(self.envelope, handler), methods=list(methods))

    async def body(self, request: Request) -> bytes:
        """The request body; 413 (in this protocol's envelope) past the limit."""
        return await read_body(request, self.max_body_bytes)


def note(call: Call, event: ChatEvent | None) -> None:
    """Put the cache header of a ``Started`` event on ``call``'s response."""
    if isinstance(event, Started):
        call.headers[CACHE_HEADER] = cache_header(event)


async def complete(
    request: Request, call: Call, events: AsyncIterator[ChatEvent]
) -> list[ChatEvent]:
    """Every event of a non-streaming generation (a client that leaves cancels it)."""
    collected = await drain(request.receive, events)
    note(call, collected[0] if collected else None)
    return collected


async def stream(
    request: Request,
    call: Call,
    events: AsyncIterator[ChatEvent],
    encode: Callable[[ChatEvent], Iterable[bytes]],
    *,
    is_finished: Callable[[], bool],
    trailer: bytes = b"",
) -> AsyncIterator[bytes]:
    """The frames of the whole stream. The first event is taken now, before the status line,
    so validation errors are ordinary HTTP errors; a later failure ends the stream with the
    protocol's error frame."""
    first = await first_event(request.receive, events)
    note(call, first)
    return event_frames(
        first, events, encode, is_finished=is_finished, fail=call.fail, trailer=trailer
    )


__all__ = ["Surface", "complete", "note", "stream"]
