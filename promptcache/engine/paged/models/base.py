"""The seam between the lean models and the engine: what a model needs from attention, and
what the engine needs from a model.

A model runs one forward over the step's packed tokens (several sequences, prefill chunks and
decode tokens mixed). Everything it does is per token except attention, which it hands to the
engine's ``Attention`` backend together with each layer's ``AttnSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class AttnSpec:
    """How one decoder layer attends."""

    scale: float
    """Softmax scale applied to q·k."""
    window: int | None
    """Sliding window in tokens: a query at position p sees keys at positions > p - window.
    ``None``: full causal attention."""
    softcap: float | None
    """Attention logit softcapping (``tanh(s / c) * c`` after scaling), ``None`` if not used."""


class Attention(Protocol):
    """The engine's attention backend, called once per layer per step."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q ``[T, num_heads, head_dim]``, k/v ``[T, num_kv_heads, head_dim]`` for the step's T
        packed tokens, after rope and q/k norms (they may be strided views of one projection).
        The backend stores k/v and returns the attention output ``[T, num_heads, head_dim]``.
        Which sequence each token belongs to and its position are the backend's business; so
        is leaving unset, in the last layer, rows the model's ``keep`` will drop."""
        ...


@dataclass(frozen=True)
class ModelShape:
    """What the KV pool needs to size itself."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


class CausalLM(nn.Module):
    """A decoder-only language model over packed tokens (``Llama``, ``Gemma3``)."""

    shape: ModelShape
    attn_specs: tuple[AttnSpec, ...]

    def __init__(self, shape: ModelShape, attn_specs: tuple[AttnSpec, ...]) -> None:
        super().__init__()
        if len(attn_specs) != shape.num_layers:
            raise ValueError(f"{len(attn_specs)} attention specs for {shape.num_layers} layers")
        self.shape = shape
        self.attn_specs = attn_specs

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV, logits)."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: Attention,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: ``[T]`` long (packed tokens of several sequences, positions
        absolute per sequence) -> final-normed hidden ``[T, hidden]``, or ``[K, hidden]`` for
        the rows ``keep [K]`` only: the last layer then computes its attention output,
        o-projection and MLP for those rows alone (as llama.cpp does for the rows it samples:
        the others only need their keys and values, which every layer still writes)."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` in the model dtype (lm_head, then the final
        softcap where the model has one); call it only for the rows that are sampled."""
        raise NotImplementedError

    def logits_and_greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """``logits(hidden)``, and each row's argmax (the first on ties) where the head finds
        it on the way (the rescored int4 head: ``RescoredHead.scores_and_greedy``); None
        where it does not, for the caller to search the logits."""
        from promptcache.engine.paged.models.int4 import RescoredHead  # imports this module

        head = getattr(self, "lm_head", None)
        if isinstance(head, RescoredHead) and getattr(self, "final_softcap", None) is None:
            return head.scores_and_greedy(hidden)
        return self.logits(hidden), None
