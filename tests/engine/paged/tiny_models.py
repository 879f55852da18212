"""Tiny random-weight transformers models of every supported family, for the model tests.

Llama and Gemma 3 come from ``promptcache.engine.hf.testing``; the rest use the same sizes.
Norm weights and biases are randomised too (transformers initialises them to constants, which
would hide a missing bias or a misplaced ``1 + w``).
"""

from __future__ import annotations

from typing import Any

import torch

from promptcache.core.tokenizer import ByteTokenizer
from promptcache.engine.hf.testing import TINY_SLIDING_WINDOW, build_tiny_model

KINDS = (
    "llama",
    "llama3_rope",
    "mistral",
    "qwen2",
    "qwen3",
    "smollm3",
    "gemma3",
    "gemma3_scaled",
)

INIT_RANGE = 0.25
_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4096,
    # Narrower than hf.testing's 0.5: there, activations grow large enough that transformers'
    # own cached decode drifts ~1e-4 from its full forward in float32.
    "initializer_range": INIT_RANGE,
    "attn_implementation": "sdpa",
}


def build(kind: str, *, seed: int = 0) -> Any:
    """A tiny float32 transformers causal LM of ``kind`` (one of ``KINDS``), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(kind)
        _randomise_constants(model)
    return model.eval()


def _build(kind: str) -> Any:
    import transformers as tf

    if kind == "llama":
        return build_tiny_model("llama", initializer_range=INIT_RANGE)
    if kind == "gemma3":
        return build_tiny_model("gemma3", initializer_range=INIT_RANGE)
    if kind == "gemma3_scaled":
        # Tied embeddings, a final softcap, a softmax scale that is not head_dim, and linear
        # rope scaling on the global layers only.
        return build_tiny_model(
            "gemma3",
            initializer_range=INIT_RANGE,
            tie_word_embeddings=True,
            final_logit_softcapping=5.0,
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
    byte = ByteTokenizer()
    common = {
        **_SIZES,
        "vocab_size": byte.vocab_size,
        "pad_token_id": byte.token_id("<pad>"),
        "eos_token_id": byte.token_id("<eos>"),
        "bos_token_id": byte.token_id("<bos>"),
    }
    if kind == "llama3_rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        config = tf.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
        return tf.LlamaForCausalLM(config)
    if kind == "mistral":
        config = tf.MistralConfig(**common, sliding_window=TINY_SLIDING_WINDOW)
        return tf.MistralForCausalLM(config)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common))
    if kind == "smollm3":
        # Layer 1 without rope (NoPE), as every fourth layer of the real model.
        config = tf.SmolLM3Config(**common, no_rope_layer_interval=2)
        return tf.SmolLM3ForCausalLM(config)
    raise ValueError(f"unknown tiny kind {kind!r}")


def build_gemma3_vision(*, seed: int = 0) -> Any:
    """A tiny ``Gemma3ForConditionalGeneration`` (the text model of ``build("gemma3")`` plus a
    one-layer vision tower); ``from_hf`` should take its language model only."""
    import transformers as tf

    text = build("gemma3", seed=seed).config.to_dict()
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=ByteTokenizer().vocab_size,  # out of the text vocabulary: unused
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.Gemma3ForConditionalGeneration(config)
        _randomise_constants(model)
    return model.eval()


def _randomise_constants(model: Any) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.2)
