"""Hosted models' caching profiles (``cache/profiles.py``) through the HTTP surfaces on the fake
engine (its byte tokenizer: ``words(n)`` is about ``n`` tokens): the hosted errors and silent
skips of spec §5.9 for the model each request names."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.cache.profiles import BUILTIN, CacheProfile, ProfileTable, spellings
from promptcache.config import ConfigError, load
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config, words

SONNET = "anthropic.claude-3-7-sonnet-20250219-v1:0"
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA = "amazon.nova-pro-v1:0"
ANTHROPIC = {"anthropic-version": "2023-06-01"}


def client_for(profile: str | None = "auto", **api: Any) -> Iterator[TestClient]:
    config = make_config(profile=profile)
    config = replace(config, api=replace(config.api, **api))
    with TestClient(build_app(Service(FakeEngine(max_context_tokens=70_000), config))) as client:
        yield client


@pytest.fixture
def client() -> Iterator[TestClient]:
    yield from client_for()


def converse(client: TestClient, model: str, system_tokens: int, **extra: Any) -> Any:
    body = {
        "system": [{"text": words(system_tokens)}, {"cachePoint": {"type": "default"}}],
        "messages": [{"role": "user", "content": [{"text": "Who?"}]}],
        "inferenceConfig": {"maxTokens": 2},
        **extra,
    }
    return client.post(f"/model/{model}/converse", json=body)


def written(response: Any) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["cacheWriteInputTokens"])


def test_nova_rejects_a_tool_cache_point(client: TestClient) -> None:
    tools = {
        "tools": [
            {"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}}},
            {"cachePoint": {"type": "default"}},
        ]
    }
    response = converse(client, NOVA, 1500, toolConfig=tools)
    assert response.status_code == 400
    assert response.headers["x-amzn-ErrorType"].startswith("ValidationException")
    assert response.json()["message"] == f"Tool caching is not supported for model {NOVA}."
    # Claude caches tools; a cross-region inference profile of Nova is Nova.
    assert converse(client, SONNET, 1500, toolConfig=tools).status_code == 200
    assert converse(client, f"us.{NOVA}", 1500, toolConfig=tools).status_code == 400


def test_a_prefix_under_the_haiku_minimum_is_skipped(client: TestClient) -> None:
    # 1,500 tokens: over Claude 3.7 Sonnet's 1,024, under Claude 3.5 Haiku's 2,048.
    assert written(converse(client, HAIKU, 1500)) == 0
    assert written(converse(client, SONNET, 1500)) > 1500
    assert written(converse(client, HAIKU, 2500)) > 2500
    # Anthropic Messages: Haiku 4.5 needs 4,096.
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 2,
        "system": [{"type": "text", "text": words(3000), "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Who?"}],
    }
    usage = client.post("/v1/messages", json=body, headers=ANTHROPIC).json()["usage"]
    assert usage["cache_creation_input_tokens"] == 0
    usage = client.post(
        "/v1/messages", json={**body, "model": "claude-sonnet-4-5"}, headers=ANTHROPIC
    ).json()["usage"]
    assert usage["cache_creation_input_tokens"] > 3000


def test_a_prefix_over_the_nova_maximum_is_skipped(client: TestClient) -> None:
    assert written(converse(client, NOVA, 33_000)) == 0  # over 32k: silently not cached
    assert written(converse(client, SONNET, 33_000)) > 33_000
    assert written(converse(client, NOVA, 5000)) > 5000


def test_table_models_treat_a_1h_cache_point_as_5m(client: TestClient) -> None:
    body = {"system": [{"text": words(1500)}, {"cachePoint": {"type": "default", "ttl": "1h"}}]}
    response = converse(client, SONNET, 0, **body)
    assert response.json()["usage"]["cacheDetails"][0]["ttl"] == "5m"
    # Another prefix: the first one is cached now, whatever model names it (one served model).
    body["system"][0] = {"text": words(1500, 5)}
    response = converse(client, "anthropic.claude-sonnet-4-5-20250929-v1:0", 0, **body)
    assert response.json()["usage"]["cacheDetails"][0]["ttl"] == "1h"


def test_the_alias_table_chooses_profiles_per_model_name() -> None:
    aliases = {"haiku": "gemma-3-270m", "nova": "gemma-3-270m", "plain": "gemma-3-270m"}
    profiles = {"haiku": "claude-3-5-haiku", "nova": "nova-micro"}
    for client in client_for(None, aliases=aliases, alias_profiles=profiles):
        assert written(converse(client, "haiku", 1500)) == 0
        assert written(converse(client, "plain", 1500)) > 1500  # the deployment's own 1,024
        tool = {
            "model": "nova",
            "max_tokens": 2,
            "tools": [
                {
                    "name": "f",
                    "input_schema": {"type": "object"},
                    "cache_control": {"type": "ephemeral"},
                }
            ],
            "system": words(1500),
            "messages": [{"role": "user", "content": "Who?"}],
        }
        # Anthropic surface: a Nova tool marker is ignored, not an error (spec §5.9).
        response = client.post("/v1/messages", json=tool, headers=ANTHROPIC)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["cache_creation_input_tokens"] == 0
        assert client.post("/model/nova/converse", json={}).status_code == 400


def test_profile_table_lookups() -> None:
    table = ProfileTable(default=CacheProfile("default"), selected="auto")
    assert table.for_model("claude-sonnet-4-5-20250929").name == "claude-sonnet-4-5"
    assert table.for_model("claude-sonnet-4-20250514").name == "claude-sonnet-4"
    assert table.for_model("claude-opus-4-1-20250805").name == "claude-opus-4"
    assert table.for_model(f"arn:aws:bedrock:us-east-1:1:inference-profile/eu.{NOVA}").name == (
        "nova-pro"
    )
    assert table.for_model("my-model").name == "default"
    assert spellings(f"us.{HAIKU}") == (f"us.{HAIKU}", HAIKU)
    assert BUILTIN["nova-lite"].policy.max_cacheable_tokens == 32_000
    assert not BUILTIN["nova-micro"].policy.tool_cache_points
    fixed = ProfileTable(default=CacheProfile("default"), selected="nova-pro")
    assert fixed.for_model(SONNET).name == "nova-pro"


def test_config_profiles(tmp_path: Path) -> None:
    config = load({"aliases": "nova=gemma-3-270m@nova-pro,plain=gemma-3-270m"}, env={})
    assert config.api.aliases == {"nova": "gemma-3-270m", "plain": "gemma-3-270m"}
    assert config.api.alias_profiles == {"nova": "nova-pro"}
    with pytest.raises(ConfigError, match="unknown cache profile 'nova-max'"):
        load({"cache_profile": "nova-max"}, env={})
    toml = tmp_path / "promptcache.toml"
    toml.write_text(
        'cache_profile = "tight"\n'
        "[aliases]\n"
        'small = { model = "gemma-3-270m", cache_profile = "claude-haiku-4-5" }\n'
        "[cache_profiles.tight]\n"
        'base = "claude-3-5-haiku"\n'
        "max_breakpoints = 2\n"
    )
    config = load(config_file=toml, env={})
    assert config.api.alias_profiles == {"small": "claude-haiku-4-5"}
    tight = config.cache.profiles["tight"]
    assert tight.max_breakpoints == 2 and tight.policy.min_cacheable_tokens == 2048
    service = Service(FakeEngine(), replace(config, api=replace(config.api, aliases={})))
    with TestClient(build_app(service)) as client:
        points = [
            item
            for n in range(3)
            for item in ({"text": words(10, n)}, {"cachePoint": {"type": "default"}})
        ]
        response = converse(client, SONNET, 10, system=points)
        assert response.status_code == 400
        assert response.json()["message"] == (
            "A maximum of 2 cachePoint blocks may be provided. Found 3."
        )


def test_stream_time_share_option() -> None:
    assert load({}, env={}).engine.stream_time_share is None
    assert load({"stream_time_share": "auto"}, env={}).engine.stream_time_share is None
    assert load({}, env={"PROMPTCACHE_STREAM_TIME_SHARE": "0"}).engine.stream_time_share == 0.0
    assert load({"stream_time_share": "0.3"}, env={}).engine.stream_time_share == 0.3
    for bad in ("1", "-0.1", "half"):
        with pytest.raises(ConfigError, match="stream_time_share"):
            load({"stream_time_share": bad}, env={})


def test_prompt_products_option() -> None:
    assert load({}, env={}).engine.prompt_products == "dense"
    assert load({"prompt_products": "int8"}, env={}).engine.prompt_products == "int8"
    env = {"PROMPTCACHE_PROMPT_PRODUCTS": "int8"}
    assert load({}, env=env).engine.prompt_products == "int8"
    with pytest.raises(ConfigError, match="prompt_products"):
        load({"prompt_products": "int4"}, env={})
