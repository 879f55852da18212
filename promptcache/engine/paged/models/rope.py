"""Rotary position embedding: inverse frequencies from a transformers config, cos/sin from
each step's absolute positions (no table, so no position limit)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Rope types whose frequencies do not depend on the sequence length. "dynamic" and "longrope"
# change with the length seen so far, which a packed batch of sequences has no single value of.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class Rotary(nn.Module):
    """One set of rope frequencies (a model has one, Gemma 3 one per layer type)."""

    inv_freq: torch.Tensor

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        super().__init__()
        # float32 on purpose; build the model in its dtype with from_hf rather than .to(dtype).
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[T, 1, head_dim]`` in ``dtype`` for ``positions [T]``, as
        ``apply_rope`` takes them: computed in float32 and scaled before the cast, as
        transformers does, with the first half of sin negated (``rotate_half``'s sign)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1).to(dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos[:, None, :], sin[:, None, :]

    @classmethod
    def from_config(cls, config: Any, head_dim: int, layer_type: str | None = None) -> Rotary:
        """From ``config.rope_parameters`` (nested by layer type when ``layer_type`` is given,
        as transformers v5 keeps Gemma 3's local and global rope)."""
        params = config.rope_parameters
        if layer_type is not None:
            params = params[layer_type]
        rope_type = params.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {rope_type!r}; supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        if rope_type == "default":
            base = float(params["rope_theta"])
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            return cls(1.0 / (base**exponents), 1.0)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
        if inv_freq.shape[0] * 2 != head_dim:
            raise ValueError(f"rope covers {inv_freq.shape[0] * 2} of {head_dim} head dims")
        return cls(inv_freq, float(scaling))
