"""Cold vs cached time to first token, measured side by side on one server.

For cached prefixes of about 1k, 2k and 4k tokens followed by a 64-token suffix, it streams
``POST /v1/messages`` and times the first ``content_block_delta`` (or, when the model answers
with an immediate end of turn, the ``message_delta``):

- cold+write: a fresh prefix with a breakpoint (a miss that writes the entry),
- hit:        the same prefix again with a new suffix (reads the entry),
- cold:       a fresh prefix without a breakpoint (the write overhead is cold+write vs cold).

Each figure is the median of ``--repeats`` runs. With no ``--url`` it starts promptcache in
process on the embedded default model (``--model`` to choose another)::

    .venv/bin/python benchmarks/ttft.py [--url http://127.0.0.1:8000] [--sizes 1024,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

SUFFIX_TOKENS = 64
CORPUS = (
    "the contract sets out terms of service between parties including payment schedules "
    "liability limits termination clauses confidentiality obligations governing law and the "
    "resolution of disputes through arbitration in the agreed venue under applicable rules"
)
WORDS = CORPUS.split(" ")


def text_of(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 13) % len(WORDS)] for i in range(n_words))


class Bench:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=600.0)
        self.headers = {"anthropic-version": "2023-06-01", "x-api-key": "bench"}

    def count(self, body: dict[str, Any]) -> int:
        fields = {k: v for k, v in body.items() if k not in ("max_tokens", "stream", "temperature")}
        r = self.client.post("/v1/messages/count_tokens", json=fields, headers=self.headers)
        r.raise_for_status()
        return int(r.json()["input_tokens"])

    def prefix(self, tokens: int, seed: int) -> str:
        """A text of at least ``tokens`` tokens (rendered as the system prompt); ``seed`` makes it
        unique, so it is cold."""
        words = tokens
        while True:
            text = f"[{seed}] " + text_of(words, seed)
            body = self.body(text, "", cached=False)
            body["messages"] = [{"role": "user", "content": "?"}]
            n = self.count(body)
            if n >= tokens + 8:
                return text
            words = int(words * (tokens + 16) / max(n, 1)) + 1

    @staticmethod
    def body(system: str, question: str, *, cached: bool) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "text", "text": system}
        if cached:
            block["cache_control"] = {"type": "ephemeral"}
        return {
            "model": "bench",
            "max_tokens": 1,
            "temperature": 0.0,
            "stream": True,
            "system": [block],
            "messages": [{"role": "user", "content": question}],
        }

    def ttft(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Seconds to the first token, and the usage of ``message_start``."""
        start = time.perf_counter()
        first = None
        usage: dict[str, Any] = {}
        with self.client.stream("POST", "/v1/messages", json=body, headers=self.headers) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "message_start":
                    usage = event["message"]["usage"]
                elif event["type"] in ("content_block_delta", "message_delta") and first is None:
                    first = time.perf_counter() - start
        assert first is not None, "no token event"
        return first, usage


@contextmanager
def in_process_server(model: str | None) -> Iterator[str]:
    from promptcache.api.server import BackgroundServer
    from promptcache.config import load
    from promptcache.engine.registry import engine_factory
    from promptcache.service import Service

    cfg = load({"model": model})
    print("loading model ...", file=sys.stderr)
    service = Service(engine_factory(cfg.engine)(), cfg)
    server = BackgroundServer(service).start()
    try:
        yield server.base_url
    finally:
        server.stop()


def run(url: str, sizes: list[int], repeats: int) -> None:
    bench = Bench(url)
    question_words = SUFFIX_TOKENS  # about one token per word; calibrated below
    seed = int(time.time()) % 100_000
    print(
        f"{'prefix':>7} {'cold+write':>11} {'cold':>8} {'hit':>8} {'cold/hit':>9} "
        f"{'write ovh':>10}  usage (read/written/uncached)"
    )
    bench.ttft(bench.body(bench.prefix(256, seed), "warm up", cached=False))  # first-call costs
    for size in sizes:
        cold_w, cold, hit = [], [], []
        usage_hit: dict[str, Any] = {}
        for _r in range(repeats):
            seed += 1
            question = text_of(question_words, seed)[: SUFFIX_TOKENS * 5 // 2]
            system = bench.prefix(size, seed)
            t, _ = bench.ttft(bench.body(system, question, cached=True))
            cold_w.append(t)
            t, usage_hit = bench.ttft(bench.body(system, question[::-1], cached=True))
            hit.append(t)
            seed += 1
            t, _ = bench.ttft(bench.body(bench.prefix(size, seed), question, cached=False))
            cold.append(t)
        cw, c, h = (statistics.median(x) for x in (cold_w, cold, hit))
        print(
            f"{usage_hit.get('cache_read_input_tokens', 0):>7} "
            f"{cw * 1000:>9.0f}ms {c * 1000:>6.0f}ms "
            f"{h * 1000:>6.0f}ms {c / h:>8.1f}x {100 * (cw - c) / c:>9.1f}%  "
            f"{usage_hit.get('cache_read_input_tokens')}/{usage_hit.get('cache_creation_input_tokens')}"
            f"/{usage_hit.get('input_tokens')}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one in process)")
    parser.add_argument("--model", help="model for the in-process server (default: embedded)")
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.url:
        run(args.url, sizes, args.repeats)
    else:
        with in_process_server(args.model) as url:
            run(url, sizes, args.repeats)


if __name__ == "__main__":
    main()
