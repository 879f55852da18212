"""The Llama family: Llama 2/3/3.1, SmolLM2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norms).

A pre-norm decoder: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, SiLU-gated MLP. The
variants differ only in what ``llama_from_hf`` reads from the config: biases, q/k norms, which
layers use rope (SmolLM3 leaves every fourth without) and which attend through a window.
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
    RMSNorm,
    SelfAttention,
    activation,
    adopt,
    chained,
    frozen,
    residual_norm,
)
from promptcache.engine.paged.models.rope import Rotary

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


class LlamaLayer(nn.Module):
    def __init__(
        self,
        attn: SelfAttention,
        mlp: GatedMLP,
        input_norm: RMSNorm,
        post_attn_norm: RMSNorm,
        use_rope: bool,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.input_norm = input_norm
        self.post_attn_norm = post_attn_norm
        self.use_rope = use_rope

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: Attention,
        next_norm: RMSNorm,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``x`` and its normalised copy ``h`` (this layer's input norm
        of ``x``) in; the same two out, ``h`` by ``next_norm`` (the next layer's input norm,
        or the model's final one)."""
        a = self.attn(h, rope if self.use_rope else None, attn, keep)
        if keep is not None:
            x = x[keep]
        x, h = residual_norm(x, a, None, self.post_attn_norm)
        return residual_norm(x, self.mlp(h), None, next_norm)


class Llama(CausalLM):
    def __init__(
        self,
        shape: ModelShape,
        attn_specs: tuple[AttnSpec, ...],
        embed: torch.Tensor,
        layers: list[LlamaLayer],
        norm: RMSNorm,
        lm_head: Linear,
        rotary: Rotary,
    ) -> None:
        super().__init__(shape, attn_specs)
        self.embed = frozen(embed)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = rotary

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
        x = F.embedding(input_ids, self.embed)
        rope = self.rotary(positions, x.dtype)
        first_norm, layers = chained(self.layers, self.norm)
        h: torch.Tensor = first_norm(x)
        for layer, next_norm, last in layers:
            x, h = layer(x, h, rope, attn, next_norm, keep if last else None)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(hidden)
        return out


def llama_from_hf(model: Any, dtype: torch.dtype) -> Llama:
    """A ``Llama`` over the weights of a transformers ``*ForCausalLM`` of the family."""
    config = model.config
    model_type = config.model_type
    if model_type not in LLAMA_FAMILY:
        raise ValueError(f"{model_type!r} is not a Llama-family model")
    shape = ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
    )
    scale = shape.head_dim**-0.5
    specs = tuple(AttnSpec(scale, w, None) for w in _windows(config))
    act = activation(config.hidden_act)
    # SmolLM3: no_rope_layers[i] is 1 where layer i uses rope.
    rope_flags = getattr(config, "no_rope_layers", None) or [1] * shape.num_layers
    body = model.model
    layers = [
        _layer(i, hf_layer, shape, dtype, act, bool(rope_flags[i]))
        for i, hf_layer in enumerate(body.layers)
    ]
    embed = adopt(body.embed_tokens.weight, dtype)
    if model.lm_head.weight is body.embed_tokens.weight:
        lm_head = Linear(embed)  # tied: one tensor, even after a dtype conversion
    else:
        lm_head = Linear.adopt(model.lm_head, dtype)
    return Llama(
        shape,
        specs,
        embed,
        layers,
        RMSNorm.adopt(body.norm, dtype),
        lm_head,
        Rotary.from_config(config, shape.head_dim).to(embed.device),
    )


def _windows(config: Any) -> list[int | None]:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":  # one window for every layer, when set
        return [window] * n
    if config.model_type == "smollm3" and not config.use_sliding_window:
        window = None
    types = getattr(config, "layer_types", None)
    if window is None or types is None:
        return [None] * n
    return [window if t == "sliding_attention" else None for t in types]


def _layer(
    index: int, hf: Any, shape: ModelShape, dtype: torch.dtype, act: Any, use_rope: bool
) -> LlamaLayer:
    a = hf.self_attn
    head_norm = None
    if getattr(a, "q_norm", None) is not None:  # Qwen3
        head_norm = HeadNorm.adopt(
            a.q_norm, a.k_norm, shape.num_heads, shape.num_kv_heads, dtype, offset=False
        )
    attn = SelfAttention(
        index,
        Linear.fuse([a.q_proj, a.k_proj, a.v_proj], dtype),
        Linear.adopt(a.o_proj, dtype),
        shape.num_heads,
        shape.num_kv_heads,
        shape.head_dim,
        head_norm,
    )
    return LlamaLayer(
        attn,
        GatedMLP.adopt(hf.mlp, act, dtype),
        RMSNorm.adopt(hf.input_layernorm, dtype),
        RMSNorm.adopt(hf.post_attention_layernorm, dtype),
        use_rope,
    )
