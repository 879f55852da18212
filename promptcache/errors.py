"""The promptcache exception tree. Every class carries an HTTP status and a neutral kind; each
protocol adapter renders them into its own envelope (``api/<proto>/errors.py``).

    PromptCacheError                      500 api_error
    ├── InvalidRequest                    400 invalid_request   (bad body, caching rule broken)
    │   └── PromptTooLong                 400 invalid_request   (prompt over the context window)
    ├── AuthenticationFailed              401 authentication
    ├── PermissionDenied                  403 permission
    ├── NotFound                          404 not_found         (unknown model or route)
    ├── RequestTooLarge                   413 request_too_large
    ├── Overloaded                        529 overloaded        (engine queue full)
    └── EngineFailure                     500 api_error         (the model raised)
"""

from __future__ import annotations

from typing import ClassVar


class PromptCacheError(Exception):
    """Base of every error promptcache reports to a client."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "api_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(PromptCacheError):
    """The request breaks the protocol schema or a caching rule of the spec."""

    status = 400
    kind = "invalid_request"


class PromptTooLong(InvalidRequest):
    """The rendered prompt does not fit the model's context window."""


class AuthenticationFailed(PromptCacheError):
    """Missing or unknown credential (checked before any cache activity, spec §1.14)."""

    status = 401
    kind = "authentication"


class PermissionDenied(PromptCacheError):
    """The credential is known but may not do this (admin calls)."""

    status = 403
    kind = "permission"


class NotFound(PromptCacheError):
    """Unknown model name (with an alias table configured) or unknown route."""

    status = 404
    kind = "not_found"


class RequestTooLarge(PromptCacheError):
    """The body exceeds the configured size limit."""

    status = 413
    kind = "request_too_large"


RETRY_AFTER_S = 1.0
"""What an overloaded answer asks a client to wait before it retries (``Retry-After``): the
official SDKs retry 529/503 twice by default, and without the header back off ~0.5 s then
~1 s, less than a model takes to load."""


class Overloaded(PromptCacheError):
    """The engine queue is full (or the model still loading); the client should retry after
    ``retry_after_s`` seconds, and not at all where that is None (a model that failed to load):
    the envelopes send ``Retry-After`` / ``retry-after-ms``, or ``x-should-retry: false``,
    headers the official SDKs follow."""

    status = 529
    kind = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float | None = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineFailure(PromptCacheError):
    """The model raised while prefilling or decoding."""

    status = 500
    kind = "api_error"


__all__ = [
    "RETRY_AFTER_S",
    "AuthenticationFailed",
    "EngineFailure",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "PromptCacheError",
    "PromptTooLong",
    "RequestTooLarge",
]
