"""Soak test: N concurrent client streams for M minutes against a live promptcache server.

Every stream sends requests back to back, picked at random across the Anthropic Messages route
(``/v1/messages``, streaming and not), OpenAI Chat Completions (``/v1/chat/completions``, streaming
and not) and Bedrock Converse (``/model/{id}/converse`` and ``converse-stream``). Good requests put
one of a few long documents (> 1024 tokens) in the system prompt with a cache breakpoint and ask a
different question each time, so the cache is written, read, demoted and evicted; some also mark
the question, which adds nested entries. Mixed in:

- client disconnects: a stream closed after a random number of events, or a request (streaming
  or not) abandoned after a random delay, usually during the prefill;
- bad requests: malformed or truncated JSON, non-UTF-8 bytes, wrong types, lone UTF-16
  surrogates, out-of-range parameters, prompts over the context window, invalid
  ``cache_control`` / ``cachePoint`` markers.

While it runs it samples ``GET /metrics`` about once a second (bytes per tier against the tier's
budget, pinned entries, in-flight keys, resident memory) and prints a progress line every 30 s.
After the time is up it stops starting requests, lets the running ones finish, waits for the
server to go idle, checks that a cached request still writes and then reads, and prints:
requests, outcomes by status and by route, bad requests by kind, client disconnects, cache read
and write tokens, pins and in-flight keys left (must be 0), the highest bytes seen per tier
against its budget (never above), and the server's RSS at start and end.

It exits 1 when it saw a 5xx other than 503/529, an internal error inside a stream, a connection
the server dropped, pins or in-flight keys left after the drain, a tier above its budget, or a
cached request that no longer reads after the drain.

Usage (from the repository root, in the project's virtual environment)::

    python benchmarks/soak.py                               # 10 streams, 2 minutes, own server
    python benchmarks/soak.py --streams 50 --minutes 10     # the long run
    python benchmarks/soak.py --target http://127.0.0.1:8000 --streams 20 --minutes 5
    python benchmarks/soak.py --cache-memory 256MiB --max-output-tokens 64   # flags pass through

Without ``--target`` it starts ``promptcache serve`` itself on a free loopback port (on the
embedded model unless ``--model`` is passed through), with ``--cache-memory 96MiB`` and a disk tier
of 192MiB in a temporary directory so that eviction happens (``--no-disk-tier`` for memory only),
waits for ``/health``, and stops it at the end. Any option this script does not know is passed to
``promptcache serve``. Against ``--target`` the server's RSS comes from its
``process_resident_memory_bytes`` metric.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

ALLOWED_5XX = frozenset({503, 529})
INTERNAL_STREAM_ERRORS = frozenset({"api_error", "server_error", "internalServerException"})
"""Error types inside a started stream that stand for an unexpected server exception (a 500)."""
OVERLOAD_STREAM_ERRORS = frozenset(
    {"overloaded_error", "serviceUnavailableException", "throttlingException"}
)

Family = Literal["anthropic", "openai", "bedrock"]
StreamKind = Literal["sse", "eventstream"] | None

ROUTES: dict[str, tuple[Family, bool]] = {
    "anthropic": ("anthropic", False),
    "anthropic-stream": ("anthropic", True),
    "openai": ("openai", False),
    "openai-stream": ("openai", True),
    "converse": ("bedrock", False),
    "converse-stream": ("bedrock", True),
}

CORPUS = (
    "the contract sets out terms of service between parties including payment schedules "
    "liability limits termination clauses confidentiality obligations governing law and the "
    "resolution of disputes through arbitration in the agreed venue under applicable rules "
    "each supplier shall deliver goods within thirty days of an order and invoice the buyer "
    "monthly while warranties cover defects in materials or workmanship for one year after "
    "acceptance unless the product was modified misused or stored outside stated conditions"
)
WORDS = CORPUS.split()
TOPICS = ("payment", "liability", "termination", "warranty", "delivery", "arbitration", "notice")

MIB = 1024 * 1024


# -- traffic -------------------------------------------------------------------------------------


def prose(rng: random.Random, n_words: int) -> str:
    sentences: list[str] = []
    count = 0
    while count < n_words:
        length = rng.randint(8, 20)
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        count += length
    return " ".join(sentences)


def documents(count: int, seed: int) -> list[str]:
    """``count`` long documents of 1100-1900 words (1200-2100 tokens on Gemma's vocabulary)."""
    rng = random.Random(seed)
    return [
        f"Agreement {i} (seed {seed}).\n\n" + prose(rng, rng.randint(1100, 1900))
        for i in range(count)
    ]


def question(rng: random.Random) -> str:
    return (
        f"Question {rng.randrange(10**6)}: what does section {rng.randint(1, 40)} say about "
        f"{rng.choice(TOPICS)}? Answer briefly."
    )


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request of the soak."""

    route: str
    family: Family
    path: str
    body: bytes
    stream: StreamKind
    bad: str | None = None  # the kind of bad request, or None for a good one


def encode(body: object) -> bytes:
    # ensure_ascii keeps lone surrogates as \\ud800 escapes: valid JSON text, invalid Unicode.
    return json.dumps(body, ensure_ascii=True).encode()


class Traffic:
    """Builds good and bad requests for every route."""

    def __init__(self, docs: list[str], model: str, long_words: int, max_tokens: int) -> None:
        self.docs = docs
        self.model = model
        self.long_words = long_words
        self.max_tokens = max_tokens

    def path(self, route: str) -> str:
        if route.startswith("anthropic"):
            return "/v1/messages"
        if route.startswith("openai"):
            return "/v1/chat/completions"
        return f"/model/{self.model}/{route}"

    def call(self, route: str, body: object, bad: str | None = None) -> Call:
        family, streaming = ROUTES[route]
        kind: StreamKind = None
        if streaming:
            kind = "eventstream" if family == "bedrock" else "sse"
        return Call(route, family, self.path(route), encode(body), kind, bad)

    def raw(self, route: str, body: bytes, bad: str) -> Call:
        return dataclasses.replace(self.call(route, {}, bad), body=body)

    # good requests

    def good(self, rng: random.Random, route: str, doc: int | None = None) -> Call:
        family, streaming = ROUTES[route]
        text = self.docs[rng.randrange(len(self.docs)) if doc is None else doc]
        ask = question(rng)
        max_tokens = rng.randint(1, self.max_tokens)
        nested = rng.random() < 0.25  # a second breakpoint on the question: nested entries
        body: dict[str, Any]
        if family == "anthropic":
            ttl = (
                {"type": "ephemeral", "ttl": "1h"} if rng.random() < 0.2 else {"type": "ephemeral"}
            )
            user: Any = ask
            if nested:
                user = [{"type": "text", "text": ask, "cache_control": {"type": "ephemeral"}}]
            body = {
                "model": self.model,
                "max_tokens": max_tokens,
                "system": [{"type": "text", "text": text, "cache_control": ttl}],
                "messages": [{"role": "user", "content": user}],
                "temperature": rng.choice([0.0, 0.7, 1.0]),
            }
            if streaming:
                body["stream"] = True
        elif family == "openai":
            system: Any = text
            if rng.random() < 0.3:  # an explicit marker; otherwise implicit caching only
                system = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
            body = {
                "model": self.model,
                "max_tokens": max_tokens,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": ask},
                ],
                "temperature": rng.choice([0.0, 0.7, 1.5]),
            }
            if streaming:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
        else:
            content: list[dict[str, Any]] = [{"text": ask}]
            if nested:
                content.append({"cachePoint": {"type": "default"}})
            body = {
                "system": [{"text": text}, {"cachePoint": {"type": "default"}}],
                "messages": [{"role": "user", "content": content}],
                "inferenceConfig": {"maxTokens": max_tokens, "temperature": rng.random()},
            }
        return self.call(route, body)

    # bad requests

    def bad(self, rng: random.Random, route: str) -> Call:
        family = ROUTES[route][0]
        good = json.loads(self.good(rng, route).body)
        raw_kinds: dict[str, bytes] = {
            "truncated-json": encode(good)[: rng.randint(1, 60)],
            "not-json": b"this is not json {",
            "non-utf8": b'{"model": "\xff\xfe", "messages": []}',
            "empty-body": b"",
            "json-array": b"[1, 2, 3]",
            "deep-nesting": b"[" * 5000 + b"]" * 5000,
        }
        kinds: list[str] = [*raw_kinds, "wrong-type", "surrogate", "out-of-range"]
        kinds += ["too-long", "bad-cache-marker"]
        kind = rng.choice(kinds)
        if kind in raw_kinds:
            return self.raw(route, raw_kinds[kind], kind)
        mutate = {
            "anthropic": self._bad_anthropic,
            "openai": self._bad_openai,
            "bedrock": self._bad_bedrock,
        }[family]
        mutate(rng, kind, good)
        return self.call(route, good, kind)

    def _long_text(self, rng: random.Random) -> str:
        return prose(rng, self.long_words)

    def _bad_anthropic(self, rng: random.Random, kind: str, body: dict[str, Any]) -> None:
        if kind == "wrong-type":
            choice = rng.randrange(6)
            if choice == 0:
                body["max_tokens"] = "eight"
            elif choice == 1:
                body["messages"] = "hello"
            elif choice == 2:
                body["messages"][0]["content"] = 42
            elif choice == 3:
                body["system"] = 7
            elif choice == 4:
                body["messages"][0]["role"] = ["user"]
            else:
                body["system"][0]["text"] = {"text": "nested"}
        elif kind == "surrogate":
            where = rng.randrange(3)
            if where == 0:
                body["messages"][0]["content"] = "lone \ud800 surrogate"
            elif where == 1:
                body["system"][0]["text"] += " \udfff"
            else:
                body["model"] = "gemma\ud83d"
        elif kind == "out-of-range":
            body.update(rng.choice([{"temperature": 3.5}, {"top_p": -1}, {"max_tokens": -5}]))
        elif kind == "too-long":
            body["messages"][0]["content"] = self._long_text(rng)
        else:
            marker = rng.choice(
                [
                    {"type": "persistent"},
                    {"type": "ephemeral", "ttl": "2h"},
                    "ephemeral",
                    {"type": "ephemeral", "ttl": 300},
                ]
            )
            body["system"][0]["cache_control"] = marker
            if rng.random() < 0.3:  # five breakpoints: over the limit of four
                mark = {"type": "ephemeral"}
                body["system"] = [
                    {"type": "text", "text": f"part {i}", "cache_control": mark} for i in range(5)
                ]

    def _bad_openai(self, rng: random.Random, kind: str, body: dict[str, Any]) -> None:
        if kind == "wrong-type":
            choice = rng.randrange(5)
            if choice == 0:
                body["max_tokens"] = "eight"
            elif choice == 1:
                body["messages"] = {"role": "user", "content": "hi"}
            elif choice == 2:
                body["messages"][1]["content"] = 42
            elif choice == 3:
                body["messages"][1]["role"] = "wizard"
            else:
                body["stop"] = {"x": 1}
        elif kind == "surrogate":
            if rng.random() < 0.5:
                body["messages"][1]["content"] = "lone \ud800 surrogate"
            else:
                body["model"] = "gpt\udfff"
        elif kind == "out-of-range":
            body.update(rng.choice([{"temperature": 5}, {"n": 3}, {"top_p": 2}]))
        elif kind == "too-long":
            body["messages"][1]["content"] = self._long_text(rng)
        else:
            text = body["messages"][0]["content"]
            if not isinstance(text, str):
                text = text[0]["text"]
            marker = rng.choice([{"type": "forever"}, {"type": "ephemeral", "ttl": "3d"}, 5])
            body["messages"][0]["content"] = [
                {"type": "text", "text": text, "cache_control": marker}
            ]

    def _bad_bedrock(self, rng: random.Random, kind: str, body: dict[str, Any]) -> None:
        if kind == "wrong-type":
            choice = rng.randrange(4)
            if choice == 0:
                body["inferenceConfig"]["maxTokens"] = "eight"
            elif choice == 1:
                body["messages"][0]["content"] = [{"text": 5}]
            elif choice == 2:
                body["messages"] = "hello"
            else:
                body["system"] = {"text": "x"}
        elif kind == "surrogate":
            body["messages"][0]["content"] = [{"text": "lone \ud800 surrogate"}]
        elif kind == "out-of-range":
            body["inferenceConfig"] = rng.choice(
                [{"maxTokens": 0}, {"temperature": 9}, {"topP": -0.5}]
            )
        elif kind == "too-long":
            body["messages"][0]["content"] = [{"text": self._long_text(rng)}]
        else:
            body["system"][1] = rng.choice(
                [{"cachePoint": {"type": "bogus"}}, {"cachePoint": "default"}, {"cachePoint": {}}]
            )


# -- client ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    route: str
    bad: str | None
    status: str  # the HTTP status, or "disconnect", "timeout", "dropped:<error>"
    seconds: float
    cut: str | None = None  # how the client disconnected
    read_tokens: int = 0
    write_tokens: int = 0
    stream_errors: list[str] = field(default_factory=list)
    envelope_ok: bool = True
    message: str = ""


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream (``[DONE]`` and comments skipped)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            text = "\n".join(data)
            data = []
            if text != "[DONE]":
                yield json.loads(text)


async def eventstream_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """AWS event-stream messages as their string headers (``:event-type`` or ``:exception-type``)
    plus ``payload``, the decoded JSON."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while len(buffer) >= 12:
            total = int.from_bytes(buffer[0:4], "big")
            headers_len = int.from_bytes(buffer[4:8], "big")
            if len(buffer) < total:
                break
            message, buffer = buffer[:total], buffer[total:]
            headers: dict[str, Any] = {}
            pos, end = 12, 12 + headers_len
            while pos < end:
                name_len = message[pos]
                name = message[pos + 1 : pos + 1 + name_len].decode()
                pos += 1 + name_len
                kind = message[pos]
                pos += 1
                if kind != 7:  # only string headers are sent
                    break
                value_len = int.from_bytes(message[pos : pos + 2], "big")
                headers[name] = message[pos + 2 : pos + 2 + value_len].decode()
                pos += 2 + value_len
            payload = message[end : total - 4]
            headers["payload"] = json.loads(payload) if payload else {}
            yield headers


def usage_of(family: Family, event: dict[str, Any]) -> tuple[int, int] | None:
    """(cache read, cache write) tokens of a response body or stream event, when it has usage."""
    if family == "anthropic":
        usage = event.get("usage") or (event.get("message") or {}).get("usage")
        if isinstance(usage, dict) and "cache_read_input_tokens" in usage:
            return (
                int(usage.get("cache_read_input_tokens") or 0),
                int(usage.get("cache_creation_input_tokens") or 0),
            )
    elif family == "openai":
        usage = event.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            return (
                int(details.get("cached_tokens") or 0),
                int(details.get("cache_write_tokens") or 0),
            )
    else:
        usage = event.get("usage") or (event.get("payload") or {}).get("usage")
        if isinstance(usage, dict):
            return (
                int(usage.get("cacheReadInputTokens") or 0),
                int(usage.get("cacheWriteInputTokens") or 0),
            )
    return None


def stream_error_of(family: Family, event: dict[str, Any]) -> str | None:
    if family == "anthropic" and event.get("type") == "error":
        return str((event.get("error") or {}).get("type"))
    if family == "openai" and isinstance(event.get("error"), dict):
        return str(event["error"].get("type"))
    if family == "bedrock" and ":exception-type" in event:
        return str(event[":exception-type"])
    return None


def envelope_ok(family: Family, response: httpx.Response, body: bytes) -> tuple[bool, str]:
    """Whether an error response is in the protocol's own JSON envelope, and its message."""
    try:
        data = json.loads(body)
    except ValueError:
        return False, body[:120].decode(errors="replace")
    if not isinstance(data, dict):
        return False, str(data)[:120]
    if family == "anthropic":
        error = data.get("error")
        ok = data.get("type") == "error" and isinstance(error, dict) and "type" in error
        return ok, str(error.get("message") if isinstance(error, dict) else data)[:160]
    if family == "openai":
        error = data.get("error")
        ok = isinstance(error, dict) and "message" in error and "type" in error
        return ok, str(error.get("message") if isinstance(error, dict) else data)[:160]
    ok = "message" in data and "x-amzn-errortype" in response.headers
    return ok, str(data.get("message", data))[:160]


class Client:
    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        timeout = httpx.Timeout(timeout_s, connect=30.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)
        self.api_key = api_key

    def headers(self, family: Family) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if family == "anthropic":
            headers["anthropic-version"] = "2023-06-01"
            if self.api_key:
                headers["x-api-key"] = self.api_key
        elif self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    async def send(
        self, call: Call, cut_events: int | None = None, cut_after_s: float | None = None
    ) -> Result:
        """Send ``call``; close the connection after ``cut_events`` events of a stream or after
        ``cut_after_s`` seconds, whichever comes first."""
        result = Result(call.route, call.bad, "?", 0.0)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(cut_after_s):
                await self._exchange(call, result, cut_events)
        except TimeoutError:  # only asyncio.timeout raises it: the timer ran out
            result.status, result.cut = "disconnect", "timer"
        except httpx.TimeoutException:
            result.status = "timeout"
        except (httpx.TransportError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            result.status = f"dropped:{type(exc).__name__}"
            result.message = str(exc)[:160]
        result.seconds = time.monotonic() - t0
        return result

    async def _exchange(self, call: Call, result: Result, cut_events: int | None) -> None:
        request = self.http.build_request(
            "POST", call.path, content=call.body, headers=self.headers(call.family)
        )
        response = await self.http.send(request, stream=True)
        try:
            result.status = str(response.status_code)
            if response.status_code != 200 or call.stream is None:
                body = await response.aread()
                if response.status_code >= 400:
                    result.envelope_ok, result.message = envelope_ok(call.family, response, body)
                elif response.status_code == 200:
                    usage = usage_of(call.family, json.loads(body))
                    if usage is not None:
                        result.read_tokens, result.write_tokens = usage
                return
            events = sse_events(response) if call.stream == "sse" else eventstream_events(response)
            count = 0
            async for event in events:
                count += 1
                usage = usage_of(call.family, event)
                if usage is not None:
                    result.read_tokens, result.write_tokens = usage
                error = stream_error_of(call.family, event)
                if error is not None:
                    result.stream_errors.append(error)
                if cut_events is not None and count >= cut_events:
                    result.status, result.cut = "disconnect", "events"
                    return
        finally:
            await response.aclose()

    async def get(self, path: str, timeout_s: float = 10.0) -> httpx.Response:
        return await self.http.get(path, timeout=timeout_s)


# -- metrics ---------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text format: name -> {sorted labels -> value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        key = tuple(sorted(_LABEL.findall(labels or "")))
        with contextlib.suppress(ValueError):
            out.setdefault(name, {})[key] = float(value)
    return out


def by_label(
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, label: str
) -> dict[str, float]:
    return {dict(labels).get(label, ""): value for labels, value in metrics.get(name, {}).items()}


def scalar(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float | None:
    values = metrics.get(name)
    return sum(values.values()) if values else None


def rss_of(pid: int) -> int | None:
    """VmRSS of ``pid`` in bytes (Linux), or None."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def hwm_of(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def whole(n: float | None) -> str:
    return "n/a" if n is None else f"{n:.0f}"


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.1f} MiB"


class Monitor:
    """Samples ``/metrics`` (and the server's RSS): highest bytes per tier, pins, in-flight keys."""

    def __init__(self, client: Client, pid: int | None) -> None:
        self.client = client
        self.pid = pid
        self.peak_bytes: dict[str, float] = {}
        self.capacity: dict[str, float] = {}
        self.server_peak: dict[str, float] = {}
        self.last: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self.max_pinned = 0.0
        self.max_inflight = 0.0
        self.max_rss = 0
        self.samples = 0
        self.failed_samples = 0

    def rss(self) -> int | None:
        if self.pid is not None:
            return rss_of(self.pid)
        value = scalar(self.last, "process_resident_memory_bytes")
        return None if value is None else int(value)

    async def sample(self) -> None:
        try:
            response = await self.client.get("/metrics")
            response.raise_for_status()
        except httpx.HTTPError:
            self.failed_samples += 1
            return
        self.samples += 1
        self.last = parse_metrics(response.text)
        for tier, used in by_label(self.last, "promptcache_cache_bytes", "tier").items():
            self.peak_bytes[tier] = max(self.peak_bytes.get(tier, 0.0), used)
        self.capacity.update(by_label(self.last, "promptcache_cache_capacity_bytes", "tier"))
        self.server_peak.update(by_label(self.last, "promptcache_cache_peak_bytes", "tier"))
        self.max_pinned = max(self.max_pinned, self.pinned or 0.0)
        self.max_inflight = max(self.max_inflight, self.inflight or 0.0)
        rss = self.rss()
        if rss is not None:
            self.max_rss = max(self.max_rss, rss)

    @property
    def pinned(self) -> float | None:
        return scalar(self.last, "promptcache_cache_pinned_entries")

    @property
    def inflight(self) -> float | None:
        return scalar(self.last, "promptcache_inflight_keys")

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def tiers_line(self) -> str:
        used = by_label(self.last, "promptcache_cache_bytes", "tier")
        return " ".join(
            f"{tier} {used.get(tier, 0) / MIB:.0f}/{cap / MIB:.0f}MiB"
            for tier, cap in self.capacity.items()
        )


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)
    started: int = 0

    def add(self, result: Result) -> None:
        self.results.append(result)

    def count(self, pred: Callable[[Result], bool]) -> int:
        return sum(1 for r in self.results if pred(r))

    def progress(self) -> str:
        ok = self.count(lambda r: r.status.startswith("2"))
        c4 = self.count(lambda r: r.status.startswith("4"))
        c5 = self.count(lambda r: r.status.startswith("5"))
        cut = self.count(lambda r: r.cut is not None)
        other = len(self.results) - ok - c4 - c5 - cut
        return (
            f"requests {len(self.results)} (2xx {ok}, 4xx {c4}, 5xx {c5}, cut {cut}, other {other})"
        )


@dataclass(frozen=True)
class Plan:
    streams: int
    seconds: float
    bad_fraction: float
    disconnect_fraction: float
    seed: int


async def stream_loop(
    index: int, plan: Plan, traffic: Traffic, client: Client, tally: Tally, deadline: float
) -> None:
    rng = random.Random(plan.seed * 10_007 + index)
    routes = list(ROUTES)
    while time.monotonic() < deadline:
        route = rng.choice(routes)
        _, streaming = ROUTES[route]
        if rng.random() < plan.bad_fraction:
            call = traffic.bad(rng, route)
            cut_events, cut_after = None, None
        else:
            call = traffic.good(rng, route)
            cut_events, cut_after = None, None
            if rng.random() < plan.disconnect_fraction:
                if streaming and rng.random() < 0.5:
                    cut_events = rng.randint(1, 8)
                else:
                    cut_after = rng.uniform(0.05, 6.0)
        tally.started += 1
        t0 = time.monotonic()
        try:
            result = await client.send(call, cut_events, cut_after)
        except asyncio.CancelledError:  # abandoned at the drain limit: one more disconnect
            tally.add(Result(route, call.bad, "disconnect", time.monotonic() - t0, cut="drain"))
            raise
        tally.add(result)


async def wait_for_health(
    client: Client, proc: subprocess.Popen[bytes] | None, limit_s: float
) -> None:
    t0 = time.monotonic()
    last_note = t0
    while True:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"soak: the server exited with {proc.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get("/health", timeout_s=5.0)
            if response.status_code == 200:
                return
        now = time.monotonic()
        if now - t0 > limit_s:
            raise SystemExit(f"soak: /health not 200 after {limit_s:.0f} s")
        if now - last_note >= 15:
            print(f"  waiting for /health ({now - t0:.0f} s)", flush=True)
            last_note = now
        await asyncio.sleep(1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    args: argparse.Namespace, extra: list[str], workdir: Path
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    command = [sys.executable, "-m", "promptcache", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--cache-memory", args.cache_memory, *extra]
    if not args.no_disk_tier and not any(a.startswith("--disk-cache-dir") for a in extra):
        command += ["--disk-cache-dir", str(workdir / "disk"), "--disk-cache-size", args.disk_size]
    log = workdir / "server.log"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's package first
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    print("soak: starting " + " ".join(command[1:]), flush=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", log


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def check_cache(traffic: Traffic, client: Client, seed: int) -> tuple[bool, str]:
    """After the drain: a fresh document is written, then read by a second question."""
    rng = random.Random(seed + 99)
    fresh = Traffic(documents(1, seed + 1_000_003), traffic.model, traffic.long_words, 1)
    first = await client.send(fresh.good(rng, "anthropic", doc=0))
    second = await client.send(fresh.good(rng, "anthropic", doc=0))
    ok = first.status == "200" and first.write_tokens > 0 and second.read_tokens > 0
    detail = (
        f"write {first.status} ({first.write_tokens} written), "
        f"read {second.status} ({second.read_tokens} read)"
    )
    return ok, detail


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def soak(args: argparse.Namespace, extra: list[str]) -> int:
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    if args.target:
        url = args.target.rstrip("/")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="promptcache-soak-"))
        proc, url, log = start_server(args, extra, workdir)
        print(f"soak: server pid {proc.pid} at {url}; log {log}", flush=True)
    client = Client(url, args.api_key, args.request_timeout)
    try:
        return await _soak(args, client, proc, log)
    finally:
        await client.http.aclose()
        if proc is not None:
            code = stop_server(proc)
            print(f"server exit status after SIGINT: {code}")
        if workdir is not None:
            shutil.rmtree(workdir / "disk", ignore_errors=True)


async def _soak(
    args: argparse.Namespace, client: Client, proc: subprocess.Popen[bytes] | None, log: Path | None
) -> int:
    t_start = time.monotonic()
    await wait_for_health(client, proc, args.startup_timeout)
    print(f"soak: server ready after {time.monotonic() - t_start:.0f} s", flush=True)
    models = (await client.get("/v1/models")).json()
    model = args.model_name or models["data"][0]["id"]
    docs = documents(args.documents, args.seed)
    traffic = Traffic(docs, model, args.long_words, args.max_tokens)
    sizes = []
    for text in docs:
        body = {"model": model, "system": text, "messages": [{"role": "user", "content": "?"}]}
        response = await client.http.post(
            "/v1/messages/count_tokens", content=encode(body), headers=client.headers("anthropic")
        )
        sizes.append(str(response.json().get("input_tokens", "?")) if response.is_success else "?")
    print(f"soak: model {model}; {len(docs)} documents of {', '.join(sizes)} tokens", flush=True)

    monitor = Monitor(client, proc.pid if proc is not None else None)
    await monitor.sample()
    rss_start = monitor.rss()
    plan = Plan(args.streams, args.minutes * 60.0, args.bad_fraction, args.disconnects, args.seed)
    print(
        f"soak: {plan.streams} streams for {args.minutes:g} min "
        f"(bad {plan.bad_fraction:.0%}, disconnects {plan.disconnect_fraction:.0%}); "
        f"budgets {monitor.tiers_line()}; RSS {mib(rss_start)}",
        flush=True,
    )

    tally = Tally()
    stop = asyncio.Event()
    sampler = asyncio.create_task(monitor.run(args.sample_interval, stop))
    t0 = time.monotonic()
    deadline = t0 + plan.seconds
    tasks = [
        asyncio.create_task(stream_loop(i, plan, traffic, client, tally, deadline))
        for i in range(plan.streams)
    ]

    def line(tag: str) -> str:
        running = tally.started - len(tally.results)
        return (
            f"[{time.monotonic() - t0:5.0f}s {tag}] {tally.progress()} running {running} | "
            f"{monitor.tiers_line()} | pins {whole(monitor.pinned)} "
            f"inflight {whole(monitor.inflight)} | "
            f"RSS {mib(monitor.rss())}"
        )

    pending = set(tasks)
    next_report = t0 + args.progress_every
    while pending and time.monotonic() < deadline:
        timeout = max(0.0, min(next_report, deadline) - time.monotonic())
        _, pending = await asyncio.wait(pending, timeout=timeout)
        if time.monotonic() >= next_report:
            print(line("run"), flush=True)
            next_report += args.progress_every

    # drain: no new requests; the running ones finish (or are cancelled after the limit)
    print(line("time up, draining"), flush=True)
    drain_end = time.monotonic() + args.drain_timeout
    while pending and time.monotonic() < drain_end:
        _, pending = await asyncio.wait(pending, timeout=args.progress_every)
        if pending:
            print(line("draining"), flush=True)
    abandoned = len(pending)
    for task in pending:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, Exception):
            raise outcome  # a bug in this script
    run_seconds = time.monotonic() - t0

    # the server finishes what disconnected clients left behind
    idle_end = time.monotonic() + args.idle_timeout
    while True:
        await monitor.sample()
        if (monitor.pinned == 0 and monitor.inflight == 0) or time.monotonic() > idle_end:
            break
        await asyncio.sleep(1.0)
    pinned, inflight = monitor.pinned, monitor.inflight
    cache_ok, cache_detail = await check_cache(traffic, client, args.seed)
    stop.set()
    await sampler
    await monitor.sample()
    rss_end = monitor.rss()
    hwm = hwm_of(proc.pid) if proc is not None else None

    return report(
        args,
        tally,
        monitor,
        run_seconds,
        abandoned,
        (pinned, inflight),
        (rss_start, rss_end, hwm),
        (cache_ok, cache_detail),
        log,
    )


def report(
    args: argparse.Namespace,
    tally: Tally,
    monitor: Monitor,
    run_seconds: float,
    abandoned: int,
    left: tuple[float | None, float | None],
    rss: tuple[int | None, int | None, int | None],
    cache_check: tuple[bool, str],
    log: Path | None,
) -> int:
    results = tally.results
    failures: list[str] = []
    warnings: list[str] = []
    print()
    print(f"== soak: {args.streams} streams, {run_seconds / 60:.1f} min ==")
    print(
        f"requests: {len(results)} ({len(results) / max(run_seconds, 1e-9):.2f}/s)"
        f"{f', {abandoned} abandoned at the drain limit' if abandoned else ''}"
    )

    statuses = Counter(r.status for r in results)
    print("outcomes by status: " + ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())))
    print("outcomes by route:")
    for route in ROUTES:
        mine = [r for r in results if r.route == route]
        good = Counter(r.status for r in mine if r.bad is None)
        bad = Counter(r.status for r in mine if r.bad is not None)
        print(
            f"  {route:<16} {len(mine):>5}  good: "
            + (", ".join(f"{s} {n}" for s, n in sorted(good.items())) or "-")
            + "  bad: "
            + (", ".join(f"{s} {n}" for s, n in sorted(bad.items())) or "-")
        )
    kinds = Counter((r.bad, r.status) for r in results if r.bad is not None)
    print(
        "bad requests by kind: "
        + ", ".join(f"{kind} {status} x{n}" for (kind, status), n in sorted(kinds.items(), key=str))
    )

    cuts = Counter(r.cut for r in results if r.cut is not None)
    print(
        f"client disconnects: {sum(cuts.values())} "
        f"(after N events {cuts.get('events', 0)}, on a timer {cuts.get('timer', 0)}, "
        f"abandoned at the drain limit {cuts.get('drain', 0)})"
    )
    done = [r.seconds for r in results if r.bad is None and r.cut is None and r.status == "200"]
    if done:
        print(
            f"completed good requests: {len(done)}; seconds p50 {statistics.median(done):.2f} "
            f"p95 {percentile(done, 0.95):.2f} max {max(done):.2f}"
        )

    read = sum(r.read_tokens for r in results)
    write = sum(r.write_tokens for r in results)
    hits = sum(1 for r in results if r.read_tokens > 0)
    print(
        f"cache tokens (client usage): read {read}, written {write}; responses with a read {hits}"
    )
    metrics = monitor.last
    server_read = scalar(metrics, "promptcache_cache_read_tokens_total")
    server_write = scalar(metrics, "promptcache_cache_written_tokens_total")
    print(f"cache tokens (server /metrics): read {server_read}, written {server_write}")
    for name in ("evictions", "demotions", "promotions"):
        series = metrics.get(f"promptcache_cache_{name}_total", {})
        text = ", ".join(
            f"{dict(labels).get('tier')}/{dict(labels).get('reason')} {value:.0f}"
            for labels, value in sorted(series.items())
        )
        print(f"cache {name}: {text or 'none'}")

    pinned, inflight = left
    print(
        f"after the drain: pinned entries {whole(pinned)}, in-flight keys {whole(inflight)} "
        f"(highest seen during the run: {monitor.max_pinned:.0f}, {monitor.max_inflight:.0f})"
    )
    if pinned is None or inflight is None:
        failures.append("the server does not expose pinned entries / in-flight keys in /metrics")
    elif pinned or inflight:
        failures.append(f"{pinned:.0f} pinned entries and {inflight:.0f} in-flight keys left")

    print(f"tier bytes ({monitor.samples} samples of /metrics, {monitor.failed_samples} failed):")
    for tier, cap in monitor.capacity.items():
        seen = monitor.peak_bytes.get(tier, 0.0)
        server_peak = monitor.server_peak.get(tier)
        peak = max(seen, server_peak or 0.0)
        print(
            f"  {tier:<6} highest sampled {mib(seen)}, server peak {mib(server_peak)}, "
            f"budget {mib(cap)} ({peak / cap:.0%} of it)"
            if cap
            else f"  {tier}: no budget"
        )
        if peak > cap:
            failures.append(f"tier {tier} reached {peak:.0f} bytes over its budget {cap:.0f}")

    rss_start, rss_end, hwm = rss
    print(
        f"server RSS: start {mib(rss_start)}, end {mib(rss_end)}, "
        f"highest sampled {mib(monitor.max_rss or None)}"
        + (f", VmHWM {mib(hwm)}" if hwm is not None else "")
    )

    cache_ok, cache_detail = cache_check
    print(f"cached request after the drain: {'ok' if cache_ok else 'FAILED'}: {cache_detail}")
    if not cache_ok:
        failures.append(
            f"a cached request after the drain does not write then read ({cache_detail})"
        )

    for r in results:
        if r.status.startswith("5") and int(r.status) not in ALLOWED_5XX:
            failures.append(f"{r.status} on {r.route} ({r.bad or 'good'}): {r.message}")
        if r.status.startswith("dropped"):
            failures.append(f"connection dropped on {r.route} ({r.bad or 'good'}): {r.message}")
        for error in r.stream_errors:
            if error in INTERNAL_STREAM_ERRORS:
                failures.append(f"internal error inside a stream on {r.route}: {error}")
            elif error not in OVERLOAD_STREAM_ERRORS:
                warnings.append(f"error event inside a stream on {r.route}: {error}")
        if r.status.startswith("4") and not r.envelope_ok:
            warnings.append(f"{r.status} on {r.route} not in the protocol's envelope: {r.message}")
        if r.bad is None and r.status.startswith("4"):
            warnings.append(f"good request got {r.status} on {r.route}: {r.message}")
        if r.bad is not None and r.status.startswith("2"):
            warnings.append(f"bad request ({r.bad}) accepted with {r.status} on {r.route}")
        if r.status == "timeout":
            warnings.append(f"client timeout on {r.route} ({r.bad or 'good'})")

    if log is not None and log.exists():
        lines = log.read_text(errors="replace").splitlines()
        errors = [x for x in lines if " ERROR " in x or x.startswith("Traceback")]
        print(f"server log: {len(lines)} lines, {len(errors)} ERROR/Traceback lines ({log})")
        for x in errors[:5]:
            print(f"  {x[:200]}")

    for title, items in (("warnings", warnings), ("FAILURES", failures)):
        if items:
            counted = Counter(items)
            print(f"{title} ({len(items)}):")
            for text, n in counted.most_common(12):
                print(f"  {n:>4} x {text}")
            if len(counted) > 12:
                print(f"  ... and {len(counted) - 12} more distinct")
    print("soak: FAILED" if failures else "soak: passed")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", help="URL of a running server (default: start one)")
    parser.add_argument("--streams", type=int, default=10, help="concurrent streams (10)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long to send (2)")
    parser.add_argument("--bad-fraction", type=float, default=0.15, help="bad requests (0.15)")
    parser.add_argument(
        "--disconnects", type=float, default=0.15, help="good requests the client cuts (0.15)"
    )
    parser.add_argument("--documents", type=int, default=4, help="long cached documents (4)")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens up to (24)")
    parser.add_argument(
        "--long-words", type=int, default=40_000, help="words of an over-long prompt (40000)"
    )
    parser.add_argument("--api-key", help="credential to send (x-api-key / Bearer)")
    parser.add_argument("--model-name", help="model id to send (default: from /v1/models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-memory", default="96MiB", help="server's budget (96MiB)")
    parser.add_argument("--disk-size", default="192MiB", help="disk tier budget (192MiB)")
    parser.add_argument("--no-disk-tier", action="store_true", help="no disk tier")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument(
        "--idle-timeout", type=float, default=300.0, help="wait for pins to reach 0 (300 s)"
    )
    parser.add_argument("--sample-interval", type=float, default=1.0)
    parser.add_argument("--progress-every", type=float, default=30.0)
    args, extra = parser.parse_known_args(argv)
    if args.target and extra:
        parser.error(f"server flags with --target: {' '.join(extra)}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    return asyncio.run(soak(args, extra))


if __name__ == "__main__":
    sys.exit(main())
