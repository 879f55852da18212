"""Report maths on recorded runs: percentiles, hit/miss split, costs, "not reported"."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from promptcache.bench import prices, report
from promptcache.bench.client import RequestRecord

FIXTURE = Path(__file__).parent / "fixtures" / "recorded.json"
IN, OUT = 3e-6, 15e-6  # default sheet, dollars per token


def approx(x: float) -> Any:
    return pytest.approx(x, rel=0, abs=1e-12)


@pytest.fixture
def recorded() -> report.Report:
    return report.load(FIXTURE)


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert report.percentile([5.0], 0.95) == 5.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert report.percentile([4.0, 1.0, 3.0, 2.0], 0.95) == approx(3.85)
    assert report.percentile([0.0, 10.0], 0.0) == 0.0
    assert report.percentile([0.0, 10.0], 1.0) == 10.0
    with pytest.raises(ValueError):
        report.percentile([], 0.5)
    assert report.stats([]) == report.Stats(0, None, None, None)


def test_promptcache_run_splits_by_reported_cache_reads(recorded: report.Report) -> None:
    s = report.summarize(recorded.runs[0], recorded.prices)
    assert (s.requests, s.errors, s.split_basis) == (6, 1, "usage")
    assert s.hit == report.Stats(3, approx(0.5), approx(0.5), approx(0.59))
    assert s.miss == report.Stats(2, approx(8.5), approx(8.5), approx(8.95))
    assert s.ttft == report.Stats(5, approx(3.7), approx(0.6), approx(8.8))
    assert s.wall_s == approx(28.6)
    assert s.total_time.mean == approx((10.0 + 11.0 + 2.5 + 2.4 + 2.6) / 5)
    assert (s.prompt_tokens, s.cache_read_tokens, s.cache_write_tokens) == (13205, 7840, 5260)
    assert s.output_tokens == 76
    assert s.output_tokens_per_s == approx(76 / 28.6)
    assert s.requests_per_min == approx(60 * 5 / 28.6)


def test_promptcache_run_costs(recorded: report.Report) -> None:
    s = report.summarize(recorded.runs[0], recorded.prices)
    uncached = (2600 + 2700 + 2610 + 2705 + 2590) * IN + 76 * OUT
    cached = (
        (20 * IN + 2580 * IN * 1.25)  # 5m write
        + (20 * IN + 2680 * IN * 2.0)  # 1h write
        + (30 * IN + 2580 * IN * 0.1)
        + (25 * IN + 2680 * IN * 0.1)
        + (10 * IN + 2580 * IN * 0.1)
        + 76 * OUT
    )
    assert s.cost_without_caching == approx(uncached)
    assert s.cost_with_caching == approx(cached)
    assert uncached == approx(0.040755)
    assert cached == approx(0.029562)
    assert s.saving == approx(1 - 0.029562 / 0.040755)


def test_server_without_cache_usage_says_not_reported(recorded: report.Report) -> None:
    s = report.summarize(recorded.runs[1], recorded.prices)
    assert s.split_basis == "workload"
    assert s.hit == report.Stats(2, approx(1.5), approx(1.5), approx(1.95))
    assert s.miss == report.Stats(2, approx(3.1), approx(3.1), approx(3.19))
    assert s.cache_read_tokens is None and s.cache_write_tokens is None
    assert s.cost_with_caching is None and s.saving is None
    assert s.cost_without_caching == approx(10800 * IN + 64 * OUT)
    table = report.render(recorded)
    assert "not reported" in table
    assert "llama-cpp-python*" in table and "workload's view" in table


def test_table_compares_mean_ttft(recorded: report.Report) -> None:
    table = report.render(recorded)
    assert (
        "mean TTFT: promptcache 3.70 s vs llama-cpp-python 2.30 s: "
        "llama-cpp-python is 1.6x faster to the first token"
    ) in table
    assert "$0.0296" in table and "$0.0408" in table and "27%" in table
    assert "promptcache: 1 failed, first: HTTP 529: overloaded" in table


def test_unsplit_writes_are_billed_at_the_workload_ttl() -> None:
    r = RequestRecord(0, "a", "s", False, 0.0, 1.0, 2.0, 2000, 0, 1500, None, 10)
    sheet = prices.DEFAULT
    five, _ = report.request_costs(r, sheet, "5m")
    hour, uncached = report.request_costs(r, sheet, "1h")
    assert five == approx(500 * IN + 1500 * IN * 1.25 + 10 * OUT)
    assert hour == approx(500 * IN + 1500 * IN * 2 + 10 * OUT)
    assert uncached == approx(2000 * IN + 10 * OUT)


def test_price_sheet_from_file_and_flags(tmp_path: Path) -> None:
    sheet = tmp_path / "haiku.toml"
    sheet.write_text('name = "Haiku-class"\ninput_per_mtok = 1.0\noutput_per_mtok = 5.0\n')
    p = prices.load(sheet, output_per_mtok=4.0, input_per_mtok=None)
    assert (p.name, p.input_per_mtok, p.output_per_mtok, p.read_multiplier) == (
        "Haiku-class",
        1.0,
        4.0,
        0.1,
    )
    assert prices.cost(p, uncached=1_000_000, read=1_000_000, output=1_000_000) == approx(5.1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"input": 1}')
    with pytest.raises(ValueError, match="unknown price keys"):
        prices.load(bad)


def test_report_round_trips_through_json(recorded: report.Report, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    recorded.write(path)
    again = report.load(path)
    assert again.runs[0].records == recorded.runs[0].records
    assert report.render(again) == report.render(recorded)


DECODE = Path(__file__).parent / "fixtures" / "recorded-decode.json"


@pytest.fixture
def decode_run() -> report.Report:
    return report.load(DECODE)


def test_decode_rate_total_time_and_aggregate_rate(decode_run: report.Report) -> None:
    s = report.summarize(decode_run.runs[0], decode_run.prices)
    # (n - 1) / (total - ttft): 100/10, 160/20, 60/5 tokens per second after the first token.
    assert s.decode_rate == report.Stats(3, approx(10.0), approx(10.0), approx(11.8))
    assert s.total_time.p50 == approx(11.0)
    assert s.total_time.mean == approx((11.0 + 21.5 + 7.0) / 3)
    # Concurrent requests: the wall time is the first start to the last end, not a sum.
    assert s.wall_s == approx(21.6)
    assert s.output_tokens_per_s == approx((101 + 161 + 61) / 21.6)
    assert s.token_basis == "usage"


def test_decode_rate_from_stream_chunks_without_usage(decode_run: report.Report) -> None:
    s = report.summarize(decode_run.runs[1], decode_run.prices)
    assert s.token_basis == "chunks" and s.output_tokens is None
    assert s.decode_rate.p50 == approx(40.0)  # 250/5, 200/10, 160/4
    assert s.output_tokens_per_s == approx((251 + 201 + 161) / 20.5)


def test_llama_server_reports_reads_but_not_writes(decode_run: report.Report) -> None:
    s = report.summarize(decode_run.runs[2], decode_run.prices)
    # A one-token answer has no decode phase and is left out of the rate.
    assert s.decode_rate == report.Stats(2, approx(50.5), approx(50.5), approx(50.95))
    assert (s.split_basis, s.miss.n, s.cache_read_tokens) == ("usage", 3, 0)
    assert s.cache_write_tokens is None and s.cost_with_caching is None
    assert s.cost_without_caching is not None


def test_table_shows_answer_figures(decode_run: report.Report) -> None:
    table = report.render(decode_run)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("run") and "decode p50" in line)
    assert header.split() == [
        "run",
        "total",
        "p50",
        "total",
        "mean",
        "decode",
        "p50",
        "out",
        "tok/s",
        "req/min",
        "wall",
    ]
    row = lines[lines.index(header) + 2]  # under the dashes
    assert row.split() == [
        "promptcache",
        "11.00",
        "s",
        "13.17",
        "s",
        "10.0",
        "tok/s",
        "15.0",
        "8.3",
        "22",
        "s",
    ]
    assert any(line.startswith("llama-cpp-python\u2020") for line in lines)
    assert "content deltas are counted" in table
    assert "concurrency 3" in lines[0]
    assert (
        "decode p50: promptcache 10.0 tok/s vs llama-server 50.5 tok/s (5.0x, llama-server" in table
    )


def test_a_small_shared_read_is_not_a_hit() -> None:
    # llama-server reports reading the BOS of a prompt on a new document: a miss.
    new_doc = RequestRecord(0, "doc1/q0", "c", False, 0.0, 3.0, 3.5, 2700, 1, None, None, 16)
    same_doc = RequestRecord(1, "doc1/q1", "c", True, 3.5, 0.2, 0.7, 2705, 2690, None, None, 16)
    assert not report.is_hit(new_doc, "usage") and report.is_hit(same_doc, "usage")
    # Without a prompt count, any read is a hit.
    bare = RequestRecord(2, "x", "c", True, 0.0, 0.1, 0.2, None, 5, None, None, 1)
    assert report.is_hit(bare, "usage")


def _record(i: int, start: float, ttft: float, read: int, prefix: str = "doc1") -> RequestRecord:
    return RequestRecord(
        i, f"r{i}", f"c{i}", i > 0, start, ttft, ttft + 0.5, 2700, read, None, None, 16,
        prefix=prefix,
    )  # fmt: skip


def test_a_hit_sent_while_its_prefix_was_being_read_is_joined() -> None:
    miss = _record(0, 0.0, 4.0, 0)
    joined = _record(1, 1.0, 3.2, 2690)  # sent before the miss's first token, at 4.0 s
    later = _record(2, 4.5, 0.1, 2690)  # sent after it: a hit like any other
    other = _record(3, 1.0, 0.2, 2690, prefix="doc2")  # another prefix, cached before
    beside = _record(4, 1.5, 0.15, 2690, prefix="doc2")  # beside a hit of its prefix
    records = [miss, joined, later, other, beside]
    assert report.joined_hits(records, "usage") == {1}
    run = report.Run("promptcache", "http://x", "anthropic", False, records)
    s = report.summarize(run, prices.DEFAULT)
    assert (s.hit.n, s.joined.n, s.miss.n) == (3, 1, 1)
    assert s.joined.p50 == approx(3.2) and s.hit.p95 is not None and s.hit.p95 < 0.2
    assert s.ttft.n == 5  # the mean still counts every request
    table = report.render(report.Report("qa", {}, 3, prices.DEFAULT, [run]))
    assert "joined p50" in table.splitlines()[2] and "3.20 s (1)" in table
    # A record without a prefix (an older report) is never joined; a table without joined
    # hits keeps its columns.
    bare = [replace(r, prefix="") for r in records]
    assert report.joined_hits(bare, "usage") == set()
    plain = report.Run("promptcache", "http://x", "anthropic", False, bare)
    assert "joined" not in report.render(report.Report("qa", {}, 3, prices.DEFAULT, [plain]))
