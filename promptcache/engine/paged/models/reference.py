"""A reference ``Attention`` backend for tests: one sequence, K/V in growing tensors.

Deliberately plain (explicit masked softmax in float32, GQA by repeating heads) so that it can
check the models against transformers and, later, the paged backends against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from promptcache.engine.paged.models.base import AttnSpec


class ContiguousAttention:
    """Attention for a single sequence fed in order: each call on a layer appends its T tokens
    at the positions after those already stored (prefill in chunks, then decode steps)."""

    def __init__(self, specs: Sequence[AttnSpec]) -> None:
        self.specs = tuple(specs)
        self.keys: list[torch.Tensor | None] = [None] * len(self.specs)
        self.values: list[torch.Tensor | None] = [None] * len(self.specs)

    def length(self, layer: int = 0) -> int:
        """Tokens stored for ``layer``."""
        keys = self.keys[layer]
        return 0 if keys is None else int(keys.shape[0])

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        spec = self.specs[layer]
        start = self.length(layer)
        past_k, past_v = self.keys[layer], self.values[layer]
        keys = k if past_k is None else torch.cat([past_k, k])
        values = v if past_v is None else torch.cat([past_v, v])
        self.keys[layer], self.values[layer] = keys, values

        tokens, heads = q.shape[0], q.shape[1]
        groups = heads // keys.shape[1]
        q_pos = torch.arange(start, start + tokens, device=q.device)[:, None]
        k_pos = torch.arange(keys.shape[0], device=q.device)[None, :]
        visible = k_pos <= q_pos
        if spec.window is not None:
            visible &= k_pos > q_pos - spec.window
        kf = keys.float().repeat_interleave(groups, dim=1)
        vf = values.float().repeat_interleave(groups, dim=1)
        scores = torch.einsum("thd,shd->hts", q.float(), kf) * spec.scale
        if spec.softcap is not None:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(dim=-1), vf)
        return out.to(q.dtype)
