"""What the decode step's arithmetic does to the model's predictions, teacher-forced.

    .venv/bin/python benchmarks/decode_quality.py                     # embedded Gemma 3 270M
    .venv/bin/python benchmarks/decode_quality.py --model smollm2-135m-instruct
    .venv/bin/python benchmarks/decode_quality.py --dtype float32

Over windows of this repository's docs: a prompt of ``--context`` tokens prefilled, then the
next ``--steps`` tokens of the text fed one decode step at a time (whatever was predicted),
each step computed three ways over the same KV and the same head:

- the engine's decode step (``NativeDecode``: int8 weights, or the GGUF file's own codes where
  it reads them, ``paged.codes``; the rows quantized to int8 where it multiplies in integers,
  ``native_decode.integer_rows``: with AVX512-VNNI or AVX2, bfloat16 or float32 rows), and
  where it reads codes the same step on the int8 copies;
- PyTorch's int8 decode path (the same int8 weights, rows in the model's dtype);
- the dense weights (what a prompt's tokens are computed with).

Prints each one's log-loss and next-token accuracy on the text, how often its greedy token is
the dense weights', and the engine step's mean KL divergence from PyTorch's int8 path.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from promptcache.engine.hf import loader
from promptcache.engine.paged import codes
from promptcache.engine.paged.attention import StepSeq
from promptcache.engine.paged.native_decode import NativeDecode

ROOT = Path(__file__).resolve().parent.parent


def texts(chars: int, per_file: int) -> list[str]:
    """Windows of ``chars`` characters of the repository's README and docs."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        starts = range(2000, max(2001, len(text) - chars), 12000)
        out += [text[i : i + chars] for i in starts][:per_file]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="model name, GGUF or HF directory (default: embedded)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--per-file", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="auto (default), bfloat16 or float32")
    args = parser.parse_args()

    cache = Path.home() / ".cache" / "promptcache"
    engine = loader.load_engine(
        args.model, cache_dir=cache, device="cpu", dtype=args.dtype, kv_pool_bytes=1 << 30
    )
    step, switch = engine.native_decode, engine._decode_switch
    if step is None or switch is None:
        print("the engine's own decode step does not run here (no int8 weights or no kernels)")
        return 1
    model, attn, pool = engine.model, engine._attn, engine._pool
    # Where the decode step reads the GGUF file's own codes (paged.codes), the same step on
    # the int8 copies beside it.
    projections = codes.decode_projections(model) or []
    kept = [[p.codes for p in layer] for layer in projections]
    int8_step = None
    if any(c is not None for layer in kept for c in layer):
        codes.attach_packed(model, [[None] * len(layer) for layer in kept])
        int8_step = NativeDecode.build(model, attn, step.max_rows)
        codes.attach_packed(model, kept)
    plain = f"int8 weights, {'bf16' if model.dtype == torch.bfloat16 else 'f32'} rows"
    n0, n = args.context, args.steps
    loss: dict[str, list[float]] = {}
    right: dict[str, list[bool]] = {}
    dense_agree: dict[str, list[bool]] = {}
    kl: list[float] = []
    with torch.inference_mode():
        for text in texts(6000, args.per_file):
            ids = engine.tokenizer.encode(text, allow_special=False)[: n0 + n + 1]
            if len(ids) < n0 + n + 1:
                continue
            blocks = pool.allocate(-(-(n0 + n) // pool.block_tokens))
            try:
                attn.plan([], [StepSeq(blocks, 0, n0)], keep=[n0 - 1])
                switch.set_step(0, n0)
                model(torch.tensor(ids[:n0]), torch.arange(n0), attn)
                for i in range(n0, n0 + n):
                    x, pos = torch.tensor([ids[i]]), torch.tensor([i])
                    attn.plan([StepSeq(blocks, i, 1)], [])
                    logits = {}
                    # Each writes the step's key and value; the engine's step writes last.
                    switch.on = False
                    logits["dense"] = model.logits(model(x, pos, attn)).float()
                    switch.on = True
                    logits[plain] = model.logits(model(x, pos, attn)).float()
                    if int8_step is not None:
                        logits["engine step, int8 copies"] = model.logits(int8_step(x, pos)).float()
                    logits["engine step"] = model.logits(step(x, pos)).float()
                    dense = int(logits["dense"].argmax())
                    for name, row in logits.items():
                        log_probs = row.log_softmax(-1)[0]
                        loss.setdefault(name, []).append(-float(log_probs[ids[i + 1]]))
                        right.setdefault(name, []).append(int(row.argmax()) == ids[i + 1])
                        dense_agree.setdefault(name, []).append(int(row.argmax()) == dense)
                    kl.append(
                        float(
                            torch.nn.functional.kl_div(
                                logits["engine step"].log_softmax(-1),
                                logits[plain].log_softmax(-1),
                                log_target=True,
                                reduction="sum",
                            )
                        )
                    )
            finally:
                pool.decref(blocks)
    print(f"{engine.info.model_id}, {len(kl)} teacher-forced decode steps")
    print(f"  {'':26} log-loss  next token  greedy == dense's")
    for name in loss:
        print(
            f"  {name:26} {statistics.mean(loss[name]):8.4f}  "
            f"{statistics.mean(right[name]):9.2%}  {statistics.mean(dense_agree[name]):9.2%}"
        )
    print(f"  engine step vs {plain}: mean KL {statistics.mean(kl):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
