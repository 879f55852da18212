"""Live savings and the dashboard: ``GET /v1/cache/stats``, ``GET /v1/cache/dashboard`` (the
page's data) and ``GET /dashboard`` (the page).

Who sees what: a credential in ``admin_keys`` sees every tenant; a tenant's API key sees its
own tenant only (its entries, requests, savings and its bytes in each tier), never another's;
anything else is 401. On an open server (no API keys) everyone is the default tenant. The page
itself holds no data: its script asks for the key (kept in the browser's session storage, or
given as ``/dashboard#key=...``, which never reaches a server log) and polls the data route
every ``POLL_S`` seconds with it. Its files ship in ``api/static`` (no CDN, no build step); the
chart is plain SVG drawn by its own script.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from promptcache.errors import AuthenticationFailed
from promptcache.service import Service
from promptcache.types import TenantId

POLL_S: Final = 2.0
_STATIC: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def _credential(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def scope(service: Service, request: Request) -> TenantId | None:
    """None for an admin (every tenant), else the caller's own tenant; raises
    ``AuthenticationFailed`` for an unknown key."""
    credential = _credential(request)
    if service.is_admin(credential):
        return None
    return service.authenticate(credential)


def _denied(exc: AuthenticationFailed) -> JSONResponse:
    body = {"error": {"type": "authentication_error", "message": str(exc)}}
    return JSONResponse(body, status_code=401)


def stats_json(service: Service, tenant: TenantId | None) -> dict[str, Any]:
    """Savings in total and per tenant (admin), or the tenant's own."""
    ledger = service.ledger
    rate = ledger.rate.tokens_per_s
    body: dict[str, Any] = {
        "object": "cache.stats",
        "prices": ledger.prices.to_json(),
        "prefill_tokens_per_s": round(rate, 1) if rate else None,
    }
    if tenant is None:
        body["scope"] = "all"
        body["total"] = ledger.totals().to_json()
        body["tenants"] = {name: t.to_json() for name, t in sorted(ledger.tenants().items())}
        remote = service.remote
        if remote is not None:  # the shared tier's counters: the whole server's, admins only
            stats = remote.store.stats
            body["remote"] = {
                "namespace": remote.store.namespace,
                "up": remote.store.is_up,
                "pending_writes": remote.writer.pending,
                **{name: getattr(stats, name) for name in stats.__slots__},
            }
    else:
        body["scope"] = "tenant"
        body["tenant"] = tenant
        body["total"] = ledger.totals(tenant).to_json()
    return body


def dashboard_json(service: Service, tenant: TenantId | None) -> dict[str, Any]:
    """Everything the page shows, for an admin (``tenant`` None) or one tenant only."""
    now = service.clock.now()
    store = service.store
    entries = [
        {
            "tenant": entry.tenant,
            "tokens": entry.num_tokens,
            "bytes": entry.nbytes,
            "tier": entry.tier,
            "copies": sorted(entry.copies),
            "ttl": entry.ttl,
            "ttl_left_s": round(max(0.0, entry.expires_at - now), 1),
            "hits": entry.num_hits,
            "pinned": entry.ref_cnt > 0,
        }
        for entry in reversed(store.entries())
        if entry.is_live(now) and (tenant is None or entry.tenant == tenant)
    ]
    # What a byte of the tiers holds: the tokens a tier's budget fits (a float16 KV cache fits
    # twice a float32 one's). None while the model loads.
    info = service.engine.info if service.is_ready else None
    per_token = info.kv_bytes_per_token if info else 0
    tiers = []
    for tier in store.tiers:
        row: dict[str, Any] = {"name": tier.name, "capacity_bytes": tier.capacity_bytes}
        if per_token:
            row["capacity_tokens"] = tier.capacity_bytes // per_token
        if tenant is None:
            row["used_bytes"] = tier.used_bytes
        else:  # only its own bytes: the others' are not its business
            row["used_bytes"] = tier.tenant_bytes(tenant)
        tiers.append(row)
    body = stats_json(service, tenant)
    body.update(
        {
            "object": "cache.dashboard",
            "now": now,
            "poll_s": POLL_S,
            "model": service.served_model,
            "engine": None
            if info is None
            else {
                "device": info.device,
                "dtype": info.dtype,
                "kv_dtype": info.kv_dtype or None,
                "kv_bytes_per_token": info.kv_bytes_per_token,
            },
            "entries": entries,
            "tiers": tiers,
            "series": service.ledger.series(tenant),
            "recent": service.ledger.recent(tenant),
        }
    )
    return body


def _static(name: str) -> bytes:
    return resources.files("promptcache.api").joinpath("static", name).read_bytes()


def routes(service: Service) -> list[BaseRoute]:
    """``/v1/cache/stats``, ``/v1/cache/dashboard``, ``/dashboard`` and its two files."""

    async def stats(request: Request) -> Response:
        try:
            tenant = scope(service, request)
        except AuthenticationFailed as exc:
            return _denied(exc)
        return JSONResponse(stats_json(service, tenant))

    async def data(request: Request) -> Response:
        try:
            tenant = scope(service, request)
        except AuthenticationFailed as exc:
            return _denied(exc)
        return JSONResponse(dashboard_json(service, tenant))

    async def page(request: Request) -> Response:
        return Response(_static("dashboard.html"), media_type="text/html; charset=utf-8")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        return Response(_static(name), media_type=_STATIC[name])

    return [
        Route("/v1/cache/stats", stats, methods=["GET"]),
        Route("/v1/cache/dashboard", data, methods=["GET"]),
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/{name}", asset, methods=["GET"]),
    ]


__all__ = ["POLL_S", "dashboard_json", "routes", "scope", "stats_json"]
