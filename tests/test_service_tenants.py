"""Tenant shares through the service and the HTTP edge (spec §1.13): with API keys configured,
one tenant's flood of new prefixes cannot flush another tenant's entries."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.config import ApiConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config, words

PREFIX = 1100  # tokens (bytes) per cached system prompt
ENTRY = PREFIX * 64  # the fake engine's 64 bytes per token (pages of 64 tokens, not shared here)
KEYS = {"key-a": "team-a", "key-b": "team-b"}


def service(**cache: Any) -> Service:
    config = make_config(capacity_bytes=10 * ENTRY, **cache)
    return Service(FakeEngine(), replace(config, api=replace(ApiConfig(), api_keys=KEYS)))


def ask(client: TestClient, key: str, seed: int) -> dict[str, Any]:
    body = {
        "model": "m",
        "max_tokens": 2,
        "system": [
            {"type": "text", "text": words(PREFIX, seed), "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"anthropic-version": "2023-06-01", "x-api-key": key}
    response = client.post("/v1/messages", json=body, headers=headers)
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


def test_a_flood_from_one_tenant_leaves_the_other_tenants_entries() -> None:
    with TestClient(build_app(service())) as client:
        for seed in (1, 2, 3):
            assert ask(client, "key-a", seed)["cache_creation_input_tokens"] > 0
        for seed in range(100, 125):  # 25 new prefixes into a budget of 10
            ask(client, "key-b", seed)
        for seed in (1, 2, 3):
            again = ask(client, "key-a", seed)
            assert again["cache_read_input_tokens"] > 1000, seed
        # b's oldest went to make room for b: its first prefix is a miss now.
        assert ask(client, "key-b", 100)["cache_read_input_tokens"] == 0
        metrics = client.get("/metrics").text
    evicted = re.search(
        r'promptcache_cache_evictions_total\{reason="tenant_share",tier="host"\} (\S+)', metrics
    )
    assert evicted is not None and float(evicted.group(1)) >= 15


def test_the_share_is_configured_and_applies_only_with_credentials() -> None:
    assert service().store.tenant_share == 0.5
    assert service(tenant_cache_share=0.25).store.tenant_share == 0.25
    open_server = Service(FakeEngine(), make_config())
    assert open_server.store.tenant_share is None
