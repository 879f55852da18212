"""``build_app``: the Starlette application, its routes and lifespan.

Each protocol package exposes ``routes(service)``; this module adds the protocol-neutral routes
(``/health``, ``/v1/models``) and ties the service's start and stop to the server's lifespan.
Errors outside any route (an unknown path or method, a bug below the routes) are answered in the
envelope of the protocol the path belongs to (``api/guard.py`` has the rest of the story).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from promptcache.api import admin, anthropic, bedrock, dashboard, openai
from promptcache.api.anthropic.errors import ENVELOPE as ANTHROPIC
from promptcache.api.bedrock.errors import ENVELOPE as BEDROCK
from promptcache.api.guard import Envelope, logger
from promptcache.api.openai import prompts
from promptcache.api.openai.errors import ENVELOPE as OPENAI
from promptcache.errors import InvalidRequest, NotFound, PromptCacheError
from promptcache.service import Service

_STARTED = int(time.time())


def _health(service: Service) -> Route:
    async def health(request: Request) -> JSONResponse:
        if service.is_ready:
            return JSONResponse({"status": "ok", "model": service.served_model})
        status = "error" if service.load_error else "loading"
        body = {"status": status, "model": service.served_model}
        if service.load_error:
            body["error"] = service.load_error
        return JSONResponse(body, status_code=503)

    return Route("/health", health, methods=["GET"])


def _root(service: Service) -> Route:
    # Clients probe the base URL before their first call (Claude Code sends ``HEAD /``).
    async def root(request: Request) -> JSONResponse:
        return JSONResponse({"name": "promptcache", "model": service.served_model})

    return Route("/", root, methods=["GET", "HEAD"])


def _models(service: Service) -> Route:
    async def models(request: Request) -> JSONResponse:
        # One body that both the anthropic and the openai SDKs parse as their model list.
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_STARTED))
        data = [
            {
                "type": "model",
                "id": name,
                "display_name": name,
                "created_at": created_at,
                "object": "model",
                "created": _STARTED,
                "owned_by": "promptcache",
            }
            for name in service.model_names()
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
            }
        )

    return Route("/v1/models", models, methods=["GET"])


def build_app(service: Service) -> Starlette:
    """The ASGI app serving ``service`` on every protocol."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    api = service.config.api
    routes: list[BaseRoute] = [_root(service), _health(service), _models(service)]
    routes += admin.routes(service)
    routes += dashboard.routes(service)
    routes += anthropic.routes(service, max_body_bytes=api.max_body_bytes)
    routes += openai.routes(
        service,
        round_cached_tokens=api.openai_round_cached_tokens,
        max_body_bytes=api.max_body_bytes,
    )
    routes += prompts.routes(
        service,
        round_cached_tokens=api.openai_round_cached_tokens,
        max_body_bytes=api.max_body_bytes,
    )
    routes += bedrock.routes(service, max_body_bytes=api.max_body_bytes)
    handlers = {HTTPException: _http_error, Exception: _unexpected}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


class MethodNotAllowed(InvalidRequest):
    """A known path with a method it does not serve."""

    status = 405


def envelope_for(path: str) -> Envelope:
    """The envelope of the protocol ``path`` belongs to; OpenAI's for the neutral routes."""
    if path.startswith("/model/"):
        return BEDROCK
    if path.startswith("/v1/messages"):
        return ANTHROPIC
    return OPENAI


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette raises these itself, for a path no route matches or a method a route lacks.
    assert isinstance(exc, HTTPException)
    envelope = envelope_for(request.url.path)
    error: PromptCacheError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed for this path")
    elif exc.status_code == 404:
        error = NotFound(f"Not found: {request.url.path}")
    elif exc.status_code < 500:
        error = InvalidRequest(str(exc.detail))
    else:
        error = PromptCacheError(str(exc.detail))
    return envelope.response(error, envelope.new_request_id())


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The last resort: a bug that escaped a route's own guard. Starlette re-raises it after
    # sending this, and the server logs the traceback; this line ties it to the request id.
    envelope = envelope_for(request.url.path)
    request_id = envelope.new_request_id()
    logger.error("unexpected error outside a route (request %s): %r", request_id, exc)
    return envelope.response(exc, request_id)


__all__ = ["build_app"]
