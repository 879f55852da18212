"""The route over a fake service: JSON, SSE, errors, credentials, keep-alives, and the SDK."""

from __future__ import annotations

import re
from typing import Any

import anyio
import openai
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import Message

from promptcache.api.openai import routes
from promptcache.api.openai.encode import usage_json
from promptcache.api.openai.rules import OPENAI_RULES
from promptcache.core.request import Block, CacheMark
from promptcache.core.response import CacheUsage, Finished, Started, TextOut
from promptcache.errors import EngineFailure, InvalidRequest, Overloaded
from promptcache.types import DEFAULT_TENANT, TenantId
from tests.api.anthropic.test_routes import drive

from .conftest import FINAL_USAGE, HEADERS, PROMPT_USAGE, FakeService, body, data_lines

URL = "/v1/chat/completions"
REQUEST_ID = re.compile(r"req_[A-Za-z0-9]{24}")


def test_completion(service: FakeService, client: TestClient) -> None:
    response = client.post(URL, json=body(), headers=HEADERS)
    assert response.status_code == 200
    assert REQUEST_ID.fullmatch(response.headers["x-request-id"])
    payload = response.json()
    assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{24}", payload["id"])
    assert payload["model"] == "gpt-test" and payload["object"] == "chat.completion"
    message = payload["choices"][0]["message"]
    assert message["content"] == "Hello, world"
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert payload["choices"][0]["finish_reason"] == "tool_calls"
    assert payload["usage"] == usage_json(FINAL_USAGE)
    assert service.num_closed == 1
    assert service.rules == [OPENAI_RULES]
    [request] = service.requests
    assert request.model == "gpt-test" and request.tenant == DEFAULT_TENANT
    assert request.messages[0].blocks == (Block("text", "Hi"),)
    assert request.auto_cache == CacheMark("5m", "prompt_cache_options.ttl")


def test_stream_with_usage(service: FakeService, client: TestClient) -> None:
    """Checklist 50 on the wire: ``data:`` chunks, one usage chunk, then ``[DONE]``."""
    payload = body(stream=True, stream_options={"include_usage": True})
    response = client.post(URL, json=payload, headers=HEADERS)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert REQUEST_ID.fullmatch(response.headers["x-request-id"])
    *chunks, done = data_lines(response.text)
    assert done == "[DONE]"
    *content, last = chunks
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in content)
    assert last["choices"] == [] and last["usage"] == usage_json(FINAL_USAGE)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)
    assert text == "Hello, world"
    assert content[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert len({c["id"] for c in chunks}) == 1
    assert service.num_closed == 1


def test_stream_without_usage(client: TestClient) -> None:
    response = client.post(URL, json=body(stream=True), headers=HEADERS)
    *chunks, done = data_lines(response.text)
    assert done == "[DONE]"
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)


def test_rounding_by_header_and_by_deployment(service: FakeService) -> None:
    usage = CacheUsage(prompt_tokens=1500, read_tokens=1300, written_tokens={"5m": 100, "1h": 0})
    service.steps = [Started(usage), Finished("end_turn", None, usage.with_output(1))]
    for round_all in (False, True):
        with TestClient(Starlette(routes=routes(service, round_cached_tokens=round_all))) as client:
            plain = client.post(URL, json=body(), headers=HEADERS).json()["usage"]
            asked = client.post(
                URL, json=body(), headers={"x-promptcache-compat": "openai-cached-128"}
            ).json()["usage"]
        expected = 1280 if round_all else 1300
        assert plain["prompt_tokens_details"]["cached_tokens"] == expected
        assert asked["prompt_tokens_details"]["cached_tokens"] == 1280
        assert plain["prompt_tokens"] == asked["prompt_tokens"] == 1500


def test_validation_error_on_the_first_step(service: FakeService, client: TestClient) -> None:
    """Count and order errors come from the service: 400 in the envelope, also when streaming."""
    message = "A maximum of 4 blocks with cache_control may be provided. Found 5."
    service.steps = [InvalidRequest(message)]
    for stream in (False, True):
        response = client.post(URL, json=body(stream=stream), headers=HEADERS)
        assert response.status_code == 400
        assert response.json() == {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        assert REQUEST_ID.fullmatch(response.headers["x-request-id"])
    assert service.num_closed == 2


def test_error_after_the_stream_started(service: FakeService, client: TestClient) -> None:
    service.steps = [Started(PROMPT_USAGE), TextOut("a"), Overloaded("engine queue is full")]
    response = client.post(URL, json=body(stream=True), headers=HEADERS)
    assert response.status_code == 200
    *chunks, error = data_lines(response.text)
    assert error == {
        "error": {
            "message": "engine queue is full",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "[DONE]" not in chunks
    assert service.num_closed == 1


def test_stream_that_ends_without_finished(service: FakeService, client: TestClient) -> None:
    service.steps = [Started(PROMPT_USAGE), TextOut("a")]
    *_, error = data_lines(client.post(URL, json=body(stream=True), headers=HEADERS).text)
    assert error["error"]["type"] == "server_error"


def test_engine_failure_without_events(service: FakeService, client: TestClient) -> None:
    service.steps = []
    response = client.post(URL, json=body(stream=True), headers=HEADERS)
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    service.steps = [EngineFailure("boom")]
    assert client.post(URL, json=body(), headers=HEADERS).status_code == 500


def test_credentials(service: FakeService, client: TestClient) -> None:
    service.keys = {"key-a": "tenant-a", "key-b": "tenant-b"}

    def tenant_of(headers: dict[str, str]) -> TenantId | int:
        response = client.post(URL, json=body(), headers=headers)
        if response.status_code != 200:
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.json()["error"]["type"] == "invalid_request_error"
            return int(response.status_code)
        return service.requests[-1].tenant

    assert tenant_of({"authorization": "Bearer key-a"}) == "tenant-a"
    # §4.1: x-portkey-api-key when Authorization is absent.
    assert tenant_of({"x-portkey-api-key": "key-b"}) == "tenant-b"
    # The portkey-ai SDK's fixed placeholder bearer token beside the real key.
    assert tenant_of({"authorization": "Bearer OPENAI_API_KEY", "x-portkey-api-key": "key-b"}) == (
        "tenant-b"
    )
    # A valid Authorization wins; no other header changes the tenant (§1.12).
    headers = {"authorization": "Bearer key-a", "x-portkey-api-key": "key-b", "x-api-key": "key-b"}
    assert tenant_of(headers) == "tenant-a"
    assert tenant_of({"authorization": "Bearer wrong"}) == 401
    assert tenant_of({"authorization": "Bearer wrong", "x-portkey-api-key": "wrong"}) == 401
    missing = client.post(URL, json=body())
    assert missing.status_code == 401
    assert missing.json()["error"]["message"].startswith("You didn't provide an API key")
    assert tenant_of({"x-api-key": "key-a"}) == 401  # not an OpenAI credential


def test_rejected_credential_never_reaches_the_service(
    service: FakeService, client: TestClient
) -> None:
    service.keys = {"key-a": "tenant-a"}
    response = client.post(URL, json=body(prompt_cache_retention="forever"), headers={})
    assert response.status_code == 401  # authentication is checked first (§1.14)
    assert service.requests == []


def test_unknown_model(service: FakeService, client: TestClient) -> None:
    service.models = {"served"}
    response = client.post(URL, json=body(model="gpt-9"), headers=HEADERS)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "The model `gpt-9` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    assert client.post(URL, json=body(model="served"), headers=HEADERS).status_code == 200


def test_body_errors(client: TestClient) -> None:
    response = client.post(URL, json=body(prompt_cache_retention="forever"), headers=HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt_cache_retention"
    assert response.json()["error"]["code"] == "invalid_value"
    bad_json = client.post(URL, content=b"{", headers=HEADERS)
    assert bad_json.status_code == 400


def test_body_too_large(service: FakeService) -> None:
    with TestClient(Starlette(routes=routes(service, max_body_bytes=100))) as client:
        response = client.post(URL, json=body(messages=[{"role": "user", "content": "x" * 200}]))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_keepalive_comment_while_the_model_is_busy() -> None:
    async def main() -> None:
        service = FakeService()
        release = anyio.Event()
        service.steps = [
            Started(PROMPT_USAGE),
            release.wait,
            TextOut("late"),
            Finished("end_turn", None, FINAL_USAGE),
        ]
        chunks: list[bytes] = []

        async def on_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message["body"])
                if message["body"].startswith(b": keepalive"):
                    release.set()

        app = Starlette(routes=routes(service, keepalive_s=0.01))
        await drive(app, body(stream=True), on_send, anyio.Event(), path=URL)
        raw = b"".join(chunks).decode()
        assert ": keepalive\n\n" in raw
        *_, done = data_lines(raw)
        assert done == "[DONE]"
        assert service.num_closed == 1

    anyio.run(main)


def test_client_disconnect_closes_the_service_generator() -> None:
    async def main() -> None:
        service = FakeService()
        disconnect = anyio.Event()
        service.steps = [Started(PROMPT_USAGE), TextOut("a"), anyio.sleep_forever]

        async def on_send(message: Message) -> None:
            if b'"content":"a"' in message.get("body", b""):
                disconnect.set()

        app = Starlette(routes=routes(service))
        await drive(app, body(stream=True), on_send, disconnect, path=URL)
        assert service.num_closed == 1

    anyio.run(main)


# -- the official SDK parses what we send ---------------------------------------------------------


@pytest.fixture
def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="key-a", base_url=f"{client.base_url}/v1", http_client=client, max_retries=0
    )


def test_sdk_create_and_stream(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Hi"}]
    completion = sdk.chat.completions.create(model="gpt-test", messages=messages)
    assert completion.choices[0].message.content == "Hello, world"
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and calls[0].type == "function"
    assert calls[0].function.arguments == '{"city": "Paris", "unit": "C"}'
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 40
    assert usage.prompt_tokens_details.cache_write_tokens == 30
    stream = sdk.chat.completions.create(
        model="gpt-test", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 107


def test_sdk_errors(service: FakeService, sdk: openai.OpenAI) -> None:
    service.steps = [InvalidRequest("A maximum of 4 blocks with cache_control may be provided.")]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.code is None and info.value.type == "invalid_request_error"
    assert info.value.request_id == info.value.response.headers["x-request-id"]
    service.keys = {}
    with pytest.raises(openai.AuthenticationError) as auth:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert auth.value.code == "invalid_api_key"
