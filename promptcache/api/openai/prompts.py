"""Prompt template routes in Portkey's shape (``promptcache/templates.py`` has the files):

- ``POST /v1/prompts/{id}/completions``: ``{"variables": {...}, "stream"?, <hyperparameters>}``
  -> an OpenAI chat completion (or its chunk stream) of the rendered template; hyperparameters
  in the body (``max_tokens``, ``temperature``, ...) override the template's;
- ``POST /v1/prompts/{id}/render``: the same body -> ``{"success": true, "data": <chat body>}``,
  the body the completion would run, markers included.

These are the paths of the portkey-ai SDK's ``prompts.completions.create`` and ``prompts.render``
with ``base_url=<server>/v1``. ``{id}`` may name a version: ``support@3``, ``support@latest``.
Credentials, errors and streams are those of Chat Completions (``ChatHandlers``).

The rendered body runs with ``prompt_cache_options.mode: "explicit"`` unless the request says
otherwise: only the template's markers (or its automatic breakpoint after the static part)
cache, so a call's variables never make an entry of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from promptcache.api.guard import Call
from promptcache.api.openai import KEEPALIVE_S, MAX_BODY_BYTES, ChatHandlers, ChatService
from promptcache.api.openai.decode import ChatCall, decode_chat_data
from promptcache.api.openai.errors import ENVELOPE
from promptcache.api.route import Surface
from promptcache.api.wire import json_object
from promptcache.errors import InvalidRequest
from promptcache.templates import Template
from promptcache.types import TenantId

NOT_OVERRIDDEN: Final = frozenset({"variables", "messages", "tools", "functions"})
"""Body fields that are the template's own: a request cannot replace them."""


class PromptService(ChatService, Protocol):
    """What the prompt routes need from ``promptcache.service.Service``."""

    @property
    def served_model(self) -> str: ...

    def template(self, reference: str, tenant: TenantId) -> Template:
        """The template ``reference`` names for ``tenant``; raises ``NotFound`` or
        ``BadTemplate``."""
        ...


def routes(
    service: PromptService,
    *,
    round_cached_tokens: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[BaseRoute]:
    """``/v1/prompts/{prompt_id}/completions`` and ``/render`` served by ``service``."""
    surface = Surface(ENVELOPE, max_body_bytes)
    handlers = PromptHandlers(service, surface, round_cached_tokens=round_cached_tokens)
    return [
        surface.route("/v1/prompts/{prompt_id}/completions", handlers.completions),
        surface.route("/v1/prompts/{prompt_id}/render", handlers.render),
    ]


def variables_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
    variables = body.get("variables")
    if variables is None:
        return {}
    if not isinstance(variables, dict):
        raise InvalidRequest(
            "variables: Input should be an object", param="variables", code="invalid_type"
        )
    return variables


def rendered_body(
    template: Template,
    variables: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    default_model: str,
) -> dict[str, Any]:
    """The chat body a call of ``template`` runs: variables substituted, automatic breakpoint
    placed, the request's hyperparameters over the template's, a model name always set."""
    body = template.render(variables)
    body.update(
        (key, value)
        for key, value in overrides.items()
        if key not in NOT_OVERRIDDEN and value is not None
    )
    body.setdefault("model", default_model)
    return body


def template_call(body: Mapping[str, Any], tenant: TenantId) -> ChatCall:
    """The decoded request of a rendered template body: only its own markers cache."""
    data = dict(body)
    data.setdefault("prompt_cache_options", {"mode": "explicit"})
    return decode_chat_data(data, tenant=tenant)


class PromptHandlers(ChatHandlers):
    def __init__(
        self, service: PromptService, surface: Surface, *, round_cached_tokens: bool
    ) -> None:
        super().__init__(
            service, surface, round_cached_tokens=round_cached_tokens, keepalive_s=KEEPALIVE_S
        )
        self.prompts = service

    async def _body(self, request: Request) -> tuple[dict[str, Any], TenantId]:
        tenant = self.authenticate(request.headers)
        body = json_object(await self.surface.body(request))
        template = self.prompts.template(request.path_params["prompt_id"], tenant)
        rendered = rendered_body(
            template, variables_of(body), body, default_model=self.prompts.served_model
        )
        return rendered, tenant

    async def completions(self, request: Request, call: Call) -> Response:
        rendered, tenant = await self._body(request)
        chat = template_call(rendered, tenant)
        self.resolve_model(chat.request.model)
        return await self.respond(request, call, chat)

    async def render(self, request: Request, call: Call) -> Response:
        rendered, _ = await self._body(request)
        rendered.pop("stream", None)
        return JSONResponse({"success": True, "data": rendered})


__all__ = [
    "NOT_OVERRIDDEN",
    "PromptHandlers",
    "PromptService",
    "rendered_body",
    "routes",
    "template_call",
    "variables_of",
]
