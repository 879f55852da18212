"""bf16 vs weight-only int8 (``torch._weight_int8pack_mm``) for decode-shaped matmuls.

The shapes are Gemma 3 270M's (hidden 640, 4 query heads and 1 KV head of 256 dims,
intermediate 2048, vocabulary 262144) as the lean model runs them: fused q/k/v, o, fused
gate/up, down, and the lm_head. Each is timed for a batch of ``--rows`` tokens (1: one decode
stream; 8: eight), best of ``--repeats`` rounds of at least ``--min-seconds`` each; the last
lines add up one decode step (18 layers + lm_head). float32 is shown as the baseline.

::

    .venv/bin/python benchmarks/int8_matmul.py [--rows 1,8] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from promptcache.engine.paged.models.int8 import quantize_weight

HIDDEN, INTERMEDIATE, HEAD_DIM, HEADS, KV_HEADS, VOCAB, LAYERS = 640, 2048, 256, 4, 1, 262144, 18
SHAPES = {  # name: (in_features, out_features, uses per decode step)
    "qkv": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, LAYERS),
    "o": (HEADS * HEAD_DIM, HIDDEN, LAYERS),
    "gate_up": (HIDDEN, 2 * INTERMEDIATE, LAYERS),
    "down": (INTERMEDIATE, HIDDEN, LAYERS),
    "lm_head": (HIDDEN, VOCAB, 1),
}


def timed(fn: Callable[[], object], repeats: int, min_seconds: float) -> float:
    """Best (least disturbed) round's seconds per call."""
    fn()
    rounds = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and calls >= 3:
                break
        rounds.append(elapsed / calls)
    return min(rounds)


def time_shape(
    rows: int, weight: torch.Tensor, repeats: int, min_seconds: float
) -> dict[str, float]:
    """Seconds per call of ``[rows, in] @ weight^T`` in fp32, bf16 and int8 (bf16 activations)."""
    x = torch.randn(rows, weight.shape[1])
    xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    q, scales = quantize_weight(weight, torch.bfloat16)
    calls: dict[str, Callable[[], object]] = {
        "fp32": partial(F.linear, x, weight),
        "bf16": partial(F.linear, xb, wb),
        "int8": partial(torch._weight_int8pack_mm, xb, q, scales),
    }
    with torch.inference_mode():
        return {key: timed(fn, repeats, min_seconds) for key, fn in calls.items()}


def row(rows: int, name: str, size: str, t: dict[str, float], digits: int) -> str:
    ms = " ".join(f"{t[key] * 1e3:>9.{digits}f}" for key in ("fp32", "bf16", "int8"))
    return f"{rows:>4} {name:<8} {size:>16} {ms} {t['bf16'] / t['int8']:>8.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8", help="tokens per matmul, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(n, k, generator=gen) * 0.02 for name, (k, n, _) in SHAPES.items()}
    for rows in (int(r) for r in args.rows.split(",")):
        print(
            f"{'rows':>4} {'matmul':<8} {'in x out':>16} "
            + " ".join(f"{h:>9}" for h in ("fp32 ms", "bf16 ms", "int8 ms", "bf16/int8"))
        )
        totals = {"fp32": 0.0, "bf16": 0.0, "int8": 0.0}
        for name, (k, n, uses) in SHAPES.items():
            t = time_shape(rows, weights[name], args.repeats, args.min_seconds)
            for key in totals:
                totals[key] += t[key] * uses
            print(row(rows, name, f"{k} x {n}", t, 3))
        print(row(rows, "step", f"{LAYERS} layers + head", totals, 2))
        print()


if __name__ == "__main__":
    main()
