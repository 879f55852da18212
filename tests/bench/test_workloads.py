"""Workload generators: deterministic from the seed, sized as asked, breakpoints in place."""

from __future__ import annotations

import itertools

import pytest

from promptcache.bench import corpus, workloads
from promptcache.bench.workloads import Text, ToolResult, ToolUse, Workload


def markers(req: workloads.BenchRequest) -> list[str]:
    """Where a request's breakpoints are: 'tools', 'system', 'messages.i'."""
    found = []
    if any(t.cache for t in req.tools):
        found.append("tools")
    if any(s.cache for s in req.system):
        found.append("system")
    for i, m in enumerate(req.messages):
        if any(not isinstance(p, ToolUse) and p.cache for p in m.parts):
            found.append(f"messages.{i}")
    return found


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_same_seed_same_workload_other_seed_other_text(name: str) -> None:
    a, b, c = workloads.build(name, 1), workloads.build(name, 1), workloads.build(name, 2)
    assert a == b
    assert [r.label for r in a.requests] == [r.label for r in c.requests]
    first_a, first_c = a.requests[0], c.requests[0]
    assert (first_a.system, first_a.messages) != (first_c.system, first_c.messages)
    assert [r.index for r in a.requests] == list(range(len(a.requests)))


def test_qa_sizes_and_interleaving() -> None:
    w = workloads.qa(0, documents=4, questions=3, clients=2)
    assert len(w.requests) == 12
    assert [r.label for r in w.requests[:5]] == [
        "doc0/q0",
        "doc1/q0",
        "doc2/q0",
        "doc3/q0",
        "doc0/q1",
    ]
    assert [r.session for r in w.requests[:3]] == ["client0", "client1", "client0"]
    docs = {r.system[0].text for r in w.requests}
    assert len(docs) == 4
    for text in docs:
        assert 2500 <= corpus.estimate_tokens(text) <= 2700
    # Each document is new once, then repeated.
    assert [r.repeat for r in w.requests] == [False] * 4 + [True] * 8
    assert all(markers(r) == ["system"] for r in w.requests)
    assert w.params["doc_tokens"] == 2500


def test_qa_rolling_arrival_asks_about_earlier_documents_while_new_ones_arrive() -> None:
    w = workloads.qa(0, documents=3, questions=3, clients=3, arrival="rolling")
    assert [r.label for r in w.requests] == [
        "doc0/q0",
        "doc0/q1",
        "doc1/q0",
        "doc0/q2",
        "doc1/q1",
        "doc2/q0",
        "doc1/q2",
        "doc2/q1",
        "doc2/q2",
    ]
    # The same requests as in rounds, in another order; a document's first question is its miss.
    rounds = workloads.qa(0, documents=3, questions=3, clients=3)
    assert {r.label: r.messages for r in w.requests} == {
        r.label: r.messages for r in rounds.requests
    }
    assert [r.repeat for r in w.requests] == [not r.label.endswith("q0") for r in w.requests]
    assert w.params["arrival"] == "rolling" and rounds.params["arrival"] == "rounds"
    with pytest.raises(ValueError, match="arrival"):
        workloads.qa(0, arrival="random")  # type: ignore[arg-type]


def test_decode_is_short_prompts_and_long_answers() -> None:
    w = workloads.decode(0)
    assert len(w.requests) == 8 and w.params["clients"] == 8
    assert len({r.session for r in w.requests}) == 8
    assert all(r.max_tokens == 256 and len(r.system) == 1 and not r.tools for r in w.requests)
    assert all(workloads.estimated_tokens(r) < 100 for r in w.requests)
    # Distinct prompts, none marked, none a repeat of an earlier prefix: caching plays no part.
    assert len({r.messages for r in w.requests}) == 8
    assert not any(r.repeat or markers(r) for r in w.requests)
    more = workloads.decode(0, clients=3, rounds=4, max_tokens=64)
    assert [r.label for r in more.requests[:4]] == [
        "client0/r0",
        "client1/r0",
        "client2/r0",
        "client0/r1",
    ]
    assert len({r.messages for r in more.requests}) == 12
    assert {r.max_tokens for r in more.requests} == {64}


def test_qa_scales() -> None:
    w = workloads.qa(0, documents=1, questions=1, scale=4)
    assert 10_000 <= corpus.estimate_tokens(w.requests[0].system[0].text) <= 10_300
    assert workloads.qa(0, documents=5, questions=7).requests[-1].label == "doc4/q6"


def test_agent_transcript_grows_and_the_breakpoint_moves() -> None:
    w = workloads.agent(0, tasks=2, calls=5)
    assert len(w.requests) == 10
    assert [r.label for r in w.requests[:3]] == ["task0/call0", "task1/call0", "task0/call1"]
    task0 = [r for r in w.requests if r.session == "task0"]
    assert [len(r.messages) for r in task0] == [1, 3, 5, 7, 9]
    for earlier, later in itertools.pairwise(task0):
        # Same tools and system, and the earlier transcript is a prefix (markers aside).
        assert later.tools == earlier.tools and later.system == earlier.system
        assert strip(later.messages[: len(earlier.messages)]) == strip(earlier.messages)
    for r in w.requests:
        assert markers(r) == ["tools", "system", f"messages.{len(r.messages) - 1}"]
    call = task0[1].messages
    assert isinstance(call[1].parts[1], ToolUse) and isinstance(call[2].parts[0], ToolResult)
    assert call[2].parts[0].tool_use_id == call[1].parts[1].id
    assert len(w.requests[0].tools) == 8
    assert [r.repeat for r in w.requests] == [False] + [True] * 9


def strip(messages: tuple[workloads.Message, ...]) -> tuple[workloads.Message, ...]:
    """``messages`` without breakpoints."""
    one = Workload("x", {}, (workloads.BenchRequest(0, "s", "l", (), messages),))
    return workloads.cold(one).requests[0].messages


def test_chat_moves_its_breakpoint_to_the_latest_turn() -> None:
    w = workloads.chat(0, conversations=3, turns=4)
    assert len(w.requests) == 12
    chat0 = [r for r in w.requests if r.session == "chat0"]
    assert [len(r.messages) for r in chat0] == [1, 3, 5, 7]
    for r in chat0:
        assert markers(r) == ["system", f"messages.{len(r.messages) - 1}"]
        assert r.messages[-1].role == "user"
    assert 2000 <= corpus.estimate_tokens(chat0[0].system[0].text) <= 2200
    assert sum(not r.repeat for r in w.requests) == 3


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_cold_control_has_the_same_prompts_without_markers(name: str) -> None:
    w = workloads.build(name, 0)
    c = workloads.cold(w)
    assert c.cold and not w.cold
    assert len(c.requests) == len(w.requests)
    for warm, cold in zip(w.requests, c.requests, strict=True):
        assert markers(cold) == [] and not cold.caching
        assert [s.text for s in cold.system] == [s.text for s in warm.system]
        texts = [[p.text for p in m.parts if isinstance(p, Text)] for m in warm.messages]
        assert [[p.text for p in m.parts if isinstance(p, Text)] for m in cold.messages] == texts


def test_estimates_and_unknown_names() -> None:
    assert corpus.estimate_tokens("Section 12.4, page 7") == 8  # 2 words x1.1, 5 digits, 2 marks
    assert workloads.estimated_tokens(workloads.qa(0, documents=1, questions=1).requests[0]) > 2500
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.build("nope")
