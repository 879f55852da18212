"""Where every route's failures become its protocol's errors: one ``Envelope`` per protocol.

Each protocol package builds its routes with ``guarded(ENVELOPE, handler)``. The wrapper gives
the handler a ``Call`` (request id, start time) and turns anything the handler raises into the
protocol's error response:

- a ``PromptCacheError`` is the client's: its status and message, in the envelope;
- a vanished client (``ClientDisconnect``) is nobody's bug: answered (to no one), not logged;
- anything else is a bug: logged once with the request id, answered as the protocol's 500
  (Anthropic ``api_error``, OpenAI ``server_error``, Bedrock ``InternalServerException``) with
  a fixed text that reveals nothing.

After a stream has started there is no status line left to send: ``Call.fail`` renders the
protocol's in-stream error frame instead (and logs a bug the same way). Rendering never fails: a
message that cannot be encoded falls back to the fixed 500 text, so no error path ends in a
plain-text body or a dropped connection. ``build_app`` adds the same envelopes, chosen by path,
for what happens outside any route (unknown path or method, a bug in Starlette's plumbing).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from promptcache.errors import Overloaded, PromptCacheError

logger = logging.getLogger("promptcache.api")


class InternalError(Exception):
    """Stands in for an error whose own rendering failed: rendered as the fixed 500."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """How one protocol reports errors: before the response starts, and inside a stream."""

    name: str
    request_id_header: str
    new_request_id: Callable[[], str]
    render: Callable[[BaseException, str], Response]
    render_stream: Callable[[BaseException], bytes]

    def response(self, exc: BaseException, request_id: str) -> Response:
        """The error response for ``exc``; never raises."""
        try:
            response = self.render(exc, request_id)
        except Exception as failure:
            logger.exception(
                "cannot render a %s error (request %s)", self.name, request_id, exc_info=failure
            )
            response = self.render(InternalError(), request_id)
        response.headers[self.request_id_header] = request_id
        if isinstance(exc, Overloaded):
            retry_hint(exc, response)
        return response

    def stream_frame(self, exc: BaseException) -> bytes:
        """The frame that ends a started stream after ``exc``; never raises."""
        try:
            return self.render_stream(exc)
        except Exception as failure:
            logger.exception("cannot render a %s stream error", self.name, exc_info=failure)
            return self.render_stream(InternalError())


@dataclass(frozen=True, slots=True)
class Call:
    """One request as its handler sees it: the id every response and log line carries, and
    ``headers`` that ``guarded`` adds to its response (the cache header, ``api/route.py``)."""

    envelope: Envelope
    request_id: str
    started_at: float
    headers: dict[str, str] = field(default_factory=dict)

    def fail(self, exc: Exception) -> bytes:
        """End a started stream after ``exc``: log it if it is a bug, return the error frame."""
        log_unexpected(exc, self.envelope.name, self.request_id)
        return self.envelope.stream_frame(exc)


Handler = Callable[[Request, Call], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def guarded(envelope: Envelope, handler: Handler) -> Endpoint:
    """A Starlette endpoint running ``handler`` whose every failure is answered in ``envelope``
    and whose every response carries the request id."""

    async def endpoint(request: Request) -> Response:
        call = Call(envelope, envelope.new_request_id(), time.monotonic())
        try:
            response = await handler(request, call)
        except Exception as exc:
            log_unexpected(exc, envelope.name, call.request_id)
            return envelope.response(exc, call.request_id)
        response.headers.update(call.headers)
        response.headers[envelope.request_id_header] = call.request_id
        return response

    return endpoint


def retry_hint(exc: Overloaded, response: Response) -> None:
    """When to retry, in headers the official SDKs read: ``retry-after-ms`` and ``Retry-After``
    (whole seconds, as HTTP has them), or ``x-should-retry: false`` where retrying cannot help
    (the model failed to load)."""
    if exc.retry_after_s is None:
        response.headers["x-should-retry"] = "false"
        return
    response.headers["retry-after-ms"] = str(round(exc.retry_after_s * 1000))
    response.headers["retry-after"] = str(math.ceil(exc.retry_after_s))


def log_unexpected(exc: BaseException, surface: str, request_id: str) -> None:
    """Log ``exc`` with its traceback unless it is meant for the client or the client left."""
    if not isinstance(exc, PromptCacheError | ClientDisconnect):
        logger.error(
            "unexpected error in a %s request (request %s)", surface, request_id, exc_info=exc
        )


__all__ = ["Call", "Endpoint", "Envelope", "Handler", "InternalError", "guarded", "log_unexpected"]
