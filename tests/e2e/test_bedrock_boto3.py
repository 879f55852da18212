"""The official ``boto3`` ``bedrock-runtime`` client against a live server on loopback: cachePoint
usage and event streams on a real (tiny, random) transformers model, so hits restore real KV;
validation, authentication and failure paths on the fake engine, which is enough for them."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, EventStreamError

from promptcache.config import ApiConfig, AwsCredential
from promptcache.engine.base import Engine
from promptcache.engine.fake import FakeEngine
from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import make_config, words
from tests.e2e.conftest import BedrockConnect, LiveServer

pytestmark = pytest.mark.e2e

Factory = Callable[[Service], LiveServer]
ACCESS_KEY = "AKIAPROMPTCACHETEST"
SECRET_KEY = "c2VjcmV0LWZvci10aGUtdGVzdHM/+example"
API_KEY = "bedrock-api-key-team-a"
MODEL_ID = "anthropic.claude-3-7-sonnet-20250219-v1:0"
MIN_CACHEABLE = 256
"""Lowered from 1024 so the tiny model's prompts stay short; the rule is the same."""

# The Portkey example of the seed, as Converse: two system parts, the second cached.
DOCUMENT = "This is a large document I want to cache... " + words(400, 11)
SYSTEM = [
    {"text": "You are a helpful assistant"},
    {"text": DOCUMENT},
    {"cachePoint": {"type": "default"}},
]
MESSAGES = [
    {"role": "user", "content": [{"text": "Summarize the above document for me in 20 words"}]}
]
GREEDY = {"maxTokens": 12, "temperature": 0.0}


def start(factory: Factory, engine: Engine) -> LiveServer:
    """A server with one SigV4 key and one API key, both of tenant ``team-a``."""
    config = make_config(min_cacheable_tokens=MIN_CACHEABLE)
    api = replace(
        ApiConfig(),
        api_keys={API_KEY: "team-a"},
        aws_credentials={ACCESS_KEY: AwsCredential(SECRET_KEY, "team-a")},
    )
    return factory(Service(engine, replace(config, api=api)))


Connect = Callable[..., Any]


@pytest.fixture
def bedrock(bedrock_connect: BedrockConnect) -> Connect:
    """``bedrock(server, access_key=..., secret=...)``: a boto3 client, closed after the test."""

    def connect(
        server: LiveServer, *, access_key: str = ACCESS_KEY, secret: str = SECRET_KEY
    ) -> Any:
        return bedrock_connect(server, access_key, secret)

    return connect


def check_usage(usage: dict[str, Any]) -> None:
    """Checklist 55 and 56."""
    parts = ("inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens", "outputTokens")
    assert usage["totalTokens"] == sum(usage[k] for k in parts)
    assert sum(d["inputTokens"] for d in usage["cacheDetails"]) == usage["cacheWriteInputTokens"]


def test_portkey_example_write_then_read(live_server_factory: Factory, bedrock: Connect) -> None:
    client = bedrock(start(live_server_factory, build_tiny_engine("gemma3")))
    first, second = (
        client.converse(modelId=MODEL_ID, system=SYSTEM, messages=MESSAGES, inferenceConfig=GREEDY)
        for _ in range(2)
    )
    for response in (first, second):
        check_usage(response["usage"])
        assert response["ResponseMetadata"]["RequestId"]
    written = first["usage"]["cacheWriteInputTokens"]
    assert written > MIN_CACHEABLE
    assert first["usage"]["cacheReadInputTokens"] == 0
    assert first["usage"]["cacheDetails"] == [{"ttl": "5m", "inputTokens": written}]
    assert second["usage"]["cacheReadInputTokens"] == written
    assert second["usage"]["cacheWriteInputTokens"] == 0
    assert second["usage"]["cacheDetails"] == []
    assert second["usage"]["inputTokens"] == first["usage"]["inputTokens"]
    # Greedy: a hit gives the cold run's tokens.
    assert first["output"] == second["output"]
    assert first["stopReason"] in ("end_turn", "max_tokens")
    counted = client.count_tokens(
        modelId=MODEL_ID, input={"converse": {"system": SYSTEM, "messages": MESSAGES}}
    )
    assert counted["inputTokens"] == first["usage"]["inputTokens"] + written


def test_converse_stream_usage_in_metadata(live_server_factory: Factory, bedrock: Connect) -> None:
    client = bedrock(start(live_server_factory, build_tiny_engine("gemma3")))
    plain = client.converse(
        modelId=MODEL_ID, system=SYSTEM, messages=MESSAGES, inferenceConfig=GREEDY
    )
    response = client.converse_stream(
        modelId=MODEL_ID, system=SYSTEM, messages=MESSAGES, inferenceConfig=GREEDY
    )
    events = list(response["stream"])  # boto3 checks every frame's CRCs as it iterates
    names = [next(iter(event)) for event in events]
    assert names[0] == "messageStart"
    assert names[-2:] == ["messageStop", "metadata"]
    usage = events[-1]["metadata"]["usage"]
    check_usage(usage)
    assert usage["cacheReadInputTokens"] == plain["usage"]["cacheWriteInputTokens"]
    assert usage["outputTokens"] == plain["usage"]["outputTokens"]
    text = "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )
    assert [{"text": text}] == (plain["output"]["message"]["content"] or [{"text": ""}])


def test_invoke_model_with_an_anthropic_body(
    live_server_factory: Factory, bedrock: Connect
) -> None:
    client = bedrock(start(live_server_factory, build_tiny_engine("gemma3")))
    body = json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 8,
            "temperature": 0,
            "system": [
                {"type": "text", "text": "You are a helpful assistant"},
                {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [{"role": "user", "content": "Summarize the above document"}],
        }
    )
    first = json.loads(client.invoke_model(modelId=MODEL_ID, body=body)["body"].read())
    assert first["id"].startswith("msg_bdrk_")
    written = first["usage"]["cache_creation_input_tokens"]
    assert written > MIN_CACHEABLE
    assert first["usage"]["cache_creation"]["ephemeral_5m_input_tokens"] == written
    stream = client.invoke_model_with_response_stream(modelId=MODEL_ID, body=body)["body"]
    events = [json.loads(event["chunk"]["bytes"]) for event in stream]
    assert events[0]["type"] == "message_start"
    assert events[0]["message"]["usage"]["cache_read_input_tokens"] == written
    assert events[-1]["type"] == "message_stop"
    assert events[-1]["amazon-bedrock-invocationMetrics"]["cacheReadInputTokenCount"] == written


def test_validation_exceptions(live_server_factory: Factory, bedrock: Connect) -> None:
    client = bedrock(start(live_server_factory, FakeEngine()))
    order = [
        {"text": DOCUMENT},
        {"cachePoint": {"type": "default", "ttl": "5m"}},
        {"text": "more"},
        {"cachePoint": {"type": "default", "ttl": "1h"}},
    ]
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=MODEL_ID, system=order, messages=MESSAGES)
    assert info.value.response["Error"]["Message"] == (
        "A cachePoint with ttl '1h' must not come after a cachePoint with ttl '5m'. "
        "Cache points are processed in the order toolConfig, system, messages."
    )
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    five = [
        item
        for i in range(5)
        for item in ({"text": f"part {i}"}, {"cachePoint": {"type": "default"}})
    ]
    with pytest.raises(client.exceptions.ValidationException, match="Found 5"):
        client.converse(modelId=MODEL_ID, system=five, messages=MESSAGES)


def test_wrong_credentials_are_rejected(live_server_factory: Factory, bedrock: Connect) -> None:
    server = start(live_server_factory, FakeEngine())
    with pytest.raises(ClientError) as info:
        bedrock(server, secret="not-the-secret").converse(modelId=MODEL_ID, messages=MESSAGES)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as info:
        bedrock(server, access_key="AKIAUNKNOWN").converse(modelId=MODEL_ID, messages=MESSAGES)
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_bearer_api_key_shares_the_tenant(live_server_factory: Factory, bedrock: Connect) -> None:
    server = start(live_server_factory, FakeEngine())
    signed = bedrock(server).converse(modelId=MODEL_ID, system=SYSTEM, messages=MESSAGES)
    # boto3 sends Bedrock API keys only over HTTPS, so a plain HTTP client sends this one,
    # as curl would: the key maps through the same table as the other surfaces' keys.
    url = f"{server.base_url}/model/{MODEL_ID}/converse"
    body = {"system": SYSTEM, "messages": MESSAGES}
    keyed = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert (
        keyed.json()["usage"]["cacheReadInputTokens"] == (signed["usage"]["cacheWriteInputTokens"])
    )
    unknown = httpx.post(url, json=body, headers={"Authorization": "Bearer unknown-key"})
    assert unknown.status_code == 403
    assert unknown.headers["x-amzn-errortype"] == "UnrecognizedClientException"


def test_engine_failure_mid_stream_is_raised_by_boto3(
    live_server_factory: Factory, bedrock: Connect
) -> None:
    client = bedrock(start(live_server_factory, FakeEngine(fail_after_prefill=True)))
    with closing(client.converse_stream(modelId=MODEL_ID, messages=MESSAGES)["stream"]) as events:
        stream = iter(events)
        assert next(stream) == {"messageStart": {"role": "assistant"}}
        with pytest.raises(EventStreamError) as info:
            next(stream)
    assert info.value.response["Error"]["Code"] == "modelStreamErrorException"
