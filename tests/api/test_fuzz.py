"""Fuzz every route of the live app (fake engine) with mutated and malformed requests.

No input may get a 5xx (an overloaded engine aside), a plain-text body or a dropped connection:
each answer is a success, or an error in the protocol's own envelope, and each stream is
well-formed to its end. Afterwards the cache still writes, then reads, a prompt exactly.

Deterministic for CI: ``derandomize=True`` and no example database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.config import ApiConfig, CacheConfig, ServerConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.api.fuzzing import (
    ANTHROPIC_HEADERS,
    JSON_HEADERS,
    ROUTES,
    Route,
    check_envelope,
    check_response,
    encode,
    mutated,
    raw_bodies,
)

ADMIN_KEY = "admin-key"
BODY_LIMIT = 256 << 10

FUZZ = settings(
    max_examples=500,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
RAW = settings(FUZZ, max_examples=60)


@pytest.fixture(scope="module")
def service() -> Service:
    config = ServerConfig(
        api=replace(ApiConfig(), admin_keys=frozenset({ADMIN_KEY}), max_body_bytes=BODY_LIMIT),
        cache=replace(CacheConfig(), min_cacheable_tokens=16),
    )
    return Service(FakeEngine(), config)


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    # raise_server_exceptions=False: a bug must show as what a client sees, not as a raise here.
    with TestClient(build_app(service), raise_server_exceptions=False) as test_client:
        yield test_client
    # Nothing is left pinned or in flight once every request has finished.
    service.store.check_integrity()
    assert len(service.inflight) == 0
    assert all(entry.ref_cnt == 0 for entry in service.store.entries())


def post(client: TestClient, route: Route, content: bytes, **headers: str) -> Any:
    # Header values as bytes: a client may send any latin-1 octet, which httpx would refuse.
    sent = {key: value.encode("latin-1") for key, value in {**route.headers, **headers}.items()}
    response = client.post(route.path, content=content, headers=sent)
    check_response(route, response)
    return response


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.name)
def test_valid_body_is_served(client: TestClient, route: Route) -> None:
    assert post(client, route, encode(route.body())).status_code == 200


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.name)
@FUZZ
@given(data=st.data())
def test_mutated_bodies(client: TestClient, route: Route, data: st.DataObject) -> None:
    post(client, route, encode(data.draw(mutated(route))))


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.name)
@RAW
@given(data=st.data())
def test_malformed_bodies(client: TestClient, route: Route, data: st.DataObject) -> None:
    body = data.draw(raw_bodies(route))
    content_type = data.draw(
        st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"])
    )
    response = post(client, route, body, **{"content-type": content_type})
    assert response.status_code == 400, response.content[:200]


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.name)
def test_body_over_the_configured_limit(client: TestClient, route: Route) -> None:
    body = route.body()
    body["padding"] = "x" * BODY_LIMIT
    response = post(client, route, encode(body))
    assert response.status_code == (400 if route.protocol == "bedrock" else 413)


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.name)
@settings(FUZZ, max_examples=30)
@given(
    headers=st.dictionaries(
        st.sampled_from(["authorization", "x-api-key", "anthropic-version", "x-amz-date"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
        max_size=3,
    )
)
def test_odd_headers(client: TestClient, route: Route, headers: dict[str, str]) -> None:
    post(client, route, encode(route.body()), **headers)


@settings(FUZZ, max_examples=60)
@given(
    method=st.sampled_from(["GET", "DELETE", "PUT", "PATCH"]),
    path=st.sampled_from(
        ["/v1/models", "/v1/cache/entries", "/health", "/", "/metrics", "/v1/nothing"]
        + [route.path for route in ROUTES]
    ),
    key=st.sampled_from([None, ADMIN_KEY, "wrong", "\x7f"]),
)
def test_other_routes_and_methods(
    client: TestClient, method: str, path: str, key: str | None
) -> None:
    headers = {"x-api-key": key} if key is not None else {}
    response = client.request(method, path, headers=headers)
    assert response.status_code < 500 or response.status_code == 503, response.content[:200]
    if path == "/metrics" and response.status_code == 200:
        return
    data = response.json()
    if response.status_code >= 400 and path.startswith(("/v1/messages", "/model/")):
        protocol = "anthropic" if path.startswith("/v1/messages") else "bedrock"
        check_envelope(protocol, response, data)
    elif response.status_code >= 400 and path != "/v1/cache/entries":
        check_envelope("openai", response, data)


def test_admin_delete(client: TestClient) -> None:
    response = client.delete("/v1/cache/entries", headers={"x-api-key": ADMIN_KEY})
    assert response.status_code == 200 and isinstance(response.json()["cleared"], int)


def test_cache_still_writes_then_reads_exactly(client: TestClient, service: Service) -> None:
    """After all the fuzzing, a fresh cached prompt is written once and then read in full."""
    system = "Fuzzing left the cache intact. " * 20
    body = {
        "model": "m",
        "max_tokens": 4,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hi"}],
    }
    first = client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS).json()["usage"]
    second = client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS).json()["usage"]
    assert first["cache_creation_input_tokens"] > 0 and first["cache_read_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    assert second["input_tokens"] == first["input_tokens"]
    converse = {
        "system": [{"text": system + "bedrock"}, {"cachePoint": {"type": "default"}}],
        "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
        "inferenceConfig": {"maxTokens": 4},
    }
    path = "/model/m/converse"
    usage = [client.post(path, content=json.dumps(converse), headers=JSON_HEADERS).json()["usage"]]
    usage.append(client.post(path, json=converse, headers=JSON_HEADERS).json()["usage"])
    assert usage[0]["cacheWriteInputTokens"] > 0
    assert usage[1]["cacheReadInputTokens"] == usage[0]["cacheWriteInputTokens"]
    service.store.check_integrity()
