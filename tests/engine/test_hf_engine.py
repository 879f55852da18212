"""HFEngine on tiny random models: cache fidelity (spec §1.15, checklist 69/70), stops, sampling."""

from __future__ import annotations

import pytest
import torch

from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest, Prefilled, Stopped, TokenOut
from promptcache.engine.hf.engine import HFEngine
from promptcache.engine.hf.kv import HFKVPayload
from promptcache.engine.hf.testing import (
    TINY_SLIDING_WINDOW,
    build_tiny_engine,
    prefilled,
    random_prompt,
    run_all,
    stop_reason,
    token_ids,
)
from promptcache.errors import PromptTooLong

W = TINY_SLIDING_WINDOW
N = 5 * W + 3  # longer than 3 windows
OFFSETS = (W + 5, 3 * W - 3, N)  # inside windows, never multiples of W
ATOL = 1e-4


def greedy(max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0)


def snapshots_of(engine: HFEngine, tokens: list[int]) -> dict[int, HFKVPayload]:
    events = run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=OFFSETS))
    snaps = prefilled(events).snapshots
    assert all(isinstance(p, HFKVPayload) for p in snaps.values())
    return dict(snaps)  # type: ignore[arg-type]


def clone_payload(payload: HFKVPayload) -> list[torch.Tensor]:
    return [t.clone() for layer in payload.layers for t in (layer.keys, layer.values)]


def assert_unchanged(payload: HFKVPayload, before: list[torch.Tensor]) -> None:
    after = [t for layer in payload.layers for t in (layer.keys, layer.values)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# --- fidelity ------------------------------------------------------------------------------------


def test_cold_partial_and_whole_prompt_hit_agree(engine: HFEngine) -> None:
    tokens = random_prompt(N)
    cold = run_all(engine, EngineRequest(tokens, greedy(24), snapshot_at=OFFSETS))
    snaps = prefilled(cold).snapshots
    assert sorted(snaps) == sorted(OFFSETS)
    assert prefilled(cold).num_computed_tokens == N
    cold_logits = engine.prompt_logits(EngineRequest(tokens, greedy(1)))

    for x in OFFSETS:
        reuse_tokens = x - 1 if x == N else x  # whole-prompt hit recomputes the last token
        payload = snaps[x]
        before = clone_payload(payload)  # type: ignore[arg-type]
        warm = run_all(engine, EngineRequest(tokens, greedy(24), payload, reuse_tokens))
        assert token_ids(warm) == token_ids(cold), f"restore at {reuse_tokens}"
        assert prefilled(warm).num_computed_tokens == N - reuse_tokens
        warm_logits = engine.prompt_logits(EngineRequest(tokens, greedy(1), payload, reuse_tokens))
        torch.testing.assert_close(warm_logits, cold_logits, atol=ATOL, rtol=0)
        assert_unchanged(payload, before)  # type: ignore[arg-type]


def test_restore_from_middle_of_sliding_window(gemma_engine: HFEngine) -> None:
    tokens = random_prompt(N, seed=2)
    snaps = snapshots_of(gemma_engine, tokens)
    cold_logits = gemma_engine.prompt_logits(EngineRequest(tokens, greedy(1)))
    windows = gemma_engine.kv_layout.windows
    assert W in windows and None in windows
    for x in OFFSETS:
        payload = snaps[x]
        # Sliding layers keep just the last W positions; full layers the whole prefix.
        for layer, window in zip(payload.layers, windows, strict=True):
            assert layer.start == (0 if window is None else x - W)
            assert layer.keys.shape[-2] == (x if window is None else W)
        assert payload.min_restore_tokens == x - 1
        for reuse_tokens in (x - 1, x) if x < N else (x - 1,):
            request = EngineRequest(tokens, greedy(1), payload, reuse_tokens)
            torch.testing.assert_close(
                gemma_engine.prompt_logits(request), cold_logits, atol=ATOL, rtol=0
            )


def test_snapshot_taken_in_a_restored_request(engine: HFEngine) -> None:
    """Checklist 70: extend a cached prefix, then both prefixes still hit exactly."""
    base = random_prompt(N, seed=3)
    longer = base + random_prompt(2 * W + 7, seed=4)
    first = run_all(engine, EngineRequest(base, greedy(0), snapshot_at=(N,)))
    base_snap = prefilled(first).snapshots[N]
    before = clone_payload(base_snap)  # type: ignore[arg-type]

    # The extension restores the base prefix and writes a deeper snapshot.
    ext = run_all(
        engine, EngineRequest(longer, greedy(16), base_snap, N, snapshot_at=(len(longer) - 3,))
    )
    assert prefilled(ext).num_computed_tokens == len(longer) - N
    deep_snap = prefilled(ext).snapshots[len(longer) - 3]
    assert token_ids(ext) == token_ids(run_all(engine, EngineRequest(longer, greedy(16))))

    # The deeper snapshot (taken from a restored cache) restores exactly, both ways.
    follow = longer + random_prompt(W + 1, seed=5)
    cold = run_all(engine, EngineRequest(follow, greedy(16)))
    warm = run_all(engine, EngineRequest(follow, greedy(16), deep_snap, len(longer) - 3))
    assert token_ids(warm) == token_ids(cold)
    whole = longer[:-3]
    assert token_ids(
        run_all(engine, EngineRequest(whole, greedy(16), deep_snap, len(whole) - 1))
    ) == token_ids(run_all(engine, EngineRequest(whole, greedy(16))))

    # The original prefix still hits and gives the cold output.
    assert_unchanged(base_snap, before)  # type: ignore[arg-type]
    again = run_all(engine, EngineRequest(base, greedy(16), base_snap, N - 1))
    assert token_ids(again) == token_ids(run_all(engine, EngineRequest(base, greedy(16))))


def test_chunk_size_does_not_change_output() -> None:
    tokens = random_prompt(N, seed=6)
    outputs = []
    for chunk in (1, 7, 64, 1000):
        eng = build_tiny_engine("gemma3", prefill_chunk_tokens=chunk)
        outputs.append(token_ids(run_all(eng, EngineRequest(tokens, greedy(12)))))
    assert all(out == outputs[0] for out in outputs)


def test_payloads_are_private_contiguous_copies(engine: HFEngine) -> None:
    """Snapshot tensors own their storage (never views into the live cache). Nested snapshots
    of one prefill share complete pages; a partial last page and sliding tails are their own."""
    tokens = random_prompt(N, seed=7)
    snaps = snapshots_of(engine, tokens)
    page_ids: dict[int, int] = {}
    tails = set()
    for payload in snaps.values():
        assert payload.num_tokens in OFFSETS
        tensors = [t for page in payload.pages for t in (*page.keys, *page.values)]
        tensors += [
            t for tail in payload.tails if tail is not None for t in (tail.keys, tail.values)
        ]
        for t in tensors:
            assert t.is_contiguous()
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert payload.nbytes == sum(t.numel() * t.element_size() for t in tensors)
        assert payload.nbytes == sum(n for _, n in payload.parts)
        for page in payload.pages:
            # The same page id is the same object, whichever snapshot holds it.
            assert page_ids.setdefault(page.page_id, id(page)) == id(page)
        tails.update(id(t) for t in payload.tails if t is not None)
    page = engine.kv_page_tokens
    complete = {x // page for x in OFFSETS}  # complete pages of each snapshot
    partial = sum(1 for x in OFFSETS if x % page)
    assert len(page_ids) == max(complete) + partial
    assert len(tails) == sum(1 for w in engine.kv_layout.windows if w is not None) * len(OFFSETS)


# --- prefill only, stops, limits -----------------------------------------------------------------


def test_prefill_only_computes_up_to_the_last_snapshot(engine: HFEngine) -> None:
    tokens = random_prompt(N, seed=8)
    before = engine.num_prefill_tokens_total
    events = run_all(engine, EngineRequest(tokens, greedy(0), snapshot_at=(20, 50)))
    assert len(events) == 2 and events[1] == Stopped("max_tokens")
    assert prefilled(events).num_computed_tokens == 50
    assert sorted(prefilled(events).snapshots) == [20, 50]
    assert engine.num_prefill_tokens_total - before == 50

    nothing = run_all(engine, EngineRequest(tokens, greedy(0)))
    assert nothing == [Prefilled({}, 0), Stopped("max_tokens")]
    assert engine.num_prefill_tokens_total - before == 50

    # A pre-warmed snapshot serves a later request exactly.
    snap = prefilled(events).snapshots[50]
    warm = run_all(engine, EngineRequest(tokens, greedy(10), snap, 50))
    assert token_ids(warm) == token_ids(run_all(engine, EngineRequest(tokens, greedy(10))))


def test_prefill_only_from_a_restored_prefix(engine: HFEngine) -> None:
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
    free = token_ids(run_all(build_tiny_engine("llama"), EngineRequest(tokens, greedy(8))))
    stop = free[3]
    expected = free[: free.index(stop)]
    eng = build_tiny_engine("llama", stop_token_ids=[stop])
    events = run_all(eng, EngineRequest(tokens, greedy(8)))
    assert token_ids(events) == expected
    assert stop_reason(events) == "end_turn"
    assert all(isinstance(e, TokenOut) for e in events[1:-1])


def test_default_stop_ids_are_end_of_turn_and_eos(llama_engine: HFEngine) -> None:
    tok = llama_engine.tokenizer
    ids = {tok.encode(s, allow_special=True)[0] for s in ("<end_of_turn>", "<eos>")}
    assert llama_engine.stop_token_ids == ids


def test_max_tokens(engine: HFEngine) -> None:
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

    # max_tokens reached at the same step wins.
    exact = run_all(eng, EngineRequest(random_prompt(37), greedy(3)))
    assert stop_reason(exact) == "max_tokens"

    with pytest.raises(PromptTooLong):
        run_all(eng, EngineRequest(random_prompt(41), greedy(1)))


# --- sampling, cancellation, state ---------------------------------------------------------------


def test_seeded_sampling_is_reproducible(engine: HFEngine) -> None:
    tokens = random_prompt(30, seed=11)

    def sample(seed: int) -> list[int]:
        sampling = Sampling(max_tokens=20, temperature=1.0, top_p=0.95, top_k=100, seed=seed)
        return token_ids(run_all(engine, EngineRequest(tokens, sampling)))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_seeded_sampling_survives_a_cache_hit(engine: HFEngine) -> None:
    tokens = random_prompt(N, seed=12)
    sampling = Sampling(max_tokens=12, temperature=0.7, seed=3)
    cold = run_all(engine, EngineRequest(tokens, sampling, snapshot_at=(40,)))
    warm = run_all(engine, EngineRequest(tokens, sampling, prefilled(cold).snapshots[40], 40))
    assert token_ids(warm) == token_ids(cold)


def test_generator_is_lazy_and_closes_mid_decode(engine: HFEngine) -> None:
    tokens = random_prompt(30, seed=13)
    before = engine.num_prefill_tokens_total
    gen = engine.generate(EngineRequest(tokens, greedy(50)))
    assert engine.num_prefill_tokens_total == before  # nothing ran yet
    assert isinstance(next(gen), Prefilled)
    assert not torch.is_inference_mode_enabled()  # not leaked across the yield
    assert isinstance(next(gen), TokenOut)
    assert isinstance(next(gen), TokenOut)
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    assert engine.num_prefill_tokens_total == before + 30
    again = run_all(engine, EngineRequest(tokens, greedy(3)))
    assert stop_reason(again) == "max_tokens"


def test_interleaved_generations_do_not_share_state(engine: HFEngine) -> None:
    a, b = random_prompt(30, seed=14), random_prompt(45, seed=15)
    solo_a = token_ids(run_all(engine, EngineRequest(a, greedy(6))))
    solo_b = token_ids(run_all(engine, EngineRequest(b, greedy(6))))
    ga, gb = (
        engine.generate(EngineRequest(a, greedy(6))),
        engine.generate(EngineRequest(b, greedy(6))),
    )
    out_a, out_b = [], []
    for ea, eb in zip(ga, gb, strict=False):
        out_a.append(ea)
        out_b.append(eb)
    assert token_ids(out_a) == solo_a and token_ids(out_b) == solo_b


# --- info and validation -------------------------------------------------------------------------


def test_info() -> None:
    llama = build_tiny_engine("llama")
    assert llama.info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x K,V x heads x dim x f32
    assert llama.info.dtype == "float32" and llama.info.device == "cpu"
    assert llama.info.max_context_tokens == 4096
    assert build_tiny_engine("llama").info.revision == llama.info.revision
    assert build_tiny_engine("llama", seed=1).info.revision != llama.info.revision
    assert build_tiny_engine("gemma3").info.revision != llama.info.revision


def test_rejects_bad_requests(gemma_engine: HFEngine, llama_engine: HFEngine) -> None:
    tokens = random_prompt(N, seed=16)
    snaps = snapshots_of(gemma_engine, tokens)
    bad = [
        EngineRequest(tokens, greedy(1), snaps[N], N),  # all restored, no logits
        EngineRequest(tokens, greedy(1), snaps[OFFSETS[1]], OFFSETS[1] + 1),  # beyond payload
        EngineRequest(tokens, greedy(1), snaps[OFFSETS[1]], OFFSETS[1] - 5),  # window dropped
        EngineRequest(tokens, greedy(1), None, 10),  # reuse_tokens without payload
        EngineRequest(tokens, greedy(0), snapshot_at=(N + 1,)),
        EngineRequest(tokens, greedy(0), snaps[OFFSETS[0]], OFFSETS[0], snapshot_at=(OFFSETS[0],)),
        EngineRequest(tokens, Sampling(max_tokens=-1)),
    ]
    for request in bad:
        with pytest.raises(ValueError):
            run_all(gemma_engine, request)
    with pytest.raises(ValueError, match="layout"):
        run_all(llama_engine, EngineRequest(tokens, greedy(1), snaps[N], N - 1))


def test_cuda_unavailable_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        build_tiny_engine("llama", device="cuda")


def test_long_prefill_runs_in_steps_that_can_be_cancelled() -> None:
    from promptcache.engine.base import PrefillProgress
    from promptcache.engine.hf.testing import build_tiny_engine

    engine = build_tiny_engine("llama", prefill_chunk_tokens=16)
    tokens = random_prompt(70, seed=3)
    events = run_all(engine, EngineRequest(tokens, greedy(2)), progress=True)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [p.num_done_tokens for p in progress] == [16, 32, 48, 64]
    assert all(p.num_total_tokens == 70 for p in progress)
    # Closing the generator between chunks stops the prefill there.
    before = engine.num_prefill_tokens_total
    steps = engine.generate(EngineRequest(tokens, greedy(2)))
    assert isinstance(next(steps), PrefillProgress)
    steps.close()
    assert engine.num_prefill_tokens_total - before == 16
