"""The routes end to end over a fake service: JSON, SSE, count_tokens, disconnects, the SDK."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import anyio
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import Message

from promptcache.api.anthropic import routes
from promptcache.api.anthropic.encode import delta_usage_json, usage_json
from promptcache.core.request import Block, CacheMark
from promptcache.core.response import Started, TextOut
from promptcache.errors import EngineFailure, Overloaded
from promptcache.types import TenantId

from .conftest import FINAL_USAGE, HEADERS, PROMPT_USAGE, FakeService, Step, body, sse_events

REQUEST_ID = re.compile(r"req_[A-Za-z0-9]{24,}")


def test_message(service: FakeService, client: TestClient) -> None:
    response = client.post("/v1/messages", json=body(), headers=HEADERS)
    assert response.status_code == 200
    assert REQUEST_ID.fullmatch(response.headers["request-id"])
    payload = response.json()
    assert re.fullmatch(r"msg_[A-Za-z0-9]{24}", payload["id"])
    assert payload["model"] == "claude-test"
    assert payload["content"][0] == {"type": "text", "text": "Hello, world"}
    assert payload["stop_reason"] == "tool_use"
    assert payload["usage"] == usage_json(FINAL_USAGE)
    assert service.num_closed == 1
    [request] = service.requests
    assert request.model == "claude-test" and request.messages[0].blocks == (Block("text", "Hi"),)


def test_request_reaches_the_service_decoded(service: FakeService, client: TestClient) -> None:
    service.keys = {"key-a": "tenant-a"}
    marked = {
        "role": "user",
        "content": [
            {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ],
    }
    response = client.post(
        "/v1/messages?beta=true",
        json=body(messages=[marked], cache_control={"type": "ephemeral"}, unknown_field=1),
        headers={**HEADERS, "anthropic-beta": "prompt-caching-2024-07-31,made-up-beta"},
    )
    assert response.status_code == 200
    [request] = service.requests
    assert request.tenant == TenantId("tenant-a")
    assert request.auto_cache == CacheMark("5m", "cache_control.ttl")
    assert request.messages[0].blocks[0].mark == CacheMark(
        "1h", "messages.0.content.0.cache_control.ttl"
    )


def test_bearer_credential(service: FakeService, client: TestClient) -> None:
    service.keys = {"tok": "tenant-b"}
    headers = {"anthropic-version": "2023-01-01", "authorization": "Bearer tok"}
    assert client.post("/v1/messages", json=body(), headers=headers).status_code == 200
    assert service.requests[0].tenant == TenantId("tenant-b")


def test_prewarm(service: FakeService, client: TestClient) -> None:
    """Checklist 33, adapter side: content [], stop_reason max_tokens, output_tokens 0."""
    service.steps = [Started(PROMPT_USAGE), service_finished("max_tokens", output_tokens=0)]
    response = client.post(
        "/v1/messages",
        json=body(max_tokens=0, cache_control={"type": "ephemeral"}),
        headers=HEADERS,
    )
    payload = response.json()
    assert payload["content"] == [] and payload["stop_reason"] == "max_tokens"
    assert payload["usage"]["output_tokens"] == 0
    assert payload["usage"]["cache_creation_input_tokens"] == 30
    assert service.requests[0].sampling.max_tokens == 0


def service_finished(stop_reason: Any, output_tokens: int) -> Any:
    from promptcache.core.response import Finished

    return Finished(stop_reason, None, PROMPT_USAGE.with_output(output_tokens))


def test_stream(service: FakeService, client: TestClient) -> None:
    """Spec §3.7 and checklist 35, 36: event order and usage, equal to the JSON response."""
    response = client.post("/v1/messages", json=body(stream=True), headers=HEADERS)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert REQUEST_ID.fullmatch(response.headers["request-id"])
    events = sse_events(response.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    plain = client.post("/v1/messages", json=body(), headers=HEADERS).json()["usage"]
    start_usage = events[0][1]["message"]["usage"]
    last_delta = [data for name, data in events if name == "message_delta"][-1]["usage"]
    for key in (
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation",
    ):
        assert start_usage[key] == plain[key]
    assert start_usage["output_tokens"] == 1
    assert last_delta == delta_usage_json(FINAL_USAGE)
    assert last_delta["output_tokens"] == plain["output_tokens"]
    for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert last_delta[key] == start_usage[key]
    assert service.num_closed == 2
    assert service.requests[0].stream is True


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (Overloaded("Overloaded"), "overloaded_error", "Overloaded"),
        (EngineFailure("decode failed"), "api_error", "decode failed"),
        (RuntimeError("secret internals"), "api_error", "Internal server error"),
    ],
)
def test_error_after_the_stream_started(
    service: FakeService, client: TestClient, exc: Exception, kind: str, message: str
) -> None:
    service.steps = [Started(PROMPT_USAGE), TextOut("par"), exc, TextOut("never")]
    response = client.post("/v1/messages", json=body(stream=True), headers=HEADERS)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert events[-1][1] == {"type": "error", "error": {"type": kind, "message": message}}
    assert service.num_closed == 1


def test_stream_that_ends_without_finished(service: FakeService, client: TestClient) -> None:
    service.steps = [Started(PROMPT_USAGE), TextOut("a")]
    events = sse_events(client.post("/v1/messages", json=body(stream=True), headers=HEADERS).text)
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"


def test_stream_with_no_events_at_all(service: FakeService, client: TestClient) -> None:
    service.steps = []
    response = client.post("/v1/messages", json=body(stream=True), headers=HEADERS)
    assert response.status_code == 500 and response.json()["error"]["type"] == "api_error"


def test_count_tokens(service: FakeService, client: TestClient) -> None:
    """Checklist 32: top-level cache_control accepted, the answer is exactly {"input_tokens": N}."""
    service.input_tokens = 321
    response = client.post(
        "/v1/messages/count_tokens?beta=true",
        json=body(max_tokens=None, cache_control={"type": "ephemeral"}),
        headers=HEADERS,
    )
    assert response.status_code == 200
    assert response.json() == {"input_tokens": 321}
    assert REQUEST_ID.fullmatch(response.headers["request-id"])
    assert service.num_started == 0  # count_tokens never generates
    assert service.requests[0].auto_cache == CacheMark("5m", "cache_control.ttl")


def test_every_response_has_a_fresh_request_id(client: TestClient) -> None:
    """Checklist 38."""
    ids = {
        client.post("/v1/messages", json=body(), headers=HEADERS).headers["request-id"],
        client.post("/v1/messages", json=body(stream=True), headers=HEADERS).headers["request-id"],
        client.post("/v1/messages", json=body(), headers={}).headers["request-id"],
        client.post("/v1/messages/count_tokens", json=body(), headers=HEADERS).headers[
            "request-id"
        ],
    }
    assert len(ids) == 4 and all(REQUEST_ID.fullmatch(value) for value in ids)


# -- ASGI level: disconnects and keep-alives -------------------------------------------------------


async def drive(
    app: Starlette,
    payload: dict[str, Any],
    on_send: Any,
    disconnect: anyio.Event,
    path: str = "/v1/messages",
) -> None:
    """Run one request against ``app``; ``receive`` reports a disconnect once ``disconnect``."""
    raw = json.dumps(payload).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("test", 80),
        "client": ("c", 1),
        "headers": [(k.encode(), v.encode()) for k, v in HEADERS.items()]
        + [(b"content-type", b"application/json")],
    }
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await on_send(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)


def test_client_disconnect_closes_the_service_generator() -> None:
    async def main() -> None:
        service = FakeService()
        disconnect = anyio.Event()
        closed_at_disconnect: list[int] = []
        service.steps = [Started(PROMPT_USAGE), TextOut("a"), anyio.sleep_forever]
        chunks: list[bytes] = []

        async def on_send(message: Message) -> None:
            if message["type"] == "http.response.body" and message["body"]:
                chunks.append(message["body"])
                if b"text_delta" in message["body"]:
                    closed_at_disconnect.append(service.num_closed)
                    disconnect.set()

        await drive(Starlette(routes=routes(service)), body(stream=True), on_send, disconnect)
        assert closed_at_disconnect == [0]
        assert service.num_closed == 1  # generation was cancelled, its generator closed
        assert b"message_stop" not in b"".join(chunks)

    anyio.run(main)


def test_vanished_client_closes_the_service_generator() -> None:
    """ASGI 2.4 servers report a gone client by failing ``send`` with an OSError."""

    async def main() -> None:
        service = FakeService()
        service.steps = [Started(PROMPT_USAGE), TextOut("a"), anyio.sleep_forever]

        async def on_send(message: Message) -> None:
            if b"text_delta" in message.get("body", b""):
                raise OSError("connection reset")

        await drive(Starlette(routes=routes(service)), body(stream=True), on_send, anyio.Event())
        assert service.num_closed == 1

    anyio.run(main)


@pytest.mark.parametrize(
    ("stream", "hang_after"),
    [(False, 2), (False, 0), (True, 0)],
    ids=["json", "json-wait", "sse-wait"],
)
def test_disconnect_before_the_response_cancels_the_generation(
    stream: bool, hang_after: int
) -> None:
    """A client that leaves during a long first step (prefill) or a non-streaming generation."""

    async def main() -> None:
        service = FakeService()
        disconnect = anyio.Event()
        sent: list[Message] = []

        async def hang_up() -> None:
            disconnect.set()
            await anyio.sleep_forever()

        before: list[Step] = [Started(PROMPT_USAGE), TextOut("a")]
        service.steps = [*before[:hang_after], hang_up]

        async def on_send(message: Message) -> None:
            sent.append(message)

        await drive(Starlette(routes=routes(service)), body(stream=stream), on_send, disconnect)
        assert service.num_closed == 1  # the generation did not run on after the client left
        assert sent[0]["type"] == "http.response.start"  # an answer nobody reads, no crash

    anyio.run(main)


def test_keepalive_ping_while_the_model_is_busy() -> None:
    async def main() -> None:
        service = FakeService()
        release = anyio.Event()
        service.steps = [
            Started(PROMPT_USAGE),
            release.wait,
            TextOut("late"),
            service_finished("end_turn", 1),
        ]
        chunks: list[bytes] = []

        async def on_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message["body"])
                if message["body"].startswith(b"event: ping"):
                    release.set()

        app = Starlette(routes=routes(service, keepalive_s=0.01))
        await drive(app, body(stream=True), on_send, anyio.Event())
        names = [name for name, _ in sse_events(b"".join(chunks).decode())]
        assert names[0] == "message_start" and "ping" in names
        assert [n for n in names if n != "ping"] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        assert service.num_closed == 1

    anyio.run(main)


# -- the official SDK parses what we send ----------------------------------------------------------


@pytest.fixture
def sdk(client: TestClient) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="key-a", base_url=str(client.base_url), http_client=client, max_retries=0
    )


def test_sdk_create(sdk: anthropic.Anthropic) -> None:
    message = sdk.messages.create(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "Hello, world"
    assert message.content[1].type == "tool_use" and message.content[1].input == {
        "city": "Paris",
        "unit": "C",
    }
    usage = message.usage
    assert (
        usage.input_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    ) == (
        30,
        40,
        30,
    )
    assert usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_1h_input_tokens == 10
    assert message._request_id is not None and message._request_id.startswith("req_")


def test_sdk_stream(sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello, world"
    assert final.content[1].type == "tool_use"
    assert final.content[1].input == {"city": "Paris", "unit": "C"}
    assert final.usage.output_tokens == 7
    assert final.usage.cache_read_input_tokens == 40
    assert final.usage.cache_creation_input_tokens == 30


def test_sdk_stream_error(service: FakeService, sdk: anthropic.Anthropic) -> None:
    service.steps = [Started(PROMPT_USAGE), Overloaded("Overloaded")]
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):  # noqa: SIM117
        with sdk.messages.stream(
            model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            stream.until_done()


def test_sdk_errors(service: FakeService, sdk: anthropic.Anthropic) -> None:
    service.keys = {"other": "t"}
    with pytest.raises(anthropic.AuthenticationError) as caught:
        sdk.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")
    service.keys = None
    with pytest.raises(anthropic.BadRequestError, match="Extra inputs are not permitted"):
        bad_marker: Any = {"type": "ephemeral", "x": 1}
        sdk.messages.create(
            model="m",
            max_tokens=1,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "x", "cache_control": bad_marker}],
                }
            ],
        )


def test_sdk_count_tokens(service: FakeService, sdk: anthropic.Anthropic) -> None:
    service.input_tokens = 77
    counted = sdk.messages.count_tokens(
        model="claude-test",
        messages=[{"role": "user", "content": "Hi"}],
        cache_control={"type": "ephemeral"},
    )
    assert counted.input_tokens == 77
