"""Server-sent events shared by the protocol adapters: wire format, keep-alives, disconnects.

An adapter turns its ``ChatEvent`` stream into an async iterator of encoded SSE bytes and hands it
to ``EventStreamResponse``, which

- drives that iterator in one task and writes its chunks in another, so a keep-alive can be sent
  while the model is busy without ever cancelling a pending ``__anext__`` of the service;
- cancels everything when the client disconnects (it listens for ``http.disconnect`` itself,
  whatever ASGI version the server speaks), and
- always closes the iterator, so the adapter's ``finally`` closes the service's generator and the
  generation stops (Starlette's ``StreamingResponse`` leaves an abandoned iterator to the GC).

``until_disconnect`` gives the same cancellation to work done before any response exists;
``drain`` and ``first_event`` apply it to a whole non-streaming generation and to the first step of
a stream, and ``event_frames`` is the loop that turns a stream's events into its frames.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from promptcache.errors import EngineFailure

_BUFFERED_CHUNKS = 16
_T = TypeVar("_T")


def sse_event(data: Mapping[str, Any] | str, *, event: str | None = None) -> bytes:
    """One SSE frame: ``event: <name>`` (when named), ``data: <json or text>``, a blank line.

    JSON is written compactly on one line; ``json.dumps`` escapes newlines inside strings, so
    the ``data`` field never needs splitting.
    """
    payload = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {payload}\n\n".encode()


async def close_iterator(iterator: AsyncIterator[Any]) -> None:
    """``aclose()`` an async generator, shielded so it completes even inside a cancelled scope."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``work()``; if the client disconnects first, cancel it and raise ``ClientDisconnect``.

    For work done before a response starts (a whole non-streaming generation, the first step of
    a stream): without it, a client that gives up keeps the engine busy until the end. Call it
    only once the request body has been read. ``work``'s own exceptions propagate unchanged.
    """
    result: list[_T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_watch_disconnect, receive, tasks.cancel_scope)
        try:
            result.append(await work())
        except Exception as exc:  # re-raised below as itself, not inside an ExceptionGroup
            failure.append(exc)
        tasks.cancel_scope.cancel()
    if failure:
        raise failure[0]
    if not result:
        raise ClientDisconnect()
    return result[0]


async def drain(receive: Receive, events: AsyncIterator[_T]) -> list[_T]:
    """Every event of a non-streaming generation; a client that leaves cancels it."""

    async def work() -> list[_T]:
        try:
            return [event async for event in events]
        finally:
            await close_iterator(events)

    return await until_disconnect(receive, work)


async def first_event(receive: Receive, events: AsyncIterator[_T]) -> _T:
    """The first event of a stream, taken before the status line is sent.

    Validation errors arrive on the first step, so they become ordinary HTTP errors rather than
    in-stream error events. The step can be long (a single-flight wait, the prefill), so a client
    that leaves meanwhile cancels it. On any failure ``events`` is closed.
    """
    try:
        return await until_disconnect(receive, lambda: anext(events))
    except StopAsyncIteration:
        await close_iterator(events)
        raise EngineFailure("generation produced no events") from None
    except BaseException:
        await close_iterator(events)
        raise


async def event_frames(
    first: _T,
    events: AsyncIterator[_T],
    encode: Callable[[_T], Iterable[bytes]],
    *,
    is_finished: Callable[[], bool],
    fail: Callable[[Exception], bytes],
    trailer: bytes = b"",
) -> AsyncIterator[bytes]:
    """The frames of one stream: ``encode`` of ``first`` and every later event, then ``trailer``.

    A failure after the first byte, including events that end before ``is_finished()`` holds,
    ends the stream with the single frame ``fail(exc)``. ``events`` is always closed, on
    disconnect too: closing the service's generator stops the generation.
    """
    try:
        for frame in encode(first):
            yield frame
        async for event in events:
            for frame in encode(event):
                yield frame
        if not is_finished():
            raise EngineFailure("generation ended without a stop reason")
        if trailer:
            yield trailer
    except Exception as exc:
        yield fail(exc)
    finally:
        await close_iterator(events)


async def _watch_disconnect(receive: Receive, cancel_scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel_scope.cancel()


class EventStreamResponse(Response):
    """A ``text/event-stream`` response over an async iterator of encoded SSE frames.

    ``keepalive`` (an encoded frame, e.g. an Anthropic ``ping``) is sent whenever nothing has
    been written for ``keepalive_s`` seconds.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str] | None = None,
        keepalive: bytes | None = None,
        keepalive_s: float = 15.0,
    ) -> None:
        self.body_iterator = content
        self.status_code = 200
        self.background = None
        self.keepalive = keepalive
        self.keepalive_s = keepalive_s
        self._last_write = 0.0
        self.init_headers({"cache-control": "no-cache", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender, chunks = anyio.create_memory_object_stream[bytes](_BUFFERED_CHUNKS)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._pump, sender)
                tasks.start_soon(_watch_disconnect, receive, tasks.cancel_scope)
                if self.keepalive is not None:
                    tasks.start_soon(self._tick, sender, self.keepalive)
                await self._write(send, chunks)
                tasks.cancel_scope.cancel()
        finally:
            await close_iterator(self.body_iterator)

    async def _pump(self, sender: MemoryObjectSendStream[bytes]) -> None:
        try:
            async with sender:
                async for chunk in self.body_iterator:
                    await sender.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the writer is gone: the client disconnected

    async def _write(self, send: Send, chunks: MemoryObjectReceiveStream[bytes]) -> None:
        self._last_write = anyio.current_time()
        start = {"type": "http.response.start", "status": self.status_code}
        try:
            await send({**start, "headers": self.raw_headers})
            async with chunks:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self._last_write = anyio.current_time()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            return  # ASGI 2.4 servers report a vanished client this way

    async def _tick(self, sender: MemoryObjectSendStream[bytes], keepalive: bytes) -> None:
        while True:
            await anyio.sleep_until(self._last_write + self.keepalive_s)
            if anyio.current_time() < self._last_write + self.keepalive_s:
                continue  # something was written meanwhile
            try:
                # Never wait: a full buffer means data is flowing and no keep-alive is needed.
                sender.send_nowait(keepalive)
            except anyio.WouldBlock:
                pass
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self._last_write = anyio.current_time()


__all__ = [
    "EventStreamResponse",
    "close_iterator",
    "drain",
    "event_frames",
    "first_event",
    "sse_event",
    "until_disconnect",
]
