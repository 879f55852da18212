"""The error guard (``api/guard.py``), the strict JSON edge (``wire.json_object``), the body limit
from the config and the hosted parameter ranges, on the live app with the fake engine."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from promptcache.api import anthropic, bedrock, openai
from promptcache.api.anthropic.errors import ENVELOPE as ANTHROPIC
from promptcache.api.app import build_app
from promptcache.api.bedrock.errors import ENVELOPE as BEDROCK
from promptcache.api.bedrock.schema import ConverseBody, validate
from promptcache.api.guard import Envelope
from promptcache.api.openai.errors import ENVELOPE as OPENAI
from promptcache.api.wire import MAX_DEPTH, json_object, printable
from promptcache.config import ApiConfig, ServerConfig, load
from promptcache.core.request import ChatRequest
from promptcache.core.response import ChatEvent, Started
from promptcache.engine.fake import FakeEngine
from promptcache.errors import InvalidRequest, Overloaded
from promptcache.service import Service
from tests.api.anthropic.conftest import PROMPT_USAGE
from tests.api.bedrock.conftest import FakeBedrockService, stream_events
from tests.api.fuzzing import ANTHROPIC_HEADERS, JSON_HEADERS, check_envelope

MESSAGES = [{"role": "user", "content": "Hi"}]
CONVERSE = [{"role": "user", "content": [{"text": "Hi"}]}]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    config = ServerConfig(api=replace(ApiConfig(), max_body_bytes=4096))
    with TestClient(build_app(Service(FakeEngine(), config))) as test_client:
        yield test_client


def anthropic_error(client: TestClient, status: int, **body: Any) -> str:
    response = client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert response.status_code == status, response.text
    check_envelope("anthropic", response, response.json())
    message: str = response.json()["error"]["message"]
    return message


def openai_error(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, **body}
    )
    assert response.status_code == 400, response.text
    check_envelope("openai", response, response.json())
    error: dict[str, Any] = response.json()["error"]
    return error


def bedrock_error(client: TestClient, path: str, content: bytes) -> str:
    response = client.post(path, content=content, headers=JSON_HEADERS)
    assert response.status_code == 400, response.text
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    message: str = response.json()["message"]
    return message


# -- the JSON edge --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"a": ["x", "\\ud800"]}', "a.1: the request body is not valid JSON: unpaired UTF-16"),
        (b'{"\\udfff": 1}', "body: the request body is not valid JSON: unpaired UTF-16"),
        (b'{"a": NaN}', "request body is not valid JSON: NaN is not a JSON value"),
        (b'{"a": -Infinity}', "request body is not valid JSON: -Infinity is not a JSON value"),
        (b'{"a": 1e999}', "request body is not valid JSON: number 1e999 is out of range"),
        (b'{"a": "\xff"}', "request body is not valid JSON: invalid UTF-8 at byte 7"),
        (b"[" * 100_000, "request body is not valid JSON: nesting deeper than"),
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "a.a.a"),
        (b"[]", "request body must be a JSON object"),
    ],
)
def test_json_object_rejects_what_encoders_cannot_take(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        json_object(raw)
    assert caught.value.message.startswith(message), caught.value.message
    caught.value.message.encode("utf-8")  # the message itself always encodes


def test_valid_surrogate_pairs_and_nesting_pass() -> None:
    assert json_object(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
    deep = b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1)
    assert json_object(deep)["a"]


def test_printable_escapes_lone_surrogates() -> None:
    assert printable("a\ud800b") == "a\\ud800b"
    assert printable("é\U0001f600") == "é\U0001f600"


def test_a_lone_surrogate_is_a_400_naming_the_field_on_every_surface(client: TestClient) -> None:
    bad = '"\\ud800"'
    raw = f'{{"model": "m", "max_tokens": 4, "stop_sequences": [{bad}], "messages": []}}'.encode()
    response = client.post("/v1/messages", content=raw, headers=ANTHROPIC_HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("stop_sequences.0: ")
    raw = f'{{"model": {bad}, "messages": []}}'.encode()
    error = client.post("/v1/chat/completions", content=raw, headers=JSON_HEADERS).json()["error"]
    assert error["param"] == "model" and "\\ud800" in error["message"]
    raw = f'{{"messages": [{{"role": "user", "content": [{{"text": {bad}}}]}}]}}'.encode()
    message = bedrock_error(client, "/model/m/converse-stream", raw)
    assert message.startswith("messages.0.content.0.text: ")


def test_count_tokens_blob_outside_ascii_is_a_validation_error(client: TestClient) -> None:
    raw = json.dumps({"input": {"invokeModel": {"body": "é"}}}).encode()
    message = bedrock_error(client, "/model/m/count-tokens", raw)
    assert message == "input.invokeModel.body: Input should be base64-encoded"


# -- the body limit comes from the config ---------------------------------------------------------


def test_body_limit_is_read_from_the_config(client: TestClient) -> None:
    big = {"model": "m", "max_tokens": 4, "messages": MESSAGES, "pad": "x" * 4096}
    message = anthropic_error(client, 413, **big)
    assert message == "request body exceeds the maximum of 4096 bytes"
    response = client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = client.post("/model/m/converse", json={"messages": CONVERSE, "pad": "x" * 4096})
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"] == "ValidationException"


def test_max_body_size_option() -> None:
    config = load({"max_body_size": "1MiB"}, env={})
    assert config.api.max_body_bytes == 1 << 20
    assert load({}, env={"PROMPTCACHE_MAX_BODY_SIZE": "2048"}).api.max_body_bytes == 2048


# -- hosted parameter ranges ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 1.5, "temperature: range: 0..1"),
        ("temperature", -0.1, "temperature: range: 0..1"),
        ("top_p", 2, "top_p: range: 0..1"),
        ("top_k", -1, "top_k: Input should be greater than or equal to 0"),
        ("max_tokens", -1, "max_tokens: Input should be greater than or equal to 0"),
    ],
)
def test_anthropic_ranges(client: TestClient, field: str, value: float, message: str) -> None:
    body = {"model": "m", "max_tokens": 4, "messages": MESSAGES, field: value}
    assert anthropic_error(client, 400, **body) == message


@pytest.mark.parametrize(
    ("field", "value", "message", "code"),
    [
        (
            "temperature",
            2.5,
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got "
            "2.5 instead.",
            "decimal_above_max_value",
        ),
        (
            "top_p",
            -1,
            "Invalid 'top_p': decimal below minimum value. Expected a value >= 0, but got -1 "
            "instead.",
            "decimal_below_min_value",
        ),
        (
            "presence_penalty",
            3,
            "Invalid 'presence_penalty': decimal above maximum value. Expected a value <= 2, but "
            "got 3 instead.",
            "decimal_above_max_value",
        ),
        (
            "frequency_penalty",
            -2.5,
            "Invalid 'frequency_penalty': decimal below minimum value. Expected a value >= -2, "
            "but got -2.5 instead.",
            "decimal_below_min_value",
        ),
        (
            "max_completion_tokens",
            0,
            "Invalid 'max_completion_tokens': integer below minimum value. Expected a value >= "
            "1, but got 0 instead.",
            "integer_below_min_value",
        ),
        (
            "n",
            0,
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            "integer_below_min_value",
        ),
        (
            "top_logprobs",
            21,
            "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got "
            "21 instead.",
            "integer_above_max_value",
        ),
        (
            "stop",
            ["a", "b", "c", "d", "e"],
            "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an "
            "array with length 5 instead.",
            "array_above_max_length",
        ),
        ("n", 2, "n: only n=1 is supported by this server", "invalid_value"),
    ],
)
def test_openai_ranges(client: TestClient, field: str, value: Any, message: str, code: str) -> None:
    error = openai_error(client, **{field: value})
    assert (error["message"], error["param"], error["code"]) == (message, field, code)
    assert error["type"] == "invalid_request_error"


def test_openai_wrong_type_is_reported_by_the_schema(client: TestClient) -> None:
    error = openai_error(client, max_tokens=1.5)
    assert error["message"] == "max_tokens: Input should be a valid integer"
    error = openai_error(client, logprobs="yes")
    assert error["message"] == "logprobs: Input should be a valid boolean"


@pytest.mark.parametrize(
    ("config", "path", "constraint"),
    [
        ({"maxTokens": 0}, "maxTokens", "Member must have value greater than or equal to 1"),
        ({"temperature": 1.5}, "temperature", "Member must have value less than or equal to 1"),
        ({"topP": -0.5}, "topP", "Member must have value greater than or equal to 0"),
        (
            {"stopSequences": [""]},
            "stopSequences.1.member",
            "Member must have length greater than or equal to 1",
        ),
    ],
)
def test_bedrock_inference_config_ranges(
    client: TestClient, config: dict[str, Any], path: str, constraint: str
) -> None:
    raw = json.dumps({"messages": CONVERSE, "inferenceConfig": config}).encode()
    message = bedrock_error(client, "/model/m/converse", raw)
    assert message.startswith("1 validation error detected: Value")
    assert message.endswith(
        f"at 'inferenceConfig.{path}' failed to satisfy constraint: {constraint}"
    )


def test_bedrock_stop_sequence_count() -> None:
    body = {"messages": CONVERSE, "inferenceConfig": {"stopSequences": ["a"] * 2501}}
    with pytest.raises(InvalidRequest) as caught:
        validate(ConverseBody, body)
    assert caught.value.message.endswith(
        "at 'inferenceConfig.stopSequences' failed to satisfy constraint: Member must have "
        "length less than or equal to 2500"
    )


# -- errors outside the routes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "protocol", "status"),
    [
        ("GET", "/v1/messages", "anthropic", 405),
        ("GET", "/v1/chat/completions", "openai", 405),
        ("POST", "/v1/nothing", "openai", 404),
        ("GET", "/model/m/converse", "bedrock", 400),
        ("POST", "/model/m/nothing", "bedrock", 404),
    ],
)
def test_unknown_path_or_method_is_answered_in_the_envelope(
    client: TestClient, method: str, path: str, protocol: Any, status: int
) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    check_envelope(protocol, response, response.json())


# -- unexpected exceptions: the one legitimate 500 ------------------------------------------------


class _Broken(FakeBedrockService):
    """A service whose generation fails after the stream started (a bug), or before it."""

    fail_early: bool = False

    async def generate(  # type: ignore[override]
        self, request: ChatRequest, rules: Any = None
    ) -> AsyncIterator[ChatEvent]:
        if self.fail_early:
            raise KeyError("secret internals")
        yield Started(PROMPT_USAGE)
        raise KeyError("secret internals")


@pytest.fixture
def broken() -> _Broken:
    return _Broken()


def _app(service: _Broken) -> Starlette:
    return Starlette(
        routes=[*anthropic.routes(service), *openai.routes(service), *bedrock.routes(service)]
    )


@pytest.mark.parametrize(
    ("path", "body", "headers", "protocol", "header"),
    [
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 4, "messages": MESSAGES},
            ANTHROPIC_HEADERS,
            "anthropic",
            "request-id",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": MESSAGES},
            {},
            "openai",
            "x-request-id",
        ),
        ("/model/m/converse", {"messages": CONVERSE}, {}, "bedrock", "x-amzn-requestid"),
    ],
)
def test_a_bug_is_a_500_in_the_envelope_logged_once_with_the_request_id(
    broken: _Broken,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    protocol: Any,
    header: str,
) -> None:
    broken.fail_early = True
    with TestClient(_app(broken)) as test_client, caplog.at_level(logging.ERROR):
        response = test_client.post(path, json=body, headers=headers)
    assert response.status_code == 500 and "secret" not in response.text
    check_envelope(protocol, response, response.json())
    request_id = response.headers[header]
    logged = [r for r in caplog.records if "secret internals" in str(r.exc_info)]
    assert len(logged) == 1 and request_id in logged[0].getMessage()
    if protocol == "bedrock":
        assert response.headers["x-amzn-errortype"] == "InternalServerException"
    elif protocol == "openai":
        assert response.json()["error"]["type"] == "server_error"
    else:
        assert response.json()["error"]["type"] == "api_error"


def test_a_bug_mid_stream_ends_each_stream_with_its_error_frame(
    broken: _Broken, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(_app(broken)) as test_client, caplog.at_level(logging.ERROR):
        body = {"model": "m", "max_tokens": 4, "stream": True, "messages": MESSAGES}
        raw = test_client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS).text
        assert raw.endswith(
            'event: error\ndata: {"type":"error","error":{"type":"api_error",'
            '"message":"Internal server error"}}\n\n'
        )
        raw = test_client.post("/v1/chat/completions", json=body).text
        last = json.loads(raw.split("\n\n")[-2].removeprefix("data: "))
        assert last["error"]["type"] == "server_error" and "[DONE]" not in raw
        response = test_client.post("/model/m/converse-stream", json={"messages": CONVERSE})
        kind, payload = stream_events(response.content)[-1]
        assert (kind, payload) == ("internalServerException", {"message": "Internal server error"})
    assert sum("secret internals" in str(r.exc_info) for r in caplog.records) == 3


def test_an_error_that_cannot_be_rendered_falls_back_to_the_fixed_500() -> None:
    def render(exc: BaseException, request_id: str) -> Any:
        if isinstance(exc, InvalidRequest):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return openai.errors.error_response(exc, request_id)

    def render_stream(exc: BaseException) -> bytes:
        if isinstance(exc, InvalidRequest):
            raise ValueError("cannot")
        return openai.errors.stream_error_frame(exc)

    envelope = Envelope("test", "x-request-id", lambda: "req_1", render, render_stream)
    response = envelope.response(InvalidRequest("bad \ud800"), "req_1")
    assert response.status_code == 500 and response.headers["x-request-id"] == "req_1"
    assert b"server_error" in envelope.stream_frame(InvalidRequest("bad"))


def test_error_messages_quoting_a_lone_surrogate_still_encode() -> None:
    for envelope in (anthropic.errors.ENVELOPE, openai.errors.ENVELOPE, bedrock.errors.ENVELOPE):
        exc = InvalidRequest("model: \ud800 is unknown", param="\ud800")
        response = envelope.response(exc, "req_1")
        assert response.status_code == 400 and b"\\\\ud800" in response.body
        assert b"\\\\ud800" in envelope.stream_frame(exc)


# -- retry hints --------------------------------------------------------------------------------


@pytest.mark.parametrize("envelope", [ANTHROPIC, OPENAI, BEDROCK], ids=lambda e: e.name)
def test_an_overloaded_answer_says_when_to_retry(envelope: Envelope) -> None:
    busy = envelope.response(Overloaded("Overloaded"), "req-1")
    assert busy.status_code in (503, 529)
    assert busy.headers["retry-after"] == "1" and busy.headers["retry-after-ms"] == "1000"
    # HTTP's Retry-After is whole seconds: a shorter wait rounds up there, not in the ms header.
    soon = envelope.response(Overloaded("Overloaded", retry_after_s=0.25), "req-2")
    assert soon.headers["retry-after"] == "1" and soon.headers["retry-after-ms"] == "250"
    # A model that failed to load will not load on a retry.
    failed = envelope.response(Overloaded("model failed to load", retry_after_s=None), "req-3")
    assert failed.headers["x-should-retry"] == "false" and "retry-after" not in failed.headers
    other = envelope.response(InvalidRequest("bad"), "req-4")
    assert "retry-after" not in other.headers and "x-should-retry" not in other.headers
