"""The ``portkey-ai`` SDK with the server as its gateway (``base_url``), on loopback.

The SDK is built on the openai SDK: it posts to ``<base_url>/chat/completions``, sends its own
placeholder ``Authorization: Bearer OPENAI_API_KEY`` and the key given as ``api_key`` in
``x-portkey-api-key``, plus ``x-portkey-*`` headers for its other options. The server takes the
Portkey key as the credential (spec §4.1) and ignores the rest. The request is the Python example
of Portkey's "Prompt Caching on Bedrock" page: two system parts, the second with ``cache_control``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from portkey_ai import Portkey

from promptcache.config import ApiConfig
from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import make_config, words
from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

Factory = Callable[[Service], LiveServer]
DOCUMENT = "This is a large document I want to cache... " + words(1200, 13)


def test_portkey_example_reads_the_cache_on_the_repeat(live_server_factory: Factory) -> None:
    config = replace(make_config(), api=replace(ApiConfig(), api_keys={"pk-team-a": "team-a"}))
    server = live_server_factory(Service(build_tiny_engine("gemma3"), config))
    portkey = Portkey(
        api_key="pk-team-a",
        virtual_key="BEDROCK_VIRTUAL_KEY",  # an inert x-portkey-* header here
        base_url=f"{server.base_url}/v1",
    )
    clients = [portkey]
    try:
        replies = [
            portkey.chat.completions.create(
                messages=[
                    {
                        "role": "system",
                        "content": [
                            {"type": "text", "text": "You are a helpful assistant"},
                            {
                                "type": "text",
                                "text": DOCUMENT,
                                "cache_control": {"type": "ephemeral"},
                            },
                        ],
                    },
                    {"role": "user", "content": "Summarize the above document in 20 words"},
                ],
                model="anthropic.claude-3-7-sonnet-20250219-v1:0",
                max_tokens=4,
                temperature=0,
            )
            for _ in range(2)
        ]
        stranger = Portkey(api_key="pk-unknown", base_url=f"{server.base_url}/v1")
        clients.append(stranger)
        # The SDK raises its vendored copy of openai's AuthenticationError.
        with pytest.raises(Exception, match="Incorrect API key") as denied:
            stranger.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}], model="m", max_tokens=1
            )
        assert type(denied.value).__name__ == "AuthenticationError"
    finally:
        for client in clients:
            client.openai_client.close()  # Portkey.close() leaves its inner openai client open
            client.close()
    first, second = (reply.usage for reply in replies)
    assert first is not None and second is not None
    first_details: Any = first.prompt_tokens_details
    second_details: Any = second.prompt_tokens_details
    # Without a prompt_cache_options.mode the implicit breakpoint also writes the user turn.
    assert first_details.cached_tokens == 0 and first_details.cache_write_tokens > 1024
    assert second_details.cached_tokens == first_details.cache_write_tokens
    assert second.prompt_tokens == first.prompt_tokens
    assert replies[0].model == "anthropic.claude-3-7-sonnet-20250219-v1:0"
    assert replies[0].choices is not None and replies[1].choices is not None
    assert replies[1].choices[0].message == replies[0].choices[0].message
