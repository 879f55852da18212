"""Three replicas on loopback (live HTTP servers, fake engine) with and without a shared Redis,
driven by the bench client round robin as a load balancer's worst case would: with Redis each
document is written once and read on the other replicas, and the cluster's usage is one
server's; without it each replica writes each document itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from promptcache.api.server import BackgroundServer
from promptcache.bench import client, cluster, report, workloads
from promptcache.bench.client import RequestRecord
from promptcache.bench.prices import DEFAULT
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e


def start(redis_url: str | None = None) -> BackgroundServer:
    """A replica on the wall clock (Redis expires on it too)."""
    config = make_config(redis_url=redis_url, redis_timeout_s=5.0) if redis_url else make_config()
    return BackgroundServer(Service(FakeEngine(), config)).start(timeout_s=60)


def servers(n: int, redis_url: str | None = None) -> Iterator[list[BackgroundServer]]:
    running = [start(redis_url) for _ in range(n)]
    try:
        yield running
    finally:
        for server in running:
            server.stop()


@pytest.fixture
def solo() -> Iterator[BackgroundServer]:
    for (server,) in servers(1):
        yield server


@pytest.fixture
def shared(redis_server: RedisServer) -> Iterator[list[BackgroundServer]]:
    yield from servers(3, redis_server.url)


@pytest.fixture
def apart() -> Iterator[list[BackgroundServer]]:
    yield from servers(3)


WORKLOAD = workloads.qa(43, documents=3, questions=3, doc_tokens=500)


def writers(records: list[RequestRecord]) -> dict[str, set[int]]:
    """The targets that wrote each document."""
    found: dict[str, set[int]] = {}
    for r in records:
        if r.cache_write_tokens:
            found.setdefault(r.label.split("/")[0], set()).add(r.target)
    return found


def totals(records: list[RequestRecord]) -> tuple[int, int, int]:
    return (
        sum(r.prompt_tokens or 0 for r in records),
        sum(r.cache_read_tokens or 0 for r in records),
        sum(r.cache_write_tokens or 0 for r in records),
    )


def figures(
    records: list[RequestRecord], targets: list[BackgroundServer]
) -> cluster.ClusterFigures:
    urls = [s.base_url for s in targets]
    run = report.Run(f"{len(urls)} targets", urls[0], "anthropic", False, records, targets=urls)
    return report.summarize(run, DEFAULT).cluster


def test_three_replicas_with_redis_write_each_document_once(
    solo: BackgroundServer, shared: list[BackgroundServer]
) -> None:
    alone = client.run(WORKLOAD, client.Target(solo.base_url))
    trio = client.run(WORKLOAD, [client.Target(s.base_url) for s in shared])
    assert [r.error for r in alone + trio] == [None] * 18
    assert sorted(r.target for r in trio) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert {doc: len(w) for doc, w in writers(trio).items()} == {"doc0": 1, "doc1": 1, "doc2": 1}
    assert totals(trio) == totals(alone)  # usage exactly as one server's
    one, three = figures(alone, [solo]), figures(trio, shared)
    assert three.hits == one.hits == 6
    assert three.token_hit_rate == pytest.approx(one.token_hit_rate)
    # Every hit of the trio was read from Redis: each question went to a replica new to it.
    remote_hits = [s.service.metrics.tier_hits.labels("remote")._value.get() for s in shared]
    assert sum(remote_hits) == 6
    assert sum(s.service.store.stats.num_commits for s in shared) == 3


def test_three_replicas_without_redis_write_each_document_on_each(
    solo: BackgroundServer, apart: list[BackgroundServer]
) -> None:
    alone = client.run(WORKLOAD, client.Target(solo.base_url))
    trio = client.run(WORKLOAD, [client.Target(s.base_url) for s in apart])
    assert [r.error for r in alone + trio] == [None] * 18
    assert writers(trio) == {"doc0": {0, 1, 2}, "doc1": {0, 1, 2}, "doc2": {0, 1, 2}}
    one, three = figures(alone, [solo]), figures(trio, apart)
    assert (one.hits, three.hits) == (6, 0)
    assert three.token_hit_rate == 0 < (one.token_hit_rate or 0)
    assert totals(trio)[1] == 0
