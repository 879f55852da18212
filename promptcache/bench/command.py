"""The ``promptcache bench`` subcommand: its arguments and what it runs.

Importing this module is cheap (argparse only): the CLI builds its parser from it on every
invocation, and the heavy modules (httpx, matplotlib, the peer runner) load only when a
benchmark actually runs.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from promptcache.bench.peers import Slot
    from promptcache.bench.report import Report, Run
    from promptcache.bench.wire import Protocol
    from promptcache.bench.workloads import Workload

WORKLOADS = ("qa", "agent", "chat", "decode")

EPILOG = """\
examples:
  promptcache bench qa --target http://127.0.0.1:8000             # any Anthropic-style server
  promptcache bench agent --target http://127.0.0.1:8080 --protocol openai
  promptcache bench qa --target http://127.0.0.1:8000 --cold      # the cold control
  promptcache bench qa --target http://127.0.0.1:8001 --target http://127.0.0.1:8002
                                              # replicas, round robin; prints the cluster hit rate
  promptcache bench qa --peers                # promptcache, cold, llama-cpp-python, llama-server
  promptcache bench decode --peers            # 256-token answers, 8 clients at once per peer
  promptcache bench qa --dry-run --documents 10 --scale 4         # sizes only, no server
  promptcache bench --replay bench-out/qa.json                    # table and plots again
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="run a prompt-caching workload against a server (or peers) and report",
        description="Drive a compatible server with a realistic prompt-caching workload and "
        "report TTFT (hit vs miss), throughput, tokens not recomputed and hosted-price cost.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("workload", nargs="?", choices=WORKLOADS, help="qa, agent, chat or decode")
    where = p.add_argument_group("where")
    where.add_argument(
        "--target",
        action="append",
        help="base URL of the server, e.g. http://127.0.0.1:8000; repeat it for replicas: "
        "requests go round robin across them and the report adds the cluster hit rate",
    )
    where.add_argument(
        "--peers",
        nargs="?",
        const="promptcache,cold,llama-cpp,llama-server",
        help="start the peers on loopback and run each "
        "(default all: promptcache,cold,llama-cpp,llama-server)",
    )
    where.add_argument(
        "--protocol",
        choices=("anthropic", "openai"),
        help="wire protocol (default anthropic with --target; openai with --peers, so every "
        "server sees the same requests)",
    )
    where.add_argument("--api-key", default="bench", help="credential sent (default 'bench')")
    where.add_argument("--model-name", help="model to ask for (default: the server's first)")
    where.add_argument(
        "--label", help="name of the run in the report (default: the URL, or 'N targets')"
    )
    where.add_argument("--cold", action="store_true", help="the cold control: caching off")
    where.add_argument(
        "--concurrency",
        type=int,
        help="requests in flight (default 1; decode: its --clients). With --peers, 1 takes turns "
        "request by request; N > 1 runs the whole schedule on each peer in turn, N in flight",
    )
    where.add_argument("--timeout", type=float, default=900.0, help="per request, seconds")
    where.add_argument("--no-warmup", action="store_true", help="skip the one tiny first request")

    size = p.add_argument_group("workload size (defaults finish in minutes on 2 CPU cores)")
    size.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    size.add_argument("--scale", type=float, default=1.0, help="multiply long-context sizes")
    size.add_argument(
        "--max-tokens",
        type=int,
        help="reply length cap (default 16, the prompt side; decode: 256). Raise it to measure "
        "long answers: total time and decode rate",
    )
    size.add_argument(
        "--ttl",
        choices=("5m", "1h"),
        help="breakpoint TTL (default 5m; 1h with --peers, whose turn-taking stretches the time "
        "between a document's questions by the number of servers)",
    )
    size.add_argument("--documents", type=int, default=3, help="qa: documents (default 3)")
    size.add_argument("--questions", type=int, default=3, help="qa: questions each (default 3)")
    size.add_argument("--clients", type=int, help="qa: clients (default 3); decode: (default 8)")
    size.add_argument(
        "--arrival",
        choices=("rounds", "rolling"),
        default="rounds",
        help="qa: rounds (default: every document's first question, then every second, ...) or "
        "rolling (documents arrive while earlier ones are still asked about: with --concurrency "
        "above 1, a new document's miss runs beside other documents' hits)",
    )
    size.add_argument("--rounds", type=int, default=1, help="decode: requests per client (1)")
    size.add_argument("--tasks", type=int, default=2, help="agent: tasks (default 2)")
    size.add_argument("--calls", type=int, default=6, help="agent: calls per task (default 6)")
    size.add_argument("--tools", type=int, default=8, help="agent: tools (default 8)")
    size.add_argument("--conversations", type=int, default=2, help="chat: conversations")
    size.add_argument("--turns", type=int, default=4, help="chat: turns each (default 4)")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("bench-out"), help="default bench-out/")
    out.add_argument("--prices", type=Path, help="price sheet (TOML/JSON; keys: see docs)")
    out.add_argument("--price-input", type=float, help="input $/MTok (default 3)")
    out.add_argument("--price-output", type=float, help="output $/MTok (default 15)")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--dry-run", action="store_true", help="print the workload's sizes only")
    out.add_argument("--replay", type=Path, help="re-render a saved JSON report")

    peers = p.add_argument_group("peers")
    peers.add_argument(
        "--peers-python",
        type=Path,
        default=Path(".venv-peers/bin/python"),
        help="python with llama-cpp-python[server] (default .venv-peers/bin/python)",
    )
    peers.add_argument(
        "--llama-server",
        type=Path,
        default=Path(".venv-peers/bin/llama-server"),
        help="llama.cpp's llama-server binary (default .venv-peers/bin/llama-server)",
    )
    peers.add_argument("--gguf", type=Path, help="GGUF for llama-cpp (default: embedded Gemma)")
    peers.add_argument(
        "--threads", type=int, help="llama-cpp and llama-server threads (default: all cores)"
    )
    return p


def build_workload(args: argparse.Namespace) -> Workload:
    """The workload the arguments describe."""
    from promptcache.bench import workloads

    ttl = args.ttl or ("1h" if args.peers else "5m")
    common: dict[str, Any] = dict(scale=args.scale, ttl=ttl)
    if args.max_tokens is not None:
        common["max_tokens"] = args.max_tokens
    if args.workload == "decode":
        return workloads.decode(args.seed, clients=args.clients or 8, rounds=args.rounds, **common)
    if args.workload == "qa":
        return workloads.qa(
            args.seed,
            documents=args.documents,
            questions=args.questions,
            clients=args.clients or 3,
            arrival=args.arrival,
            **common,
        )
    if args.workload == "agent":
        return workloads.agent(
            args.seed, tasks=args.tasks, calls=args.calls, tools=args.tools, **common
        )
    return workloads.chat(args.seed, conversations=args.conversations, turns=args.turns, **common)


def describe(workload: Workload) -> str:
    """Request count and prompt sizes, for ``--dry-run``."""
    from promptcache.bench.workloads import estimated_tokens

    sizes = [estimated_tokens(r) for r in workload.requests]
    repeats = sum(r.repeat for r in workload.requests)
    params = ", ".join(f"{k}={v}" for k, v in workload.params.items())
    return (
        f"workload {workload.name} ({params})\n"
        f"{len(sizes)} requests, {repeats} with a prefix sent before (ideal hits), "
        f"~{sum(sizes):,} prompt tokens in all (largest ~{max(sizes, default=0):,}; "
        "estimated, chat-format markup excluded)"
    )


def _fail(message: str) -> int:
    print(f"promptcache bench: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run ``promptcache bench`` as ``args`` say; the exit status."""
    from promptcache.bench import prices as prices_mod
    from promptcache.bench import report as report_mod

    replay = report_mod.load(args.replay) if args.replay else None
    try:
        prices = prices_mod.load(
            args.prices,
            base=replay.prices if replay else prices_mod.DEFAULT,
            input_per_mtok=args.price_input,
            output_per_mtok=args.price_output,
        )
    except (OSError, ValueError, TypeError) as exc:
        return _fail(f"bad price sheet: {exc}")
    if replay is not None:
        replay.prices = prices
        return _emit(replay, args, stem=args.replay.stem, write_json=False)
    if args.workload is None:
        if args.peers in WORKLOADS:  # "bench --peers qa": --peers took the workload's name
            return _fail(f"write the workload first: promptcache bench {args.peers} --peers")
        return _fail("name a workload (qa, agent, chat or decode), or --replay a report")
    workload = build_workload(args)
    if args.concurrency is None:
        # decode is about clients streaming at once; the others default to one at a time.
        args.concurrency = int(workload.params["clients"]) if workload.name == "decode" else 1
    if args.concurrency < 1:
        return _fail("--concurrency must be at least 1")
    if args.dry_run:
        print(describe(workload))
        return 0
    if bool(args.target) == bool(args.peers):
        return _fail("give either --target URL or --peers")
    report = report_mod.Report(workload.name, dict(workload.params), args.concurrency, prices, [])
    try:
        if args.peers:
            status = _run_peers(args, workload, report)
            if status:
                return status
        else:
            default = args.target[0] if len(args.target) == 1 else f"{len(args.target)} targets"
            label = args.label or default + (" (cold)" if args.cold else "")
            _run_one(args, workload, report, label, args.protocol or "anthropic", args.cold)
    except (KeyboardInterrupt, SystemExit):
        # SystemExit: the peer runner turns SIGTERM into it once its servers are stopped.
        print("interrupted; reporting what finished", file=sys.stderr)
    stem = workload.name + ("-cold" if args.cold and not args.peers else "")
    return _emit(report, args, stem=stem, write_json=True)


def _run_one(
    args: argparse.Namespace,
    workload: Workload,
    report: Report,
    label: str,
    protocol: str,
    cold: bool,
    url: str | None = None,
) -> None:
    from tqdm import tqdm

    from promptcache.bench import client, workloads
    from promptcache.bench.report import Run

    if cold:
        workload = workloads.cold(workload)
    urls = [u.rstrip("/") for u in ([url] if url else args.target)]
    proto = cast("Protocol", protocol)
    targets = [client.Target(u, proto, args.api_key, args.model_name, args.timeout) for u in urls]
    # A server started just before the benchmark may still be loading its model: wait for
    # it rather than record a run of 503s.
    for u in urls:
        say = functools.partial(print, f"waiting for {u} to load its model", file=sys.stderr)
        if not client.wait_until_loaded(u, args.timeout, waiting=say):
            print(f"{u} still loading after {args.timeout:g} s; running anyway", file=sys.stderr)

    # The run joins the report before it starts, so an interrupted run still reports.
    ttl = str(workload.params.get("ttl", "5m"))
    run = Run(label, urls[0], protocol, cold, [], ttl=ttl, targets=urls)
    report.runs.append(run)
    bar = tqdm(
        total=len(workload.requests),
        desc=label,
        unit="req",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
    )

    def done(record: client.RequestRecord) -> None:
        run.records.append(record)
        ttft = "error" if record.error else f"{record.ttft_s or 0:.2f}s"
        where = f" @{record.target + 1}" if len(urls) > 1 else ""
        bar.set_postfix_str(f"{record.label}{where} ttft {ttft}", refresh=False)
        bar.update(1)

    try:
        client.run(
            workload, targets, concurrency=args.concurrency, warmup=not args.no_warmup, on_done=done
        )
    finally:
        bar.close()


def _run_peers(args: argparse.Namespace, workload: Workload, report: Report) -> int:
    import os

    from promptcache.bench import peers

    plan = peers.PeerPlan(
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        peers_python=args.peers_python,
        llama_server_bin=args.llama_server,
        gguf=args.gguf,
        slots=args.concurrency,
        threads=args.threads or os.cpu_count() or 1,
    )
    problems = peers.check(plan)
    if problems:
        return _fail("\n".join(problems))
    protocol = args.protocol or "openai"

    def run_all(slots: list[peers.Slot]) -> list[Run]:
        if args.concurrency == 1:
            return _run_interleaved(args, workload, report, slots)
        # Batching needs requests in flight together, so taking turns request by request cannot
        # show it: each run gets the whole schedule in turn while the other servers idle (an idle
        # server costs nothing), so no run competes with another for the CPU.
        runs = []
        for slot in slots:
            _run_one(args, workload, report, slot.label, slot.protocol, slot.cold, slot.url)
            runs.append(report.runs[-1])
        return runs

    started = time.monotonic()
    peers.run_peers(plan, args.out, protocol, run_all)
    print(f"peer runs took {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


def _run_interleaved(
    args: argparse.Namespace, workload: Workload, report: Report, slots: list[Slot]
) -> list[Run]:
    from tqdm import tqdm

    from promptcache.bench import client, workloads
    from promptcache.bench.report import Run

    ttl = str(workload.params.get("ttl", "5m"))
    # The runs join the report before they start, so an interrupted run still reports.
    runs = [Run(s.label, s.url, s.protocol, s.cold, [], ttl=ttl) for s in slots]
    report.runs.extend(runs)
    pairs = [
        (
            workloads.cold(workload) if s.cold else workload,
            client.Target(
                s.url.rstrip("/"),
                cast("Protocol", s.protocol),
                args.api_key,
                args.model_name,
                args.timeout,
            ),
        )
        for s in slots
    ]
    bar = tqdm(
        total=len(workload.requests) * len(slots),
        desc="peers",
        unit="req",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
    )

    def done(k: int, record: client.RequestRecord) -> None:
        runs[k].records.append(record)
        ttft = "error" if record.error else f"{record.ttft_s or 0:.2f}s"
        bar.set_postfix_str(f"{slots[k].label} {record.label} ttft {ttft}", refresh=False)
        bar.update(1)

    try:
        client.run_interleaved(pairs, warmup=not args.no_warmup, on_done=done)
    finally:
        bar.close()
    return runs


def _emit(report: Report, args: argparse.Namespace, *, stem: str, write_json: bool) -> int:
    from promptcache.bench.report import render

    print(render(report))
    written = []
    if write_json:
        path = args.out / f"{stem}.json"
        report.write(path)
        written.append(path)
    if not args.no_plots and report.runs:
        from promptcache.bench.plots import write_plots

        written += write_plots(report, args.out, stem)
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    if not write_json:
        return 0  # a replay re-renders; failures were reported when the run happened
    failed = any(r.error for run in report.runs for r in run.records)
    return 1 if failed or not report.runs else 0


__all__ = ["add_parser", "build_workload", "describe", "run"]
