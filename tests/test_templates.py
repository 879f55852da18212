"""Prompt template files (``promptcache/templates.py``) and their routes on the fake engine."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.config import ApiConfig
from promptcache.engine.fake import FakeEngine
from promptcache.errors import NotFound
from promptcache.service import Service
from promptcache.templates import BadTemplate, MissingVariable, TemplateStore
from tests.conftest import make_config, words

ARN = "arn:aws:bedrock:us-east-1:123456789012:prompt/"


def write(directory: Path, name: str, data: Any) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def body(*messages: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


def test_the_automatic_breakpoint_closes_the_static_part(tmp_path: Path) -> None:
    write(
        tmp_path,
        "t.json",
        body(
            {
                "role": "system",
                "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            },
            {"role": "user", "content": "{{q}}"},
            {"role": "assistant", "content": "static, but after a variable"},
        ),
    )
    rendered = TemplateStore(tmp_path).get("t", "", is_open=True).render({"q": "why"})
    system, user, assistant = rendered["messages"]
    assert system["content"][1] == {
        "type": "text",
        "text": "B",
        "cache_control": {"type": "ephemeral"},
    }
    assert "cache_control" not in system["content"][0] and "cache_control" not in assistant
    assert user == {"role": "user", "content": "why"}


def test_breakpoint_on_tools_last_block_or_none(tmp_path: Path) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    write(tmp_path, "tools.json", body({"role": "user", "content": "{{q}}"}, tools=[tool]))
    write(
        tmp_path,
        "static.json",
        body({"role": "user", "content": "a"}, {"role": "user", "content": "b"}),
    )
    write(tmp_path, "off.json", body({"role": "user", "content": "a"}, auto_cache=False))
    marked = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    write(
        tmp_path,
        "own.json",
        body({"role": "system", "content": [marked]}, {"role": "user", "content": "static"}),
    )
    store = TemplateStore(tmp_path)
    assert store.get("tools", "", is_open=True).render({"q": 1})["tools"][0]["cache_control"]
    static = store.get("static", "", is_open=True).render({})["messages"]
    assert "cache_control" not in static[0] and static[1]["cache_control"]
    assert "cache_control" not in store.get("off", "", is_open=True).render({})["messages"][0]
    own = store.get("own", "", is_open=True).render({})["messages"]
    assert own[0]["content"][0]["cache_control"]["ttl"] == "1h" and "cache_control" not in own[1]


def test_variables_defaults_and_missing(tmp_path: Path) -> None:
    write(
        tmp_path,
        "t.json",
        body({"role": "user", "content": "{{ a }} {{{b}}} {{c}} {{a}}"}, variables={"c": "C"}),
    )
    template = TemplateStore(tmp_path).get("t", "", is_open=True)
    assert template.variables == ["a", "b", "c"]
    rendered = template.render({"a": 1, "b": {"k": True}})
    assert rendered["messages"][0]["content"] == '1 {"k": true} C 1'
    with pytest.raises(MissingVariable, match="needs variable\\(s\\) b"):
        template.render({"a": "x"})


def test_versions_by_field_and_file_name(tmp_path: Path) -> None:
    write(tmp_path, "s.json", body({"role": "user", "content": "v3"}, version=3))
    write(tmp_path, "s@2.json", body({"role": "user", "content": "v2"}))
    write(tmp_path, "s@1.json", body({"role": "user", "content": "v1"}))
    store = TemplateStore(tmp_path)

    def content(reference: str) -> str:
        return str(store.get(reference, "", is_open=True).render({})["messages"][0]["content"])

    assert [content(r) for r in ("s", "s@latest", "s@2", "s@1")] == ["v3", "v3", "v2", "v1"]
    with pytest.raises(NotFound):
        store.get("s@9", "", is_open=True)
    write(tmp_path, "s@3.json", body({"role": "user", "content": "again"}))
    with pytest.raises(BadTemplate, match="defined twice"):
        store.get("s", "", is_open=True)


def test_bad_files_and_reload(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    cases = {
        "a.json": "[1]",
        "b.json": json.dumps({"messages": []}),
        "c.json": json.dumps(body({"role": "user", "content": "{{#each}}x{{/each}}"})),
        "d.json": json.dumps(body({"role": "user", "content": "x"}, version="2")),
        "e.yaml": "messages: [unclosed",
    }
    for name, text in cases.items():
        write(tmp_path, name, text)
        with pytest.raises(BadTemplate, match=f"file {name} is invalid"):
            store.get(Path(name).stem, "", is_open=True)
    write(tmp_path, "e.yaml", "messages:\n  - role: user\n    content: 'hi {{who}}'\n")
    assert store.get("e", "", is_open=True).render({"who": "yaml"})["messages"][0]["content"] == (
        "hi yaml"
    )
    (tmp_path / "e.yaml").unlink()
    with pytest.raises(NotFound):
        store.get("e", "", is_open=True)


def test_tenants(tmp_path: Path) -> None:
    write(tmp_path, "shared.json", body({"role": "user", "content": "s"}))
    write(tmp_path, "named.json", body({"role": "user", "content": "n"}, tenants=["team-a"]))
    write(tmp_path, "team-b/mine.json", body({"role": "user", "content": "m"}))
    store = TemplateStore(tmp_path)
    assert store.get("shared", "team-b", is_open=False).id == "shared"
    assert store.get("named", "team-a", is_open=False).id == "named"
    assert store.get("mine", "team-b", is_open=False).id == "mine"
    for reference, tenant in (("named", "team-b"), ("mine", "team-a")):
        with pytest.raises(NotFound):
            store.get(reference, tenant, is_open=False)
    assert store.get("mine", "anyone", is_open=True).id == "mine"  # an open server: one tenant


@pytest.fixture
def client(tmp_path: Path) -> Any:
    write(
        tmp_path,
        "doc.json",
        body(
            {"role": "system", "content": words(1500)},
            {"role": "user", "content": "{{q}}"},
            model="amazon.nova-pro-v1:0",
            max_tokens=3,
        ),
    )
    config = make_config(profile="auto")
    config = replace(config, api=replace(ApiConfig(), prompts_dir=tmp_path))
    with TestClient(build_app(Service(FakeEngine(), config))) as client:
        yield client


def test_completions_route(client: TestClient) -> None:
    first = client.post("/v1/prompts/doc/completions", json={"variables": {"q": "a"}})
    second = client.post(
        "/v1/prompts/doc/completions", json={"variables": {"q": "b"}, "max_tokens": 1}
    )
    assert first.status_code == 200, first.text
    assert first.json()["model"] == "amazon.nova-pro-v1:0"
    written = first.json()["usage"]["prompt_tokens_details"]["cache_write_tokens"]
    assert written > 1500
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == written
    assert second.json()["usage"]["completion_tokens"] == 1
    missing = client.post("/v1/prompts/doc/completions", json={})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "missing_variable"
    unknown = client.post("/v1/prompts/nope/render", json={"variables": []})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "prompt_not_found"


def test_converse_on_a_prompt_arn(client: TestClient) -> None:
    variables = {"q": {"text": "a"}}
    first = client.post(f"/model/{ARN}doc/converse", json={"promptVariables": variables})
    assert first.status_code == 200, first.text
    written = first.json()["usage"]["cacheWriteInputTokens"]
    more = {
        "promptVariables": {"q": {"text": "b"}},
        "messages": [
            {"role": "assistant", "content": [{"text": "ok"}]},
            {"role": "user", "content": [{"text": "and?"}]},
        ],
    }
    second = client.post(f"/model/{ARN}doc:1/converse", json=more)
    assert second.json()["usage"]["cacheReadInputTokens"] == written
    assert second.json()["usage"]["inputTokens"] > first.json()["usage"]["inputTokens"]
    rejected = client.post(
        f"/model/{ARN}doc/converse", json={"promptVariables": variables, "system": [{"text": "x"}]}
    )
    assert rejected.status_code == 400
    assert "system cannot be given" in rejected.json()["message"]
    bad = client.post(f"/model/{ARN}doc/converse", json={"promptVariables": {"q": "a"}})
    assert bad.status_code == 400 and "promptVariables.q" in bad.json()["message"]
