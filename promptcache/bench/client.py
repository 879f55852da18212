"""Sends a workload to a server and times every request.

One ``httpx.AsyncClient`` speaks both protocols, so timings are comparable across servers: the
clock starts just before the request is sent, time to first token (TTFT) is taken when the first
content delta arrives (streaming), and total time when the stream ends. Up to ``concurrency``
requests are in flight; requests of one session wait for their predecessor, as a real client
whose next prompt contains the previous answer would. With several targets each request goes to
the one ``cluster.round_robin`` picks, over a connection of its own per target.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from promptcache.bench import wire
from promptcache.bench.cluster import round_robin
from promptcache.bench.workloads import BenchRequest, Message, Text, Workload, prefix_digest


@dataclass
class RequestRecord:
    """The measurements of one request; token fields are ``None`` where the server was silent."""

    index: int
    label: str
    session: str
    repeat: bool
    start_s: float
    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    output_tokens: int | None = None
    content_chunks: int | None = None
    text: str = ""
    error: str | None = None
    target: int = 0
    """Which of the run's targets served the request (an index into ``Run.target_urls()``)."""
    prefix: str = ""
    """Its stable prefix's identity (``workloads.prefix_digest``): equal for requests that a
    cache could serve from one another; empty where it has none (or the record predates it)."""

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the JSON report."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        """The inverse of ``to_json`` (unknown keys are ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    url: str
    protocol: wire.Protocol = "anthropic"
    api_key: str = "bench"
    model: str | None = None
    timeout_s: float = 900.0


def _headers(target: Target) -> dict[str, str]:
    headers = {"authorization": f"Bearer {target.api_key}"}
    if target.protocol == "anthropic":
        headers |= {"x-api-key": target.api_key, "anthropic-version": "2023-06-01"}
    return headers


async def _model_name(client: httpx.AsyncClient, target: Target) -> str:
    """The model to ask for: ``target.model``, else the server's first listed model."""
    if target.model:
        return target.model
    try:
        r = await client.get("/v1/models", headers=_headers(target))
        data = r.json().get("data") or []
        if r.status_code == 200 and data and isinstance(data[0].get("id"), str):
            return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return "default"


async def send(
    client: httpx.AsyncClient, target: Target, req: BenchRequest, model: str, t0: float
) -> RequestRecord:
    """Send one request, stream the reply and time it. Errors are recorded, never raised."""
    body = wire.body_for(target.protocol, req, model)
    on_event = wire.anthropic_event if target.protocol == "anthropic" else wire.openai_event
    state = wire.StreamState(wire.Usage())
    start = time.perf_counter()
    ttft: float | None = None
    try:
        async with client.stream(
            "POST", wire.PATHS[target.protocol], json=body, headers=_headers(target)
        ) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:500]
                state.error = f"HTTP {response.status_code}: {detail}"
            else:
                async for line in response.aiter_lines():
                    data = wire.sse_data(line)
                    if data is not None and on_event(data, state) and ttft is None:
                        ttft = time.perf_counter() - start
    except httpx.HTTPError as exc:
        state.error = f"{type(exc).__name__}: {exc}"
    total = time.perf_counter() - start
    u = state.usage
    return RequestRecord(
        index=req.index,
        label=req.label,
        session=req.session,
        repeat=req.repeat,
        prefix=prefix_digest(req),
        start_s=start - t0,
        ttft_s=None if state.error else ttft,
        total_s=total,
        prompt_tokens=u.prompt,
        cache_read_tokens=u.cache_read,
        cache_write_tokens=u.cache_write,
        cache_write_1h_tokens=u.cache_write_1h,
        output_tokens=u.output,
        content_chunks=state.chunks,
        text=state.text[:200],
        error=state.error,
    )


WARMUP = BenchRequest(-1, "warmup", "warmup", (), (Message("user", (Text("Hello"),)),), (), 1)


@dataclass(frozen=True)
class _Endpoint:
    """A target with its connection pool and the model name it answered to."""

    target: Target
    http: httpx.AsyncClient
    model: str


async def run_async(
    workload: Workload,
    target: Target | Sequence[Target],
    *,
    concurrency: int = 1,
    warmup: bool = True,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Run ``workload`` against ``target``, or round robin across several (``record.target``
    says which); records come back in completion order."""
    targets = [target] if isinstance(target, Target) else list(target)
    if not targets:
        raise ValueError("no target to run against")
    # Every target may get all requests in flight (the routing need not spread them evenly).
    limits = httpx.Limits(max_connections=max(1, concurrency) + 1)
    async with contextlib.AsyncExitStack() as stack:
        endpoints = []
        for t in targets:
            http = httpx.AsyncClient(base_url=t.url, timeout=t.timeout_s, limits=limits)
            await stack.enter_async_context(http)
            # Each replica is asked for its own model name: they need not be configured alike.
            endpoints.append(_Endpoint(t, http, await _model_name(http, t)))
        if warmup:
            # One tiny request first, so first-use costs (connections, lazy initialisation) of
            # any server stay out of the figures.
            for e in endpoints:
                await send(e.http, e.target, WARMUP, e.model, time.perf_counter())
        route = round_robin(workload.requests, len(endpoints))
        return await _schedule(endpoints, route, workload, max(1, concurrency), on_done)


async def _send_to(
    endpoints: Sequence[_Endpoint], k: int, req: BenchRequest, t0: float
) -> RequestRecord:
    e = endpoints[k]
    record = await send(e.http, e.target, req, e.model, t0)
    record.target = k
    return record


async def _schedule(
    endpoints: Sequence[_Endpoint],
    route: Sequence[int],
    workload: Workload,
    concurrency: int,
    on_done: Callable[[RequestRecord], None] | None,
) -> list[RequestRecord]:
    pending = list(zip(route, workload.requests, strict=True))
    busy: set[str] = set()
    running: dict[asyncio.Task[RequestRecord], str] = {}
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    while pending or running:
        # Start requests in workload order, skipping those whose session is still busy.
        i = 0
        while len(running) < concurrency and i < len(pending):
            k, req = pending[i]
            if req.session in busy:
                i += 1
                continue
            pending.pop(i)
            busy.add(req.session)
            task = asyncio.create_task(_send_to(endpoints, k, req, t0))
            running[task] = req.session
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            busy.discard(running.pop(task))
            record = task.result()
            records.append(record)
            if on_done is not None:
                on_done(record)
    return records


LOADING = 503
"""What a server's ``/health`` answers while it loads its model (promptcache, llama-server)."""


def wait_until_loaded(
    url: str, timeout_s: float, *, poll_s: float = 0.5, waiting: Callable[[], None] | None = None
) -> bool:
    """Wait while ``url``'s ``/health`` answers 503 (a server still loading its model: every
    request would fail), calling ``waiting`` once if it does; True once it answers anything
    else, or nothing (not every server has the route), or says its model failed to load
    (``"status": "error"``: waiting cannot help, and the requests' errors will say why); False
    after ``timeout_s`` of 503s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=5.0)
        except httpx.HTTPError:
            return True  # no answer: the requests will say what is wrong
        if health.status_code != LOADING or _failed(health):
            return True
        if time.monotonic() >= deadline:
            return False
        if waiting is not None:
            waiting()
            waiting = None
        time.sleep(poll_s)


def _failed(health: httpx.Response) -> bool:
    """Whether a 503 from ``/health`` says the model failed to load (promptcache's body)."""
    try:
        body = health.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == "error"


def run(
    workload: Workload,
    target: Target | Sequence[Target],
    *,
    concurrency: int = 1,
    warmup: bool = True,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Blocking ``run_async``."""
    return asyncio.run(
        run_async(workload, target, concurrency=concurrency, warmup=warmup, on_done=on_done)
    )


async def interleaved_async(
    runs: Sequence[tuple[Workload, Target]],
    *,
    warmup: bool = True,
    on_done: Callable[[int, RequestRecord], None] | None = None,
) -> list[list[RequestRecord]]:
    """Run several workloads of equal length one request at a time, taking turns: request i of
    every run before request i+1 of any.

    Only one server computes at any moment, and load from outside the benchmark falls on all of
    them alike. Each run's clock counts its own requests only (``start_s`` is the sum of its
    earlier requests' times), so its figures read as if it had run alone.
    """
    async with contextlib.AsyncExitStack() as stack:
        clients, models = [], []
        for _, target in runs:
            http = httpx.AsyncClient(base_url=target.url, timeout=target.timeout_s)
            clients.append(await stack.enter_async_context(http))
            models.append(await _model_name(http, target))
            if warmup:
                await send(http, target, WARMUP, models[-1], time.perf_counter())
        records: list[list[RequestRecord]] = [[] for _ in runs]
        clocks = [0.0] * len(runs)
        for i in range(max((len(w.requests) for w, _ in runs), default=0)):
            for k, (workload, target) in enumerate(runs):
                if i >= len(workload.requests):
                    continue
                record = await send(clients[k], target, workload.requests[i], models[k], 0.0)
                record.start_s = clocks[k]
                clocks[k] += record.total_s
                records[k].append(record)
                if on_done is not None:
                    on_done(k, record)
        return records


def run_interleaved(
    runs: Sequence[tuple[Workload, Target]],
    *,
    warmup: bool = True,
    on_done: Callable[[int, RequestRecord], None] | None = None,
) -> list[list[RequestRecord]]:
    """Blocking ``interleaved_async``."""
    return asyncio.run(interleaved_async(runs, warmup=warmup, on_done=on_done))


__all__ = [
    "LOADING",
    "WARMUP",
    "RequestRecord",
    "Target",
    "interleaved_async",
    "run",
    "run_async",
    "run_interleaved",
    "send",
    "wait_until_loaded",
]
