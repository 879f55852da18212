"""Operator routes: ``GET /metrics`` (Prometheus) and the admin-only cache view.

``GET /v1/cache/entries`` lists entries (tokens, TTL left, tier, hits, a hash of the tenant);
``DELETE /v1/cache/entries`` drops every unpinned entry. Both need a credential listed in
``admin_keys`` (``x-api-key`` or ``Authorization: Bearer``); with none configured they are off.
Prompt text is never stored, so none can be shown (spec §1.12).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from promptcache.metrics import tenant_digest
from promptcache.service import Service

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _credential(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _denied() -> JSONResponse:
    body = {"error": {"type": "permission_error", "message": "admin credential required"}}
    return JSONResponse(body, status_code=403)


def routes(service: Service) -> list[BaseRoute]:
    """``/metrics`` and ``/v1/cache/entries``."""

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=_PROMETHEUS)

    async def entries(request: Request) -> Response:
        if not service.is_admin(_credential(request)):
            return _denied()
        if request.method == "DELETE":
            return JSONResponse({"cleared": service.store.clear()})
        now = service.clock.now()
        data = [
            {
                "key": entry.key.hex()[:16],
                "tokens": entry.num_tokens,
                "bytes": entry.nbytes,
                "ttl": entry.ttl,
                "ttl_left_s": round(max(0.0, entry.expires_at - now), 3),
                "tier": entry.tier,
                "copies": sorted(entry.copies),
                "hits": entry.num_hits,
                "pinned": entry.ref_cnt > 0,
                "tenant": tenant_digest(entry.tenant),
            }
            for entry in reversed(service.store.entries())
            if entry.is_live(now)
        ]
        return JSONResponse({"object": "list", "data": data})

    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/cache/entries", entries, methods=["GET", "DELETE"]),
    ]


__all__ = ["routes", "tenant_digest"]
