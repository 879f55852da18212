"""What integer prompt products (``--prompt-products int8``) do to the model's predictions.

    .venv/bin/python benchmarks/prompt_quality.py                     # embedded Gemma 3 270M
    .venv/bin/python benchmarks/prompt_quality.py --model smollm2-135m-instruct

Over windows of this repository's docs: a prompt of ``--context`` tokens prefilled two ways, in
steps of ``--chunk`` tokens, into two sets of KV blocks: by the dense weights (the model's
PyTorch forward: the default's bits) and by the integer prompt step (``NativePrefill`` with
``integer``: the int8 decode copies, rows quantized per group of 64). Then the next ``--steps``
tokens of the text fed one decode step at a time over each (the engine's own decode step, the
same for both), teacher-forced. Prints each way's log-loss and next-token accuracy on the text,
how often its greedy token is the dense prompt's, and the mean KL divergence between the two.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from decode_quality import texts  # the sibling script: windows of the repository's docs

from promptcache.engine.hf import loader
from promptcache.engine.paged.attention import StepSeq


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="model name, GGUF or HF directory (default: embedded)")
    parser.add_argument("--dtype", default="auto", help="auto (default), bfloat16 or float32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--per-file", type=int, default=4)
    args = parser.parse_args()

    cache = Path.home() / ".cache" / "promptcache"
    engine = loader.load_engine(
        args.model,
        cache_dir=cache,
        device="cpu",
        dtype=args.dtype,
        kv_pool_bytes=1 << 30,
        max_batch_tokens=args.chunk,
        prompt_products="int8",
    )
    integer, step, switch = engine.native_prefill, engine.native_decode, engine._decode_switch
    if integer is None or not integer.integer or step is None or switch is None:
        print("integer prompts do not run here (no int8 weights, or kernels without int8 rows)")
        return 1
    model, attn, pool = engine.model, engine._attn, engine._pool
    n0, n, c = args.context, args.steps, args.chunk
    ways = ("dense prompt", "int8 prompt")
    loss: dict[str, list[float]] = {w: [] for w in ways}
    right: dict[str, list[bool]] = {w: [] for w in ways}
    agree: list[bool] = []
    kl: list[float] = []
    with torch.inference_mode():
        for text in texts(8000, args.per_file):
            ids = engine.tokenizer.encode(text, allow_special=False)[: n0 + n + 1]
            if len(ids) < n0 + n + 1:
                continue
            blocks = {w: pool.allocate(-(-(n0 + n) // pool.block_tokens)) for w in ways}
            try:
                for start in range(0, n0, c):
                    m = min(c, n0 - start)
                    x, pos = torch.tensor(ids[start : start + m]), torch.arange(start, start + m)
                    for way in ways:
                        attn.plan([], [StepSeq(blocks[way], start, m)], keep=[])
                        if way == "dense prompt":
                            switch.set_step(0, m)  # the dense weights, PyTorch's forward
                            model(x, pos, attn, torch.tensor([], dtype=torch.long))
                        else:
                            integer(x, pos, False)
                for i in range(n0, n0 + n):
                    x, pos = torch.tensor([ids[i]]), torch.tensor([i])
                    logits = {}
                    for way in ways:
                        attn.plan([StepSeq(blocks[way], i, 1)], [])
                        logits[way] = model.logits(step(x, pos)).float()[0]
                    for way, row in logits.items():
                        loss[way].append(-float(row.log_softmax(-1)[ids[i + 1]]))
                        right[way].append(int(row.argmax()) == ids[i + 1])
                    agree.append(int(logits[ways[0]].argmax()) == int(logits[ways[1]].argmax()))
                    kl.append(
                        float(
                            torch.nn.functional.kl_div(
                                logits[ways[1]].log_softmax(-1),
                                logits[ways[0]].log_softmax(-1),
                                log_target=True,
                                reduction="sum",
                            )
                        )
                    )
            finally:
                for b in blocks.values():
                    pool.decref(b)
    print(
        f"{engine.info.model_id}, {len(agree) // n} prompts of {n0} tokens (chunks of {c}), {n} "
        f"teacher-forced decode steps after each ({len(agree)} in all)"
    )
    print(f"  {'':14} log-loss  next token")
    for way in ways:
        print(f"  {way:14} {statistics.mean(loss[way]):8.4f}  {statistics.mean(right[way]):9.2%}")
    print(f"  greedy tokens the same: {statistics.mean(agree):.2%}")
    print(f"  int8 prompt vs dense prompt: mean KL {statistics.mean(kl):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
