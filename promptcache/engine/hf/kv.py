"""KV snapshots of a transformers ``DynamicCache``: export at a token offset, restore a prefix.

The live cache keeps full-length KV in full-attention layers and only a window's tail in
sliding-window layers (``WindowLayer``), so attention over a long restored prefix costs only
what the model really attends to. Snapshots are exported at chunk boundaries during prefill
(spec §2.4): once a window has rolled past, the positions before it are gone::

    full layer     payload [0, X)                 restore R: K[:, :, :R]
    sliding layer  payload [X - w, X)             restore R: K[:, :, R - w .. R) (or from X - w)

A query at position ``q`` of a sliding layer sees positions ``(q - w, q]``. The first query after
a restore sits at ``R >= X - 1`` (``X - 1`` for a whole-prompt hit, spec §2.5), and needs
``[R - w + 1, R)``; ``WindowLayer`` keeps ``w`` positions, one more than transformers' own
sliding layer, so that the stored tail covers ``R = X - 1`` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Per decoder layer: ``None`` for full attention, else its sliding window in tokens."""

    windows: tuple[int | None, ...]

    @classmethod
    def from_config(cls, config: Any) -> KVLayout:
        """Read ``layer_types`` / ``sliding_window`` of a (text) model config.

        Only ``sliding_attention`` layers are trimmed to their window; every other layer type
        (or a config without ``layer_types``) keeps full KV, which is exact whatever its mask.
        """
        text = (
            config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        )
        num_layers = int(text.num_hidden_layers)
        layer_types: Sequence[str] | None = getattr(text, "layer_types", None)
        window: int | None = getattr(text, "sliding_window", None)
        if layer_types is None or window is None:
            return cls((None,) * num_layers)
        if len(layer_types) < num_layers:
            raise ValueError(f"config has {len(layer_types)} layer_types for {num_layers} layers")
        return cls(
            tuple(
                int(window) if kind == "sliding_attention" else None
                for kind in layer_types[:num_layers]
            )
        )


@dataclass(frozen=True, slots=True, eq=False)
class LayerKV:
    """One layer's stored keys and values ``[1, kv_heads, length, head_dim]`` from ``start``."""

    keys: torch.Tensor
    values: torch.Tensor
    start: int

    @property
    def end(self) -> int:
        return self.start + int(self.keys.shape[-2])


class HFKVPayload:
    """The KV state of the first ``num_tokens`` prompt tokens; implements ``KVPayload``.

    Its tensors are private copies, never views into a live cache, and nothing writes to them
    after creation: restoring copies out of them (spec §1.5).
    """

    __slots__ = ("_layers", "_layout", "_nbytes", "_num_tokens")

    def __init__(self, layers: Sequence[LayerKV], num_tokens: int, layout: KVLayout) -> None:
        if len(layers) != len(layout.windows):
            raise ValueError(f"{len(layers)} layers for a layout of {len(layout.windows)}")
        self._layers = tuple(layers)
        self._num_tokens = num_tokens
        self._layout = layout
        self._nbytes = sum(
            t.numel() * t.element_size()
            for layer in self._layers
            for t in (layer.keys, layer.values)
        )

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def layers(self) -> tuple[LayerKV, ...]:
        return self._layers

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def min_restore_tokens(self) -> int:
        """The fewest tokens this payload can restore exactly (``num_tokens - 1`` once a sliding
        window dropped older positions; 0 when every layer holds its whole prefix)."""
        low = 0
        for layer, window in zip(self._layers, self._layout.windows, strict=True):
            if window is not None and layer.start > 0:
                # The first new query at R needs positions (R - w, R): start <= R - w + 1.
                low = max(low, layer.start + window - 1)
        return low

    def __repr__(self) -> str:
        return f"HFKVPayload(num_tokens={self._num_tokens}, nbytes={self._nbytes})"


class WindowLayer(DynamicSlidingWindowLayer):  # type: ignore[no-untyped-call]
    """A sliding-window layer that keeps the last ``window`` positions after each update.

    transformers' ``DynamicSlidingWindowLayer`` keeps ``window - 1``, all the next query needs;
    one more lets a snapshot restore the state one token earlier (spec §2.5). The mask sizes come
    from what the layer really holds, so a restored layer may hold ``window - 1`` positions.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        # torch.cat makes new tensors: a restored layer never writes into a payload's tensors.
        assert self.keys is not None and self.values is not None
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys = keys[:, :, -self.sliding_window :]
        self.values = values[:, :, -self.sliding_window :]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = int(self.keys.shape[-2]) if self.is_initialized and self.keys is not None else 0
        return held + query_length, self.cumulative_length - held


def new_cache(layout: KVLayout) -> DynamicCache:
    """An empty live cache: full layers keep everything, sliding layers their window."""
    cache = DynamicCache()
    layers: list[Any] = [DynamicLayer() if w is None else WindowLayer(w) for w in layout.windows]  # type: ignore[no-untyped-call]
    cache.layers = layers
    return cache


def _fill(layer: Any, keys: torch.Tensor, values: torch.Tensor, num_tokens: int) -> None:
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if isinstance(layer, WindowLayer):
        layer.cumulative_length = num_tokens


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def export_snapshot(cache: DynamicCache, offset: int, layout: KVLayout) -> HFKVPayload:
    """Copy the state of a live ``cache`` that has processed exactly ``offset`` tokens."""
    if len(cache.layers) != len(layout.windows):
        raise ValueError(f"cache has {len(cache.layers)} layers, layout {len(layout.windows)}")
    if cache.get_seq_length() != offset:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens, not {offset}")
    layers: list[LayerKV] = []
    live: list[Any] = list(cache.layers)
    for layer, window in zip(live, layout.windows, strict=True):
        keys: torch.Tensor = layer.keys
        values: torch.Tensor = layer.values
        held = int(keys.shape[-2])
        if window is None and held != offset:
            raise ValueError(f"full layer holds {held} tokens, not {offset}")
        layers.append(LayerKV(_copy(keys), _copy(values), offset - held))
    return HFKVPayload(layers, offset, layout)


def restore_cache(payload: HFKVPayload, reuse_tokens: int, layout: KVLayout) -> DynamicCache:
    """A live cache holding the state after ``reuse_tokens`` tokens of ``payload``.

    The layers point into the payload's tensors without copying them: every update concatenates
    into new tensors, so the payload stays unchanged (spec §1.5) and a restore costs no copy.
    """
    if payload.layout != layout:
        raise ValueError("payload was exported by a model with another layer layout")
    if not payload.min_restore_tokens <= reuse_tokens <= payload.num_tokens:
        raise ValueError(
            f"payload of {payload.num_tokens} tokens cannot restore {reuse_tokens} "
            f"(at least {payload.min_restore_tokens})"
        )
    cache = new_cache(layout)
    if reuse_tokens == 0:
        return cache
    for live, layer, window in zip(cache.layers, payload.layers, layout.windows, strict=True):
        first = layer.start if window is None else max(layer.start, reuse_tokens - window)
        lo, hi = first - layer.start, reuse_tokens - layer.start
        _fill(live, layer.keys[:, :, lo:hi], layer.values[:, :, lo:hi], reuse_tokens)
    return cache


__all__ = [
    "HFKVPayload",
    "KVLayout",
    "LayerKV",
    "WindowLayer",
    "export_snapshot",
    "new_cache",
    "restore_cache",
]
