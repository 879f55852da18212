"""Logits -> token: greedy, temperature, top-k, top-p and seeded generators."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.core.request import Sampling
from promptcache.engine.sampling import (
    apply_top_k,
    apply_top_p,
    draw,
    make_generator,
    sample_token,
)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) if p > 0 else float("-inf") for p in probs])


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample_token(logits, Sampling(max_tokens=1, temperature=0.0)) == 1
    assert sample_token(logits, Sampling(max_tokens=1, temperature=1.0, top_k=1)) == 1


def test_greedy_needs_no_generator() -> None:
    assert make_generator(Sampling(max_tokens=1, temperature=0.0, seed=1), "cpu") is None
    assert make_generator(Sampling(max_tokens=1, seed=None), "cpu") is None
    assert isinstance(make_generator(Sampling(max_tokens=1, seed=1), "cpu"), torch.Generator)


def test_top_k_keeps_the_k_largest() -> None:
    out = apply_top_k(torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0]), 2)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]
    assert torch.equal(apply_top_k(torch.tensor([1.0, 2.0]), 5), torch.tensor([1.0, 2.0]))


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.79)).tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(apply_top_p(logits, 1.0)).all()
    assert torch.isfinite(apply_top_p(logits, 0.0)).tolist() == [True, False, False, False]


def test_sampling_respects_top_k_and_top_p() -> None:
    logits = logits_of([0.3, 0.25, 0.2, 0.15, 0.1])
    gen = torch.Generator().manual_seed(0)
    k2 = Sampling(max_tokens=1, temperature=1.0, top_k=2)
    assert {sample_token(logits, k2, gen) for _ in range(200)} == {0, 1}
    p = Sampling(max_tokens=1, temperature=1.0, top_p=0.7)
    assert {sample_token(logits, p, gen) for _ in range(200)} == {0, 1, 2}


def test_low_temperature_concentrates_on_the_mode() -> None:
    logits = torch.tensor([1.0, 0.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    cold = Sampling(max_tokens=1, temperature=0.05)
    assert all(sample_token(logits, cold, gen) == 0 for _ in range(100))
    hot = Sampling(max_tokens=1, temperature=5.0)
    assert len({sample_token(logits, hot, gen) for _ in range(200)}) == 4


def test_seeded_generator_reproduces() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    sampling = Sampling(max_tokens=1, temperature=1.0, top_p=0.9, seed=42)

    def draw() -> list[int]:
        gen = make_generator(sampling, "cpu")
        return [sample_token(logits, sampling, gen) for _ in range(30)]

    assert draw() == draw()


def test_bfloat16_logits_are_sampled_in_float32() -> None:
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    sampling = Sampling(max_tokens=1, temperature=0.8, top_p=0.9, top_k=50, seed=1)
    token = sample_token(logits, sampling, make_generator(sampling, "cpu"))
    assert 0 <= token < 5000


def test_rejects_batched_logits() -> None:
    with pytest.raises(ValueError, match="1-D"):
        sample_token(torch.zeros(2, 3), Sampling(max_tokens=1, temperature=0.0))


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=40),
    top_p=st.floats(0.0, 1.0),
)
def test_top_p_nucleus_property(probs: list[float], top_p: float) -> None:
    total = sum(probs)
    logits = logits_of([p / total for p in probs])
    kept = torch.isfinite(apply_top_p(logits, top_p))
    p = torch.softmax(logits, dim=-1)
    assert float(p[kept].max()) == float(p.max())  # a mode always survives (ties: any of them)
    kept_mass = float(p[kept].sum())
    assert kept_mass >= min(top_p, 1.0) - 1e-5 or kept.all()
    # Minimal: dropping the least likely kept token falls below top_p (unless only one is kept).
    if int(kept.sum()) > 1:
        assert kept_mass - float(p[kept].min()) < top_p + 1e-5


def test_draws_follow_the_distribution() -> None:
    """``draw`` (the inverse of the cumulative sum) draws each index as often as its
    probability says, never one of probability 0, whatever the size of the vocabulary."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.15, 0.05, 0.0])
    n = 20_000
    counts = torch.bincount(torch.tensor([draw(probs, gen) for _ in range(n)]), minlength=7)
    assert counts[probs == 0].sum() == 0
    # Within 5 standard deviations of the expected count for each index.
    expected = probs * n
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs)).sqrt() + 1).all()
    big = torch.zeros(262_144)
    big[[7, 200_000, 262_143]] = torch.tensor([0.25, 0.5, 0.25])
    assert {draw(big, gen) for _ in range(300)} == {7, 200_000, 262_143}


def test_a_draw_at_the_very_top_lands_on_the_last_token_with_any_probability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probs = torch.tensor([0.2, 0.8, 0.0, 0.0])
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones_like(real_rand(*a, **k)))
    assert draw(probs) == 1
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros_like(real_rand(*a, **k)))
    assert draw(torch.tensor([0.0, 0.0, 1.0])) == 2


def test_a_broken_distribution_is_refused() -> None:
    with pytest.raises(RuntimeError):
        draw(torch.tensor([float("nan"), 0.5]))
    with pytest.raises(RuntimeError):
        draw(torch.tensor([0.0, 0.0]))
