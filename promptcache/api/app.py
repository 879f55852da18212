"""``build_app``: the Starlette application, its routes and lifespan.

Each protocol package exposes ``routes(service)``; this module adds the protocol-neutral routes
(``/health``, ``/v1/models``) and ties the service's start and stop to the server's lifespan.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from promptcache.api import admin, anthropic, bedrock, openai
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

    routes: list[BaseRoute] = [_root(service), _health(service), _models(service)]
    routes += admin.routes(service)
    routes += anthropic.routes(service)
    routes += openai.routes(
        service, round_cached_tokens=service.config.api.openai_round_cached_tokens
    )
    routes += bedrock.routes(service)
    return Starlette(routes=routes, lifespan=lifespan)


__all__ = ["build_app"]
