"""What the cache tells clients and operators: the ``x-promptcache-cache`` header on all three
surfaces (streams too), Anthropic's diagnostics beta (spec §3.12) in the body and in
``message_start``, ``/v1/cache/stats`` per tenant and the dashboard's data, scoped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.api.cacheheader import CACHE_HEADER, parse_cache_header
from promptcache.config import ApiConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config, words

SYSTEM = words(2000)
KEYS = {"key-alice": "alice", "key-bob": "bob"}
ADMIN = "key-admin"
BETA = "cache-diagnosis-2026-04-07"


def headers(key: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", **extra}


@pytest.fixture
def client() -> Iterator[TestClient]:
    config = make_config()
    config = replace(config, api=ApiConfig(api_keys=KEYS, admin_keys=frozenset({ADMIN})))
    with TestClient(build_app(Service(FakeEngine(), config))) as test_client:
        yield test_client


def messages_body(system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 4,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


# -- the header ------------------------------------------------------------------------------------


def test_anthropic_header_says_written_then_read(client: TestClient) -> None:
    first = client.post("/v1/messages", json=messages_body(), headers=headers("key-alice"))
    second = client.post("/v1/messages", json=messages_body(), headers=headers("key-alice"))
    written = first.json()["usage"]["cache_creation_input_tokens"]
    one = parse_cache_header(first.headers[CACHE_HEADER])
    assert one["read"] == ["0"] and one["written"] == [str(written)]
    assert one["miss"] == [f"0:never_written:tokens={written}"]
    two = parse_cache_header(second.headers[CACHE_HEADER])
    assert two == {"read": [str(written)], "written": ["0"], "tier": ["host"]}


def test_anthropic_stream_carries_the_header(client: TestClient) -> None:
    body = messages_body(stream=True)
    with client.stream("POST", "/v1/messages", json=body, headers=headers("key-alice")) as reply:
        value = reply.headers[CACHE_HEADER]
        reply.read()
    assert "never_written" in value


def test_openai_header_whole_and_streamed(client: TestClient) -> None:
    body = {
        "model": "m",
        "max_tokens": 4,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
    }
    auth = {"authorization": "Bearer key-alice"}
    first = client.post("/v1/chat/completions", json=body, headers=auth)
    assert first.status_code == 200, first.text
    assert "miss=" in first.headers[CACHE_HEADER]
    with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=auth
    ) as reply:
        value = reply.headers[CACHE_HEADER]
        reply.read()
    cached = first.json()["usage"]["prompt_tokens_details"]["cache_write_tokens"]
    assert parse_cache_header(value)["read"] == [str(cached)]


def test_bedrock_header_converse_and_stream(client: TestClient) -> None:
    body = {
        "system": [{"text": SYSTEM}, {"cachePoint": {"type": "default"}}],
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
        "inferenceConfig": {"maxTokens": 4},
    }
    auth = {"authorization": "Bearer key-bob"}
    first = client.post("/model/m/converse", json=body, headers=auth)
    assert first.status_code == 200, first.text
    assert "never_written" in first.headers[CACHE_HEADER]
    with client.stream("POST", "/model/m/converse-stream", json=body, headers=auth) as reply:
        value = reply.headers[CACHE_HEADER]
        reply.read()
    assert parse_cache_header(value)["tier"] == ["host"]


def test_a_validation_error_has_no_header(client: TestClient) -> None:
    reply = client.post("/v1/messages", json={"model": "m"}, headers=headers("key-alice"))
    assert reply.status_code == 400 and CACHE_HEADER not in reply.headers


# -- Anthropic's diagnostics -----------------------------------------------------------------------


def test_diagnostics_in_the_body_under_the_beta(client: TestClient) -> None:
    beta = headers("key-alice", **{"anthropic-beta": BETA})
    first = client.post("/v1/messages", json=messages_body(diagnostics={}), headers=beta).json()
    assert first["diagnostics"] == {"cache_miss_reason": None}
    previous = {"previous_message_id": first["id"]}
    body = messages_body(words(2000, 9), diagnostics=previous)
    second = client.post("/v1/messages", json=body, headers=beta).json()
    written = first["usage"]["cache_creation_input_tokens"]
    assert second["diagnostics"] == {
        "cache_miss_reason": {"type": "system_changed", "cache_missed_input_tokens": written}
    }
    # Without the beta, the field is ignored and the body keeps its usual shape.
    plain = client.post(
        "/v1/messages", json=messages_body(diagnostics=previous), headers=headers("key-alice")
    ).json()
    assert "diagnostics" not in plain


def test_diagnostics_in_message_start_and_never_across_tenants(client: TestClient) -> None:
    beta = {"anthropic-beta": BETA}
    first = client.post(
        "/v1/messages", json=messages_body(diagnostics={}), headers=headers("key-alice", **beta)
    ).json()
    body = messages_body(stream=True, diagnostics={"previous_message_id": first["id"]})
    for key, expected in (
        ("key-alice", None),
        ("key-bob", {"type": "previous_message_not_found"}),
    ):
        reply = client.post("/v1/messages", json=body, headers=headers(key, **beta))
        start = sse_events(reply.text)[0]
        assert start["type"] == "message_start"
        assert start["message"]["diagnostics"] == {"cache_miss_reason": expected}


def test_a_bad_previous_message_id_is_400(client: TestClient) -> None:
    body = messages_body(diagnostics={"previous_message_id": 3})
    reply = client.post(
        "/v1/messages", json=body, headers=headers("key-alice", **{"anthropic-beta": BETA})
    )
    assert reply.status_code == 400
    assert "diagnostics.previous_message_id" in reply.json()["error"]["message"]


# -- stats and the dashboard's data ----------------------------------------------------------------


def test_stats_per_tenant_and_for_the_admin(client: TestClient) -> None:
    for key in ("key-alice", "key-alice", "key-bob"):
        client.post("/v1/messages", json=messages_body(), headers=headers(key))
    alice = client.get("/v1/cache/stats", headers={"x-api-key": "key-alice"}).json()
    assert alice["scope"] == "tenant" and alice["tenant"] == "alice"
    assert "tenants" not in alice
    total = alice["total"]
    assert (total["requests"], total["hits"]) == (2, 1)
    assert total["read_tokens"] > 1024 and total["money_saved"] > 0
    assert total["misses_by_reason"] == {"never_written": 1}
    assert total["read_tokens_by_tier"] == {"host": total["read_tokens"]}
    admin = client.get("/v1/cache/stats", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert admin["scope"] == "all" and set(admin["tenants"]) == {"alice", "bob"}
    assert admin["total"]["requests"] == 3
    assert client.get("/v1/cache/stats", headers={"x-api-key": "nope"}).status_code == 401


def test_dashboard_data_shows_a_tenant_only_its_own(client: TestClient) -> None:
    client.post("/v1/messages", json=messages_body(), headers=headers("key-alice"))
    client.post("/v1/messages", json=messages_body(words(2000, 4)), headers=headers("key-bob"))
    bob = client.get("/v1/cache/dashboard", headers={"x-api-key": "key-bob"}).json()
    assert {e["tenant"] for e in bob["entries"]} == {"bob"}
    assert {r["tenant"] for r in bob["recent"]} == {"bob"}
    assert bob["recent"][0]["misses"][0]["reason"] == "never_written"
    admin = client.get("/v1/cache/dashboard", headers={"x-api-key": ADMIN}).json()
    assert {e["tenant"] for e in admin["entries"]} == {"alice", "bob"}
    assert admin["tiers"][0]["used_bytes"] > bob["tiers"][0]["used_bytes"] > 0
    # What the budget holds in tokens, from the engine's bytes a token (the fake's 64).
    assert admin["engine"]["kv_bytes_per_token"] == 64
    assert admin["tiers"][0]["capacity_tokens"] == admin["tiers"][0]["capacity_bytes"] // 64
    assert admin["series"] and admin["series"][-1]["tokens_saved"] == 0


def test_dashboard_page_and_files_are_served_from_the_package(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and "dashboard.js" in page.text
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing from a CDN
    script = client.get("/dashboard/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert client.get("/dashboard/other.js").status_code == 404


def test_metrics_count_misses_by_reason_and_reads_by_tier(client: TestClient) -> None:
    for _ in range(2):
        client.post("/v1/messages", json=messages_body(), headers=headers("key-alice"))
    text = client.get("/metrics").text
    assert 'promptcache_cache_misses_total{reason="never_written"} 1.0' in text
    assert 'promptcache_cache_hits_total{tier="host"} 1.0' in text
    assert 'promptcache_cache_tier_read_tokens_total{tier="host"}' in text
    assert "promptcache_cache_tenant_share{" in text
