"""Request plumbing shared by the protocol adapters: credentials and size-limited body reading."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request

from promptcache.errors import RequestTooLarge


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is a non-empty one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all.

    Raises ``RequestTooLarge`` (413) as soon as the declared or received size passes ``limit``.
    """
    too_large = RequestTooLarge(f"request body exceeds the maximum of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["bearer_token", "read_body"]
