"""Several targets: the round robin, the cluster hit rate's arithmetic, and two live promptcache
servers on loopback (fake engine) that share nothing: each writes a document the other already
wrote, the baseline a shared cache tier improves on."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from promptcache import cli
from promptcache.api.server import BackgroundServer
from promptcache.bench import client, cluster, report, workloads
from promptcache.bench.client import RequestRecord
from promptcache.bench.prices import DEFAULT
from promptcache.cache.clock import FakeClock
from promptcache.config import ApiConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config, make_service

FIXTURE = Path(__file__).parent / "fixtures" / "recorded.json"


def test_each_documents_questions_go_round_the_targets() -> None:
    w = workloads.qa(0, documents=3, questions=3)
    route = cluster.round_robin(w.requests, 3)
    by_doc: dict[str, list[int]] = {}
    for req, k in zip(w.requests, route, strict=True):
        by_doc.setdefault(req.label.split("/")[0], []).append(k)
    # Plain i mod 3 would send every question about a document to the target that wrote it
    # (the workload interleaves its 3 documents); here each document visits every target.
    assert [i % 3 for i in range(9)] == [int(r.label[3]) for r in w.requests]
    assert by_doc == {"doc0": [0, 1, 2], "doc1": [1, 2, 0], "doc2": [2, 0, 1]}
    assert sorted(Counter(route).values()) == [3, 3, 3]
    two = cluster.round_robin(w.requests, 2)
    assert sorted(Counter(two).values()) == [4, 5]
    assert all(len(set(two[i::3])) == 2 for i in range(3))  # no document stays on one target


def test_round_robin_is_plain_where_prefixes_do_not_repeat_or_all_repeat() -> None:
    decode = workloads.decode(0, clients=5).requests  # a prefix each
    agent = workloads.agent(0, tasks=2, calls=3).requests  # one tool list for all
    for reqs in (decode, agent):
        assert cluster.round_robin(reqs, 2) == [i % 2 for i in range(len(reqs))]
    assert cluster.round_robin(decode, 1) == [0] * 5
    with pytest.raises(ValueError):
        cluster.round_robin(decode, 0)


def cells(text: str) -> list[str]:
    return text.split()


def record(
    i: int, target: int, read: int | None, written: int | None, ttft: float
) -> RequestRecord:
    prompt = None if read is None else read + (written or 0) + 10
    return RequestRecord(
        i,
        f"r{i}",
        "s",
        False,
        float(i),
        ttft,
        ttft + 1,
        prompt,
        read,
        written,
        None,
        16,
        target=target,
    )


def test_cluster_hit_rate_arithmetic() -> None:
    records = [
        record(0, 0, 0, 1000, 2.0),  # writes the document
        record(1, 1, 0, 1000, 3.0),  # writes it again: the other target never saw it
        record(2, 0, 1000, 0, 0.5),  # reads it: a hit
        replace(record(3, 1, None, None, 9.0), error="HTTP 529: overloaded", ttft_s=None),
        record(4, 1, 400, 600, 1.0),  # a small read (under half the prompt) is no hit
    ]
    run = report.Run("2 targets", "http://a", "anthropic", False, records, targets=["a", "b"])
    c = report.summarize(run, DEFAULT).cluster
    assert (c.requests, c.hits, c.request_hit_rate) == (4, 1, 0.25)
    assert (c.cache_read_tokens, c.cacheable_tokens) == (1400, 4000)
    assert c.token_hit_rate == pytest.approx(0.35)
    a, b = c.targets
    assert a == cluster.TargetFigures("a", 2, 0, 1, 1.25, 1000, 1000)
    assert b == cluster.TargetFigures("b", 3, 1, 0, 2.0, 400, 1600)
    one = report.Report("qa", {}, 1, DEFAULT, [run])
    table = report.render(one)
    rows = [cells(line) for line in table.splitlines()]
    assert cells("2 targets 2 35% (1,400 of 4,000) 25% (1 of 4)") in rows
    assert cells("2 targets b 3 (1 failed) 0 2.00 s 400 1,600") in rows
    silent = [replace(r, cache_read_tokens=None) for r in records]
    quiet = replace(run, label="quiet", records=silent)
    s = report.summarize(quiet, DEFAULT).cluster
    assert s.token_hit_rate is None and s.targets[0].cache_read_tokens is None
    rows = [cells(line) for line in report.render(replace(one, runs=[quiet])).splitlines()]
    # No usage: the workload's view decides hits (none of these repeats a prefix).
    assert cells("quiet* 2 not reported 0% (0 of 4)") in rows


def test_one_target_keeps_its_table() -> None:
    recorded = report.load(FIXTURE)
    assert "hit rate" not in report.render(recorded)
    c = report.summarize(recorded.runs[0], recorded.prices).cluster
    assert len(c.targets) == 1 and c.hits == 3 and c.targets[0].hits == 3


def strict_service(name: str) -> Service:
    """A server that answers to its own model names only (an alias table makes others 404)."""
    api = replace(ApiConfig(), served_model_name=name, aliases={f"{name}-alias": name})
    return Service(FakeEngine(), replace(make_config(), api=api), clock=FakeClock())


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str, str]]:
    """One server alone, and two replicas (of different model names) that share nothing."""
    running = [
        BackgroundServer(s).start(timeout_s=60)
        for s in (make_service(), strict_service("replica-a"), strict_service("replica-b"))
    ]
    try:
        solo, a, b = (s.base_url for s in running)
        yield solo, a, b
    finally:
        for s in running:
            s.stop()


def test_two_servers_without_a_shared_cache_each_write_the_document(
    servers: tuple[str, str, str],
) -> None:
    solo, a, b = servers
    w = workloads.qa(41, documents=2, questions=3, doc_tokens=500)
    alone = client.run(w, client.Target(solo))
    # Each replica is asked its own model name: sending one's name to the other would 404.
    pair = client.run(w, [client.Target(a), client.Target(b)])
    assert [r.error for r in alone + pair] == [None] * 12
    assert [r.target for r in sorted(pair, key=lambda r: r.index)] == [0, 1, 1, 0, 0, 1]
    writers: dict[str, set[int]] = {}
    for r in pair:
        if r.cache_write_tokens:
            writers.setdefault(r.label.split("/")[0], set()).add(r.target)
    assert writers == {"doc0": {0, 1}, "doc1": {0, 1}}  # each document prefilled on both
    one = report.summarize(report.Run("solo", solo, "anthropic", False, alone), DEFAULT).cluster
    run = report.Run("2 targets", a, "anthropic", False, pair, targets=[a, b])
    two = report.summarize(run, DEFAULT).cluster
    # One server: written once, read twice per document. Two: written twice, read once.
    assert (one.hits, two.hits) == (4, 2)
    assert one.token_hit_rate == pytest.approx(2 / 3)
    assert two.token_hit_rate == pytest.approx(1 / 3)
    assert [(t.requests, t.hits) for t in two.targets] == [(3, 1), (3, 1)]
    assert all(t.ttft_mean is not None for t in two.targets)


def test_bench_cli_across_targets_reports_the_cluster(
    servers: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, a, b = servers
    argv = ["bench", "qa", "--target", a, "--target", b + "/", "--out", str(tmp_path)]
    argv += ["--seed", "42", "--documents", "2", "--scale", "0.2", "--no-progress", "--no-plots"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = [cells(line) for line in out.splitlines()]
    cluster_row = next(r for r in rows if r[:3] == ["2", "targets", "2"])
    assert cluster_row[3] == "33%" and cluster_row[-4:] == ["33%", "(2", "of", "6)"]
    for url in (a, b):
        assert next(r for r in rows if r[2:3] == [url])[3:5] == ["3", "1"]
    data = json.loads((tmp_path / "qa.json").read_text())
    (run,) = data["runs"]
    assert run["label"] == "2 targets" and run["targets"] == [a, b] and run["url"] == a
    assert sorted(r["target"] for r in run["requests"]) == [0, 0, 0, 1, 1, 1]
    figures = run["summary"]["cluster"]
    assert figures["request_hit_rate"] == pytest.approx(1 / 3)
    assert [t["url"] for t in figures["targets"]] == [a, b]
    argv = ["bench", "--replay", str(tmp_path / "qa.json"), "--no-plots"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith(out.split("wrote ")[0])
