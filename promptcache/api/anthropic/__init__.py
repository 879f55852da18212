"""Anthropic Messages routes: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Each request is checked in the order of spec §1.14 before the service sees it: (1) the credential
(``service.authenticate``), (2) the protocol headers, then the body: size, schema and (3) marker
shape (``decode.py``), then the model name. Steps 4-6 (breakpoint count, automatic-caching
conflicts, TTL order) run inside ``service.generate`` / ``service.count_tokens`` and surface on
the generator's first step, before anything is sent. Every error, an unexpected one included, is
rendered in Anthropic's envelope by ``api/guard.py`` (``errors.ENVELOPE``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Final, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from promptcache.api.anthropic.decode import (
    check_version,
    credential,
    decode_diagnostics,
    decode_messages,
)
from promptcache.api.anthropic.encode import (
    StreamEncoder,
    collect,
    count_json,
    message_json,
    new_message_id,
)
from promptcache.api.anthropic.errors import ENVELOPE
from promptcache.api.guard import Call
from promptcache.api.route import Surface, complete, stream
from promptcache.api.streaming import EventStreamResponse, sse_event
from promptcache.api.wire import json_object
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatEvent, Started
from promptcache.types import TenantId

MAX_BODY_BYTES: Final = 32 * 1024 * 1024
"""The default limit (``ApiConfig.max_body_bytes``); larger bodies get 413 ``request_too_large``
(spec §3.5)."""

KEEPALIVE_S: Final = 15.0
"""Seconds of silence after which a stream sends a ``ping`` event."""

_PING: Final = sse_event({"type": "ping"}, event="ping")


class MessagesService(Protocol):
    """What the routes need from ``promptcache.service.Service``."""

    def authenticate(self, credential: str | None) -> TenantId:
        """The tenant of ``credential``; raises ``AuthenticationFailed``."""
        ...

    def resolve_model(self, name: str) -> str:
        """The served model id for ``name``; raises ``NotFound``."""
        ...

    def generate(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        """``Started``, output pieces, ``Finished``; validation errors on the first step."""
        ...

    async def count_tokens(self, request: ChatRequest) -> int:
        """The prompt's token count ``N``; applies the caching validation, touches no entry."""
        ...


def routes(
    service: MessagesService,
    *,
    keepalive_s: float = KEEPALIVE_S,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[BaseRoute]:
    """The Anthropic Messages routes served by ``service``."""
    surface = Surface(ENVELOPE, max_body_bytes)
    handlers = _Handlers(service, surface, keepalive_s=keepalive_s)
    return [
        surface.route("/v1/messages", handlers.messages),
        surface.route("/v1/messages/count_tokens", handlers.count_tokens),
    ]


class _Handlers:
    def __init__(self, service: MessagesService, surface: Surface, *, keepalive_s: float) -> None:
        self.service = service
        self.surface = surface
        self.keepalive_s = keepalive_s

    async def messages(self, request: Request, call: Call) -> Response:
        message_id = new_message_id()
        chat = await self._admit(request, count_only=False, message_id=message_id)
        events = self.service.generate(chat)
        if chat.stream:
            # Validation errors arrive on the first step: taken before the status line is sent.
            encoder = StreamEncoder(model=chat.model, message_id=message_id)

            def encode(event: ChatEvent) -> list[bytes]:
                return [sse_event(data, event=name) for name, data in encoder.feed(event)]

            frames = await stream(
                request, call, events, encode, is_finished=lambda: encoder.is_finished
            )
            return EventStreamResponse(frames, keepalive=_PING, keepalive_s=self.keepalive_s)
        collected = await complete(request, call, events)
        started = collected[0] if collected and isinstance(collected[0], Started) else None
        body = message_json(
            collect(collected),
            model=chat.model,
            message_id=message_id,
            diagnosis=started.diagnosis if started is not None else None,
        )
        return JSONResponse(body)

    async def count_tokens(self, request: Request, call: Call) -> Response:
        chat = await self._admit(request, count_only=True, message_id="")
        return JSONResponse(count_json(await self.service.count_tokens(chat)))

    async def _admit(self, request: Request, *, count_only: bool, message_id: str) -> ChatRequest:
        """Validation steps 1-3 of spec §1.14, then the model name."""
        tenant = self.service.authenticate(credential(request.headers))
        check_version(request.headers)
        data = json_object(await self.surface.body(request))
        chat = decode_messages(data, tenant=tenant, count_only=count_only)
        self.service.resolve_model(chat.model)  # 404 for an unknown name; chat keeps the alias
        if count_only:
            return chat
        ask = decode_diagnostics(data, request.headers, message_id=message_id)
        return replace(chat, diagnostics=ask) if ask is not None else chat


__all__ = ["KEEPALIVE_S", "MAX_BODY_BYTES", "MessagesService", "routes"]
