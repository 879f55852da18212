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
from typing import Final, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from promptcache.api.anthropic.decode import check_version, credential, decode_messages
from promptcache.api.anthropic.encode import (
    StreamEncoder,
    collect,
    count_json,
    message_json,
    new_message_id,
)
from promptcache.api.anthropic.errors import ENVELOPE
from promptcache.api.guard import Call, guarded
from promptcache.api.http import read_body
from promptcache.api.streaming import (
    EventStreamResponse,
    drain,
    event_frames,
    first_event,
    sse_event,
)
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatEvent
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
    handlers = _Handlers(service, keepalive_s=keepalive_s, max_body_bytes=max_body_bytes)
    return [
        Route("/v1/messages", guarded(ENVELOPE, handlers.messages), methods=["POST"]),
        Route(
            "/v1/messages/count_tokens",
            guarded(ENVELOPE, handlers.count_tokens),
            methods=["POST"],
        ),
    ]


class _Handlers:
    def __init__(
        self, service: MessagesService, *, keepalive_s: float, max_body_bytes: int
    ) -> None:
        self.service = service
        self.keepalive_s = keepalive_s
        self.max_body_bytes = max_body_bytes

    async def messages(self, request: Request, call: Call) -> Response:
        chat = await self._admit(request, count_only=False)
        events = self.service.generate(chat)
        if chat.stream:
            return await self._stream(request, chat, events, call)
        return await self._complete(request, chat, events)

    async def count_tokens(self, request: Request, call: Call) -> Response:
        chat = await self._admit(request, count_only=True)
        return JSONResponse(count_json(await self.service.count_tokens(chat)))

    async def _admit(self, request: Request, *, count_only: bool) -> ChatRequest:
        """Validation steps 1-3 of spec §1.14, then the model name."""
        tenant = self.service.authenticate(credential(request.headers))
        check_version(request.headers)
        body = await read_body(request, self.max_body_bytes)
        chat = decode_messages(body, tenant=tenant, count_only=count_only)
        self.service.resolve_model(chat.model)  # 404 for an unknown name; chat keeps the alias
        return chat

    async def _complete(
        self,
        request: Request,
        chat: ChatRequest,
        events: AsyncIterator[ChatEvent],
    ) -> Response:
        collected = await drain(request.receive, events)
        body = message_json(collect(collected), model=chat.model, message_id=new_message_id())
        return JSONResponse(body)

    async def _stream(
        self,
        request: Request,
        chat: ChatRequest,
        events: AsyncIterator[ChatEvent],
        call: Call,
    ) -> Response:
        # Validation errors arrive on the first step: taken before the status line is sent.
        first = await first_event(request.receive, events)
        encoder = StreamEncoder(model=chat.model, message_id=new_message_id())
        return EventStreamResponse(
            _sse(first, events, encoder, call),
            keepalive=_PING,
            keepalive_s=self.keepalive_s,
        )


def _sse(
    first: ChatEvent, events: AsyncIterator[ChatEvent], encoder: StreamEncoder, call: Call
) -> AsyncIterator[bytes]:
    """The SSE frames of one stream; a failure after the first byte ends it with ``error``."""

    def encode(event: ChatEvent) -> list[bytes]:
        return [sse_event(data, event=name) for name, data in encoder.feed(event)]

    return event_frames(
        first, events, encode, is_finished=lambda: encoder.is_finished, fail=call.fail
    )


__all__ = ["KEEPALIVE_S", "MAX_BODY_BYTES", "MessagesService", "routes"]
