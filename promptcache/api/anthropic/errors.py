"""The promptcache error tree rendered in Anthropic's error envelope (spec §3.5).

    {"type": "error",
     "error": {"type": "<error type>", "message": "<text>"},
     "request_id": "req_..."}

The error type follows the HTTP status (the §3.5 table). Anything that is not a
``PromptCacheError`` is a bug: the client gets a 500 ``api_error`` with a fixed message and no
traceback, and the caller logs the exception.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.responses import JSONResponse

from promptcache.api.anthropic.encode import new_request_id
from promptcache.api.guard import Envelope
from promptcache.api.streaming import sse_event
from promptcache.api.wire import printable
from promptcache.errors import PromptCacheError

ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""HTTP status -> Anthropic ``error.type``; any other status reports ``api_error``."""

INTERNAL_ERROR_MESSAGE: Final = "Internal server error"


def client_error(exc: BaseException) -> PromptCacheError:
    """``exc`` itself if it is meant for the client, else a bare 500 that reveals nothing."""
    if isinstance(exc, PromptCacheError):
        return exc
    return PromptCacheError(INTERNAL_ERROR_MESSAGE)


def error_detail(exc: BaseException) -> dict[str, str]:
    """The inner ``error`` object: ``{"type": ..., "message": ...}``."""
    error = client_error(exc)
    return {
        "type": ERROR_TYPES.get(error.status, "api_error"),
        "message": printable(error.message),
    }


def error_json(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The full error body of a non-streaming response."""
    return {"type": "error", "error": error_detail(exc), "request_id": request_id}


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """A JSON error response with the status of ``exc`` and the ``request-id`` header."""
    return JSONResponse(
        error_json(exc, request_id),
        status_code=client_error(exc).status,
        headers={"request-id": request_id},
    )


def stream_error_json(exc: BaseException) -> dict[str, Any]:
    """The ``data`` of an ``event: error`` sent after the stream has started (spec §3.5)."""
    return {"type": "error", "error": error_detail(exc)}


def stream_error_frame(exc: BaseException) -> bytes:
    """The ``event: error`` frame that ends a stream after a failure."""
    return sse_event(stream_error_json(exc), event="error")


ENVELOPE: Final = Envelope(
    name="Anthropic Messages",
    request_id_header="request-id",
    new_request_id=new_request_id,
    render=error_response,
    render_stream=stream_error_frame,
)
"""How every Anthropic route reports errors (``api/guard.py``)."""


__all__ = [
    "ENVELOPE",
    "ERROR_TYPES",
    "INTERNAL_ERROR_MESSAGE",
    "client_error",
    "error_detail",
    "error_json",
    "error_response",
    "stream_error_frame",
    "stream_error_json",
]
