"""Checklist 67 and 68 with the official SDKs: an entry written through one surface is read
through the other (same tenant, same model), and both report the same uncached input."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from promptcache.engine.hf.testing import build_tiny_engine
from tests.conftest import words
from tests.e2e.conftest import BedrockConnect
from tests.e2e.test_bedrock_boto3 import (
    ACCESS_KEY,
    API_KEY,
    DOCUMENT,
    MESSAGES,
    MODEL_ID,
    SECRET_KEY,
    SYSTEM,
    Factory,
    start,
)

pytestmark = pytest.mark.e2e

QUESTION = MESSAGES[0]["content"][0]["text"]
SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
TOOL_DESCRIPTION = "Search the archive. " + words(300, 5)


def test_anthropic_write_is_read_by_converse(
    live_server_factory: Factory, bedrock_connect: BedrockConnect
) -> None:
    server = start(live_server_factory, build_tiny_engine("gemma3"))
    with anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0) as claude:
        written = claude.messages.create(
            model="claude-sonnet-5",
            max_tokens=8,
            extra_body={"temperature": 0.0},
            system=[
                {"type": "text", "text": "You are a helpful assistant"},
                {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}},
            ],
            messages=[{"role": "user", "content": QUESTION}],
        )
    read = bedrock_connect(server, ACCESS_KEY, SECRET_KEY).converse(
        modelId=MODEL_ID,
        system=SYSTEM,
        messages=MESSAGES,
        inferenceConfig={"maxTokens": 8, "temperature": 0.0},
    )
    assert written.usage.cache_creation_input_tokens > 0
    assert read["usage"]["cacheReadInputTokens"] == written.usage.cache_creation_input_tokens
    assert read["usage"]["cacheWriteInputTokens"] == 0
    assert read["usage"]["inputTokens"] == written.usage.input_tokens  # checklist 68
    # Same prompt tokens, greedy: the same reply through either surface.
    texts = [block.text for block in written.content if block.type == "text"]
    assert [c["text"] for c in read["output"]["message"]["content"]] == texts


def test_converse_tool_and_system_write_is_read_by_anthropic(
    live_server_factory: Factory, bedrock_connect: BedrockConnect
) -> None:
    server = start(live_server_factory, build_tiny_engine("gemma3"))
    tool_spec: dict[str, Any] = {
        "name": "search",
        "description": TOOL_DESCRIPTION,
        "inputSchema": {"json": SCHEMA},
    }
    written = bedrock_connect(server, ACCESS_KEY, SECRET_KEY).converse(
        modelId=MODEL_ID,
        toolConfig={"tools": [{"toolSpec": tool_spec}, {"cachePoint": {"type": "default"}}]},
        system=SYSTEM,
        messages=MESSAGES,
        inferenceConfig={"maxTokens": 4},
    )
    with anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0) as claude:
        read = claude.messages.create(
            model="claude-sonnet-5",
            max_tokens=4,
            tools=[
                {
                    "name": "search",
                    "description": TOOL_DESCRIPTION,
                    "input_schema": SCHEMA,
                    "cache_control": {"type": "ephemeral"},
                }
            ],
            system=[
                {"type": "text", "text": "You are a helpful assistant"},
                {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}},
            ],
            messages=[{"role": "user", "content": QUESTION}],
        )
    usage = written["usage"]
    assert usage["cacheWriteInputTokens"] > 0
    assert read.usage.cache_read_input_tokens == usage["cacheWriteInputTokens"]
    assert read.usage.cache_creation_input_tokens == 0
    assert read.usage.input_tokens == usage["inputTokens"]
