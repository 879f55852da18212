"""The official ``openai`` SDK against a live server on loopback, on a real (tiny, random)
transformers model with sliding-window layers: implicit and marker-based caching, streaming
usage, tenants and errors, each in the SDK's own types."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest

from promptcache.config import ApiConfig
from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import make_config, words
from tests.e2e.conftest import LiveServer, ServerFactory, slow_to_load

pytestmark = pytest.mark.e2e

DOCUMENT = words(1300, 5)
# Tests of markers, tenants and errors need no 1024-token prompt: a lower minimum keeps them fast.
SMALL_MINIMUM = {"min_cacheable_tokens": 128}
NOTE = words(300, 6)
Factory = Callable[[Service], LiveServer]


def start(factory: Factory, cache: dict[str, Any] | None = None, **api: Any) -> LiveServer:
    config = replace(make_config(**(cache or {})), api=replace(ApiConfig(), **api))
    return factory(Service(build_tiny_engine("gemma3"), config))


Connect = Callable[[LiveServer, str], openai.OpenAI]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Call it with a server and a key to get an SDK client; every client is closed after."""
    opened: list[openai.OpenAI] = []

    def make(server: LiveServer, key: str) -> openai.OpenAI:
        opened.append(openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0))
        return opened[-1]

    yield make
    for sdk in opened:
        sdk.close()


def conversation(question: str = "What is this about?", document: str = DOCUMENT) -> list[Any]:
    return [
        {"role": "system", "content": document},
        {"role": "user", "content": question},
    ]


def details(usage: Any) -> Any:
    assert usage is not None and usage.prompt_tokens_details is not None
    return usage.prompt_tokens_details


def test_repeated_long_prompt_and_streaming_usage(
    live_server_factory: Factory, connect: Connect
) -> None:
    """Checklist 41 and 50 with the SDK: no markers, a repeat reads what the first call wrote."""
    sdk = connect(start(live_server_factory), "k")
    # temperature 0: greedy, so a hit is comparable token for token with the cold run.
    calls = [
        sdk.chat.completions.create(
            model="gpt-5", messages=conversation(), max_tokens=6, temperature=0
        )
        for _ in range(2)
    ]
    first, second = (details(c.usage) for c in calls)
    assert first.cached_tokens == 0 and first.cache_write_tokens is not None
    assert first.cache_write_tokens > 1024
    assert second.cached_tokens == first.cache_write_tokens and second.cache_write_tokens == 0
    assert calls[0].usage is not None and calls[1].usage is not None
    assert calls[1].usage.prompt_tokens == calls[0].usage.prompt_tokens
    assert calls[1].choices[0].message.content == calls[0].choices[0].message.content
    assert calls[0].model == "gpt-5"

    stream = sdk.chat.completions.create(
        model="gpt-5",
        messages=conversation(),
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *content, last = chunks
    assert all(chunk.usage is None for chunk in content)
    assert last.choices == [] and last.usage is not None
    assert details(last.usage).cached_tokens == first.cache_write_tokens
    assert last.usage.completion_tokens == calls[0].usage.completion_tokens
    text = "".join(chunk.choices[0].delta.content or "" for chunk in content)
    assert text == calls[0].choices[0].message.content


def test_markers_in_parts(live_server_factory: Factory, connect: Connect) -> None:
    """Explicit mode: a 1h ``cache_control`` on a system part, ``prompt_cache_breakpoint`` on a
    user part; a new question after them reads both."""
    sdk = connect(start(live_server_factory, SMALL_MINIMUM), "k")

    def ask(question: str) -> Any:
        messages: Any = [
            {
                "role": "system",
                "content": [
                    {
                        "type": "text",
                        "text": NOTE,
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "Context: " + words(200, 9),
                        "prompt_cache_breakpoint": {"mode": "explicit"},
                    },
                    {"type": "text", "text": question},
                ],
            },
        ]
        reply = sdk.chat.completions.create(
            model="m",
            messages=messages,
            max_tokens=2,
            temperature=0,
            prompt_cache_options={"mode": "explicit"},
        )
        return reply.usage

    first = ask("First question?")
    second = ask("Second question?")
    assert details(first).cached_tokens == 0
    assert details(first).cache_write_tokens > 300 + 200
    assert details(second).cached_tokens == details(first).cache_write_tokens
    assert details(second).cache_write_tokens == 0
    assert second.prompt_tokens > details(second).cached_tokens


def test_tenants_and_errors(live_server_factory: Factory, connect: Connect) -> None:
    server = start(
        live_server_factory,
        SMALL_MINIMUM,
        api_keys={"key-a": "a", "key-a2": "a", "key-b": "b"},
        aliases={"gpt-local": "gemma-3-270m"},
    )

    def usage(key: str) -> Any:
        reply = connect(server, key).chat.completions.create(
            model="gpt-local", messages=conversation("hi", NOTE), max_tokens=1, temperature=0
        )
        return details(reply.usage)

    a, b, a2 = usage("key-a"), usage("key-b"), usage("key-a2")
    assert a.cache_write_tokens > 300
    assert b.cached_tokens == 0 and b.cache_write_tokens == a.cache_write_tokens
    assert a2.cached_tokens == a.cache_write_tokens

    sdk = connect(server, "key-a")
    five = [
        {"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
        for i in range(5)
    ]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="gpt-local", messages=[{"role": "user", "content": five}])
    assert info.value.body == {
        "message": "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert info.value.request_id == info.value.response.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as retention:
        sdk.chat.completions.create(
            model="gpt-local",
            messages=conversation(),
            extra_body={"prompt_cache_retention": "forever"},
        )
    assert retention.value.param == "prompt_cache_retention"
    assert retention.value.code == "invalid_value"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-unknown", messages=conversation())
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as denied:
        connect(server, "wrong").chat.completions.create(model="gpt-local", messages=conversation())
    assert denied.value.code == "invalid_api_key"
    models = sdk.models.list()
    assert [model.id for model in models] == ["gemma-3-270m", "gpt-local"]


def test_the_sdk_waits_out_a_model_still_loading(live_server_factory: ServerFactory) -> None:
    # The SDK's two retries back off ~0.5 s and ~1 s on their own: the server's Retry-After
    # (2 s while loading) carries them past a load of 2.5 s.
    service = Service(slow_to_load(build_tiny_engine("gemma3"), 2.5), make_config())
    server = live_server_factory(service, wait_ready=False)
    assert httpx.get(f"{server.base_url}/health").status_code == 503
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="k") as sdk:
        reply = sdk.chat.completions.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    assert reply.choices[0].message.content is not None and reply.usage is not None
