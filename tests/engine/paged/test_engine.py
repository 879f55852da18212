"""PagedEngine on tiny random models: cache fidelity (spec §1.15, checklist 69/70), batching,
stops, sampling, cancellation and the pool's block accounting."""

from __future__ import annotations

import gc
import itertools
import random

import pytest
import torch

from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest, Prefilled, PrefillProgress, Stopped, TokenOut
from promptcache.engine.hf.testing import (
    TINY_SLIDING_WINDOW,
    build_tiny_engine,
    prefilled,
    random_prompt,
    run_all,
    stop_reason,
    token_ids,
)
from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.pool import PoolPayload
from promptcache.errors import PromptTooLong

W = TINY_SLIDING_WINDOW
N = 5 * W + 3  # longer than 3 windows
OFFSETS = (W + 5, 3 * W - 3, N)  # inside windows and blocks, never multiples of either
ATOL = 1e-4


def test_a_float16_pool_keeps_hits_exact_on_pytorchs_path() -> None:
    """A float16 pool under a float32 model where the engine's kernels do not run (no
    compiler, no F16C): PyTorch's attention stores the keys rounded and reads them converted,
    so a hit still restores exactly what the cold prompt attended to."""
    from promptcache.engine.paged import native
    from tests.engine.paged.test_int8 import assert_hits_exact

    with native.disabled():
        for kind in ("llama", "gemma3"):
            engine = build_tiny_engine(kind, dtype=torch.float32, kv_dtype=torch.float16)
            assert engine.pool.dtype == torch.float16
            assert engine.native_prefill is None and engine.native_decode is None
            assert_hits_exact(engine)
    with pytest.raises(ValueError, match="choose bfloat16"):
        build_tiny_engine("llama", dtype=torch.bfloat16, kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="choose float32 or float16"):
        build_tiny_engine("llama", dtype=torch.float32, kv_dtype=torch.bfloat16)


def greedy(max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0)


def snapshots_of(engine: PagedEngine, tokens: list[int]) -> dict[int, PoolPayload]:
    events = run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=OFFSETS))
    snaps = prefilled(events).snapshots
    assert all(isinstance(p, PoolPayload) for p in snaps.values())
    return dict(snaps)  # type: ignore[arg-type]


def contents(payload: PoolPayload) -> torch.Tensor:
    return payload.pool.kv[:, :, list(payload.blocks)].clone()


def run_batch(engine: PagedEngine, requests: list[EngineRequest]) -> list[list[int]]:
    """Run ``requests`` together, every step one batch; the tokens of each."""
    seqs = {engine.add(r): i for i, r in enumerate(requests)}
    out: list[list[int]] = [[] for _ in requests]
    while engine.num_running:
        for seq, item in engine.step():
            if isinstance(item, Exception):
                raise item
            if isinstance(item, TokenOut):
                out[seqs[seq]].append(item.token_id)
    return out


# --- fidelity ------------------------------------------------------------------------------------


def test_cold_partial_and_whole_prompt_hit_agree(engine: PagedEngine) -> None:
    tokens = random_prompt(N)
    cold = run_all(engine, EngineRequest(tokens, greedy(24), snapshot_at=OFFSETS))
    snaps = prefilled(cold).snapshots
    assert sorted(snaps) == sorted(OFFSETS)
    assert prefilled(cold).num_computed_tokens == N
    cold_logits = engine.prompt_logits(EngineRequest(tokens, greedy(1)))

    for x in OFFSETS:
        payload = snaps[x]
        assert isinstance(payload, PoolPayload)
        before = contents(payload)
        for reuse_tokens in (x - 1, x) if x < N else (x - 1,):
            warm = run_all(engine, EngineRequest(tokens, greedy(24), payload, reuse_tokens))
            assert token_ids(warm) == token_ids(cold), f"restore at {reuse_tokens}"
            assert prefilled(warm).num_computed_tokens == N - reuse_tokens
            request = EngineRequest(tokens, greedy(1), payload, reuse_tokens)
            torch.testing.assert_close(
                engine.prompt_logits(request), cold_logits, atol=ATOL, rtol=0
            )
        assert torch.equal(contents(payload), before)  # restoring never writes a payload


def test_lean_model_matches_transformers_end_to_end(engine: PagedEngine) -> None:
    from promptcache.engine.hf.testing import build_tiny_model

    kind = "gemma3" if any(s.window for s in engine.model.attn_specs) else "llama"
    hf = build_tiny_model(kind)
    tokens = random_prompt(N, seed=20)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0, -1]
    mine = engine.prompt_logits(EngineRequest(tokens, greedy(1)))
    torch.testing.assert_close(mine, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_the_last_layer_finishes_only_the_kept_rows(kind: str) -> None:
    """A step of a decode row and two prompt chunks past the sliding window, one completing its
    prompt: with ``keep``, the kept rows' hidden states are those of the whole computation, and
    the keys and values written are the same."""
    from promptcache.engine.paged.attention import StepSeq

    engine = build_tiny_engine(kind)
    attn, pool, model = engine._attn, engine._pool, engine._model
    blocks = pool.allocate(30)
    seqs = [
        StepSeq(blocks[:10], 2 * W + 7, 1),
        StepSeq(blocks[10:20], W + 9, 13),
        StepSeq(blocks[20:], 3 * W + 1, 11),
    ]
    ids = torch.tensor(random_prompt(25, seed=8))
    positions = torch.tensor([s.start + i for s in seqs for i in range(s.num_new)])
    keep = [0, 24]  # the decode row and the second chunk's last row
    try:
        with torch.inference_mode():
            attn.plan(seqs[:1], seqs[1:])
            whole = model(ids, positions, attn)
            kv = pool.kv.clone()
            attn.plan(seqs[:1], seqs[1:], keep=keep)
            kept = model(ids, positions, attn, torch.tensor(keep))
    finally:
        pool.decref(blocks)
    assert kept.shape == (2, whole.shape[1])
    torch.testing.assert_close(kept, whole[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(pool.kv, kv)


def test_snapshot_taken_in_a_restored_request(engine: PagedEngine) -> None:
    """Checklist 70: extend a cached prefix, then both prefixes still hit exactly."""
    base = random_prompt(N, seed=3)
    longer = base + random_prompt(2 * W + 7, seed=4)
    first = run_all(engine, EngineRequest(base, greedy(0), snapshot_at=(N,)))
    base_snap = prefilled(first).snapshots[N]
    assert isinstance(base_snap, PoolPayload)
    before = contents(base_snap)

    ext = run_all(
        engine, EngineRequest(longer, greedy(16), base_snap, N, snapshot_at=(len(longer) - 3,))
    )
    assert prefilled(ext).num_computed_tokens == len(longer) - N
    deep_snap = prefilled(ext).snapshots[len(longer) - 3]
    assert token_ids(ext) == token_ids(run_all(engine, EngineRequest(longer, greedy(16))))

    follow = longer + random_prompt(W + 1, seed=5)
    cold = run_all(engine, EngineRequest(follow, greedy(16)))
    warm = run_all(engine, EngineRequest(follow, greedy(16), deep_snap, len(longer) - 3))
    assert token_ids(warm) == token_ids(cold)
    whole = longer[:-3]
    assert token_ids(
        run_all(engine, EngineRequest(whole, greedy(16), deep_snap, len(whole) - 1))
    ) == token_ids(run_all(engine, EngineRequest(whole, greedy(16))))

    assert torch.equal(contents(base_snap), before)
    again = run_all(engine, EngineRequest(base, greedy(16), base_snap, N - 1))
    assert token_ids(again) == token_ids(run_all(engine, EngineRequest(base, greedy(16))))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_step_size_does_not_change_output(kind: str) -> None:
    tokens = random_prompt(N, seed=6)
    outputs = []
    for step in (1, 7, 64, 1000):
        eng = build_tiny_engine(kind, max_batch_tokens=step)
        outputs.append(token_ids(run_all(eng, EngineRequest(tokens, greedy(12)))))
    assert all(out == outputs[0] for out in outputs)


# --- batching ------------------------------------------------------------------------------------


def test_a_batch_gives_each_request_its_solo_tokens(engine: PagedEngine) -> None:
    """Requests of every length (and some from a cached prefix) decode together in one batch,
    joining and leaving at different steps, and each gets exactly its solo output."""
    base = random_prompt(N, seed=30)
    snap = prefilled(run_all(engine, EngineRequest(base, greedy(0), snapshot_at=(40,))))
    payload = snap.snapshots[40]
    requests = [EngineRequest(random_prompt(n, seed=n), greedy(5 + n % 23)) for n in (3, 9, 70)]
    requests += [EngineRequest(random_prompt(130, seed=1), greedy(30))]
    requests += [EngineRequest(base + random_prompt(9, seed=2), greedy(17), payload, 40)]
    requests += [EngineRequest(base, greedy(25), payload, 40)]
    solo = [token_ids(run_all(engine, r)) for r in requests]
    assert run_batch(engine, requests) == solo


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_streams_decode_alike_beside_prompts_being_read(kind: str) -> None:
    """With int8 decode weights (a CPU's default), the steps that carry prompt chunks beside
    decoding streams run in parts: each stream still gets its solo tokens (a forward of the
    whole mixed batch took the dense weights for its rows), and so does each prompt."""
    engine = build_tiny_engine(kind, decode_int8=True, max_batch_tokens=48)
    requests = [EngineRequest(random_prompt(n, seed=n), greedy(40)) for n in (5, 11)]
    requests += [EngineRequest(random_prompt(n, seed=n), greedy(4)) for n in (150, 100, 30)]
    solo = [token_ids(run_all(engine, r)) for r in requests]
    steps = engine.native_prefill.num_steps if engine.native_prefill else 0
    assert run_batch(engine, requests) == solo
    if engine.native_prefill is not None:  # each chunk beside the streams in the kernels
        assert engine.native_prefill.num_steps - steps >= (150 + 100 + 30) // 48


def test_batched_logits_stay_close_to_solo(engine: PagedEngine) -> None:
    """fp32: the logits of a prompt prefilled in steps shared with decoding requests stay within
    1e-4 of the same prompt alone."""
    tokens = random_prompt(60, seed=31)
    solo = engine.prompt_logits(EngineRequest(tokens, greedy(1)))
    others = [EngineRequest(random_prompt(20, seed=s), greedy(40)) for s in (1, 2, 3)]
    batched = engine.prompt_logits(EngineRequest(tokens, greedy(1)), batch_with=others)
    assert engine.num_running == 0
    torch.testing.assert_close(batched, solo, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_beside_streams_computes_as_alone_through_pytorch_too(
    kind: str, dtype: torch.dtype
) -> None:
    """With int8 decode weights the streams' rows are a forward of their own, so they take
    nothing from a chunk: a prompt read beside them is cut into the chunks it is cut into
    alone, and even through PyTorch's matmuls (no engine kernels: they block by the chunk's
    shape) its logits are the same bits."""
    from promptcache.engine.paged import native

    with native.disabled():
        engine = build_tiny_engine(kind, decode_int8=True, dtype=dtype, max_batch_tokens=48)
        tokens = random_prompt(150, seed=41)
        solo = engine.prompt_logits(EngineRequest(tokens, greedy(1)))
        others = [EngineRequest(random_prompt(20, seed=s), greedy(60)) for s in (1, 2, 3)]
        batched = engine.prompt_logits(EngineRequest(tokens, greedy(1)), batch_with=others)
    assert torch.equal(batched, solo)


def test_blocks_return_to_the_pool(engine: PagedEngine) -> None:
    gc.collect()
    free = engine.pool.num_free
    tokens = random_prompt(N, seed=32)
    snaps = snapshots_of(engine, tokens)
    held = engine.pool.num_free
    # Nested snapshots share whole blocks: the three together hold the longest's blocks plus
    # one private copy of a partial block each.
    bt = engine.pool.block_tokens
    assert free - held == -(-N // bt) + sum(1 for x in OFFSETS[:-1] if x % bt)
    seq = engine.add(EngineRequest(tokens, greedy(40), snaps[OFFSETS[1]], OFFSETS[1]))
    engine.step()
    engine.cancel(seq)
    assert engine.pool.num_free == held
    del snaps
    gc.collect()
    assert engine.pool.num_free == free


def test_pool_exhaustion_fails_one_request_cleanly() -> None:
    engine = build_tiny_engine("llama", pool_bytes=40 * 2 * 2 * 2 * 16 * 4 * 8)  # ~40 blocks
    big = EngineRequest(random_prompt(8 * 60, seed=1), greedy(4))
    events = []
    seq = engine.add(big)
    while engine.num_running:
        events += [item for s, item in engine.step() if s == seq]
    assert any(isinstance(e, Exception) and "exhausted" in str(e) for e in events)
    assert token_ids(run_all(engine, EngineRequest(random_prompt(30), greedy(3))))


def test_a_full_pool_fails_the_newest_prefill_not_a_stream() -> None:
    """Two prompts that fit the pool one at a time but not together: the older one streams on,
    the newer one (still in its prefill) fails with Overloaded; nothing spins."""
    engine = build_tiny_engine(
        "llama", pool_bytes=40 * 2 * 2 * 2 * 16 * 4 * 8, max_batch_tokens=512
    )
    first = engine.add(EngineRequest(random_prompt(8 * 25, seed=1), greedy(4)))
    second = engine.add(EngineRequest(random_prompt(8 * 25, seed=2), greedy(4)))
    results: dict[int, list[object]] = {first: [], second: []}
    steps = 0
    while engine.num_running and steps < 200:
        steps += 1
        for seq, item in engine.step():
            results[seq].append(item)
    assert steps < 200
    assert isinstance(results[second][-1], Exception) and "exhausted" in str(results[second][-1])
    assert isinstance(results[first][-1], Stopped)


# --- prefill only, stops, limits -----------------------------------------------------------------


def test_prefill_only_computes_up_to_the_last_snapshot(engine: PagedEngine) -> None:
    tokens = random_prompt(N, seed=8)
    before = engine.num_prefill_tokens_total
    events = run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=(20, 50)))
    assert len(events) == 2 and events[1] == Stopped("max_tokens")
    assert prefilled(events).num_computed_tokens == 50
    assert sorted(prefilled(events).snapshots) == [20, 50]
    assert engine.num_prefill_tokens_total - before == 50

    nothing = run_all(engine, EngineRequest(tokens, greedy(0)))
    assert nothing == [Prefilled({}, 0), Stopped("max_tokens")]

    snap = prefilled(events).snapshots[50]
    warm = run_all(engine, EngineRequest(tokens, greedy(10), snap, 50))
    assert token_ids(warm) == token_ids(run_all(engine, EngineRequest(tokens, greedy(10))))


def test_prefill_only_from_a_restored_prefix(engine: PagedEngine) -> None:
    tokens = random_prompt(N, seed=9)
    snap = prefilled(run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=(30,))))
    events = run_all(
        engine, EngineRequest(tokens, greedy(0), snap.snapshots[30], 30, snapshot_at=(N,))
    )
    assert prefilled(events).num_computed_tokens == N - 30
    whole = run_all(engine, EngineRequest(tokens, greedy(8), prefilled(events).snapshots[N], N - 1))
    assert token_ids(whole) == token_ids(run_all(engine, EngineRequest(tokens, greedy(8))))


def test_stops_on_end_of_turn_without_yielding_it() -> None:
    tokens = random_prompt(40, seed=10)
    free = token_ids(run_all(build_tiny_engine("gemma3"), EngineRequest(tokens, greedy(8))))
    stop = free[3]
    expected = free[: free.index(stop)]
    eng = build_tiny_engine("gemma3", stop_token_ids=[stop])
    events = run_all(eng, EngineRequest(tokens, greedy(8)))
    assert token_ids(events) == expected
    assert stop_reason(events) == "end_turn"
    assert all(isinstance(e, TokenOut) for e in events[1:-1])


def test_default_stop_ids_are_end_of_turn_and_eos(llama_engine: PagedEngine) -> None:
    tok = llama_engine.tokenizer
    ids = {tok.encode(s, allow_special=True)[0] for s in ("<end_of_turn>", "<eos>")}
    assert llama_engine.stop_token_ids == ids


def test_max_tokens() -> None:
    engine = build_tiny_engine("gemma3", stop_token_ids=())
    events = run_all(engine, EngineRequest(random_prompt(30), greedy(5)))
    assert len(token_ids(events)) == 5
    assert stop_reason(events) == "max_tokens"
    assert len(events) == 7


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_context_window_stop(kind: str) -> None:
    eng = build_tiny_engine(kind, max_context_tokens=40, stop_token_ids=())
    events = run_all(eng, EngineRequest(random_prompt(37), greedy(10)))
    assert len(token_ids(events)) == 3  # positions 37, 38, 39
    assert stop_reason(events) == "model_context_window_exceeded"

    full = run_all(eng, EngineRequest(random_prompt(40), greedy(10)))
    assert token_ids(full) == [] and stop_reason(full) == "model_context_window_exceeded"

    exact = run_all(eng, EngineRequest(random_prompt(37), greedy(3)))
    assert stop_reason(exact) == "max_tokens"

    with pytest.raises(PromptTooLong):
        eng.add(EngineRequest(random_prompt(41), greedy(1)))


# --- sampling, cancellation, state ---------------------------------------------------------------


def test_seeded_sampling_is_reproducible(engine: PagedEngine) -> None:
    tokens = random_prompt(30, seed=11)

    def sample(seed: int) -> list[int]:
        sampling = Sampling(max_tokens=20, temperature=1.0, top_p=0.95, top_k=100, seed=seed)
        return token_ids(run_all(engine, EngineRequest(tokens, sampling)))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_seeded_sampling_survives_a_cache_hit(engine: PagedEngine) -> None:
    tokens = random_prompt(N, seed=12)
    sampling = Sampling(max_tokens=12, temperature=0.7, seed=3)
    cold = run_all(engine, EngineRequest(tokens, sampling, snapshot_at=(40,)))
    warm = run_all(engine, EngineRequest(tokens, sampling, prefilled(cold).snapshots[40], 40))
    assert token_ids(warm) == token_ids(cold)


def test_sampled_rows_draw_in_the_kernel_alike_alone_and_in_a_batch(
    engine: PagedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of temperature sampling draw in the engine's kernel (where it runs), each from its
    own generator: seeded, a request draws the same tokens alone and beside others; top-p and
    top-k rows draw there too (against PyTorch's cut: test_native), as reproducibly."""
    from promptcache.engine.paged import native

    kernels = native.kernels()
    if kernels is None:
        pytest.skip("the engine's kernels do not run here")
    calls: list[int] = []
    sample = type(kernels).sample

    def spy(self: native.Kernels, logits: torch.Tensor, *args: list[float]) -> list[int] | None:
        calls.append(logits.shape[0])
        return sample(self, logits, *args)

    monkeypatch.setattr(type(kernels), "sample", spy)
    requests = [
        EngineRequest(random_prompt(12 + 5 * i, seed=40 + i), Sampling(20, temperature=0.8, seed=i))
        for i in range(3)
    ]
    alone = [token_ids(run_all(engine, r)) for r in requests]
    assert calls and max(calls) == 1
    calls.clear()
    assert run_batch(engine, requests) == alone
    assert max(calls) > 1  # several rows in one call
    calls.clear()
    for cut in (Sampling(20, temperature=0.8, top_p=0.9, seed=1), Sampling(20, top_k=5, seed=2)):
        first = token_ids(run_all(engine, EngineRequest(requests[0].tokens, cut)))
        assert calls
        calls.clear()
        assert token_ids(run_all(engine, EngineRequest(requests[0].tokens, cut))) == first


def test_add_is_lazy_and_cancel_stops_mid_decode(engine: PagedEngine) -> None:
    tokens = random_prompt(30, seed=13)
    before = engine.num_prefill_tokens_total
    seq = engine.add(EngineRequest(tokens, greedy(50)))
    assert engine.num_prefill_tokens_total == before  # nothing ran yet
    assert [type(e) for _, e in engine.step()] == [Prefilled, TokenOut]
    assert [type(e) for _, e in engine.step()] == [TokenOut]
    engine.cancel(seq)
    assert engine.num_running == 0 and engine.step() == []
    engine.cancel(seq)  # twice is harmless
    assert engine.num_prefill_tokens_total == before + 30


def test_long_prefill_runs_in_steps_that_can_be_cancelled() -> None:
    engine = build_tiny_engine("llama", max_batch_tokens=16)
    tokens = random_prompt(70, seed=3)
    events = run_all(engine, EngineRequest(tokens, greedy(2)), progress=True)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [p.num_done_tokens for p in progress] == [16, 32, 48, 64]
    assert all(p.num_total_tokens == 70 for p in progress)
    before = engine.num_prefill_tokens_total
    seq = engine.add(EngineRequest(tokens, greedy(2)))
    assert isinstance(engine.step()[0][1], PrefillProgress)
    engine.cancel(seq)
    assert engine.num_prefill_tokens_total - before == 16


def test_a_short_prompt_gets_a_step_of_its_own_beside_a_long_one_being_read() -> None:
    """A hit's suffix (a short prompt) arriving while a long prompt is read is answered in the
    next step, one of its own (none of the long prompt in it: it waits for the chunk in flight
    and its own tokens only); the long prompt reads a whole step every other step however many
    short ones arrive, and every step once none waits."""
    engine = build_tiny_engine("llama", max_batch_tokens=32)
    long = engine.add(EngineRequest(random_prompt(400, seed=50), greedy(2)))
    engine.step()
    done = 32

    def step() -> tuple[int, set[int]]:
        """The long prompt's tokens read in a step, and the sequences answered in it."""
        nonlocal done
        events = engine.step()
        progress = [e for seq, e in events if seq == long and isinstance(e, PrefillProgress)]
        read = progress[0].num_done_tokens - done if progress else 0
        done += read
        return read, {seq for seq, e in events if isinstance(e, TokenOut)}

    for i in range(3):  # one at a time: each answered alone in the step after it came
        short = engine.add(EngineRequest(random_prompt(9, seed=60 + i), greedy(1)))
        assert step() == (0, {short})
        assert step() == (32, set())
    flood = [engine.add(EngineRequest(random_prompt(9, seed=70 + i), greedy(1))) for i in range(6)]
    # 54 short tokens: 32 in their first turn (the fourth prompt in part), the rest in the next.
    assert [step() for _ in range(5)] == [
        (0, set(flood[:3])),
        (32, set()),
        (0, set(flood[3:])),
        (32, set()),
        (32, set()),
    ]
    run_all(engine, EngineRequest(random_prompt(9, seed=1), greedy(1)))
    assert engine.num_running == 0
    # The smallest steps too: a stream decoding leaves 1 token of a 2-token step, and it goes
    # to the short prompt.
    tiny = build_tiny_engine("llama", max_batch_tokens=2)
    tiny.add(EngineRequest(random_prompt(1, seed=50), greedy(20)))
    tiny.step()
    tiny.add(EngineRequest(random_prompt(10, seed=51), greedy(1)))
    tiny.step()
    short = tiny.add(EngineRequest(random_prompt(1, seed=52), greedy(1)))
    assert any(seq == short and isinstance(e, TokenOut) for seq, e in tiny.step())


def test_prompts_being_read_take_turns_fewest_tokens_left_first() -> None:
    """A prompt too long to be short (a hit with a long new message) arriving while a longer
    one is read takes the steps between the oldest one's turns, alone, rather than waiting for
    all of the other; prompts of the same length go in arrival order, one after the other."""
    engine = build_tiny_engine("llama", max_batch_tokens=32)
    long = engine.add(EngineRequest(random_prompt(400, seed=50), greedy(1)))
    engine.step()
    medium = engine.add(EngineRequest(random_prompt(40, seed=51), greedy(1)))

    def step() -> tuple[set[int], set[int]]:
        """The sequences whose prompt a step read, and those it answered."""
        events = engine.step()
        read = {seq for seq, e in events if isinstance(e, PrefillProgress | TokenOut)}
        return read, {seq for seq, e in events if isinstance(e, TokenOut)}

    assert [step() for _ in range(4)] == [
        ({medium}, set()),  # 32 of its 40 tokens, alone
        ({long}, set()),  # the oldest's turn
        ({medium}, {medium}),  # its last 8 (short now): answered
        ({long}, set()),
    ]
    run_all(engine, EngineRequest(random_prompt(9, seed=1), greedy(1)))
    first, second = (
        engine.add(EngineRequest(random_prompt(100, seed=s), greedy(1))) for s in (2, 3)
    )
    # 100 tokens each: the first in 32 + 32 + 32 + 4, the second from what its last step left.
    assert [step() for _ in range(7)] == [
        *[({first}, set())] * 3,
        ({first, second}, {first}),
        *[({second}, set())] * 2,
        ({second}, {second}),
    ]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_prompts_arriving_at_random_each_get_their_solo_tokens_and_none_starves(kind: str) -> None:
    """Prompts of random lengths, some from a cached prefix, arriving at random steps while
    others are read and answered: each gets its solo tokens, and the oldest prompt being read
    is never passed over two steps running (its turns: however many prompts with fewer tokens
    left arrive, it is answered)."""
    engine = build_tiny_engine(kind, max_batch_tokens=32)
    rng = random.Random(7)
    base = random_prompt(90, seed=99)
    cached = prefilled(run_all(engine, EngineRequest(base, greedy(0), snapshot_at=(64,))))
    requests = []
    for i in range(24):
        tail = random_prompt(rng.randrange(1, 160), seed=100 + i)
        if i % 3:
            requests.append(EngineRequest(tail, greedy(rng.randrange(1, 12))))
        else:
            sampling = greedy(rng.randrange(1, 12))
            requests.append(EngineRequest(base[:64] + tail, sampling, cached.snapshots[64], 64))
    solo = [token_ids(run_all(engine, r)) for r in requests]
    arrivals = sorted(rng.randrange(60) for _ in requests)
    index: dict[int, int] = {}  # sequence -> request, in arrival order
    out: list[list[int]] = [[] for _ in requests]
    passed_over: int | None = None
    step = 0
    while len(index) < len(requests) or engine.num_running:
        while len(index) < len(requests) and arrivals[len(index)] <= step:
            index[engine.add(requests[len(index)])] = len(index)
        reading = [seq for seq, i in index.items() if not out[i]]  # arrival order
        events = engine.step()
        if reading:
            if any(seq == reading[0] for seq, _ in events):
                passed_over = None
            else:
                assert passed_over != reading[0], f"step {step}: the oldest prompt passed over"
                passed_over = reading[0]
        for seq, item in events:
            if isinstance(item, Exception):
                raise item
            if isinstance(item, TokenOut):
                out[index[seq]].append(item.token_id)
        step += 1
    assert out == solo


def test_a_step_beside_streams_carries_fewer_prompt_tokens() -> None:
    """``prompt_tokens_beside_streams``: while a stream decodes, a long prompt is read in
    smaller chunks (shorter waits between the stream's tokens), and in whole steps after."""
    engine = build_tiny_engine("llama", max_batch_tokens=32, prompt_tokens_beside_streams=8)
    engine.add(EngineRequest(random_prompt(5, seed=80), greedy(6)))  # a stream
    engine.step()
    long = engine.add(EngineRequest(random_prompt(200, seed=81), greedy(1)))
    done = [0]
    while engine.num_running:
        for seq, item in engine.step():
            if seq == long and isinstance(item, PrefillProgress):
                done.append(item.num_done_tokens)
    steps = [b - a for a, b in itertools.pairwise(done)]
    assert steps[:5] == [8] * 5 and set(steps[6:]) == {32}


def test_streams_get_steps_of_their_own_beside_a_long_prompt() -> None:
    """``stream_time_share``: while a long prompt is read beside a decoding stream, steps of
    the stream alone take that share of the time (each step here takes 1 s of a test clock:
    at 0.5, every other step); short prompts still go in those steps; none once the stream ends."""
    engine = build_tiny_engine(
        "llama", max_batch_tokens=16, stop_token_ids=(), stream_time_share=0.5
    )
    ticks = iter(range(10_000))
    engine.clock = lambda: float(next(ticks))
    stream = engine.add(EngineRequest(random_prompt(3, seed=90), greedy(9)))
    engine.step()
    long = engine.add(EngineRequest(random_prompt(200, seed=91), greedy(1)))
    read, tokens = [], []
    for i in range(14):
        if i == 3:
            short = engine.add(EngineRequest(random_prompt(4, seed=92), greedy(1)))
        events = engine.step()
        read.append(any(seq == long and isinstance(e, PrefillProgress) for seq, e in events))
        tokens.append({seq for seq, e in events if isinstance(e, TokenOut)})
    # The stream's 8 tokens, one a step; the long prompt read in every other step meanwhile.
    assert all(stream in t for t in tokens[:8]) and read[:8] == [True, False] * 4
    assert short in tokens[3]  # a step of the stream's own: the short prompt still went
    assert all(read[9:])  # the stream is done: every step reads the prompt
    run_all(engine, EngineRequest(random_prompt(3, seed=93), greedy(1)))


# --- info and validation -------------------------------------------------------------------------


def test_info() -> None:
    llama = build_tiny_engine("llama")
    assert llama.info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x K,V x heads x dim x f32
    assert llama.info.dtype == "float32" and llama.info.device == "cpu"
    assert llama.info.max_context_tokens == 4096
    assert build_tiny_engine("llama").info.revision == llama.info.revision
    assert build_tiny_engine("llama", seed=1).info.revision != llama.info.revision
    assert build_tiny_engine("gemma3").info.revision != llama.info.revision
    bf16 = build_tiny_engine("llama", dtype=torch.bfloat16)
    assert bf16.info.dtype == "bfloat16" and bf16.info.revision != llama.info.revision


def test_rejects_bad_requests(gemma_engine: PagedEngine, llama_engine: PagedEngine) -> None:
    tokens = random_prompt(N, seed=16)
    snaps = snapshots_of(gemma_engine, tokens)
    bad = [
        EngineRequest(tokens, greedy(1), snaps[N], N),  # all restored, no logits
        EngineRequest(tokens, greedy(1), snaps[OFFSETS[1]], OFFSETS[1] + 1),  # beyond payload
        EngineRequest(tokens, greedy(1), None, 10),  # reuse_tokens without payload
        EngineRequest(tokens, greedy(0), snapshot_at=(N + 1,)),
        EngineRequest(tokens, greedy(0), snaps[OFFSETS[0]], OFFSETS[0], snapshot_at=(OFFSETS[0],)),
        EngineRequest(tokens, Sampling(max_tokens=-1)),
    ]
    for request in bad:
        with pytest.raises(ValueError):
            gemma_engine.add(request)
    with pytest.raises(ValueError, match="layout"):
        llama_engine.add(EngineRequest(tokens, greedy(1), snaps[N], N - 1))
    assert gemma_engine.num_running == 0


def test_cuda_unavailable_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        from promptcache.engine.device import resolve_device

        resolve_device("cuda")


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_cpu_attention_kernels_agree(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU small score matrices take the grouped matmul path and large ones SDPA's flash
    kernel; both give the same logits (fp32) for prefill chunks, hits and batched decodes."""
    from promptcache.engine.paged import attention

    tokens = random_prompt(N, seed=33)
    logits = {}
    for limit in (attention.MATH_MAX_SCORES, 0):
        monkeypatch.setattr(attention, "MATH_MAX_SCORES", limit)
        eng = build_tiny_engine(kind, max_batch_tokens=40)
        others = [EngineRequest(random_prompt(20, seed=s), greedy(30)) for s in (1, 2)]
        logits[limit] = eng.prompt_logits(EngineRequest(tokens, greedy(1)), batch_with=others)
    first, second = logits.values()
    torch.testing.assert_close(first, second, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_keys_read_in_place_or_gathered_alike(
    kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill chunk whose keys sit in consecutive slots reads them in place (a view of the
    pool); scattered ones are gathered. Both give the same logits, bit for bit, for a cold
    prompt and a hit."""
    from promptcache.engine.paged.attention import PagedAttention

    taken: list[bool] = []
    first_slot = PagedAttention._first_slot

    def spy(self: PagedAttention, blocks: list[int], lo: int, hi: int) -> int | None:
        found = first_slot(self, blocks, lo, hi)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(PagedAttention, "_first_slot", spy)
    tokens = random_prompt(N, seed=34)

    def logits(engine: PagedEngine) -> list[torch.Tensor]:
        snap = prefilled(run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=(40,))))
        cold = engine.prompt_logits(EngineRequest(tokens, greedy(1)))
        hit = engine.prompt_logits(EngineRequest(tokens, greedy(1), snap.snapshots[40], 40))
        return [cold, hit]

    in_place = logits(build_tiny_engine(kind, dtype=dtype))
    assert any(taken)

    scattered = build_tiny_engine(kind, dtype=dtype)
    # Free every other block first: each table then alternates and no two blocks are adjacent.
    blocks = scattered.pool.allocate(scattered.pool.num_free)
    scattered.pool.decref(blocks[1::2])
    taken.clear()
    gathered = logits(scattered)
    assert taken and not any(taken)
    for a, b in zip(in_place, gathered, strict=True):
        assert torch.equal(a, b)
