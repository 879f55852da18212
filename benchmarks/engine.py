"""The engine alone, side by side with llama.cpp: decode rate, batching, cold vs hit TTFT.

    .venv/bin/python benchmarks/engine.py                       # embedded Gemma 3 270M on the CPU
    .venv/bin/python benchmarks/engine.py --peer                # + llama-cpp-python, same GGUF
    .venv/bin/python benchmarks/engine.py --synthetic llama-3-8b --device cuda --prefix 32768

Runs ``PagedEngine`` in process (no HTTP), greedy, with end-of-turn ignored so every stream
decodes ``--decode-tokens``:

- decode: one stream, then ``--streams`` streams together (total tokens/s and the ratio), each
  measured two ways, alike for both: the decode rate (tokens after the first, over the time
  after the first token; for the streams, after the last stream's first token) and the whole
  run (every token over the time from the request to the last token, the prefill included);
  one stream and the streams take turns ``--repeats`` times, and each figure is a median; and
  one stream sampling at temperature 1 (the APIs' default) instead of greedy; with
  ``--scaling``, every stream count from 1 to ``--streams`` too (each count has kernels of its
  own, and one compiled badly shows as a dip);
- ttft: a ``--prefix``-token prefix plus a 64-token suffix, cold (nothing cached) and hit (the
  prefix restored from a snapshot), medians of ``--repeats``; and the hit sent while another
  user's cold prompt of that length is being read (it has run one step); and a hit with a
  600-token suffix alone and sent the same way;
- with ``--peer``: llama-cpp-python (``.venv-peers``, ``scripts/setup-peers``) on the same GGUF
  file in a subprocess, the same prompts, one stream: its decode rate and cold TTFT, and
  the ratios against ours. Both sides use every core; run it on an otherwise idle machine.

``--synthetic llama-3-8b`` builds random bf16 weights of that shape on the device (no files).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest, Prefilled, TokenOut
from promptcache.engine.paged.engine import PagedEngine

SUFFIX = 64
LONG_SUFFIX = 600
"""A hit's longer suffix (a long new message after the cached prefix), alone and behind a cold
prompt: more than half a step, so it does not count as a short prompt."""
PEER_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
args = json.loads(sys.argv[1])
llm = Llama(model_path=args["gguf"], n_ctx=args["n_ctx"], n_batch=512, logits_all=False,
            verbose=False)
out = {}
def run(tokens, n):
    llm.reset()
    t0 = time.perf_counter(); first = None; count = 0
    for tok in llm.generate(tokens, temp=0.0, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter() - t0
        if count >= n:
            break
    return first, time.perf_counter() - t0, count
run(args["short"], 8)
first, total, count = run(args["short"], args["decode"])
out["decode_tok_s"] = (count - 1) / (total - first)
ttfts = []
for _ in range(args["repeats"]):
    first, _, _ = run(args["long"], 1)
    ttfts.append(first)
out["cold_ttft_s"] = sorted(ttfts)[len(ttfts) // 2]
first, total, count = run(args["long"], args["decode"])
out["decode_long_tok_s"] = (count - 1) / (total - first)
print(json.dumps(out))
"""


def build_engine(args: argparse.Namespace) -> tuple[PagedEngine, Path | None]:
    """The engine under test and the GGUF it was built from (None when synthetic)."""
    if args.synthetic:
        return synthetic_engine(args), None
    from promptcache.engine.hf import loader

    cache_dir = Path.home() / ".cache" / "promptcache"
    engine = loader.load_engine(
        args.model,
        cache_dir=cache_dir,
        device=args.device,
        dtype=args.dtype,
        kv_dtype=args.kv_dtype,
        kv_pool_bytes=args.pool_gib << 30,
        quantize=args.quantize,
        compile_mode=args.compile,
        prompt_products=args.prompt_products,
    )
    # The peer reads the same GGUF: the file given, or the embedded model's (default or named).
    from promptcache.engine.models import EmbeddedModel, resolve_model

    named = resolve_model(args.model)
    if isinstance(named, EmbeddedModel):
        return engine, named.gguf(cache_dir)
    return engine, named if named.suffix == ".gguf" else None


def synthetic_engine(args: argparse.Namespace) -> PagedEngine:
    from transformers import LlamaConfig, LlamaForCausalLM

    from promptcache.core.chatformat import PLAIN
    from promptcache.core.tokenizer import ByteTokenizer
    from promptcache.engine.paged.models import from_hf

    if args.synthetic != "llama-3-8b":
        raise SystemExit(f"unknown synthetic model {args.synthetic!r}")
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        initializer_range=0.02,
    )
    device = torch.device(args.device)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(torch.bfloat16)
    model = from_hf(hf, torch.bfloat16)
    del hf
    return PagedEngine(
        model,
        ByteTokenizer(),
        PLAIN,
        model_id="synthetic-llama-3-8b",
        revision="synthetic",
        max_context_tokens=131072,
        stop_token_ids=(),
        pool_bytes=args.pool_gib << 30,
        max_batch_tokens=args.max_batch_tokens or 2048,
    )


def run(engine: PagedEngine, requests: list[EngineRequest]) -> dict[str, Any]:
    """Run ``requests`` together; time to each one's first token, the end, tokens, snapshots."""
    seqs = {engine.add(r): i for i, r in enumerate(requests)}
    first: dict[int, float] = {}
    snapshots: dict[int, Any] = {}
    ids: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    count = 0
    sync(engine)
    t0 = time.perf_counter()
    while engine.num_running:
        for seq, item in engine.step():
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Prefilled):
                snapshots.update(item.snapshots)
            if isinstance(item, TokenOut):
                count += 1
                ids[seqs[seq]].append(item.token_id)
                first.setdefault(seqs[seq], time.perf_counter() - t0)
    sync(engine)
    total = time.perf_counter() - t0
    return {"first": first, "total": total, "tokens": count, "ids": ids, "snaps": snapshots}


def decode_rate(result: dict[str, Any]) -> float:
    """A ``run``'s decode rate: tokens after each stream's first over the time after the last
    stream's first token."""
    first = result["first"]
    return float((result["tokens"] - len(first)) / (result["total"] - max(first.values())))


def run_behind(engine: PagedEngine, first: EngineRequest, second: EngineRequest) -> float:
    """``second`` sent once ``first`` has run a step: the time to ``second``'s first token."""
    engine.add(first)
    engine.step()
    sync(engine)
    started = time.perf_counter()
    seq = engine.add(second)
    ttft = 0.0
    while engine.num_running:
        for q, item in engine.step():
            if isinstance(item, Exception):
                raise item
            if q == seq and isinstance(item, TokenOut) and not ttft:
                sync(engine)
                ttft = time.perf_counter() - started
    return ttft


def sync(engine: PagedEngine) -> None:
    if engine.info.device.startswith("cuda"):
        torch.cuda.synchronize()


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, min(vocab, 30000)) for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="model name, GGUF or HF directory (default: embedded)")
    parser.add_argument("--synthetic", help="random weights of a known shape: llama-3-8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-dtype", default="auto", help="the KV pool's: auto or float16")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--compile", default="auto", help="auto (default), on or off")
    parser.add_argument(
        "--prompt-products", default="dense", help="dense (default) or int8 (as serve's flag)"
    )
    parser.add_argument("--pool-gib", type=int, default=4)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--prefix", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument(
        "--scaling", action="store_true", help="also every stream count from 1 to --streams"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", action="store_true", help="also run llama-cpp-python")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    started = time.perf_counter()
    engine, gguf = build_engine(args)
    engine._stop_ids = frozenset()  # every stream decodes its full length
    # The int8 copy of the head is packed in the background after the load (models/int4.py):
    # measure the steady state, not the first seconds beside it.
    from promptcache.engine.paged.models.int4 import RescoredHead

    for module in engine.model.modules():
        if isinstance(module, RescoredHead):
            module.ready.wait(300)
    ready_s = time.perf_counter() - started
    # Likewise the compiled decode step (engine/paged/compiled.py): compiled in the background.
    compiled = "no"
    if engine.compiled is not None:
        engine.compiled.done.wait(900)
        compiled = engine.compiled.failed or f"yes, {time.perf_counter() - started:.0f} s in"
    info = engine.info
    natively = engine.native_prefill
    products = "int8" if natively is not None and natively.integer else "dense"
    print(
        f"engine: {info.model_id} on {info.device}, {info.dtype}, ready in {ready_s:.1f} s, "
        f"{torch.get_num_threads()} threads, compiled decode: {compiled}, "
        f"prompt products: {products}"
    )
    vocab = engine.model.shape.vocab_size
    greedy = lambda n: Sampling(max_tokens=n, temperature=0.0)  # noqa: E731
    short = prompt(32, 1, vocab)
    n = args.decode_tokens
    figures: dict[str, float] = {}

    run(engine, [EngineRequest(short, greedy(8))])  # warm up
    # One stream and the streams together, in turns, ``--repeats`` times: each figure is the
    # median of its runs, and a slow spell of a shared machine falls on both sides alike.
    rates: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        one = run(engine, [EngineRequest(short, greedy(n))])
        many = run(
            engine, [EngineRequest(prompt(32, s, vocab), greedy(n)) for s in range(args.streams)]
        )
        # The same two measures on both sides: a ratio of a rate that counts the prefill to one
        # that does not would charge the streams for their 8 prompts.
        for key, value in (
            ("decode_tok_s", decode_rate(one)),
            ("whole_tok_s", one["tokens"] / one["total"]),
            ("batch_decode_tok_s", decode_rate(many)),
            ("batch_tok_s", many["tokens"] / many["total"]),
        ):
            rates.setdefault(key, []).append(value)
    # One stream sampling at temperature 1 (the APIs' default) rather than greedy.
    for _ in range(args.repeats):
        sampled = run(engine, [EngineRequest(short, Sampling(max_tokens=n, temperature=1.0))])
        rates.setdefault("sampled_tok_s", []).append(decode_rate(sampled))
    figures.update({key: statistics.median(values) for key, values in rates.items()})
    figures["batch_per_stream_tok_s"] = figures["batch_tok_s"] / args.streams
    ratios = [
        b / a for a, b in zip(rates["decode_tok_s"], rates["batch_decode_tok_s"], strict=True)
    ]
    figures["batch_ratio_min"], figures["batch_ratio_max"] = min(ratios), max(ratios)

    # Every stream count from 1 up, in turns: each has its own kernels (a count whose kernel
    # GCC compiled badly, as the int4 head's 4 rows once, shows as a dip here).
    scaling: dict[int, list[float]] = {}
    for _ in range(args.repeats if args.scaling else 0):
        for count in range(1, args.streams + 1):
            each = run(
                engine, [EngineRequest(prompt(32, s, vocab), greedy(n)) for s in range(count)]
            )
            scaling.setdefault(count, []).append(decode_rate(each))
    for count, values in scaling.items():
        figures[f"streams_{count}_decode_tok_s"] = statistics.median(values)

    long = prompt(args.prefix + SUFFIX, 2, vocab)
    cold, hit, write = [], [], []
    # Cold, cold + write, and a hit from what was written, in turns (as for the streams).
    for _ in range(args.repeats):
        cold.append(run(engine, [EngineRequest(long, greedy(1))])["first"][0])
        written = run(engine, [EngineRequest(long, greedy(1), snapshot_at=[args.prefix])])
        write.append(written["first"][0])
        payload = written["snaps"][args.prefix]
        request = EngineRequest(long, greedy(1), payload, args.prefix)
        hit.append(run(engine, [request])["first"][0])
    # The hit again, sent while a cold prompt of the same length is being read (another
    # user's miss): it goes ahead of the rest of that prompt.
    behind = [
        run_behind(engine, EngineRequest(prompt(len(long), 3 + i, vocab), greedy(1)), request)
        for i in range(args.repeats)
    ]
    figures["hit_behind_cold_ttft_s"] = statistics.median(behind)
    # A hit with a longer suffix, from the same snapshot: alone, then behind a cold prompt.
    longer = EngineRequest(
        long[: args.prefix] + prompt(LONG_SUFFIX, 4, vocab), greedy(1), payload, args.prefix
    )
    figures["long_suffix_hit_ttft_s"] = statistics.median(
        run(engine, [longer])["first"][0] for _ in range(args.repeats)
    )
    figures["long_suffix_hit_behind_cold_ttft_s"] = statistics.median(
        run_behind(engine, EngineRequest(prompt(len(long), 13 + i, vocab), greedy(1)), longer)
        for i in range(args.repeats)
    )
    figures["cold_ttft_s"] = statistics.median(cold)
    figures["cold_write_ttft_s"] = statistics.median(write)
    figures["hit_ttft_s"] = statistics.median(hit)
    # Decoding after the long prompt: attention now reads thousands of keys a token.
    deep = run(engine, [EngineRequest(long, greedy(n), payload, args.prefix)])
    figures["decode_long_tok_s"] = decode_rate(deep)

    # Fidelity: a hit's greedy answer against the cold one, and one prompt's logits prefilled
    # alone against the same prompt prefilled while 7 other streams decode in the same steps.
    answer = run(engine, [EngineRequest(long, greedy(64))])
    again = run(engine, [EngineRequest(long, greedy(64))])
    warm = run(engine, [EngineRequest(long, greedy(64), payload, args.prefix)])
    figures["cold_tokens_repeat"] = float(again["ids"][0] == answer["ids"][0])
    figures["hit_tokens_equal"] = float(warm["ids"][0] == answer["ids"][0])
    first_diff = next(
        (
            i
            for i, (a, b) in enumerate(zip(warm["ids"][0], answer["ids"][0], strict=False))
            if a != b
        ),
        None,
    )
    probe = EngineRequest(long[:1024], greedy(1))
    solo = engine.prompt_logits(probe)
    others = [EngineRequest(prompt(32, 10 + s, vocab), greedy(64)) for s in range(7)]
    batched = engine.prompt_logits(probe, batch_with=others)
    figures["batch_logits_max_abs_diff"] = float((solo - batched).abs().max())
    figures["batch_argmax_equal"] = float(int(solo.argmax()) == int(batched.argmax()))

    print(f"\ndecode, {n} tokens     promptcache: decode rate | whole run (prefill included)")
    print(
        f"  1 stream            {figures['decode_tok_s']:8.1f} tok/s     | "
        f"{figures['whole_tok_s']:8.1f} tok/s"
    )
    print(
        f"  {args.streams} streams total     {figures['batch_decode_tok_s']:8.1f} tok/s "
        f"{figures['batch_decode_tok_s'] / figures['decode_tok_s']:.2f}x | "
        f"{figures['batch_tok_s']:8.1f} tok/s "
        f"{figures['batch_tok_s'] / figures['whole_tok_s']:.2f}x one stream "
        f"({figures['batch_per_stream_tok_s']:.1f} tok/s each)"
    )
    print(f"  1 stream, sampled at temperature 1 {figures['sampled_tok_s']:6.1f} tok/s")
    print(
        f"  (medians of {args.repeats} turns; decode-rate ratio in each turn "
        f"{figures['batch_ratio_min']:.2f}-{figures['batch_ratio_max']:.2f}x)"
    )
    if scaling:
        one = figures["streams_1_decode_tok_s"]
        print("  by streams (decode rate, total tok/s, x one stream; medians of the turns):")
        for count in scaling:
            rate = figures[f"streams_{count}_decode_tok_s"]
            print(f"    {count} {rate:8.1f} tok/s {rate / one:5.2f}x")
    print(
        f"  1 stream after {args.prefix + SUFFIX} prompt tokens "
        f"{figures['decode_long_tok_s']:6.1f} tok/s"
    )
    print(f"ttft, {args.prefix} + {SUFFIX} tokens")
    print(f"  cold                {figures['cold_ttft_s'] * 1000:8.0f} ms")
    print(f"  cold + write        {figures['cold_write_ttft_s'] * 1000:8.0f} ms")
    print(
        f"  hit                 {figures['hit_ttft_s'] * 1000:8.0f} ms   "
        f"(cold/hit {figures['cold_ttft_s'] / figures['hit_ttft_s']:.1f}x)"
    )
    print(
        f"  hit beside a cold   {figures['hit_behind_cold_ttft_s'] * 1000:8.0f} ms   "
        f"(sent once another {len(long)}-token prompt had run a step)"
    )
    print(
        f"  hit, {LONG_SUFFIX}-token suffix {figures['long_suffix_hit_ttft_s'] * 1000:6.0f} ms   "
        f"beside a cold {figures['long_suffix_hit_behind_cold_ttft_s'] * 1000:6.0f} ms"
    )

    print(f"fidelity ({info.dtype})")
    print(f"  cold answer twice the same (64 greedy tokens): {bool(figures['cold_tokens_repeat'])}")
    print(
        f"  hit answer == cold answer (64 greedy tokens): {bool(figures['hit_tokens_equal'])}"
        + ("" if first_diff is None else f" (first difference at token {first_diff})")
    )
    print(
        f"  logits, batched with 7 decoding streams vs alone: max |diff| "
        f"{figures['batch_logits_max_abs_diff']:.2e}, same argmax: "
        f"{bool(figures['batch_argmax_equal'])}"
    )

    if args.peer:
        del engine, payload
        peer = run_peer(gguf, short, long, n, args.repeats)
        figures.update({f"llama_cpp_{k}": v for k, v in peer.items()})
        print("\nllama-cpp-python, same GGUF, same prompts, one stream")
        print(
            f"  decode              {peer['decode_tok_s']:8.1f} tok/s   "
            f"(promptcache / llama.cpp {figures['decode_tok_s'] / peer['decode_tok_s']:.2f}x)"
        )
        print(
            f"  decode after {len(long)} {peer['decode_long_tok_s']:8.1f} tok/s   "
            f"(promptcache / llama.cpp "
            f"{figures['decode_long_tok_s'] / peer['decode_long_tok_s']:.2f}x)"
        )
        print(
            f"  cold ttft           {peer['cold_ttft_s'] * 1000:8.0f} ms   "
            f"(llama.cpp cold / promptcache hit "
            f"{peer['cold_ttft_s'] / figures['hit_ttft_s']:.1f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def run_peer(
    gguf: Path | None, short: list[int], long: list[int], n: int, repeats: int
) -> dict[str, float]:
    python = Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "python"
    if gguf is None or not python.exists():
        raise SystemExit("--peer needs a GGUF model and .venv-peers (scripts/setup-peers)")
    payload = {
        "gguf": str(gguf),
        "n_ctx": len(long) + n + 16,
        "short": short,
        "long": long,
        "decode": n,
        "repeats": repeats,
    }
    out = subprocess.run(
        [str(python), "-c", PEER_SCRIPT, json.dumps(payload)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    sys.exit(main())
