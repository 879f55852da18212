"""KV snapshots of a transformers ``DynamicCache``: export at a token offset, restore a prefix.

The live cache is a ``DynamicCache()`` built without a config, so every layer is a plain
``DynamicLayer`` that keeps full-length KV, sliding-window layers included. Sliding-window
attention stays exact because transformers builds those masks from absolute positions
(``kv_idx > q_idx - window``), not from what the cache holds. Hence a snapshot may be sliced out
of the cache after the whole prefill (spec §2.4, full-length KV), and a restored prefix may hold
zeros where a window can no longer look::

    full layer     payload [0, X)            restore R: K[:, :, :R]
    sliding layer  payload [X - w, X)        restore R: zeros[0, R - w) + tail   (R >= X - 1)

A query at position ``q`` of a sliding layer sees positions ``(q - w, q]``. The first query after
a restore sits at ``R >= X - 1`` (``X - 1`` for a whole-prompt hit, spec §2.5), so the last ``w``
positions before ``X`` are all it, or any later query, can attend: older ones are never stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


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


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def export_snapshot(cache: DynamicCache, offset: int, layout: KVLayout) -> HFKVPayload:
    """Copy the state after ``offset`` tokens out of a full-length live ``cache``."""
    if len(cache.layers) != len(layout.windows):
        raise ValueError(f"cache has {len(cache.layers)} layers, layout {len(layout.windows)}")
    layers: list[LayerKV] = []
    for layer, window in zip(cache.layers, layout.windows, strict=True):
        # Plain DynamicLayers: attention layers only (no linear-attention or KV-sharing layers).
        keys: torch.Tensor | None = getattr(layer, "keys", None)
        values: torch.Tensor | None = getattr(layer, "values", None)
        if keys is None or values is None or keys.shape[-2] < offset:
            raise ValueError(f"cache holds fewer than {offset} tokens")
        # Sliding layers keep only the tail a later query can attend to (see module docstring).
        start = 0 if window is None else max(0, offset - window)
        layers.append(
            LayerKV(_copy(keys[:, :, start:offset]), _copy(values[:, :, start:offset]), start)
        )
    return HFKVPayload(layers, offset, layout)


def restore_cache(payload: HFKVPayload, reuse_tokens: int, layout: KVLayout) -> DynamicCache:
    """A fresh full-length ``DynamicCache`` holding the state after ``reuse_tokens`` tokens."""
    if payload.layout != layout:
        raise ValueError("payload was exported by a model with another layer layout")
    if not payload.min_restore_tokens <= reuse_tokens <= payload.num_tokens:
        raise ValueError(
            f"payload of {payload.num_tokens} tokens cannot restore {reuse_tokens} "
            f"(at least {payload.min_restore_tokens})"
        )
    if reuse_tokens == 0:
        return DynamicCache()
    data: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in payload.layers:
        if layer.start == 0:
            keys = layer.keys[:, :, :reuse_tokens]
            values = layer.values[:, :, :reuse_tokens]
        else:
            # Positions before the stored tail are masked for every query from R on, so zeros
            # there never reach an attention output; they only keep all layers the same length.
            keys = _padded(layer.keys, layer.start, reuse_tokens)
            values = _padded(layer.values, layer.start, reuse_tokens)
        data.append((keys, values))
    # DynamicLayer.update concatenates onto an empty tensor: the live cache gets its own copy,
    # and decoding (torch.cat again) never writes into the payload's tensors.
    return DynamicCache(data)


def _padded(tail: torch.Tensor, start: int, length: int) -> torch.Tensor:
    shape = (*tail.shape[:-2], length, tail.shape[-1])
    out = tail.new_zeros(shape)
    out[:, :, start:length] = tail[:, :, : length - start]
    return out


__all__ = ["HFKVPayload", "KVLayout", "LayerKV", "export_snapshot", "restore_cache"]
