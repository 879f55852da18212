"""Gemma 3 text models (``Gemma3ForCausalLM``, and the text half of
``Gemma3ForConditionalGeneration``).

Against Llama: embeddings scaled by sqrt(hidden) (rounded to the model dtype, as transformers
does), RMSNorms that scale by ``1 + w`` in float32, four norms per layer (before and after both
attention and MLP), q/k norms, a GELU-tanh MLP, softmax scale ``query_pre_attn_scalar**-0.5``,
and two ropes: a local base for the sliding-window layers and the global base (with any scaling)
for the full-attention ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.engine.paged.models.base import Attention, AttnSpec, CausalLM, ModelShape
from promptcache.engine.paged.models.layers import (
    GatedMLP,
    HeadNorm,
    Linear,
    OffsetRMSNorm,
    SelfAttention,
    activation,
    adopt,
    chained,
    frozen,
    residual_norm,
)
from promptcache.engine.paged.models.rope import Rotary

GEMMA3_TYPES = ("gemma3_text", "gemma3")


class Gemma3Layer(nn.Module):
    def __init__(
        self,
        attn: SelfAttention,
        mlp: GatedMLP,
        norms: tuple[OffsetRMSNorm, OffsetRMSNorm, OffsetRMSNorm, OffsetRMSNorm],
        rope: int,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.input_norm, self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm = norms
        self.rope = rope
        """Index of this layer's ``Rotary`` in ``Gemma3.rotaries``."""

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        ropes: list[tuple[torch.Tensor, torch.Tensor]],
        attn: Attention,
        next_norm: OffsetRMSNorm,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``x`` and its normalised copy ``h`` (this layer's input norm
        of ``x``) in; the same two out, ``h`` by ``next_norm`` (the next layer's input norm,
        or the model's final one)."""
        a = self.attn(h, ropes[self.rope], attn, keep)
        if keep is not None:
            x = x[keep]
        x, h = residual_norm(x, a, self.post_attn_norm, self.pre_mlp_norm)
        return residual_norm(x, self.mlp(h), self.post_mlp_norm, next_norm)


class Gemma3(CausalLM):
    def __init__(
        self,
        shape: ModelShape,
        attn_specs: tuple[AttnSpec, ...],
        embed: torch.Tensor,
        layers: list[Gemma3Layer],
        norm: OffsetRMSNorm,
        lm_head: Linear,
        rotaries: list[Rotary],
        final_softcap: float | None,
    ) -> None:
        super().__init__(shape, attn_specs)
        self.embed = frozen(embed)
        # transformers multiplies by sqrt(hidden) cast to the weights' dtype (55.4256 becomes
        # 55.5 in bfloat16); the rounded value, as a Python float, multiplies the same.
        self.embed_scale = float(torch.tensor(shape.hidden_size**0.5).to(embed.dtype))
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotaries = nn.ModuleList(rotaries)
        self.final_softcap = final_softcap

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: Attention,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed) * self.embed_scale
        ropes = [rotary(positions, x.dtype) for rotary in self.rotaries]
        first_norm, layers = chained(self.layers, self.norm)
        h: torch.Tensor = first_norm(x)
        for layer, next_norm, last in layers:
            x, h = layer(x, h, ropes, attn, next_norm, keep if last else None)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def gemma3_from_hf(model: Any, dtype: torch.dtype) -> Gemma3:
    """A ``Gemma3`` over the weights of a transformers ``Gemma3ForCausalLM`` (or the language
    model of a ``Gemma3ForConditionalGeneration``; the vision tower is left out)."""
    config = model.config
    if config.model_type == "gemma3":
        config, body = config.text_config, model.model.language_model
    elif config.model_type == "gemma3_text":
        body = model.model
    else:
        raise ValueError(f"{config.model_type!r} is not a Gemma 3 model")
    if config.use_bidirectional_attention:
        raise ValueError(
            "Gemma 3 with bidirectional attention (an embedding model) is not a causal LM"
        )
    shape = ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
    )
    scale = config.query_pre_attn_scalar**-0.5
    # transformers' Gemma 3 never passes attn_logit_softcapping to its attention (Gemma 3
    # replaced softcapping with q/k norms; the released configs leave it null), so neither do we.
    specs = tuple(
        AttnSpec(scale, config.sliding_window if t == "sliding_attention" else None, None)
        for t in config.layer_types
    )
    layer_types = sorted(set(config.layer_types))
    embed = adopt(body.embed_tokens.weight, dtype)
    rotaries = [Rotary.from_config(config, shape.head_dim, t).to(embed.device) for t in layer_types]
    act = activation(config.hidden_activation)
    layers = [
        _layer(i, hf_layer, shape, dtype, act, layer_types.index(config.layer_types[i]))
        for i, hf_layer in enumerate(body.layers)
    ]
    if model.lm_head.weight is body.embed_tokens.weight:
        lm_head = Linear(embed)  # tied: one tensor, even after a dtype conversion
    else:
        lm_head = Linear.adopt(model.lm_head, dtype)
    return Gemma3(
        shape,
        specs,
        embed,
        layers,
        OffsetRMSNorm.adopt(body.norm),
        lm_head,
        rotaries,
        config.final_logit_softcapping,
    )


def _layer(
    index: int, hf: Any, shape: ModelShape, dtype: torch.dtype, act: Any, rope: int
) -> Gemma3Layer:
    a = hf.self_attn
    attn = SelfAttention(
        index,
        Linear.fuse([a.q_proj, a.k_proj, a.v_proj], dtype),
        Linear.adopt(a.o_proj, dtype),
        shape.num_heads,
        shape.num_kv_heads,
        shape.head_dim,
        HeadNorm.adopt(a.q_norm, a.k_norm, shape.num_heads, shape.num_kv_heads, dtype, offset=True),
    )
    norms = (
        OffsetRMSNorm.adopt(hf.input_layernorm),
        OffsetRMSNorm.adopt(hf.post_attention_layernorm),
        OffsetRMSNorm.adopt(hf.pre_feedforward_layernorm),
        OffsetRMSNorm.adopt(hf.post_feedforward_layernorm),
    )
    return Gemma3Layer(attn, GatedMLP.adopt(hf.mlp, act, dtype), norms, rope)
