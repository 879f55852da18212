"""The promptcache error tree rendered in OpenAI's error envelope (spec §4.8).

    {"error": {"message": "<text>", "type": "<error type>", "param": "<field>" | null,
               "code": "<code>" | null}}

The type follows the HTTP status; ``param`` and ``code`` come from the exception (the decoder
sets them: ``code: "invalid_value"`` and the field for a bad enum value) or, failing that, from
the class (``invalid_api_key`` for 401, ``model_not_found`` for 404, ``context_length_exceeded``
for an over-long prompt). Anything that is not a ``PromptCacheError`` is a bug: the client gets a
500 ``server_error`` with a fixed message, and the caller logs the exception.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.responses import JSONResponse

from promptcache.api.guard import Envelope
from promptcache.api.streaming import sse_event
from promptcache.api.wire import printable
from promptcache.core.output import new_id
from promptcache.errors import PromptCacheError, PromptTooLong

ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
"""HTTP status -> OpenAI ``error.type``; any other status reports ``server_error``."""

DEFAULT_CODES: Final[dict[int, str]] = {
    401: "invalid_api_key",
    404: "model_not_found",
    413: "request_too_large",
}
"""The ``code`` of an error that names none itself, by status."""

STATUSES: Final[dict[int, int]] = {529: 503}
"""Statuses OpenAI clients do not know: an overloaded engine is 503 Service Unavailable."""

INTERNAL_ERROR_MESSAGE: Final = "The server had an error while processing your request."


def client_error(exc: BaseException) -> PromptCacheError:
    """``exc`` itself if it is meant for the client, else a bare 500 that reveals nothing."""
    return exc if isinstance(exc, PromptCacheError) else PromptCacheError(INTERNAL_ERROR_MESSAGE)


def status_of(exc: BaseException) -> int:
    """The HTTP status the OpenAI surface answers ``exc`` with."""
    status = client_error(exc).status
    return STATUSES.get(status, status)


def error_detail(exc: BaseException) -> dict[str, Any]:
    """The inner ``error`` object: ``{"message", "type", "param", "code"}``."""
    error = client_error(exc)
    status = status_of(exc)
    code = error.code
    if code is None:
        code = "context_length_exceeded" if isinstance(error, PromptTooLong) else None
        code = code or DEFAULT_CODES.get(status)
    param = error.param
    if param is None and isinstance(error, PromptTooLong):
        param = "messages"
    return {
        "message": printable(error.message),
        "type": ERROR_TYPES.get(status, "server_error"),
        "param": None if param is None else printable(param),
        "code": code,
    }


def error_json(exc: BaseException) -> dict[str, Any]:
    """The full error body, also the ``data`` of an error sent inside a stream."""
    return {"error": error_detail(exc)}


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """A JSON error response with the status of ``exc`` and the ``x-request-id`` header."""
    return JSONResponse(
        error_json(exc), status_code=status_of(exc), headers={"x-request-id": request_id}
    )


def stream_error_frame(exc: BaseException) -> bytes:
    """The ``data: {"error": ...}`` frame that ends a stream after a failure."""
    return sse_event(error_json(exc))


ENVELOPE: Final = Envelope(
    name="OpenAI Chat Completions",
    request_id_header="x-request-id",
    new_request_id=lambda: new_id("req_"),
    render=error_response,
    render_stream=stream_error_frame,
)
"""How the OpenAI route reports errors; also the envelope of the protocol-neutral routes."""


__all__ = [
    "DEFAULT_CODES",
    "ENVELOPE",
    "ERROR_TYPES",
    "INTERNAL_ERROR_MESSAGE",
    "STATUSES",
    "client_error",
    "error_detail",
    "error_json",
    "error_response",
    "status_of",
    "stream_error_frame",
]
