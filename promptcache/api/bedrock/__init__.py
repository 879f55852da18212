"""Amazon Bedrock runtime routes (spec §5): Converse, ConverseStream, InvokeModel,
InvokeModelWithResponseStream and CountTokens under ``POST /model/{modelId}/...``.

Each request is checked in the order of spec §1.14 before the service sees it: (1) the credential:
a SigV4 ``Authorization`` whose access key id names a tenant and whose signature verifies against
that key's configured secret, or a Bedrock API key as ``Authorization: Bearer`` mapped through the
same ``api_keys`` table as the other surfaces (with no credentials configured the server is open
and signatures are not verified, §1.12); (2) InvokeModel's ``anthropic_version``; (3) the body and
its marker shape (``decode.py``); then the model id. Steps 4-6 (cachePoint count and TTL order,
``BEDROCK_RULES``) run inside the service and surface on the generator's first step, before any
byte is sent. Every error, an unexpected one included, is rendered in Bedrock's shape by
``api/guard.py`` (``errors.ENVELOPE``); every response carries ``x-amzn-RequestId``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from promptcache.api.anthropic.encode import message_json, new_message_id
from promptcache.api.anthropic.rules import ANTHROPIC_RULES
from promptcache.api.bedrock import sigv4
from promptcache.api.bedrock.decode import (
    decode_converse,
    decode_count_tokens,
    decode_invoke,
    has_cache_points,
    model_candidates,
    prompt_reference,
    prompt_variables,
)
from promptcache.api.bedrock.encode import (
    ConverseStreamEncoder,
    EventEncoder,
    InvokeStreamEncoder,
    converse_json,
    count_json,
    elapsed_ms,
    invoke_headers,
)
from promptcache.api.bedrock.errors import ENVELOPE
from promptcache.api.bedrock.eventstream import event_message
from promptcache.api.bedrock.rules import BEDROCK_RULES
from promptcache.api.events import collect
from promptcache.api.guard import Call, Handler
from promptcache.api.http import bearer_token
from promptcache.api.openai.prompts import rendered_body, template_call
from promptcache.api.route import Surface, complete, stream
from promptcache.api.streaming import EventStreamResponse
from promptcache.api.wire import json_object
from promptcache.config import AwsCredential
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatEvent
from promptcache.errors import InvalidRequest, NotFound
from promptcache.service import CacheProfile, MarkRules
from promptcache.templates import Template
from promptcache.types import TenantId

MAX_BODY_BYTES: Final = 32 * 1024 * 1024
"""The default limit (``ApiConfig.max_body_bytes``); larger bodies get a ValidationException
without being read."""

INVOKE_ID_PREFIX: Final = "msg_bdrk_"

PROMPT_DEFINED: Final = ("system", "toolConfig", "inferenceConfig", "additionalModelRequestFields")
"""Converse fields a prompt ARN's prompt defines: AWS rejects them beside one."""
PROMPT_FIELDS_MESSAGE: Final = (
    "The model ID is a prompt ARN: {fields} cannot be given in the request, the prompt "
    "defines them."
)


class BedrockService(Protocol):
    """What the routes need from ``promptcache.service.Service``."""

    @property
    def served_model(self) -> str: ...

    def template(self, reference: str, tenant: TenantId) -> Template:
        """The prompt template ``reference`` names for ``tenant`` (a prompt ARN's resource);
        raises ``NotFound`` or ``BadTemplate``."""
        ...

    def profile_for(self, model: str) -> CacheProfile:
        """The caching profile of ``model`` (its ``tool_cache_points`` matters here)."""
        ...

    @property
    def is_open(self) -> bool:
        """No credentials configured: every request is the default tenant, unverified."""
        ...

    def authenticate(self, credential: str | None) -> TenantId:
        """The tenant of an API key; raises ``AuthenticationFailed``."""
        ...

    def aws_credential(self, access_key_id: str) -> AwsCredential:
        """The secret and tenant of a SigV4 access key id; raises ``AuthenticationFailed``."""
        ...

    def resolve_model(self, name: str) -> str:
        """The served model id for ``name``; raises ``NotFound``."""
        ...

    def generate(self, request: ChatRequest, rules: MarkRules) -> AsyncIterator[ChatEvent]:
        """``Started``, output pieces, ``Finished``; validation errors on the first step."""
        ...

    async def count_tokens(self, request: ChatRequest, rules: MarkRules) -> int:
        """The prompt's token count ``N``; validates like ``generate``, touches no entry."""
        ...


def routes(
    service: BedrockService,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
) -> list[BaseRoute]:
    """The Bedrock runtime routes served by ``service``; ``clock`` (epoch seconds) bounds the age
    of SigV4 signatures."""
    surface = Surface(ENVELOPE, max_body_bytes)
    handlers = _Handlers(service, surface, clock=clock)
    operations: dict[str, Handler] = {
        "converse": handlers.converse,
        "converse-stream": handlers.converse_stream,
        "invoke": handlers.invoke,
        "invoke-with-response-stream": handlers.invoke_stream,
        "count-tokens": handlers.count_tokens,
    }
    # ``:path`` because an ARN model id carries a slash, percent-encoded by boto3 but decoded by
    # the server before routing.
    return [
        surface.route(f"/model/{{model_id:path}}/{name}", operation)
        for name, operation in operations.items()
    ]


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who is calling, and the signature still to verify once the body has been read."""

    tenant: TenantId
    signed: sigv4.SignedAuthorization | None = None
    secret: str = ""


@dataclass(frozen=True, slots=True)
class _Admitted:
    model_id: str
    tenant: TenantId
    body: dict[str, Any]


class AwsEventStreamResponse(EventStreamResponse):
    """Binary event-stream frames (spec §5.5) with ``EventStreamResponse``'s disconnect handling:
    a client that leaves closes the service's generator."""

    media_type = "application/vnd.amazon.eventstream"


class _Handlers:
    def __init__(
        self, service: BedrockService, surface: Surface, *, clock: Callable[[], float]
    ) -> None:
        self.service = service
        self.surface = surface
        self.clock = clock

    async def converse(self, request: Request, call: Call) -> Response:
        chat = await self._converse_request(request)
        events = await complete(request, call, self.service.generate(chat, BEDROCK_RULES))
        body = converse_json(
            collect(events),
            has_cache_points=has_cache_points(chat),
            latency_ms=elapsed_ms(call.started_at),
        )
        return JSONResponse(body)

    async def converse_stream(self, request: Request, call: Call) -> Response:
        chat = await self._converse_request(request)
        encoder = ConverseStreamEncoder(
            has_cache_points=has_cache_points(chat), started_at=call.started_at
        )
        return await _stream(request, self.service.generate(chat, BEDROCK_RULES), encoder, call)

    async def invoke(self, request: Request, call: Call) -> Response:
        chat = await self._invoke_request(request)
        events = await complete(request, call, self.service.generate(chat, ANTHROPIC_RULES))
        result = collect(events)
        message_id = new_message_id(INVOKE_ID_PREFIX)
        body = message_json(result, model=chat.model, message_id=message_id)
        headers = invoke_headers(result.usage, latency_ms=elapsed_ms(call.started_at))
        return JSONResponse(body, headers=headers)

    async def invoke_stream(self, request: Request, call: Call) -> Response:
        chat = await self._invoke_request(request)
        encoder = InvokeStreamEncoder(
            model=chat.model,
            message_id=new_message_id(INVOKE_ID_PREFIX),
            started_at=call.started_at,
        )
        return await _stream(request, self.service.generate(chat, ANTHROPIC_RULES), encoder, call)

    async def count_tokens(self, request: Request, call: Call) -> Response:
        admitted = await self._admit(request)
        chat, rules = decode_count_tokens(
            admitted.body,
            model_id=admitted.model_id,
            tenant=admitted.tenant,
            tool_cache_points=self._tool_cache_points(admitted.model_id),
        )
        self._resolve_model(admitted.model_id)
        return JSONResponse(count_json(await self.service.count_tokens(chat, rules)))

    async def _converse_request(self, request: Request) -> ChatRequest:
        admitted = await self._admit(request)
        reference = prompt_reference(admitted.model_id)
        if reference is not None:
            chat = self._prompt_request(admitted, reference)
            self._resolve_model(chat.model)
            return chat
        chat = decode_converse(
            admitted.body,
            model_id=admitted.model_id,
            tenant=admitted.tenant,
            tool_cache_points=self._tool_cache_points(admitted.model_id),
        )
        self._resolve_model(admitted.model_id)
        return chat

    async def _invoke_request(self, request: Request) -> ChatRequest:
        admitted = await self._admit(request)
        chat = decode_invoke(admitted.body, model_id=admitted.model_id, tenant=admitted.tenant)
        self._resolve_model(admitted.model_id)
        return chat

    async def _admit(self, request: Request) -> _Admitted:
        """Step 1 of spec §1.14 (the credential; the signature once the body is read), then
        the body as a JSON object."""
        caller = self._identify(request.headers)
        body = await self.surface.body(request)
        if caller.signed is not None:
            # The path and query as sent, still percent-encoded; latin-1 maps any byte.
            raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
            raw_query: bytes = request.scope.get("query_string", b"")
            sigv4.verify(
                caller.signed,
                secret=caller.secret,
                method=request.method,
                raw_path=raw_path.decode("latin-1"),
                raw_query=raw_query.decode("latin-1"),
                headers=request.headers.items(),
                body=body,
                now=self.clock(),
            )
        model_id: str = request.path_params["model_id"]
        return _Admitted(model_id, caller.tenant, json_object(body))

    def _identify(self, headers: Headers) -> _Caller:
        if self.service.is_open:
            return _Caller(self.service.authenticate(None))  # §1.12: nothing is verified
        signed = sigv4.parse_authorization(headers.get("authorization", ""))
        if signed is None:
            return _Caller(self.service.authenticate(bearer_token(headers)))
        credential = self.service.aws_credential(signed.access_key_id)
        return _Caller(TenantId(credential.tenant), signed, credential.secret_access_key)

    def _prompt_request(self, admitted: _Admitted, reference: str) -> ChatRequest:
        """Converse on a prompt ARN (Prompt Management): the template of ``--prompts-dir`` the
        ARN names, its ``promptVariables`` substituted, then the request's ``messages``."""
        body = admitted.body
        given = [name for name in PROMPT_DEFINED if name in body]
        if given:
            raise InvalidRequest(PROMPT_FIELDS_MESSAGE.format(fields=", ".join(given)))
        template = self.service.template(reference, admitted.tenant)
        rendered = rendered_body(
            template,
            prompt_variables(body.get("promptVariables")),
            {},
            default_model=self.service.served_model,
        )
        chat = template_call(rendered, admitted.tenant).request
        if body.get("messages"):
            extra = decode_converse(
                {"messages": body["messages"]},
                model_id=admitted.model_id,
                tenant=admitted.tenant,
                tool_cache_points=self._tool_cache_points(chat.model),
            )
            chat = replace(chat, messages=chat.messages + extra.messages)
        return replace(chat, stream=False)

    def _tool_cache_points(self, model_id: str) -> bool:
        # A Nova profile rejects a tool cachePoint as hosted Nova does (spec §5.9).
        return self.service.profile_for(model_id).policy.tool_cache_points

    def _resolve_model(self, model_id: str) -> None:
        """404 unless ``model_id``, its ARN resource or its base model id resolves (§5.1)."""
        for name in model_candidates(model_id):
            try:
                self.service.resolve_model(name)
                return
            except NotFound:
                continue
        raise NotFound(f"The provided model identifier is invalid: {model_id}")


async def _stream(
    request: Request, events: AsyncIterator[ChatEvent], encoder: EventEncoder, call: Call
) -> Response:
    # Validation errors arrive on the first step: taken before the status line is sent, they
    # are ordinary JSON errors (spec §5.5); later failures end the stream with an exception.
    def encode(event: ChatEvent) -> list[bytes]:
        return [event_message(name, payload) for name, payload in encoder.feed(event)]

    frames = await stream(request, call, events, encode, is_finished=lambda: encoder.is_finished)
    return AwsEventStreamResponse(frames)


__all__ = [
    "INVOKE_ID_PREFIX",
    "MAX_BODY_BYTES",
    "AwsEventStreamResponse",
    "BedrockService",
    "routes",
]
