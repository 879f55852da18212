"""Claude Code's attribution block through the real service (spec §3.11): a new question with a
new ``cc_version`` hex reads what the previous one wrote, and the block costs no input tokens."""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config, words

HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "prompt-caching-scope-2026-01-05",
}
STATIC = words(1500, 7)


def claude_code_body(hex3: str, question: str) -> dict[str, Any]:
    billing = f"x-anthropic-billing-header: cc_version=2.1.197.{hex3}; cc_entrypoint=sdk-cli;"
    return {
        "model": "claude-sonnet-5",
        "max_tokens": 4,
        "system": [
            {"type": "text", "text": billing},
            {
                "type": "text",
                "text": STATIC,
                "cache_control": {"type": "ephemeral", "scope": "global"},
            },
        ],
        "messages": [{"role": "user", "content": question}],
    }


def test_new_question_reads_the_system_prompt_the_last_one_wrote() -> None:
    with TestClient(build_app(Service(FakeEngine(), make_config()))) as client:
        usages = [
            client.post("/v1/messages", json=claude_code_body(hex3, q), headers=HEADERS).json()[
                "usage"
            ]
            for hex3, q in (("a1f", "What is 2+2?"), ("07c", "Name a colour."))
        ]
        counted = client.post(
            "/v1/messages/count_tokens",
            json=claude_code_body("fff", "What is 2+2?"),
            headers=HEADERS,
        ).json()
    first, second = usages
    written = first["cache_creation_input_tokens"]
    assert written > 1024 and first["cache_read_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == written
    assert second["cache_creation_input_tokens"] == 0
    # The attribution line is in neither the prefix nor the uncached tail.
    assert counted["input_tokens"] == written + first["input_tokens"]
