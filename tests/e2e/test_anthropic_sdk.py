"""The official ``anthropic`` SDK against a live server on loopback, on a real (tiny, random)
transformers model with sliding-window layers: real KV snapshots, restores and usage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anthropic
import httpx
import pytest

from promptcache.config import ApiConfig
from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import make_config, words
from tests.e2e.conftest import LiveServer, ServerFactory, slow_to_load

pytestmark = pytest.mark.e2e

SYSTEM = words(1600, 3)
Factory = Callable[[Service], LiveServer]
# The current SDK has no sampling parameters; older clients send them in the body, and the server
# honours them. Greedy decoding makes a hit comparable token for token with a cold run.
GREEDY = {"temperature": 0.0}


def start(factory: Factory, **api: Any) -> tuple[LiveServer, anthropic.Anthropic]:
    config = make_config()
    config = replace(config, api=replace(ApiConfig(), **api))
    server = factory(Service(build_tiny_engine("gemma3"), config))
    return server, anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0)


def cached_system() -> list[Any]:
    return [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]


def test_cached_system_prompt_write_then_read(live_server_factory: Factory) -> None:
    _server, client = start(live_server_factory)
    calls = [
        client.messages.create(
            model="claude-sonnet-5",
            max_tokens=12,
            extra_body=GREEDY,
            system=cached_system(),
            messages=[{"role": "user", "content": "What is this about?"}],
        )
        for _ in range(2)
    ]
    first, second = (c.usage for c in calls)
    written = first.cache_creation_input_tokens
    assert written is not None and written > 1024
    assert first.cache_read_input_tokens == 0
    assert first.cache_creation is not None
    assert first.cache_creation.ephemeral_5m_input_tokens == written
    assert first.cache_creation.ephemeral_1h_input_tokens == 0
    assert second.cache_read_input_tokens == written
    assert second.cache_creation_input_tokens == 0
    assert second.input_tokens == first.input_tokens
    assert calls[0].content == calls[1].content  # greedy: a hit gives the cold run's tokens
    assert calls[0].model == "claude-sonnet-5"
    total = client.messages.count_tokens(
        model="claude-sonnet-5",
        system=cached_system(),
        messages=[{"role": "user", "content": "What is this about?"}],
    )
    assert total.input_tokens == first.input_tokens + written


def test_multi_turn_with_moving_breakpoint(live_server_factory: Factory) -> None:
    _server, client = start(live_server_factory)
    history: list[Any] = []
    usages = []
    for turn in range(3):
        content = [{"type": "text", "text": f"Turn {turn}: " + words(700, turn)}]
        history.append({"role": "user", "content": content})
        # The breakpoint moves to the newest user block; older markers are dropped.
        marked = [
            {**m, "content": [{**m["content"][0], "cache_control": {"type": "ephemeral"}}]}
            if i == len(history) - 1
            else m
            for i, m in enumerate(history)
        ]
        reply = client.messages.create(model="m", max_tokens=6, extra_body=GREEDY, messages=marked)
        usages.append(reply.usage)
        history.append({"role": "assistant", "content": reply.content or "ok"})
    assert usages[0].cache_read_input_tokens == 0  # below 1024 on the first turn: nothing cached
    assert usages[0].cache_creation_input_tokens == 0
    assert usages[1].cache_creation_input_tokens > 0
    assert usages[2].cache_read_input_tokens == (
        usages[1].cache_read_input_tokens + usages[1].cache_creation_input_tokens
    )


def test_automatic_caching_moves_forward(live_server_factory: Factory) -> None:
    _server, client = start(live_server_factory)
    messages: list[Any] = [{"role": "user", "content": words(1300, 7)}]
    first = client.messages.create(
        model="m",
        max_tokens=4,
        extra_body=GREEDY,
        messages=messages,
        cache_control={"type": "ephemeral"},
    )
    messages += [
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And then?"},
    ]
    second = client.messages.create(
        model="m",
        max_tokens=4,
        extra_body=GREEDY,
        messages=messages,
        cache_control={"type": "ephemeral"},
    )
    assert first.usage.cache_creation_input_tokens > 1024
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens


def test_streaming_usage_matches_non_streaming(live_server_factory: Factory) -> None:
    _server, client = start(live_server_factory)
    kwargs: dict[str, Any] = {
        "model": "m",
        "max_tokens": 10,
        "extra_body": GREEDY,
        "system": cached_system(),
        "messages": [{"role": "user", "content": "Summarise."}],
    }
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start_event = events[0]
    assert start_event.type == "message_start"
    start_usage = start_event.message.usage
    assert start_usage.cache_read_input_tokens == plain.usage.cache_creation_input_tokens
    assert start_usage.cache_creation is not None
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert [b.model_dump(include={"type", "text"}) for b in final.content] == [
        b.model_dump(include={"type", "text"}) for b in plain.content
    ]
    assert [e.type for e in events][-1] == "message_stop"


def test_errors_in_anthropic_envelope(live_server_factory: Factory) -> None:
    _server, client = start(live_server_factory)
    five = [
        {"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
        for i in range(5)
    ]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": five}]
        )
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    }
    assert body["request_id"] == info.value.response.headers["request-id"]
    order = [
        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
        {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    with pytest.raises(anthropic.BadRequestError, match="must not come after"):
        client.messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": order}]
        )
    with pytest.raises(anthropic.BadRequestError, match="Input should be '5m' or '1h'"):
        client.messages.create(
            model="m",
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "text",
                            "text": "a",
                            "cache_control": {"type": "ephemeral", "ttl": "10m"},
                        }
                    ],
                }
            ],
        )


def test_two_tenants_never_share(live_server_factory: Factory) -> None:
    server, _ = start(live_server_factory, api_keys={"key-a": "a", "key-a2": "a", "key-b": "b"})

    def call(key: str) -> Any:
        client = anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0)
        return client.messages.create(
            model="m",
            max_tokens=2,
            extra_body=GREEDY,
            system=cached_system(),
            messages=[{"role": "user", "content": "hi"}],
        ).usage

    a = call("key-a")
    b = call("key-b")
    a2 = call("key-a2")
    assert a.cache_creation_input_tokens > 0
    assert b.cache_read_input_tokens == 0 and b.cache_creation_input_tokens > 0
    assert a2.cache_read_input_tokens == a.cache_creation_input_tokens
    with pytest.raises(anthropic.AuthenticationError):
        call("wrong")


def test_the_sdk_waits_out_a_model_still_loading(live_server_factory: ServerFactory) -> None:
    # As the openai SDK: its own backoff (~1.5 s over two retries) is shorter than the load.
    service = Service(slow_to_load(build_tiny_engine("gemma3"), 2.5), make_config())
    server = live_server_factory(service, wait_ready=False)
    assert httpx.get(f"{server.base_url}/health").status_code == 503
    with anthropic.Anthropic(base_url=server.base_url, api_key="k") as sdk:
        reply = sdk.messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    assert reply.usage.input_tokens > 0
