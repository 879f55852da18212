"""OpenAI Chat Completions route: ``POST /v1/chat/completions``, streaming and not (spec §4).

Each request is checked in the order of spec §1.14 before the service sees it: (1) the credential,
then the body: size, schema and (3) marker shape (``decode.py``), then the model name. Steps 4-6
(breakpoint count, TTL order) run inside ``service.generate`` with ``OPENAI_RULES`` and surface on
the generator's first step, before anything is sent. Every error, an unexpected one included, is
rendered in OpenAI's envelope by ``api/guard.py`` (``errors.ENVELOPE``), and every response
carries ``x-request-id``.

``GET /v1/models`` is protocol-neutral and lives in ``app.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Final, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from promptcache.api.events import collect
from promptcache.api.guard import Call
from promptcache.api.openai.decode import ChatCall, credentials, decode_chat, wants_rounding
from promptcache.api.openai.encode import ChunkEncoder, Completion, completion_json
from promptcache.api.openai.errors import ENVELOPE
from promptcache.api.openai.rules import OPENAI_RULES
from promptcache.api.route import Surface, complete, stream
from promptcache.api.streaming import EventStreamResponse, sse_event
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatEvent
from promptcache.errors import AuthenticationFailed, NotFound
from promptcache.service import MarkRules
from promptcache.types import TenantId

MAX_BODY_BYTES: Final = 32 * 1024 * 1024
"""The default limit (``ApiConfig.max_body_bytes``); larger bodies get 413."""

KEEPALIVE_S: Final = 15.0
"""Seconds of silence after which a stream sends an SSE comment, which clients skip."""

_KEEPALIVE: Final = b": keepalive\n\n"
_DONE: Final = sse_event("[DONE]")
_NO_KEY: Final = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_BAD_KEY: Final = "Incorrect API key provided."


class ChatService(Protocol):
    """What the route needs from ``promptcache.service.Service``."""

    def authenticate(self, credential: str | None) -> TenantId:
        """The tenant of ``credential``; raises ``AuthenticationFailed``."""
        ...

    def resolve_model(self, name: str) -> str:
        """The served model id for ``name``; raises ``NotFound``."""
        ...

    def generate(self, request: ChatRequest, rules: MarkRules) -> AsyncIterator[ChatEvent]:
        """``Started``, output pieces, ``Finished``; validation errors on the first step."""
        ...


def routes(
    service: ChatService,
    *,
    round_cached_tokens: bool = False,
    keepalive_s: float = KEEPALIVE_S,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[BaseRoute]:
    """The OpenAI Chat Completions route served by ``service``.

    ``round_cached_tokens`` is the deployment option of spec §4.6: report ``cached_tokens`` in
    whole 128-token units, as the classic hosted models do, for every request.
    """
    surface = Surface(ENVELOPE, max_body_bytes)
    handlers = ChatHandlers(
        service, surface, round_cached_tokens=round_cached_tokens, keepalive_s=keepalive_s
    )
    return [surface.route("/v1/chat/completions", handlers.chat_completions)]


class ChatHandlers:
    """The Chat Completions handler and the steps other OpenAI-shaped routes reuse."""

    def __init__(
        self,
        service: ChatService,
        surface: Surface,
        *,
        round_cached_tokens: bool,
        keepalive_s: float,
    ) -> None:
        self.service = service
        self.surface = surface
        self.round_cached_tokens = round_cached_tokens
        self.keepalive_s = keepalive_s

    async def chat_completions(self, request: Request, call: Call) -> Response:
        return await self.respond(request, call, await self._admit(request))

    async def respond(self, request: Request, call: Call, chat: ChatCall) -> Response:
        """The completion of an admitted ``chat``, streamed or whole."""
        completion = Completion.new(chat.request.model)
        round_cached = self.round_cached_tokens or wants_rounding(request.headers)
        events = self.service.generate(chat.request, OPENAI_RULES)
        if chat.request.stream:
            encoder = ChunkEncoder(
                completion, include_usage=chat.include_usage, round_cached=round_cached
            )

            def encode(event: ChatEvent) -> list[bytes]:
                return [sse_event(chunk) for chunk in encoder.feed(event)]

            # Then ``data: [DONE]``; a failure after the first byte ends the stream with an
            # ``{"error": ...}`` frame instead.
            frames = await stream(
                request,
                call,
                events,
                encode,
                is_finished=lambda: encoder.is_finished,
                trailer=_DONE,
            )
            return EventStreamResponse(frames, keepalive=_KEEPALIVE, keepalive_s=self.keepalive_s)
        result = collect(await complete(request, call, events))
        return JSONResponse(completion_json(result, completion, round_cached=round_cached))

    async def _admit(self, request: Request) -> ChatCall:
        """Validation steps 1 and 3 of spec §1.14 (OpenAI has no protocol headers), then the
        model name."""
        tenant = self.authenticate(request.headers)
        call = decode_chat(await self.surface.body(request), tenant=tenant)
        self.resolve_model(call.request.model)
        return call

    def resolve_model(self, name: str) -> None:
        """404 ``model_not_found`` unless ``name`` resolves."""
        try:
            self.service.resolve_model(name)  # the request keeps the name the client sent
        except NotFound:
            raise NotFound(
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            ) from None

    def authenticate(self, headers: Mapping[str, str]) -> TenantId:
        token, portkey_key = credentials(headers)
        # ``x-portkey-api-key`` is the credential when ``Authorization`` is absent (§4.1). The
        # portkey-ai SDK always sends its inner OpenAI client's placeholder bearer token
        # ("OPENAI_API_KEY") beside it, so it is also tried when the bearer token is unknown.
        # Either way the key must be a configured one: no header can pick a tenant (§1.12).
        candidates: list[str | None] = [key for key in (token, portkey_key) if key is not None]
        candidates = candidates or [None]
        for credential in candidates:
            try:
                return self.service.authenticate(credential)
            except AuthenticationFailed:
                continue
        message = _NO_KEY if candidates == [None] else _BAD_KEY
        raise AuthenticationFailed(message, code="invalid_api_key")


__all__ = ["KEEPALIVE_S", "MAX_BODY_BYTES", "ChatHandlers", "ChatService", "routes"]
