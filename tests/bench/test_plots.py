"""The PNG plots: drawn for any report, a run whose every request failed included."""

from __future__ import annotations

from pathlib import Path

from promptcache.bench import plots, report
from promptcache.bench.client import RequestRecord
from promptcache.bench.prices import DEFAULT


def test_a_run_whose_every_request_failed_still_plots(tmp_path: Path) -> None:
    # A server still loading its model answers 503 to everything: no TTFT, no rate, no cost.
    failed = [
        RequestRecord(i, f"doc0/q{i}", "c", i > 0, 0.1 * i, None, 0.1, error="HTTP 503: loading")
        for i in range(3)
    ]
    run = report.Run("promptcache", "http://x", "openai", False, failed)
    written = plots.write_plots(report.Report("qa", {}, 3, DEFAULT, [run]), tmp_path, "qa")
    assert [p.name for p in written] == ["qa-ttft.png", "qa-cost.png"]
    assert all(p.stat().st_size > 0 for p in written)
