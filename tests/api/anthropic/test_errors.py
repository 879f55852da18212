"""Error envelopes and statuses (§3.5), request ids (checklist 38), validation order (§1.14)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from promptcache.api.anthropic import routes
from promptcache.api.anthropic.errors import error_json, error_response, stream_error_json
from promptcache.core.response import Started, TextOut
from promptcache.errors import (
    AuthenticationFailed,
    EngineFailure,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    PromptCacheError,
    PromptTooLong,
    RequestTooLarge,
)

from .conftest import HEADERS, PROMPT_USAGE, FakeService, body

ERRORS = [
    (InvalidRequest("bad"), 400, "invalid_request_error"),
    (PromptTooLong("long"), 400, "invalid_request_error"),
    (AuthenticationFailed("invalid x-api-key"), 401, "authentication_error"),
    (PermissionDenied("no"), 403, "permission_error"),
    (NotFound("model: x"), 404, "not_found_error"),
    (RequestTooLarge("big"), 413, "request_too_large"),
    (Overloaded("Overloaded"), 529, "overloaded_error"),
    (EngineFailure("boom"), 500, "api_error"),
    (PromptCacheError("base"), 500, "api_error"),
]


def assert_error(response: httpx2.Response, status: int, kind: str, message: str | None) -> None:
    assert response.status_code == status
    request_id = response.headers["request-id"]
    assert re.fullmatch(r"req_[A-Za-z0-9]{24,}", request_id)
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["request_id"] == request_id
    assert payload["error"]["type"] == kind
    if message is not None:
        assert payload["error"]["message"] == message
    assert set(payload) == {"type", "error", "request_id"}


@pytest.mark.parametrize(("exc", "status", "kind"), ERRORS)
def test_error_response(exc: PromptCacheError, status: int, kind: str) -> None:
    response = error_response(exc, "req_1")
    assert response.status_code == status
    assert response.headers["request-id"] == "req_1"
    assert json.loads(bytes(response.body)) == {
        "type": "error",
        "error": {"type": kind, "message": exc.message},
        "request_id": "req_1",
    }
    assert stream_error_json(exc) == {
        "type": "error",
        "error": {"type": kind, "message": exc.message},
    }


def test_unexpected_exception_reveals_nothing() -> None:
    payload = error_json(KeyError("secret internals"), "req_1")
    assert payload["error"] == {"type": "api_error", "message": "Internal server error"}


# -- through the routes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "status", "kind"), ERRORS)
@pytest.mark.parametrize("stream", [False, True])
def test_service_errors_on_the_first_step(
    service: FakeService,
    client: TestClient,
    exc: PromptCacheError,
    status: int,
    kind: str,
    stream: bool,
) -> None:
    """Validation (and queue) errors come before any event: an HTTP error even when streaming."""
    service.steps = [exc]
    response = client.post("/v1/messages", json=body(stream=stream), headers=HEADERS)
    assert_error(response, status, kind, exc.message)
    assert service.num_closed == 1


@pytest.mark.parametrize(("exc", "status", "kind"), ERRORS)
def test_count_tokens_errors(
    service: FakeService, client: TestClient, exc: PromptCacheError, status: int, kind: str
) -> None:
    service.count_error = exc
    response = client.post("/v1/messages/count_tokens", json=body(), headers=HEADERS)
    assert_error(response, status, kind, exc.message)


def test_error_after_started_in_a_non_streaming_request(
    service: FakeService, client: TestClient
) -> None:
    service.steps = [Started(PROMPT_USAGE), TextOut("partial"), EngineFailure("CUDA out of memory")]
    response = client.post("/v1/messages", json=body(), headers=HEADERS)
    assert_error(response, 500, "api_error", "CUDA out of memory")


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/messages/count_tokens"])
def test_unexpected_exception_is_a_500_without_details(
    service: FakeService, client: TestClient, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    service.steps = [RuntimeError("secret internals")]
    service.count_error = RuntimeError("secret internals")
    response = client.post(route, json=body(), headers=HEADERS)
    assert_error(response, 500, "api_error", "Internal server error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internals" in caplog.text  # but the server log has it


def test_missing_credential_when_keys_are_configured(
    service: FakeService, client: TestClient
) -> None:
    service.keys = {"key-a": "tenant-a"}
    headers = {"anthropic-version": "2023-06-01"}
    response = client.post("/v1/messages", json=body(), headers=headers)
    assert_error(response, 401, "authentication_error", "invalid x-api-key")
    response = client.post("/v1/messages", json=body(), headers={**headers, "x-api-key": "nope"})
    assert_error(response, 401, "authentication_error", "invalid x-api-key")
    assert service.requests == []


def test_unknown_model(service: FakeService, client: TestClient) -> None:
    service.models = {"claude-test"}
    response = client.post("/v1/messages", json=body(model="gpt-9"), headers=HEADERS)
    assert_error(response, 404, "not_found_error", "model: gpt-9")
    response = client.post("/v1/messages/count_tokens", json=body(model="gpt-9"), headers=HEADERS)
    assert_error(response, 404, "not_found_error", "model: gpt-9")
    assert service.requests == []


def test_missing_anthropic_version(client: TestClient) -> None:
    """Checklist 37."""
    for route in ("/v1/messages", "/v1/messages/count_tokens"):
        response = client.post(route, json=body(), headers={"x-api-key": "k"})
        assert_error(
            response, 400, "invalid_request_error", "anthropic-version: header is required"
        )


def test_unsupported_anthropic_version(client: TestClient) -> None:
    headers = {**HEADERS, "anthropic-version": "2099-01-01"}
    response = client.post("/v1/messages", json=body(), headers=headers)
    assert_error(response, 400, "invalid_request_error", None)
    assert "2099-01-01" in response.json()["error"]["message"]


def test_validation_order(service: FakeService, client: TestClient) -> None:
    """Spec §1.14: authentication, then headers, then the body (marker shape before pre-warm)."""
    service.keys = {"key-a": "tenant-a"}
    bad_body = body(max_tokens=0, stream=True, cache_control={"type": "ephemeral", "ttl": "10m"})
    response = client.post("/v1/messages", json=bad_body, headers={"x-api-key": "wrong"})
    assert response.status_code == 401
    response = client.post("/v1/messages", json=bad_body, headers={"x-api-key": "key-a"})
    assert response.json()["error"]["message"] == "anthropic-version: header is required"
    response = client.post("/v1/messages", json=bad_body, headers=HEADERS)
    assert response.json()["error"]["message"] == "cache_control.ttl: Input should be '5m' or '1h'"
    del bad_body["cache_control"]
    response = client.post("/v1/messages", json=bad_body, headers=HEADERS)
    assert response.json()["error"]["message"] == (
        "max_tokens: 0 (cache pre-warming) cannot be combined with stream"
    )
    assert service.requests == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{oops", "request body is not valid JSON"),
        (b'"a string"', "request body must be a JSON object"),
    ],
)
def test_body_that_is_not_json(client: TestClient, content: bytes, message: str) -> None:
    response = client.post("/v1/messages", content=content, headers=HEADERS)
    assert_error(response, 400, "invalid_request_error", None)
    assert response.json()["error"]["message"].startswith(message)


def test_marker_error_rejects_before_the_service_is_called(
    service: FakeService, client: TestClient
) -> None:
    """Checklist 15 at the route: nothing reaches the service (no entry read or written)."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "10m"}}
            ],
        }
    ]
    for route in ("/v1/messages", "/v1/messages/count_tokens"):
        response = client.post(route, json=body(messages=messages), headers=HEADERS)
        assert_error(
            response,
            400,
            "invalid_request_error",
            "messages.0.content.0.cache_control.ttl: Input should be '5m' or '1h'",
        )
    assert service.requests == []


def test_body_over_the_limit() -> None:
    service = FakeService()
    app = Starlette(routes=routes(service, max_body_bytes=1000))
    with TestClient(app) as client:
        big = body(messages=[{"role": "user", "content": "x" * 2000}])
        response = client.post("/v1/messages", json=big, headers=HEADERS)
        assert_error(response, 413, "request_too_large", None)

        def chunks() -> Any:  # no content-length: the limit holds while streaming the body
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            yield b"x" * 2000
            yield b'"}]}'

        response = client.post("/v1/messages", content=chunks(), headers=HEADERS)
        assert_error(response, 413, "request_too_large", None)
        assert service.requests == []


def test_default_body_limit_is_32_mb() -> None:
    from promptcache.api.anthropic import MAX_BODY_BYTES

    assert MAX_BODY_BYTES == 32 * 1024 * 1024
