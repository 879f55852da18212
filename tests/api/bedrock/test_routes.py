"""The Bedrock routes over a fake service: JSON, event streams, auth, model ids, disconnects."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import Message

from promptcache.api.anthropic.rules import ANTHROPIC_RULES
from promptcache.api.bedrock import routes
from promptcache.api.bedrock.rules import BEDROCK_RULES
from promptcache.config import AwsCredential
from promptcache.core.response import Started, TextOut
from promptcache.errors import EngineFailure, InvalidRequest
from tests.api.anthropic.conftest import PROMPT_USAGE
from tests.api.anthropic.test_routes import drive
from tests.api.bedrock.conftest import (
    ACCESS_KEY,
    MODEL_ID,
    MODEL_PATH,
    SECRET_KEY,
    FakeBedrockService,
    converse_body,
    invoke_body,
    signed_headers,
    stream_events,
)

EVENT_STREAM = "application/vnd.amazon.eventstream"


def url(operation: str, model: str = MODEL_PATH) -> str:
    return f"/model/{model}/{operation}"


def assert_request_id(headers: Any) -> None:
    assert uuid.UUID(headers["x-amzn-requestid"])


def assert_error(response: Any, status: int, code: str, message: str | None = None) -> None:
    assert response.status_code == status
    assert response.headers["x-amzn-errortype"] == code
    assert_request_id(response.headers)
    body = response.json()
    assert set(body) == {"message"}
    if message is not None:
        assert body["message"] == message


def test_converse(client: TestClient, service: FakeBedrockService) -> None:
    response = client.post(url("converse"), json=converse_body())
    assert response.status_code == 200
    assert_request_id(response.headers)
    body = response.json()
    assert body["stopReason"] == "tool_use"
    assert body["output"]["message"]["content"][0] == {"text": "Hello, world"}
    assert set(body["usage"]) == {"inputTokens", "outputTokens", "totalTokens"}
    assert isinstance(body["metrics"]["latencyMs"], int)
    assert service.requests[0].model == MODEL_ID  # URL-decoded
    assert service.rules == [BEDROCK_RULES]


def test_converse_stream(client: TestClient, service: FakeBedrockService) -> None:
    response = client.post(url("converse-stream"), json=converse_body())
    assert response.status_code == 200
    assert response.headers["content-type"] == EVENT_STREAM
    assert_request_id(response.headers)
    names = [name for name, _ in stream_events(response.content)]
    assert names[0] == "messageStart" and names[-2:] == ["messageStop", "metadata"]
    assert service.num_closed == 1


def test_invoke(client: TestClient, service: FakeBedrockService) -> None:
    response = client.post(url("invoke"), json=invoke_body())
    assert response.status_code == 200
    assert_request_id(response.headers)
    body = response.json()
    assert body["id"].startswith("msg_bdrk_")
    assert body["model"] == MODEL_ID
    assert body["usage"]["cache_read_input_tokens"] == 40
    assert response.headers["x-amzn-bedrock-cache-write-input-token-count"] == "30"
    assert service.rules == [ANTHROPIC_RULES]


def test_invoke_with_response_stream(client: TestClient) -> None:
    response = client.post(url("invoke-with-response-stream"), json=invoke_body())
    assert response.headers["content-type"] == EVENT_STREAM
    chunks = [json.loads(base64.b64decode(p["bytes"])) for _, p in stream_events(response.content)]
    assert chunks[0]["type"] == "message_start"
    assert chunks[0]["message"]["id"].startswith("msg_bdrk_")
    assert "amazon-bedrock-invocationMetrics" in chunks[-1]


def test_count_tokens(client: TestClient, service: FakeBedrockService) -> None:
    response = client.post(url("count-tokens"), json={"input": {"converse": converse_body()}})
    assert response.json() == {"inputTokens": 100}
    assert_request_id(response.headers)
    body = base64.b64encode(json.dumps(invoke_body()).encode()).decode()
    response = client.post(url("count-tokens"), json={"input": {"invokeModel": {"body": body}}})
    assert response.json() == {"inputTokens": 100}
    assert service.rules == [BEDROCK_RULES, ANTHROPIC_RULES]
    service.count_error = InvalidRequest(
        "A maximum of 4 cachePoint blocks may be provided. Found 5."
    )
    response = client.post(url("count-tokens"), json={"input": {"converse": converse_body()}})
    assert_error(response, 400, "ValidationException", str(service.count_error))


@pytest.mark.parametrize("operation", ["converse", "converse-stream"])
def test_validation_errors_before_the_stream_are_json(
    client: TestClient, service: FakeBedrockService, operation: str
) -> None:
    service.steps = [InvalidRequest("A maximum of 4 cachePoint blocks may be provided. Found 5.")]
    response = client.post(url(operation), json=converse_body())
    assert_error(response, 400, "ValidationException", str(service.steps[0]))
    assert service.num_closed == 1


def test_decode_errors(client: TestClient, service: FakeBedrockService) -> None:
    assert_error(client.post(url("converse"), content=b"{"), 400, "ValidationException")
    bad = converse_body(system=[{"cachePoint": {"type": "default"}}, {"text": "s"}])
    response = client.post(url("converse"), json=bad)
    assert_error(response, 400, "ValidationException", "A cachePoint must follow a content block.")
    response = client.post(url("invoke"), json=invoke_body(anthropic_version=None))
    assert_error(response, 400, "ValidationException")
    assert service.requests == []


def test_failure_after_the_stream_started_is_an_exception_frame(
    client: TestClient, service: FakeBedrockService
) -> None:
    service.steps = [Started(PROMPT_USAGE), TextOut("a"), EngineFailure("generation failed")]
    for operation, first in (
        ("converse-stream", "messageStart"),
        ("invoke-with-response-stream", "chunk"),
    ):
        response = client.post(
            url(operation), json=converse_body() if "converse" in operation else invoke_body()
        )
        assert response.status_code == 200
        events = stream_events(response.content)
        assert events[0][0] == first
        assert events[-1] == ("modelStreamErrorException", {"message": "generation failed"})
    assert service.num_closed == 2


def test_body_too_large() -> None:
    service = FakeBedrockService()
    with TestClient(Starlette(routes=routes(service, max_body_bytes=10))) as client:
        response = client.post(url("converse"), json=converse_body())
    assert_error(response, 400, "ValidationException")
    assert "exceeds the maximum" in response.json()["message"]


# -- model ids -------------------------------------------------------------------------------------


def test_model_ids_resolve_through_arns_and_profiles() -> None:
    service = FakeBedrockService(models={MODEL_ID})
    arn = f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.{MODEL_ID}"
    with TestClient(Starlette(routes=routes(service))) as client:
        encoded = arn.replace(":", "%3A").replace("/", "%2F")
        assert client.post(url("converse", encoded), json=converse_body()).status_code == 200
        assert service.requests[-1].model == arn  # echoed as sent
        response = client.post(url("converse", "amazon.nova-pro-v1%3A0"), json=converse_body())
    assert_error(
        response,
        404,
        "ResourceNotFoundException",
        "The provided model identifier is invalid: amazon.nova-pro-v1:0",
    )


# -- authentication --------------------------------------------------------------------------------


@pytest.fixture
def secured() -> FakeBedrockService:
    return FakeBedrockService(
        keys={"bedrock-api-key": "team-b"},
        aws={ACCESS_KEY: AwsCredential(SECRET_KEY, "team-a")},
    )


def post_signed(client: TestClient, operation: str, **sign: Any) -> Any:
    path = url(operation)
    body = json.dumps(converse_body()).encode()
    return client.post(path, content=body, headers=signed_headers(path, body, **sign))


def test_open_server_does_not_verify_signatures(
    client: TestClient, service: FakeBedrockService
) -> None:
    response = post_signed(client, "converse", secret="anything")
    assert response.status_code == 200
    assert service.requests[0].tenant == "default"


def test_sigv4_maps_the_access_key_to_its_tenant(secured: FakeBedrockService) -> None:
    with TestClient(Starlette(routes=routes(secured))) as client:
        assert post_signed(client, "converse").status_code == 200
        assert post_signed(client, "converse-stream").status_code == 200
        assert [r.tenant for r in secured.requests] == ["team-a", "team-a"]
        assert_error(
            post_signed(client, "converse", secret="wrong"),
            403,
            "InvalidSignatureException",
        )
        assert_error(
            post_signed(client, "converse", access_key="AKIDUNKNOWN"),
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
        # A signature over another body does not cover this one.
        path = url("converse")
        headers = signed_headers(path, b"{}")
        response = client.post(path, content=json.dumps(converse_body()), headers=headers)
        assert_error(response, 403, "InvalidSignatureException")
    assert len(secured.requests) == 2


def test_bearer_api_keys_share_the_api_keys_table(secured: FakeBedrockService) -> None:
    with TestClient(Starlette(routes=routes(secured))) as client:
        ok = client.post(
            url("converse"),
            json=converse_body(),
            headers={"Authorization": "Bearer bedrock-api-key"},
        )
        assert ok.status_code == 200
        assert secured.requests[-1].tenant == "team-b"
        for headers in ({"Authorization": "Bearer nope"}, {}):
            response = client.post(url("converse"), json=converse_body(), headers=headers)
            assert_error(response, 403, "UnrecognizedClientException")


# -- disconnects -----------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["converse-stream", "converse"])
def test_client_disconnect_closes_the_service_generator(operation: str) -> None:
    async def main() -> None:
        service = FakeBedrockService()
        disconnect = anyio.Event()

        async def hang_up() -> None:
            disconnect.set()
            await anyio.sleep_forever()

        service.steps = [Started(PROMPT_USAGE), TextOut("a"), hang_up]
        chunks: list[bytes] = []

        async def on_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message["body"])

        app = Starlette(routes=routes(service))
        await drive(app, converse_body(), on_send, disconnect, path=url(operation))
        assert service.num_closed == 1  # generation was cancelled, its generator closed
        assert b"messageStop" not in b"".join(chunks)

    anyio.run(main)
