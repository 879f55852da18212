"""One cache, two protocols (spec §1.12): an entry written through ``/v1/messages`` with the
``anthropic`` SDK is read through ``/v1/chat/completions`` with the ``openai`` SDK, and back,
for the same tenant and model. Equal content decodes to equal canonical blocks on both
surfaces, so the keys match."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import anthropic
import openai
import pytest

from promptcache.config import ApiConfig
from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import make_config, words
from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

Factory = Callable[[Service], LiveServer]
# A low minimum keeps the prompts (and the test) short; the rules are the same at any size.
MINIMUM = 128
SYSTEM = words(500, 21)
QUESTION = "What is this about? " + words(200, 22)


def test_written_by_anthropic_read_by_openai_and_back(live_server_factory: Factory) -> None:
    # Two credentials of one tenant: the surfaces need not even share a key.
    config = replace(
        make_config(min_cacheable_tokens=MINIMUM),
        api=replace(ApiConfig(), api_keys={"ka": "t", "ko": "t"}),
    )
    server = live_server_factory(Service(build_tiny_engine("gemma3"), config))
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="ka", max_retries=0)
    gpt = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="ko", max_retries=0)
    with claude, gpt:
        written = claude.messages.create(
            model="claude-sonnet-5",
            max_tokens=4,
            extra_body={"temperature": 0.0},
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": QUESTION}],
        ).usage
        # The implicit breakpoint (end of the user message) looks back and finds the system
        # entry; it writes the user turn on top of it.
        read = gpt.chat.completions.create(
            model="gpt-5",
            max_tokens=4,
            temperature=0,
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION},
            ],
        )
        # Back: an Anthropic breakpoint on the user block reads the OpenAI-written entry.
        reread = claude.messages.create(
            model="claude-sonnet-5",
            max_tokens=4,
            extra_body={"temperature": 0.0},
            system=[{"type": "text", "text": SYSTEM}],
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": QUESTION, "cache_control": {"type": "ephemeral"}}
                    ],
                }
            ],
        )
    usage = read.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    system_tokens = written.cache_creation_input_tokens
    assert system_tokens is not None and system_tokens > 500
    assert usage.prompt_tokens_details.cached_tokens == system_tokens
    user_tokens = usage.prompt_tokens_details.cache_write_tokens
    assert user_tokens is not None and user_tokens > 200
    # Checklist 68: same N, same uncached count on both surfaces.
    assert usage.prompt_tokens == written.input_tokens + system_tokens
    assert reread.usage.cache_read_input_tokens == system_tokens + user_tokens
    assert reread.usage.cache_creation_input_tokens == 0
    # Same tokens in, same greedy tokens out, whichever surface asked.
    text = "".join(block.text for block in reread.content if block.type == "text")
    assert read.choices[0].message.content == text
