"""The lean models against transformers, family by family, in float32 (max abs diff <= 1e-4).

Each kind runs a whole prompt in one forward, the same tokens as prefill chunks then decode
steps, and two sequences packed into one step. Prompts are longer than the sliding window (16),
so the window is exercised wherever a kind has one.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from promptcache.engine.paged.models import CausalLM, Gemma3, Llama, from_hf
from promptcache.engine.paged.models.reference import ContiguousAttention
from tests.engine.paged.tiny_models import KINDS, build, build_gemma3_vision

TOL = 1e-4
LENGTH = 48
CHUNKS = (13, 16, 11)  # then single-token decode steps up to LENGTH


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits for every position of one sequence, ``[len, vocab]``."""
    logits: torch.Tensor = hf(input_ids=ids[None]).logits[0]
    return logits


@torch.no_grad()
def run(model: CausalLM, attn: ContiguousAttention, ids: torch.Tensor, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[0])
    return model.logits(model(ids, positions, attn))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


class PackedAttention:
    """Several ``ContiguousAttention`` sequences packed into one step, in ``segments`` order."""

    def __init__(self, sequences: list[ContiguousAttention]) -> None:
        self.sequences = sequences
        self.segments: list[tuple[int, int]] = []  # (sequence, tokens) of the current step

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        sizes = [n for _, n in self.segments]
        outs = [
            self.sequences[s](layer, qs, ks, vs)
            for (s, _), qs, ks, vs in zip(
                self.segments, q.split(sizes), k.split(sizes), v.split(sizes), strict=True
            )
        ]
        return torch.cat(outs)


@pytest.fixture(scope="module", params=KINDS)
def pair(request: pytest.FixtureRequest) -> tuple[Any, CausalLM]:
    """(transformers model, lean model over the same, shared, weights)."""
    hf = build(request.param)
    return hf, from_hf(hf)


def test_whole_prompt(pair: tuple[Any, CausalLM]) -> None:
    hf, model = pair
    ids = tokens(LENGTH)
    ours = run(model, ContiguousAttention(model.attn_specs), ids, 0)
    assert ours.shape == (LENGTH, model.shape.vocab_size)
    assert max_diff(ours, reference_logits(hf, ids)) <= TOL


def test_chunked_prefill_then_decode(pair: tuple[Any, CausalLM]) -> None:
    hf, model = pair
    ids = tokens(LENGTH, seed=2)
    ref = reference_logits(hf, ids)
    attn = ContiguousAttention(model.attn_specs)
    start = 0
    for size in [*CHUNKS, *[1] * (LENGTH - sum(CHUNKS))]:
        ours = run(model, attn, ids[start : start + size], start)
        assert max_diff(ours, ref[start : start + size]) <= TOL, f"tokens {start}..{start + size}"
        start += size
    assert attn.length() == LENGTH


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_packed_sequences(kind: str) -> None:
    """Two sequences in each step: a prefill chunk of one beside another's, then both decode."""
    hf = build(kind)
    model = from_hf(hf)
    a, b = tokens(30, seed=3), tokens(24, seed=4)
    ref_a, ref_b = reference_logits(hf, a), reference_logits(hf, b)
    packed = PackedAttention([ContiguousAttention(model.attn_specs) for _ in range(2)])
    # (tokens of a, tokens of b) per step: prefill chunks, a decodes while b prefills, both decode.
    steps = [(20, 10), (1, 12), (9, 1), (0, 1)]
    done = [0, 0]
    with torch.no_grad():
        for na, nb in steps:
            packed.segments = [(s, n) for s, n in ((0, na), (1, nb)) if n]
            ids = torch.cat([a[done[0] : done[0] + na], b[done[1] : done[1] + nb]])
            positions = torch.cat(
                [torch.arange(done[0], done[0] + na), torch.arange(done[1], done[1] + nb)]
            )
            ours = model.logits(model(ids, positions, packed))
            assert max_diff(ours[:na], ref_a[done[0] : done[0] + na]) <= TOL
            assert max_diff(ours[na:], ref_b[done[1] : done[1] + nb]) <= TOL
            done = [done[0] + na, done[1] + nb]
    assert done == [30, 24]


def test_gemma3_with_vision_runs_its_language_model() -> None:
    hf = build_gemma3_vision()
    model = from_hf(hf)
    assert isinstance(model, Gemma3)
    ids = tokens(LENGTH, seed=6)
    ours = run(model, ContiguousAttention(model.attn_specs), ids, 0)
    assert max_diff(ours, reference_logits(hf, ids)) <= TOL


def test_families_and_specs() -> None:
    llama, gemma = from_hf(build("llama")), from_hf(build("gemma3"))
    assert isinstance(llama, Llama)
    assert isinstance(gemma, Gemma3)
    assert [s.window for s in gemma.attn_specs] == [16, None, 16]
    assert all(s.window is None and s.softcap is None for s in llama.attn_specs)
    assert [s.window for s in from_hf(build("mistral")).attn_specs] == [16, 16]
    assert gemma.shape.num_layers == 3 and gemma.shape.num_kv_heads == 2
    assert llama.dtype == torch.float32
    assert not any(p.requires_grad for p in gemma.parameters())


def test_shares_weights_in_the_same_dtype() -> None:
    hf = build("qwen2")
    model = from_hf(hf)
    assert isinstance(model, Llama)
    attn = hf.model.layers[0].self_attn
    fused = model.layers[0].attn.qkv
    # The fused projection became the source's storage (q, k, v are slices of it) ...
    assert attn.q_proj.weight.data_ptr() == fused.weight.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.weight.data_ptr()
    assert attn.v_proj.bias.untyped_storage().data_ptr() == fused.bias.data_ptr()
    # ... and unfused tensors are the source's own.
    assert model.embed.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr()


def test_tied_embeddings_stay_one_tensor_after_conversion() -> None:
    hf = build("gemma3_scaled")
    model = from_hf(hf, torch.bfloat16)
    assert isinstance(model, Gemma3)
    assert model.lm_head.weight.data_ptr() == model.embed.data_ptr()
    assert hf.model.embed_tokens.weight.dtype == torch.float32  # the source is left alone


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_bfloat16_smoke(kind: str) -> None:
    """bf16 runs, and drifts from float32 no more than transformers' own bf16 does."""
    hf = build(kind)
    ids = tokens(LENGTH, seed=5)
    ref = reference_logits(hf, ids)
    hf_bf16 = reference_logits(copy.deepcopy(hf).to(torch.bfloat16), ids).float()
    model = from_hf(hf, torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ours = run(model, ContiguousAttention(model.attn_specs), ids, 0)
    assert ours.dtype == torch.bfloat16
    assert torch.isfinite(ours).all()
    ours = ours.float()
    # Measured: our mean |error| is within 2% of transformers' (0.047 vs 0.047 on the tiny
    # Llama, logits of mean magnitude 1.6); 1.25x leaves room for other seeds and CPUs.
    assert (ours - ref).abs().mean() <= 1.25 * (hf_bf16 - ref).abs().mean()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_unsupported_architecture_is_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        from_hf(gpt2)


def test_length_dependent_rope_is_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        vocab_size=64,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    with pytest.raises(ValueError, match="dynamic"):
        from_hf(LlamaForCausalLM(config))
