"""Prompt templates (``--prompts-dir``) through the portkey-ai SDK's ``prompts`` API and boto3's
Converse with a prompt ARN, against a live server on a tiny real model, so cached tokens are
restored KV.

The SDK posts ``prompts.completions.create`` to ``<base_url>/prompts/{id}/completions`` and
``prompts.render`` to ``<base_url>/prompts/{id}/render``; with ``base_url=<server>/v1`` those are
promptcache's routes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from portkey_ai import Portkey

from promptcache.config import ApiConfig, AwsCredential
from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import make_config, words
from tests.e2e.conftest import BedrockConnect, LiveServer

pytestmark = pytest.mark.e2e

Factory = Callable[[Service], LiveServer]
ACCESS_KEY = "AKIAPROMPTCACHETEST"
SECRET_KEY = "c2VjcmV0LWZvci10aGUtdGVzdHM/+example"
DOCUMENT = "You answer questions about this contract. " + words(1200, 13)
TEMPLATE = {
    "version": 2,
    "messages": [
        {"role": "system", "content": DOCUMENT},
        {"role": "user", "content": "Question from {{name}}: {{question}}"},
    ],
    "max_tokens": 4,
    "temperature": 0,
}
PROMPT_ARN = "arn:aws:bedrock:us-east-1:123456789012:prompt/support"


@pytest.fixture
def prompts_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "prompts"
    directory.mkdir()
    (directory / "support.json").write_text(json.dumps(TEMPLATE))
    (directory / "support@1.json").write_text(
        json.dumps({"messages": [{"role": "user", "content": "v1"}]})
    )
    (directory / "other-team.json").write_text(json.dumps({**TEMPLATE, "tenants": ["team-b"]}))
    return directory


@pytest.fixture
def server(live_server_factory: Factory, prompts_dir: Path) -> LiveServer:
    api = replace(
        ApiConfig(),
        api_keys={"pk-team-a": "team-a", "pk-team-b": "team-b"},
        aws_credentials={ACCESS_KEY: AwsCredential(SECRET_KEY, "team-a")},
        prompts_dir=prompts_dir,
    )
    service = Service(build_tiny_engine("gemma3"), replace(make_config(), api=api))
    return live_server_factory(service)


@pytest.fixture
def portkey(server: LiveServer) -> Iterator[Portkey]:
    client = Portkey(api_key="pk-team-a", base_url=f"{server.base_url}/v1")
    yield client
    client.openai_client.close()  # Portkey.close() leaves its inner openai client open
    client.close()


def details(reply: Any) -> Any:
    assert reply.usage is not None
    return reply.usage.prompt_tokens_details


def test_completions_cache_the_static_part_and_converse_reads_it(
    server: LiveServer, portkey: Portkey, bedrock_connect: BedrockConnect
) -> None:
    first = portkey.prompts.completions.create(
        prompt_id="support", variables={"name": "Ann", "question": "Who are the parties?"}
    )
    second = portkey.prompts.completions.create(
        prompt_id="support",
        variables={"name": "Bob", "question": "When does it end?"},
        max_tokens=2,  # a hyperparameter override from the body
    )
    written = details(first).cache_write_tokens
    assert details(first).cached_tokens == 0 and written > 1024
    # The second call's variables differ: it reads the template's fixed part and writes nothing.
    assert details(second).cached_tokens == written
    assert details(second).cache_write_tokens == 0
    assert second.usage is not None and second.usage.completion_tokens <= 2
    assert first.choices is not None and first.choices[0].message is not None

    client = bedrock_connect(server, ACCESS_KEY, SECRET_KEY)
    reply = client.converse(
        modelId=PROMPT_ARN,
        promptVariables={"name": {"text": "Cy"}, "question": {"text": "Is there a fee?"}},
    )
    usage = reply["usage"]
    assert usage["cacheReadInputTokens"] == written and usage["cacheWriteInputTokens"] == 0
    streamed = client.converse_stream(
        modelId=f"{PROMPT_ARN}:2",
        promptVariables={"name": {"text": "Di"}, "question": {"text": "Any penalty?"}},
    )
    events = list(streamed["stream"])
    assert events[-1]["metadata"]["usage"]["cacheReadInputTokens"] == written
    with pytest.raises(ClientError) as missing:
        client.converse(modelId=PROMPT_ARN, promptVariables={"name": {"text": "Cy"}})
    assert missing.value.response["Error"]["Code"] == "ValidationException"
    assert "question" in missing.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as unknown:
        client.converse(modelId="arn:aws:bedrock:us-east-1:123456789012:prompt/nope")
    assert unknown.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_streaming_completion(portkey: Portkey) -> None:
    plain = portkey.prompts.completions.create(
        prompt_id="support", variables={"name": "Ann", "question": "Who?"}
    )
    chunks = list(
        portkey.prompts.completions.create(
            prompt_id="support", variables={"name": "Ann", "question": "Who?"}, stream=True
        )
    )
    assert chunks
    text = "".join(
        choice.delta.content or ""
        for chunk in chunks
        for choice in (chunk.choices or [])
        if getattr(choice, "delta", None) is not None
    )
    assert plain.choices is not None and plain.choices[0].message is not None
    assert text == (plain.choices[0].message.content or "")


def test_render_and_versions(portkey: Portkey) -> None:
    rendered = portkey.prompts.render(
        prompt_id="support", variables={"name": "Ann", "question": "Who?"}, temperature=0.5
    )
    data = rendered.data
    assert rendered.success is True
    assert data.messages is not None
    system, user = data.messages
    assert user.content == "Question from Ann: Who?"
    # The automatic breakpoint closes the static part, the system message here.
    assert (system.model_extra or {}).get("cache_control") == {"type": "ephemeral"}
    assert data.temperature == 0.5 and data.max_tokens == 4
    old = portkey.prompts.render(prompt_id="support@1", variables={})
    assert old.data.messages is not None and old.data.messages[0].content == "v1"


def test_client_errors(portkey: Portkey, prompts_dir: Path) -> None:
    with pytest.raises(Exception, match="question") as missing:
        portkey.prompts.completions.create(prompt_id="support", variables={"name": "Ann"})
    assert type(missing.value).__name__ == "BadRequestError"
    for unknown in ("nope", "other-team", "support@7"):  # other-team belongs to team-b
        with pytest.raises(Exception, match="not found") as absent:
            portkey.prompts.render(prompt_id=unknown, variables={})
        assert type(absent.value).__name__ == "NotFoundError"
    (prompts_dir / "broken.json").write_text("{not json")
    with pytest.raises(Exception, match=r"broken\.json is invalid") as bad:
        portkey.prompts.render(prompt_id="broken", variables={})
    assert type(bad.value).__name__ == "UnprocessableEntityError"
    # Files are read again when they change.
    (prompts_dir / "broken.json").write_text(
        json.dumps({"messages": [{"role": "user", "content": "fixed {{x}}"}]})
    )
    fixed = portkey.prompts.render(prompt_id="broken", variables={"x": 1})
    assert fixed.data.messages is not None and fixed.data.messages[0].content == "fixed 1"
