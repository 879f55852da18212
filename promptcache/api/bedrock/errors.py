"""The promptcache error tree rendered as Bedrock runtime errors (spec §5.1, §5.3, §5.6).

A JSON error is the status, the ``x-amzn-ErrorType`` header (botocore takes the error code from
it) and the body ``{"message": "..."}``; boto3 raises ``client.exceptions.<code>``. After an event
stream has started, the same error is one exception message whose ``:exception-type`` is the
member name of the operation's stream union (``modelStreamErrorException`` for a model failure).

    promptcache error        status  x-amzn-ErrorType               in a stream
    InvalidSignature         403     InvalidSignatureException      -
    AuthenticationFailed     403     UnrecognizedClientException    -
    PermissionDenied         403     AccessDeniedException          -
    InvalidRequest           400     ValidationException            validationException
    RequestTooLarge          400     ValidationException            validationException
    NotFound                 404     ResourceNotFoundException      -
    Overloaded               503     ServiceUnavailableException    serviceUnavailableException
    EngineFailure            424     ModelErrorException            modelStreamErrorException
    anything else            500     InternalServerException        internalServerException
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

from starlette.responses import JSONResponse

from promptcache.api.bedrock.eventstream import exception_message
from promptcache.api.guard import Envelope
from promptcache.api.wire import printable
from promptcache.errors import (
    AuthenticationFailed,
    EngineFailure,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    PromptCacheError,
    RequestTooLarge,
)

REQUEST_ID_HEADER: Final = "x-amzn-RequestId"
INTERNAL_ERROR_MESSAGE: Final = "Internal server error"
UNRECOGNIZED_CLIENT_MESSAGE: Final = "The security token included in the request is invalid."
"""AWS's text for an unknown access key or API key; the service's own text names Anthropic's
header, so it is replaced."""


class InvalidSignature(AuthenticationFailed):
    """A SigV4 signature that does not verify: wrong secret, altered request or stale date."""

    status = 403


@dataclass(frozen=True, slots=True)
class AwsError:
    """How one error class looks on the wire."""

    status: int
    code: str
    stream_code: str = "internalServerException"
    message: str | None = None  # replaces the exception's own text when set


_ERRORS: Final[tuple[tuple[type[PromptCacheError], AwsError], ...]] = (
    (InvalidSignature, AwsError(403, "InvalidSignatureException")),
    (
        AuthenticationFailed,
        AwsError(403, "UnrecognizedClientException", message=UNRECOGNIZED_CLIENT_MESSAGE),
    ),
    (PermissionDenied, AwsError(403, "AccessDeniedException")),
    (InvalidRequest, AwsError(400, "ValidationException", "validationException")),
    (RequestTooLarge, AwsError(400, "ValidationException", "validationException")),
    (NotFound, AwsError(404, "ResourceNotFoundException")),
    (Overloaded, AwsError(503, "ServiceUnavailableException", "serviceUnavailableException")),
    (EngineFailure, AwsError(424, "ModelErrorException", "modelStreamErrorException")),
)
"""Most specific class first; anything else is ``InternalServerException``."""

_INTERNAL: Final = AwsError(500, "InternalServerException")


def aws_error(exc: BaseException) -> tuple[AwsError, str]:
    """The wire form of ``exc`` and the message to send. Non-promptcache errors reveal nothing."""
    if not isinstance(exc, PromptCacheError):
        return _INTERNAL, INTERNAL_ERROR_MESSAGE
    for cls, error in _ERRORS:
        if isinstance(exc, cls):
            return error, printable(error.message or exc.message)
    return _INTERNAL, printable(exc.message)


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """A JSON error response: status, ``x-amzn-ErrorType``, ``{"message": ...}``."""
    error, message = aws_error(exc)
    headers = {"x-amzn-ErrorType": error.code, REQUEST_ID_HEADER: request_id}
    return JSONResponse({"message": message}, status_code=error.status, headers=headers)


def exception_frame(exc: BaseException) -> bytes:
    """The exception message that ends an event stream after a failure (spec §5.6)."""
    error, message = aws_error(exc)
    return exception_message(error.stream_code, message)


ENVELOPE: Final = Envelope(
    name="Bedrock runtime",
    request_id_header=REQUEST_ID_HEADER,
    new_request_id=lambda: str(uuid.uuid4()),
    render=error_response,
    render_stream=exception_frame,
)
"""How every Bedrock route reports errors (``api/guard.py``)."""


__all__ = [
    "ENVELOPE",
    "INTERNAL_ERROR_MESSAGE",
    "REQUEST_ID_HEADER",
    "UNRECOGNIZED_CLIENT_MESSAGE",
    "AwsError",
    "InvalidSignature",
    "aws_error",
    "error_response",
    "exception_frame",
]
