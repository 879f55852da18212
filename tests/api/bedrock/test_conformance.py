"""Spec §7 checklist items 54-68 (Bedrock) on the real service and fake engine, in process."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.config import ApiConfig, AwsCredential
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.api.bedrock.conftest import MODEL_ID, MODEL_PATH, signed_headers, stream_events
from tests.conftest import make_service, words

DOCUMENT = words(1500)
SECOND = words(600, 5)
POINT = {"cachePoint": {"type": "default"}}
POINT_1H = {"cachePoint": {"type": "default", "ttl": "1h"}}
TOOL = {
    "toolSpec": {
        "name": "lookup",
        "description": words(1200, 9),
        "inputSchema": {"json": {"type": "object", "properties": {"q": {"type": "string"}}}},
    }
}
ORDER_MESSAGE = (
    "A cachePoint with ttl '1h' must not come after a cachePoint with ttl '5m'. "
    "Cache points are processed in the order toolConfig, system, messages."
)


@contextmanager
def start(service: Service) -> Iterator[TestClient]:
    """The whole app (every surface) serving ``service``, started and stopped."""
    with TestClient(build_app(service)) as client:
        yield client


@pytest.fixture
def service() -> Service:
    return make_service()


@pytest.fixture
def client(service: Service) -> Iterator[TestClient]:
    with start(service) as test_client:
        yield test_client


def converse(client: TestClient, operation: str = "converse", **body: Any) -> Any:
    body.setdefault("messages", [{"role": "user", "content": [{"text": "Summarize it."}]}])
    body.setdefault("inferenceConfig", {"maxTokens": 8, "temperature": 0})
    return client.post(f"/model/{MODEL_PATH}/{operation}", json=body)


def usage_of(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    check_totals(usage)
    return usage


def check_totals(usage: dict[str, Any]) -> None:
    """Checklist 55 and 56, asserted on every Converse usage this module sees."""
    parts = ("inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens", "outputTokens")
    assert usage["totalTokens"] == sum(usage.get(k, 0) for k in parts)
    if "cacheDetails" in usage:
        details = usage["cacheDetails"]
        assert [d["ttl"] for d in details] in ([], ["1h"], ["5m"], ["1h", "5m"])
        assert all(d["inputTokens"] > 0 for d in details)
        assert sum(d["inputTokens"] for d in details) == usage["cacheWriteInputTokens"]


def count(client: TestClient, **converse_input: Any) -> int:
    converse_input.setdefault(
        "messages", [{"role": "user", "content": [{"text": "Summarize it."}]}]
    )
    response = client.post(
        f"/model/{MODEL_PATH}/count-tokens", json={"input": {"converse": converse_input}}
    )
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"inputTokens"}
    tokens: int = response.json()["inputTokens"]
    return tokens


def assert_validation(response: Any, message: str) -> None:
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    assert response.json() == {"message": message}


def test_54_system_cache_point_writes_then_reads(client: TestClient) -> None:
    system = [{"text": DOCUMENT}, POINT]
    first, second = (usage_of(converse(client, system=system)) for _ in range(2))
    written = first["cacheWriteInputTokens"]
    assert written > 1500
    assert first["cacheReadInputTokens"] == 0
    assert first["cacheDetails"] == [{"ttl": "5m", "inputTokens": written}]
    assert second["cacheReadInputTokens"] == written
    assert second["cacheWriteInputTokens"] == 0 and second["cacheDetails"] == []
    assert first["inputTokens"] == second["inputTokens"]
    assert first["inputTokens"] + written == count(client, system=system)


def test_no_cache_point_omits_the_cache_fields(client: TestClient) -> None:
    usage = usage_of(converse(client, system=[{"text": DOCUMENT}]))
    assert set(usage) == {"inputTokens", "outputTokens", "totalTokens"}


def test_56_cache_details_1h_before_5m(client: TestClient) -> None:
    system = [{"text": DOCUMENT}, POINT_1H, {"text": SECOND}, POINT]
    first = usage_of(converse(client, system=system))
    one_hour, five_min = first["cacheDetails"]
    assert one_hour["ttl"] == "1h" and five_min["ttl"] == "5m"
    assert one_hour["inputTokens"] > 1500 and five_min["inputTokens"] >= 600
    again = usage_of(converse(client, system=system))
    assert again["cacheReadInputTokens"] == first["cacheWriteInputTokens"]
    assert again["cacheDetails"] == []


def test_57_ttl_order_is_a_validation_exception(client: TestClient, service: Service) -> None:
    system = [{"text": DOCUMENT}, POINT, {"text": SECOND}, POINT_1H]
    assert_validation(converse(client, system=system), ORDER_MESSAGE)
    assert len(service.store) == 0  # a rejected request touches no entry (§1.14)


def test_58_five_cache_points(client: TestClient) -> None:
    system = [item for i in range(5) for item in ({"text": f"part {i}"}, POINT)]
    response = converse(client, system=system)
    assert_validation(response, "A maximum of 4 cachePoint blocks may be provided. Found 5.")
    counted = client.post(
        f"/model/{MODEL_PATH}/count-tokens",
        json={
            "input": {
                "converse": {
                    "system": system,
                    "messages": [{"role": "user", "content": [{"text": "q"}]}],
                }
            }
        },
    )
    assert_validation(counted, "A maximum of 4 cachePoint blocks may be provided. Found 5.")


def test_59_tool_cache_point_without_tool_caching() -> None:
    with start(make_service(tool_cache_points=False)) as client:
        response = converse(client, toolConfig={"tools": [TOOL, POINT]})
        assert_validation(response, f"Tool caching is not supported for model {MODEL_ID}.")
        # The workaround of §5.2 is accepted and caches tools and system.
        body = {
            "toolConfig": {"tools": [TOOL]},
            "system": [{"text": DOCUMENT}],
            "messages": [{"role": "user", "content": [POINT, {"text": "Go."}]}],
        }
        assert usage_of(converse(client, **body))["cacheWriteInputTokens"] > 2700


def test_60_cache_point_at_the_head_of_messages(client: TestClient) -> None:
    body = {
        "toolConfig": {"tools": [TOOL]},
        "system": [{"text": DOCUMENT}],
        "messages": [{"role": "user", "content": [POINT, {"text": "Use the tool."}]}],
    }
    first = usage_of(converse(client, **body))
    written = first["cacheWriteInputTokens"]
    assert written > 1200 + 1500  # the tool and the system text
    assert first["inputTokens"] < 60  # only the user turn and the trailer
    second = usage_of(converse(client, **body))
    assert second["cacheReadInputTokens"] == written


def test_61_62_converse_stream_order_and_usage(client: TestClient) -> None:
    system = [{"text": DOCUMENT}, POINT]
    plain = usage_of(converse(client, system=system))
    response = converse(client, "converse-stream", system=system)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
    events = stream_events(response.content)  # botocore checks both CRCs of every frame
    names = [name for name, _ in events]
    assert names[0] == "messageStart"
    assert set(names[1:-3]) == {"contentBlockDelta"}
    assert names[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    metadata = events[-1][1]
    check_totals(metadata["usage"])
    assert metadata["usage"]["cacheReadInputTokens"] == plain["cacheWriteInputTokens"]
    assert metadata["usage"]["outputTokens"] == plain["outputTokens"]
    assert isinstance(metadata["metrics"]["latencyMs"], int)
    text = "".join(p["delta"]["text"] for n, p in events if n == "contentBlockDelta")
    assert text == converse(client, system=system).json()["output"]["message"]["content"][0]["text"]


def test_63_engine_failure_after_the_stream_started() -> None:
    with start(make_service(FakeEngine(fail_after_prefill=True))) as client:
        response = converse(client, "converse-stream", system=[{"text": DOCUMENT}, POINT])
        assert response.status_code == 200
        events = stream_events(response.content)
        assert events[0] == ("messageStart", {"role": "assistant"})
        kind, payload = events[-1]
        assert kind == "modelStreamErrorException"
        assert "fake engine failure" in payload["message"]
        response = converse(client, system=[{"text": DOCUMENT}])
        assert response.status_code == 424
        assert response.headers["x-amzn-errortype"] == "ModelErrorException"


def invoke_body(**overrides: Any) -> dict[str, Any]:
    return {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 8,
        "temperature": 0,
        "system": [{"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Summarize it."}],
        **overrides,
    }


def test_64_invoke_model_anthropic_body(client: TestClient) -> None:
    first, second = (
        client.post(f"/model/{MODEL_PATH}/invoke", json=invoke_body()) for _ in range(2)
    )
    body = first.json()
    assert body["id"].startswith("msg_bdrk_")
    written = body["usage"]["cache_creation_input_tokens"]
    assert written > 1500
    assert body["usage"]["cache_creation"] == {
        "ephemeral_5m_input_tokens": written,
        "ephemeral_1h_input_tokens": 0,
    }
    assert second.json()["usage"]["cache_read_input_tokens"] == written
    assert second.headers["x-amzn-bedrock-cache-read-input-token-count"] == str(written)
    assert second.headers["x-amzn-bedrock-input-token-count"] == str(
        second.json()["usage"]["input_tokens"]
    )


def test_65_invoke_with_response_stream(client: TestClient) -> None:
    client.post(f"/model/{MODEL_PATH}/invoke", json=invoke_body())
    response = client.post(f"/model/{MODEL_PATH}/invoke-with-response-stream", json=invoke_body())
    events = [json.loads(base64.b64decode(p["bytes"])) for _, p in stream_events(response.content)]
    start_usage = events[0]["message"]["usage"]
    assert events[0]["type"] == "message_start"
    assert start_usage["cache_read_input_tokens"] > 1500
    assert start_usage["cache_creation_input_tokens"] == 0
    assert events[-1]["type"] == "message_stop"
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["cacheReadInputTokenCount"] == start_usage["cache_read_input_tokens"]


def test_66_count_tokens_then_converse_still_writes(client: TestClient) -> None:
    system = [{"text": DOCUMENT}, POINT]
    total = count(client, system=system)
    usage = usage_of(converse(client, system=system))
    assert usage["cacheWriteInputTokens"] > 0 and usage["cacheReadInputTokens"] == 0
    assert usage["inputTokens"] + usage["cacheWriteInputTokens"] == total


def test_67_68_anthropic_write_is_read_by_converse(client: TestClient) -> None:
    anthropic = client.post(
        "/v1/messages",
        headers={"anthropic-version": "2023-06-01"},
        json={
            "model": "claude",
            **{k: v for k, v in invoke_body().items() if k != "anthropic_version"},
        },
    ).json()["usage"]
    bedrock = usage_of(converse(client, system=[{"text": DOCUMENT}, POINT]))
    invoke = client.post(f"/model/{MODEL_PATH}/invoke", json=invoke_body()).json()["usage"]
    assert anthropic["cache_creation_input_tokens"] > 1500
    assert bedrock["cacheReadInputTokens"] == anthropic["cache_creation_input_tokens"]
    assert invoke["cache_read_input_tokens"] == anthropic["cache_creation_input_tokens"]
    # 68: one logical request reports the same uncached input on every surface.
    assert anthropic["input_tokens"] == bedrock["inputTokens"] == invoke["input_tokens"]


def test_tenants_from_access_keys_never_share() -> None:
    credentials = {
        "AKIDA": AwsCredential("secret-a", "a"),
        "AKIDA2": AwsCredential("secret-a2", "a"),
        "AKIDB": AwsCredential("secret-b", "b"),
    }
    service = make_service()
    service = Service(
        FakeEngine(),
        replace(service.config, api=replace(ApiConfig(), aws_credentials=credentials)),
        clock=service.clock,
    )
    path = f"/model/{MODEL_PATH}/converse"
    body = json.dumps(
        {
            "system": [{"text": DOCUMENT}, POINT],
            "messages": [{"role": "user", "content": [{"text": "hi"}]}],
        }
    ).encode()
    with start(service) as client:

        def call(key: str) -> dict[str, Any]:
            secret = credentials[key].secret_access_key
            headers = signed_headers(path, body, access_key=key, secret=secret)
            return usage_of(client.post(path, content=body, headers=headers))

        a, b, a2 = call("AKIDA"), call("AKIDB"), call("AKIDA2")
        assert b["cacheReadInputTokens"] == 0 and b["cacheWriteInputTokens"] > 0
        assert a2["cacheReadInputTokens"] == a["cacheWriteInputTokens"]
        # Credentials are on: an unsigned or Anthropic-keyed request is rejected everywhere.
        assert client.post(path, content=body).status_code == 403
        anthropic = client.post("/v1/messages", headers={"anthropic-version": "2023-06-01"})
        assert anthropic.status_code == 401
