"""Replicas with and without a shared Redis tier, on one machine.

It starts ``redis-server`` and ``promptcache serve`` replicas as subprocesses on free loopback
ports, runs the measurements, prints the tables and stops everything:

1. **qa, round robin** (``promptcache bench qa`` with one ``--target`` per replica): 1 replica
   (the ideal), 3 replicas without Redis, 3 replicas with Redis. For each: the cluster hit rate
   (tokens read over cacheable tokens, and requests that hit) and the mean TTFT, overall and of
   the hits.
2. **A Redis hit against a local hit** (``--hit-tokens``, default 4096): a fresh prefix of that
   many tokens is sent to replica A (a miss that writes it), to A again with another question (a
   hit in A's memory) and, once A's write to Redis is done, to replica B (a hit read from Redis
   and promoted). Each figure is the median TTFT of ``--repeats`` prefixes, streamed, one
   output token; the ``x-promptcache-cache`` header confirms the tier.

The replicas run the embedded model by default (``--engine fake`` for the plumbing alone); on a
machine of few cores they share its CPUs, so times are for comparing the three runs, not for
absolute speed::

    .venv/bin/python benchmarks/cluster.py [--engine fake] [--scale 0.4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
from ttft import Bench, text_of  # the sibling script: streamed TTFT and prompts of N tokens

from promptcache.bench import client, report, workloads
from promptcache.bench.peers import free_port
from promptcache.bench.prices import DEFAULT

REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A subprocess with its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@contextmanager
def redis(workdir: Path) -> Iterator[str]:
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = Proc([executable, *args, "--dir", str(workdir)], workdir / "redis.log")
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("redis-server did not start")
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()


@contextmanager
def replicas(
    n: int, args: argparse.Namespace, workdir: Path, redis_url: str | None
) -> Iterator[list[str]]:
    """``n`` replicas started together (their models load in parallel), ready."""
    started: list[tuple[Proc, str]] = []
    for _ in range(n):
        port = free_port()
        argv = [sys.executable, "-m", "promptcache", "serve", "--port", str(port)]
        argv += ["--engine", args.engine, "--log-level", "warning"]
        if args.model:
            argv += ["--model", args.model]
        if redis_url:
            argv += ["--redis-url", redis_url]
        started.append((Proc(argv, workdir / f"serve-{port}.log"), f"http://127.0.0.1:{port}"))
    try:
        deadline = time.monotonic() + 600
        for proc, url in started:
            while True:
                if proc.proc.poll() is not None:
                    sys.exit(f"replica exited: {proc.log.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit(f"replica {url} not ready")
                time.sleep(0.1)
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            proc.stop()


def qa_runs(args: argparse.Namespace, workdir: Path) -> None:
    workload = workloads.qa(
        args.seed, documents=args.documents, questions=args.questions, scale=args.scale
    )
    rows = []
    for label, n, shared in (
        ("1 replica", 1, False),
        ("3 replicas", 3, False),
        ("3 replicas + Redis", 3, True),
    ):
        with (
            redis(workdir) if shared else _none() as url,
            replicas(n, args, workdir, url) as urls,
        ):
            records = client.run(workload, [client.Target(u) for u in urls])
        errors = [r.error for r in records if r.error]
        if errors:
            sys.exit(f"{label}: {errors[0]}")
        run = report.Run(label, urls[0], "anthropic", False, records, targets=urls)
        c = report.summarize(run, DEFAULT).cluster
        ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
        hits = [r.ttft_s for r in records if r.ttft_s is not None and (r.cache_read_tokens or 0)]
        rows.append(
            (
                label,
                f"{(c.token_hit_rate or 0):.0%}",
                f"{c.hits} of {c.requests}",
                f"{c.cache_read_tokens:,}",
                f"{sum(r.cache_write_tokens or 0 for r in records):,}",
                f"{statistics.mean(ttfts):.2f} s",
                f"{statistics.mean(hits):.2f} s" if hits else "-",
            )
        )
    print(
        f"qa: {args.documents} documents x {args.questions} questions, scale {args.scale}, "
        f"round robin per document, engine {args.engine}"
    )
    table(
        ("run", "hit rate (tokens)", "hits", "read", "written", "TTFT mean", "hit TTFT mean"),
        rows,
    )


@contextmanager
def _none() -> Iterator[None]:
    yield None


def hit_runs(args: argparse.Namespace, workdir: Path) -> None:
    rows: dict[str, list[float]] = {"miss (A)": [], "local hit (A)": [], "Redis hit (B)": []}
    tiers: dict[str, set[str]] = {name: set() for name in rows}
    tokens = 0
    with redis(workdir) as url, replicas(2, args, workdir, url) as (a, b):
        bench_a, bench_b = Bench(a), Bench(b)
        bench_a.ttft(bench_a.body(bench_a.prefix(256, 1), "warm up", cached=False))
        bench_b.ttft(bench_b.body(bench_b.prefix(256, 2), "warm up", cached=False))
        seed = int(time.time()) % 100_000
        for i in range(args.repeats):
            system = bench_a.prefix(args.hit_tokens, seed + i)
            for name, bench, question in (
                ("miss (A)", bench_a, text_of(30, i)),
                ("local hit (A)", bench_a, text_of(30, i + 1)),
                ("Redis hit (B)", bench_b, text_of(30, i + 2)),
            ):
                if name == "Redis hit (B)":
                    wait_for_write(a)
                seconds, usage = bench.ttft(bench.body(system, question, cached=True))
                rows[name].append(seconds)
                read = usage.get("cache_read_input_tokens", 0)
                tiers[name].add("read" if read else "miss")
                tokens = max(tokens, read)
    print(f"\nTTFT of a {tokens:,}-token prefix (median of {args.repeats}), engine {args.engine}")
    miss = statistics.median(rows["miss (A)"])
    table(
        ("request", "TTFT", "vs miss", "usage"),
        [
            (
                name,
                f"{statistics.median(times) * 1e3:.0f} ms",
                f"{statistics.median(times) / miss:.2f}x",
                "/".join(sorted(tiers[name])),
            )
            for name, times in rows.items()
        ],
    )


def wait_for_write(url: str, timeout_s: float = 30) -> None:
    """Until the replica has no write to Redis queued or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if "promptcache_remote_pending_writes 0.0" in text:
            return
        time.sleep(0.02)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--engine", default="hf", help="hf (the embedded model) or fake")
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.4)
    parser.add_argument("--hit-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-qa", action="store_true")
    parser.add_argument("--skip-hit", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pc-cluster-"))
    try:
        if not args.skip_qa:
            qa_runs(args, workdir)
        if not args.skip_hit:
            hit_runs(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
