"""The benchmark's traffic: protocol-neutral requests, generated deterministically from a seed.

Three shapes that prompt caching is bought for, one for the answer side, plus a control:

- ``qa``: multi-document Q&A (RAG, legal review). D contracts of ~2.5k tokens each sit in the
  system prompt with a breakpoint; Q questions per document arrive interleaved across documents
  and clients, so each document is written once and read Q-1 times. ``arrival="rolling"``:
  documents arrive one after another while the earlier ones are still asked about, so with
  requests in flight together a new document's miss runs beside other documents' hits.
- ``agent``: an agent loop. A fixed tool list and system prompt (both marked), then 5-20 calls per
  task whose transcript grows by a tool call and its result each time; the breakpoint on the
  latest message moves forward, so each call reads what the previous one wrote.
- ``chat``: multi-turn chat about a document. The document is marked in the system prompt and a
  second breakpoint moves to the latest user turn.
- ``decode``: long answers to short prompts, one session per client: what a reader of a streamed
  answer waits for once the first token is there (run with as many requests in flight as clients).
- ``cold(w)``: the same prompts with every marker removed and caching switched off.

Assistant turns inside transcripts are scripted rather than taken from the model's replies, so
every server sees byte-identical prompts and runs compare like with like.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from promptcache.bench import corpus

Ttl = Literal["5m", "1h"]
Arrival = Literal["rounds", "rolling"]
ARRIVALS: tuple[Arrival, ...] = get_args(Arrival)
WORKLOADS = ("qa", "agent", "chat", "decode")


@dataclass(frozen=True)
class Text:
    """A text block; ``cache`` puts a breakpoint (with that TTL) at its end."""

    text: str
    cache: Ttl | None = None


@dataclass(frozen=True)
class ToolUse:
    """An assistant's call of a tool."""

    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    """The result of a tool call, sent back in a user turn."""

    tool_use_id: str
    text: str
    cache: Ttl | None = None


Part = Text | ToolUse | ToolResult


@dataclass(frozen=True)
class Message:
    """One turn."""

    role: Literal["user", "assistant"]
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Tool:
    """A tool definition; ``cache`` marks the end of the tool list when set on the last one."""

    name: str
    description: str
    schema: dict[str, Any]
    cache: Ttl | None = None


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    ``session`` orders requests: those of one session (a client, an agent task, a conversation)
    run one after another, never concurrently. ``repeat`` says the request's stable prefix (tools
    and system prompt) was sent earlier in the workload, i.e. an ideal cache would hit.
    """

    index: int
    session: str
    label: str
    system: tuple[Text, ...]
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    max_tokens: int = 16
    repeat: bool = False
    caching: bool = True


@dataclass(frozen=True)
class Workload:
    """A named, ordered list of requests and the parameters that generated it."""

    name: str
    params: dict[str, Any]
    requests: tuple[BenchRequest, ...] = field(repr=False)

    @property
    def cold(self) -> bool:
        """Whether this is a cold control (caching off)."""
        return bool(self.params.get("cold", False))


def prefix_key(req: BenchRequest) -> str:
    """The identity of ``req``'s stable prefix (its tools and system prompt): equal keys mean a
    cache could serve one request's prefix from another's."""
    tools = [(t.name, t.description, t.schema) for t in req.tools]
    return json.dumps([tools, [s.text for s in req.system]], sort_keys=True)


def prefix_digest(req: BenchRequest) -> str:
    """A short digest of ``prefix_key(req)``, for records; empty for a request with no system
    prompt or tools (no stable prefix)."""
    if not (req.system or req.tools):
        return ""
    return hashlib.sha256(prefix_key(req).encode()).hexdigest()[:16]


def _finish(name: str, params: dict[str, Any], reqs: list[BenchRequest]) -> Workload:
    """Number the requests in dispatch order and set ``repeat``."""
    seen: set[str] = set()
    out = []
    for i, req in enumerate(reqs):
        key = prefix_key(req)
        # A request with no system prompt or tools has no stable prefix to repeat.
        repeat = key in seen and bool(req.system or req.tools)
        out.append(replace(req, index=i, repeat=repeat))
        seen.add(key)
    return Workload(name, params, tuple(out))


def _interleave(groups: list[list[BenchRequest]]) -> list[BenchRequest]:
    """Round-robin over groups: the first of each, then the second of each, ..."""
    out: list[BenchRequest] = []
    for step in range(max((len(g) for g in groups), default=0)):
        out.extend(g[step] for g in groups if step < len(g))
    return out


QA_INSTRUCTIONS = (
    "You are a contracts analyst. Answer the question using only the agreement below. "
    "Quote clause numbers. If the agreement does not say, answer 'not stated'.\n\n"
)
QA_QUESTIONS = (
    "What does section {n} ({title}) require?",
    "Summarise the {title} terms in one sentence.",
    "Which party carries the risk under section {n}?",
    "Is there a notice period in the {title} section, and how long is it?",
    "List the monetary amounts mentioned in section {n}.",
    "Does the {title} section refer to any other clause?",
)


def qa(
    seed: int = 0,
    *,
    documents: int = 3,
    questions: int = 3,
    clients: int = 3,
    doc_tokens: int = 2500,
    scale: float = 1.0,
    max_tokens: int = 16,
    ttl: Ttl = "5m",
    arrival: Arrival = "rounds",
) -> Workload:
    """Multi-document Q&A: ``documents`` x ``questions`` requests, interleaved across documents:
    in ``rounds`` (every document's first question, then every second one, ...) or
    ``rolling`` (question q of document d in wave d + q: document d arrives in wave d)."""
    rng = random.Random(f"qa:{seed}")
    size = max(1, round(doc_tokens * scale))
    per_doc: list[list[BenchRequest]] = []
    for d in range(documents):
        text, titles = corpus.document(rng, 100 + d, size)
        system = (Text(QA_INSTRUCTIONS + text, cache=ttl),)
        reqs = []
        for q in range(questions):
            n = rng.randrange(len(titles))
            ask = rng.choice(QA_QUESTIONS).format(n=n + 1, title=titles[n])
            msg = Message("user", (Text(ask),))
            reqs.append(BenchRequest(0, "", f"doc{d}/q{q}", system, (msg,), max_tokens=max_tokens))
        per_doc.append(reqs)
    if arrival == "rolling":
        waves = documents + questions - 1
        ordered = [
            per_doc[d][w - d]
            for w in range(waves)
            for d in range(documents)
            if 0 <= w - d < questions
        ]
    elif arrival == "rounds":
        ordered = _interleave(per_doc)
    else:
        raise ValueError(f"unknown arrival {arrival!r}; choose from {', '.join(ARRIVALS)}")
    # Clients take turns, so one client's questions hop between documents as real users do.
    ordered = [replace(r, session=f"client{i % max(1, clients)}") for i, r in enumerate(ordered)]
    params = dict(
        seed=seed,
        documents=documents,
        questions=questions,
        clients=clients,
        doc_tokens=size,
        max_tokens=max_tokens,
        ttl=ttl,
        arrival=arrival,
    )
    return _finish("qa", params, ordered)


TOOL_VERBS = ("search", "get", "update", "create", "list", "cancel", "refund", "escalate")
TOOL_OBJECTS = ("tickets", "orders", "customers", "invoices", "shipments", "contracts", "users")
AGENT_GOALS = (
    "Find out why invoice batch {n} for {party} was rejected and fix what can be fixed.",
    "A customer of {party} reports shipment {n} as lost; investigate and propose a remedy.",
    "Reconcile the open orders of {party} against contract {n} and report discrepancies.",
    "Escalate the unresolved tickets of {party} older than {n} days, with a summary of each.",
)


def _tools(rng: random.Random, count: int, ttl: Ttl) -> tuple[Tool, ...]:
    tools: list[Tool] = []
    names: set[str] = set()
    while len(tools) < count:
        name = f"{rng.choice(TOOL_VERBS)}_{rng.choice(TOOL_OBJECTS)}"
        if name in names:
            name = f"{name}_{len(tools)}"
        names.add(name)
        props: dict[str, Any] = {}
        for p in range(rng.randint(3, 6)):
            kind = rng.choice(("string", "integer", "boolean"))
            desc = corpus.paragraph(rng, 12, ("the caller", "the service"))
            props[f"{rng.choice(corpus.NOUNS).replace(' ', '_')}_{p}"] = {
                "type": kind,
                "description": desc,
            }
        description = corpus.paragraph(rng, 40, ("the caller", "the service"))
        schema = {"type": "object", "properties": props, "required": sorted(props)[:2]}
        tools.append(Tool(name, description, schema))
    tools[-1] = replace(tools[-1], cache=ttl)
    return tuple(tools)


def _value(rng: random.Random, kind: str) -> Any:
    """An argument of JSON-schema type ``kind``."""
    if kind == "integer":
        return rng.randint(1, 9999)
    if kind == "boolean":
        return rng.random() < 0.5
    return rng.choice(corpus.NOUNS)


def agent(
    seed: int = 0,
    *,
    tasks: int = 2,
    calls: int = 6,
    tools: int = 8,
    system_tokens: int = 600,
    result_tokens: int = 150,
    scale: float = 1.0,
    max_tokens: int = 16,
    ttl: Ttl = "5m",
) -> Workload:
    """Agent loop: ``tasks`` tasks of ``calls`` calls each, interleaved across tasks."""
    rng = random.Random(f"agent:{seed}")
    toolset = _tools(rng, max(1, round(tools * scale)), ttl)
    policy = corpus.paragraph(rng, round(system_tokens * scale), ("the agent", "the operator"))
    system = (Text("You are an operations agent. Use the tools. Policy:\n" + policy, cache=ttl),)
    per_task: list[list[BenchRequest]] = []
    for t in range(tasks):
        party = rng.choice(corpus.PARTIES)
        goal = rng.choice(AGENT_GOALS).format(n=rng.randint(100, 9999), party=party)
        transcript: list[Message] = [Message("user", (Text(goal),))]
        reqs = []
        for c in range(calls):
            # The moving breakpoint: a marker on the latest message only.
            last = transcript[-1]
            marked = replace(last, parts=(*last.parts[:-1], _with_cache(last.parts[-1], ttl)))
            msgs = (*transcript[:-1], marked)
            reqs.append(
                BenchRequest(0, f"task{t}", f"task{t}/call{c}", system, msgs, toolset, max_tokens)
            )
            tool = rng.choice(toolset)
            call_id = f"toolu_{seed:x}{t:02d}{c:02d}"
            args = {
                k: _value(rng, v["type"]) for k, v in list(tool.schema["properties"].items())[:2]
            }
            thought = f"I will call {tool.name} to check the {rng.choice(corpus.NOUNS)}."
            transcript.append(
                Message("assistant", (Text(thought), ToolUse(call_id, tool.name, args)))
            )
            result = corpus.paragraph(rng, round(result_tokens * scale), (party, "the service"))
            transcript.append(Message("user", (ToolResult(call_id, result),)))
        per_task.append(reqs)
    params = dict(
        seed=seed,
        tasks=tasks,
        calls=calls,
        tools=len(toolset),
        system_tokens=round(system_tokens * scale),
        result_tokens=round(result_tokens * scale),
        max_tokens=max_tokens,
        ttl=ttl,
    )
    return _finish("agent", params, _interleave(per_task))


CHAT_QUESTIONS = (
    "Can you explain section {n} in plain words?",
    "And what happens if {party} misses that deadline?",
    "How does that interact with the {title} section?",
    "Give me the two riskiest clauses for {party}.",
    "What should I negotiate first?",
    "Draft a one-line email asking {party} about section {n}.",
)


def chat(
    seed: int = 0,
    *,
    conversations: int = 2,
    turns: int = 4,
    doc_tokens: int = 2000,
    reply_tokens: int = 80,
    scale: float = 1.0,
    max_tokens: int = 16,
    ttl: Ttl = "5m",
) -> Workload:
    """Multi-turn chat about a document, with a breakpoint that moves to the latest turn."""
    rng = random.Random(f"chat:{seed}")
    size = max(1, round(doc_tokens * scale))
    per_conv: list[list[BenchRequest]] = []
    for c in range(conversations):
        text, titles = corpus.document(rng, 500 + c, size)
        party = text.split("between ", 1)[1].split(" (", 1)[0]
        system = (Text("You help a lawyer review this agreement.\n\n" + text, cache=ttl),)
        history: list[Message] = []
        reqs = []
        for t in range(turns):
            n = rng.randrange(len(titles))
            ask = rng.choice(CHAT_QUESTIONS).format(n=n + 1, title=titles[n], party=party)
            msgs = (*history, Message("user", (Text(ask, cache=ttl),)))
            reqs.append(
                BenchRequest(0, f"chat{c}", f"chat{c}/turn{t}", system, msgs, (), max_tokens)
            )
            reply = corpus.paragraph(rng, round(reply_tokens * scale), (party, "the customer"))
            history += [Message("user", (Text(ask),)), Message("assistant", (Text(reply),))]
        per_conv.append(reqs)
    params = dict(
        seed=seed,
        conversations=conversations,
        turns=turns,
        doc_tokens=size,
        reply_tokens=round(reply_tokens * scale),
        max_tokens=max_tokens,
        ttl=ttl,
    )
    return _finish("chat", params, _interleave(per_conv))


DECODE_TOPICS = (
    "the history of container shipping",
    "how a city water network is planned",
    "the life cycle of a software release",
    "what a lighthouse keeper did each day",
    "how bread is made in a bakery at night",
    "the migration of arctic terns",
    "how a suspension bridge is built",
    "the rules and history of chess openings",
)
DECODE_SYSTEM = "You are a staff writer at {party}. You answer every request with a long essay."
DECODE_ASK = (
    "Write a long, detailed essay about {topic}. Use several paragraphs, give examples and "
    "explain each step in order."
)


def decode(
    seed: int = 0,
    *,
    clients: int = 8,
    rounds: int = 1,
    max_tokens: int = 256,
    scale: float = 1.0,
    ttl: Ttl = "5m",
) -> Workload:
    """Long answers to short prompts: ``clients`` sessions of ``rounds`` requests each.

    The prompts (~50 tokens) are far below any cacheable size, so caching plays no part: this
    measures decoding, per stream and in aggregate. ``scale`` and ``ttl`` are accepted for a
    uniform signature and change nothing.
    """
    del scale, ttl
    rng = random.Random(f"decode:{seed}")
    topics = list(DECODE_TOPICS)
    rng.shuffle(topics)
    per_client: list[list[BenchRequest]] = []
    for c in range(clients):
        reqs = []
        for r in range(rounds):
            k = c + r * clients
            party = corpus.PARTIES[k % len(corpus.PARTIES)]
            # The party (and, past the fixed topics, the round) keeps every prompt distinct.
            topic = f"{topics[k % len(topics)]} at {party}"
            if k >= len(topics):
                topic += f", part {k // len(topics) + 1}"
            # A system prompt, because without one llama-cpp-python's fallback chat format has
            # the base model end its answer at once (an empty reply).
            system = (Text(DECODE_SYSTEM.format(party=party)),)
            msg = Message("user", (Text(DECODE_ASK.format(topic=topic)),))
            reqs.append(
                BenchRequest(0, f"client{c}", f"client{c}/r{r}", system, (msg,), (), max_tokens)
            )
        per_client.append(reqs)
    params = dict(seed=seed, clients=clients, rounds=rounds, max_tokens=max_tokens)
    w = _finish("decode", params, _interleave(per_client))
    # Prompts this short are never cached, so none counts as a repeat (a party's system prompt
    # comes back in later rounds).
    return replace(w, requests=tuple(replace(r, repeat=False) for r in w.requests))


def _with_cache(part: Part, ttl: Ttl | None) -> Part:
    """``part`` with its breakpoint set to ``ttl`` (tool calls carry none)."""
    if isinstance(part, Text):
        return Text(part.text, ttl)
    if isinstance(part, ToolResult):
        return ToolResult(part.tool_use_id, part.text, ttl)
    return part


def cold(workload: Workload) -> Workload:
    """The cold control: the same prompts with every breakpoint removed and caching off."""
    reqs = tuple(
        replace(
            r,
            system=tuple(replace(s, cache=None) for s in r.system),
            tools=tuple(replace(t, cache=None) for t in r.tools),
            messages=tuple(
                replace(m, parts=tuple(_with_cache(p, None) for p in m.parts)) for m in r.messages
            ),
            caching=False,
        )
        for r in workload.requests
    )
    return Workload(workload.name, {**workload.params, "cold": True}, reqs)


def build(name: str, seed: int = 0, **sizes: Any) -> Workload:
    """The workload called ``name`` (one of ``WORKLOADS``); ``sizes`` go to its generator."""
    if name == "qa":
        return qa(seed, **sizes)
    if name == "agent":
        return agent(seed, **sizes)
    if name == "chat":
        return chat(seed, **sizes)
    if name == "decode":
        return decode(seed, **sizes)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def estimated_tokens(req: BenchRequest) -> int:
    """Prompt tokens of ``req`` estimated without a tokenizer (excluding chat-format markup)."""
    texts = [s.text for s in req.system]
    texts += [json.dumps([t.name, t.description, t.schema]) for t in req.tools]
    for m in req.messages:
        for p in m.parts:
            texts.append(json.dumps(p.input) if isinstance(p, ToolUse) else p.text)
    return sum(corpus.estimate_tokens(t) for t in texts)


__all__ = [
    "ARRIVALS",
    "WORKLOADS",
    "BenchRequest",
    "Message",
    "Part",
    "Text",
    "Tool",
    "ToolResult",
    "ToolUse",
    "Workload",
    "agent",
    "build",
    "chat",
    "cold",
    "decode",
    "estimated_tokens",
    "prefix_key",
    "qa",
]
