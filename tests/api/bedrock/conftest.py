"""A fake service for the Bedrock routes, botocore's own event-stream decoder and SigV4 signer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, EventStreamMessage
from starlette.applications import Starlette
from starlette.testclient import TestClient

from promptcache.api.bedrock import routes
from promptcache.cache.profiles import CacheProfile
from promptcache.config import AwsCredential
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatEvent
from promptcache.errors import AuthenticationFailed
from promptcache.service import MarkRules, ModelCachePolicy
from tests.api.anthropic.conftest import FakeService

MODEL_ID = "anthropic.claude-3-7-sonnet-20250219-v1:0"
MODEL_PATH = "anthropic.claude-3-7-sonnet-20250219-v1%3A0"
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"


@dataclass
class FakeBedrockService(FakeService):
    """The Anthropic fake plus what the Bedrock routes need: rules, policy, SigV4 keys."""

    aws: dict[str, AwsCredential] | None = None
    policy: ModelCachePolicy = field(default_factory=ModelCachePolicy)
    rules: list[MarkRules] = field(default_factory=list)

    def profile_for(self, model: str) -> CacheProfile:
        return CacheProfile("test", self.policy)

    @property
    def is_open(self) -> bool:
        return self.keys is None and self.aws is None

    def aws_credential(self, access_key_id: str) -> AwsCredential:
        if self.aws is None or access_key_id not in self.aws:
            raise AuthenticationFailed("unknown access key")
        return self.aws[access_key_id]

    async def generate(  # type: ignore[override]
        self, request: ChatRequest, rules: MarkRules
    ) -> AsyncIterator[ChatEvent]:
        self.rules.append(rules)
        async for event in super().generate(request):
            yield event

    async def count_tokens(self, request: ChatRequest, rules: MarkRules) -> int:  # type: ignore[override]
        self.rules.append(rules)
        return await super().count_tokens(request)


def converse_body(**overrides: Any) -> dict[str, Any]:
    """A minimal Converse body with ``overrides`` applied (``None`` removes a field)."""
    base: dict[str, Any] = {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def invoke_body(**overrides: Any) -> dict[str, Any]:
    """A minimal InvokeModel (Anthropic) body."""
    base: dict[str, Any] = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def decode_frames(raw: bytes) -> list[EventStreamMessage]:
    """Every message of an event stream, decoded (and CRC-checked) by botocore."""
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    messages = list(buffer)
    assert sum(m.prelude.total_length for m in messages) == len(raw), "trailing bytes"
    return messages


def stream_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event or exception type, JSON payload)`` for each message of an event stream."""
    out = []
    for message in decode_frames(raw):
        headers = message.headers
        kind = headers.get(":event-type") or headers[":exception-type"]
        out.append((kind, json.loads(message.payload)))
    return out


def signed_headers(
    path: str,
    body: bytes,
    *,
    secret: str = SECRET_KEY,
    access_key: str = ACCESS_KEY,
    host: str = "testserver",
) -> dict[str, str]:
    """The headers botocore's ``SigV4Auth`` adds to ``POST http://<host><path>``."""
    request = AWSRequest(
        method="POST",
        url=f"http://{host}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    SigV4Auth(Credentials(access_key, secret), "bedrock", REGION).add_auth(request)
    return {
        key: value.decode() if isinstance(value, bytes) else value
        for key, value in request.headers.items()
    }


@pytest.fixture
def service() -> FakeBedrockService:
    return FakeBedrockService()


@pytest.fixture
def client(service: FakeBedrockService) -> Iterator[TestClient]:
    with TestClient(Starlette(routes=routes(service))) as test_client:
        yield test_client
