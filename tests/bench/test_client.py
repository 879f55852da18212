"""The client: stream parsing for both protocols (recorded streams), and whole workloads against
promptcache on the fake engine over loopback HTTP, cached and cold, on both protocols."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from promptcache.api.server import BackgroundServer
from promptcache.bench import client, report, wire, workloads
from promptcache.bench.prices import DEFAULT
from tests.conftest import make_service


def sse(*events: dict[str, Any], named: bool = True, done: bool = False) -> bytes:
    lines = []
    for e in events:
        if named:
            lines.append(f"event: {e['type']}")
        lines.append(f"data: {json.dumps(e)}\n")
    if done:
        lines.append("data: [DONE]\n")
    return ("\n".join(lines) + "\n").encode()


ANTHROPIC_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 12,
                "cache_read_input_tokens": 2000,
                "cache_creation_input_tokens": 300,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 0,
                    "ephemeral_1h_input_tokens": 300,
                },
                "output_tokens": 1,
            }
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens"},
        "usage": {"output_tokens": 5},
    },
    {"type": "message_stop"},
)


def openai_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"type": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def one_request(protocol: wire.Protocol, body: bytes, status: int = 200) -> client.RequestRecord:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(status, content=body)

    async def go() -> client.RequestRecord:
        async with httpx.AsyncClient(
            base_url="http://test", transport=httpx.MockTransport(handler)
        ) as http:
            req = workloads.qa(0, documents=1, questions=1).requests[0]
            return await client.send(http, client.Target("http://test", protocol), req, "m", 0.0)

    record = asyncio.run(go())
    assert seen and seen[0]["stream"] is True
    return record


def test_anthropic_stream_usage_and_first_token() -> None:
    r = one_request("anthropic", ANTHROPIC_STREAM)
    assert r.error is None and r.text == "Hello"
    assert r.ttft_s is not None and 0 <= r.ttft_s <= r.total_s
    assert (r.prompt_tokens, r.cache_read_tokens, r.cache_write_tokens) == (2312, 2000, 300)
    assert (r.cache_write_1h_tokens, r.output_tokens) == (300, 5)


def test_openai_stream_with_cache_details() -> None:
    usage = {
        "prompt_tokens": 2312,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 2000, "cache_write_tokens": 300},
    }
    body = sse(
        openai_chunk({"role": "assistant"}),
        openai_chunk({"content": "Hi"}),
        openai_chunk({}, "length"),
        {"type": "x", "choices": [], "usage": usage},
        named=False,
        done=True,
    )
    r = one_request("openai", body)
    assert r.error is None and r.text == "Hi" and r.ttft_s is not None
    assert (r.prompt_tokens, r.cache_read_tokens, r.cache_write_tokens) == (2312, 2000, 300)
    assert (r.cache_write_1h_tokens, r.output_tokens) == (None, 4)


def test_openai_stream_from_a_server_without_cache_fields() -> None:
    body = sse(
        openai_chunk({"content": "Hi"}),
        {"type": "x", "choices": [], "usage": {"prompt_tokens": 900, "completion_tokens": 3}},
        named=False,
        done=True,
    )
    r = one_request("openai", body)
    assert (r.prompt_tokens, r.cache_read_tokens, r.cache_write_tokens) == (900, None, None)
    cached, uncached = report.request_costs(r, DEFAULT)
    assert cached is None and uncached is not None
    silent = one_request("openai", sse(openai_chunk({"content": "Hi"}), named=False, done=True))
    assert silent.prompt_tokens is None and silent.ttft_s is not None


def test_errors_are_recorded_not_raised() -> None:
    r = one_request("anthropic", b'{"type":"error"}', status=529)
    assert r.error is not None and r.error.startswith("HTTP 529") and r.ttft_s is None
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    r = one_request("anthropic", sse(overloaded))
    assert r.error == "Overloaded" and r.ttft_s is None


def test_bodies_carry_markers_on_both_protocols() -> None:
    req = workloads.agent(0, tasks=1, calls=2).requests[1]
    a = wire.anthropic_body(req, "m")
    assert a["tools"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}
    assert a["system"][0]["cache_control"]["type"] == "ephemeral"
    assert a["messages"][1]["content"][1]["type"] == "tool_use"
    assert a["messages"][-1]["content"][0]["type"] == "tool_result"
    assert "cache_control" in a["messages"][-1]["content"][0]
    o = wire.openai_body(req, "m")
    assert o["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in o["messages"]] == ["system", "user", "assistant", "tool"]
    assert isinstance(o["messages"][0]["content"], str) and "cache_control" in o["messages"][0]
    assert (
        o["messages"][2]["tool_calls"][0]["function"]["name"]
        == a["messages"][1]["content"][1]["name"]
    )
    assert "cache_control" in o["messages"][-1] and "cache_control" in o["tools"][-1]
    assert "prompt_cache_options" not in o
    cold = workloads.cold(workloads.Workload("agent", {}, (req,))).requests[0]
    assert "cache_control" not in json.dumps(wire.anthropic_body(cold, "m"))
    o_cold = wire.openai_body(cold, "m")
    assert "cache_control" not in json.dumps(o_cold)
    assert o_cold["prompt_cache_options"] == {"mode": "explicit"}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    server = BackgroundServer(make_service()).start(timeout_s=60)
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.mark.parametrize("protocol", wire.PROTOCOLS)
def test_whole_workload_against_promptcache(fake_server: str, protocol: wire.Protocol) -> None:
    # A seed per protocol, so the module's shared server has no entries from the other test.
    seed = 11 if protocol == "anthropic" else 12
    w = workloads.qa(seed, documents=2, questions=3, doc_tokens=500)
    target = client.Target(fake_server, protocol)
    done: list[str] = []
    records = client.run(w, target, concurrency=2, on_done=lambda r: done.append(r.label))
    assert sorted(done) == sorted(r.label for r in w.requests)
    assert all(r.error is None for r in records), [r.error for r in records]
    by_label = {r.label: r for r in records}
    for req in w.requests:
        r = by_label[req.label]
        assert r.ttft_s is not None and r.prompt_tokens and r.output_tokens
        # The first question of each document writes it; later ones read it.
        assert bool(r.cache_read_tokens) == req.repeat
        if not req.repeat:
            assert r.cache_write_tokens and r.cache_write_tokens >= 1024
        elif protocol == "anthropic":
            assert r.cache_write_tokens == 0
        else:  # OpenAI's implicit breakpoint also writes the short question (spec §4.2)
            assert r.cache_write_tokens is not None and r.cache_write_tokens < 100
    run = report.Run("promptcache", fake_server, protocol, False, records)
    s = report.summarize(run, DEFAULT)
    # A hit may be joined (sent while its document's first question was still before its first
    # token, which depends on timing): the hits and joined hits together are the 4 repeats.
    assert (s.split_basis, s.hit.n + s.joined.n, s.miss.n) == ("usage", 4, 2)
    assert all(r.prefix for r in records) and len({r.prefix for r in records}) == 2
    assert s.saving is not None and s.saving > 0
    cold = client.run(workloads.cold(w), target)
    assert all(r.cache_read_tokens == 0 and r.cache_write_tokens == 0 for r in cold)
    assert [r.error for r in cold] == [None] * 6


def test_sessions_never_overlap_under_concurrency(fake_server: str) -> None:
    w = workloads.chat(13, conversations=2, turns=3, doc_tokens=400)
    records = client.run(w, client.Target(fake_server), concurrency=4)
    for session in ("chat0", "chat1"):
        mine = sorted((r for r in records if r.session == session), key=lambda r: r.start_s)
        assert [r.label for r in mine] == [f"{session}/turn{t}" for t in range(3)]
        for a, b in itertools.pairwise(mine):
            assert b.start_s >= a.start_s + a.total_s
    # The moving breakpoint: every later turn reads what the turn before wrote.
    later = [r for r in records if not r.label.endswith("turn0")]
    assert all(r.cache_read_tokens and r.cache_write_tokens for r in later)


@pytest.mark.parametrize("protocol", wire.PROTOCOLS)
def test_agent_loop_reads_tools_system_and_the_previous_call(
    fake_server: str, protocol: wire.Protocol
) -> None:
    seed = 14 if protocol == "anthropic" else 15
    w = workloads.agent(seed, tasks=2, calls=3, tools=3, system_tokens=150, result_tokens=40)
    records = client.run(w, client.Target(fake_server, protocol))
    assert [r.error for r in records] == [None] * 6
    by_label = {r.label: r for r in records}
    assert by_label["task0/call0"].cache_read_tokens == 0
    # The second task reuses the tools and system prompt; later calls also read the transcript.
    second = by_label["task1/call0"]
    assert second.cache_read_tokens and second.cache_write_tokens
    for t in range(2):
        reads = [by_label[f"task{t}/call{c}"].cache_read_tokens or 0 for c in range(3)]
        assert reads[1] > reads[0] and reads[2] > reads[1]


def test_interleaved_runs_take_turns_and_keep_their_own_clocks(fake_server: str) -> None:
    w = workloads.qa(16, documents=2, questions=2, doc_tokens=500)
    target = client.Target(fake_server)
    order: list[tuple[int, str]] = []
    cached, cold = client.run_interleaved(
        [(w, target), (workloads.cold(w), target)],
        on_done=lambda k, r: order.append((k, r.label)),
    )
    labels = [r.label for r in w.requests]
    assert order == [(k, label) for label in labels for k in (0, 1)]
    for records in (cached, cold):
        assert [r.label for r in records] == labels
        assert records[0].start_s == 0.0
        for a, b in itertools.pairwise(records):
            assert b.start_s == a.start_s + a.total_s
    # The cold control shares the server without reading or writing the cached run's entries.
    assert [bool(r.cache_read_tokens) for r in cached] == [r.repeat for r in w.requests]
    assert all(r.cache_read_tokens == 0 and r.cache_write_tokens == 0 for r in cold)
