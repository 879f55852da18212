"""KV snapshots of a transformers ``DynamicCache``: export at a token offset, restore a prefix.

The live cache keeps full-length KV in full-attention layers and only a window's tail in
sliding-window layers (``WindowLayer``), so attention over a long restored prefix costs only
what the model really attends to. Snapshots are exported at chunk boundaries during prefill
(spec §2.4): once a window has rolled past, the positions before it are gone::

    full layer     payload [0, X) in pages        restore R: pages joined, cut at R
    sliding layer  payload [X - w, X)             restore R: K[:, :, R - w .. R) (or from X - w)

A query at position ``q`` of a sliding layer sees positions ``(q - w, q]``. The first query after
a restore sits at ``R >= X - 1`` (``X - 1`` for a whole-prompt hit, spec §2.5), and needs
``[R - w + 1, R)``; ``WindowLayer`` keeps ``w`` positions, one more than transformers' own
sliding layer, so that the stored tail covers ``R = X - 1`` too.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from promptcache.core.payload import PartId, new_part_id

DEFAULT_PAGE_TOKENS = 256
"""Full-attention KV is stored in pages of this many tokens, shared by nested snapshots."""


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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class KVPage:
    """Keys and values of every full-attention layer for the tokens ``[start, end)``.

    Pages are never written after creation, so nested snapshots of one prompt share them: the
    snapshot at 3,000 tokens holds the very page objects of the one at 1,000 for ``[0, 768)``
    (with 256-token pages). ``page_id`` names the bytes in every tier and file.
    """

    page_id: PartId
    start: int
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[-2])

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def device(self) -> str:
        return str(self.keys[0].device)


class PagePool:
    """Every live page of one engine by ``(page id, device)``, held weakly.

    Copies and loads go through the pool, so each device holds at most one copy of a page: a
    tier that counts a page id once then counts real bytes. Thread-safe (loads run on worker
    threads while the engine exports pages on its own).
    """

    def __init__(self) -> None:
        self._pages: weakref.WeakValueDictionary[tuple[PartId, str], KVPage] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pages)

    def adopt(self, page: KVPage) -> KVPage:
        """``page``, or the live copy of the same page on its device when there is one."""
        with self._lock:
            existing = self._pages.get((page.page_id, page.device))
            if existing is not None:
                return existing
            self._pages[page.page_id, page.device] = page
            return page

    def get(self, page_id: PartId, device: torch.device) -> KVPage | None:
        """The live copy of page ``page_id`` on ``device``, if any."""
        with self._lock:
            return self._pages.get((page_id, str(device)))

    def copy_all(self, pages: Sequence[KVPage], device: torch.device) -> list[KVPage]:
        """``pages`` on ``device``: live copies where there are, new ones otherwise.

        The new copies are queued together and waited for once (a CUDA copy per tensor would
        wait for each), and adopted only then, so no other thread sees a copy still in flight.
        """
        out: list[KVPage | None] = [
            page if page.device == str(device) else self.get(page.page_id, device) for page in pages
        ]
        fresh = {
            i: KVPage(
                page.page_id,
                page.start,
                tuple(to_device(t, device) for t in page.keys),
                tuple(to_device(t, device) for t in page.values),
            )
            for i, page in enumerate(pages)
            if out[i] is None
        }
        if fresh:
            wait_for_copies(device, pages[next(iter(fresh))].device)
        for i, page in fresh.items():
            out[i] = self.adopt(page)
        return [page for page in out if page is not None]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device``, queued without waiting (see ``wait_for_copies``). Host
    copies of CUDA tensors go to pinned memory, which later copies back to the GPU faster and
    lets both directions run asynchronously."""
    if device.type == "cpu" and t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.to(device, copy=True, non_blocking=t.is_pinned())


def wait_for_copies(*devices: torch.device | str) -> None:
    """Wait until copies queued by ``to_device`` to or from these devices have landed."""
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


class HFKVPayload:
    """The KV state of the first ``num_tokens`` prompt tokens; implements ``KVPayload``.

    Full-attention layers are held in ``pages`` (``KVPage``, shared with nested snapshots);
    each sliding layer has its own tail ``LayerKV`` of the last ``window`` positions (``tails``,
    ``None`` for full layers). Every tensor is a private copy, never a view into a live cache,
    and nothing writes to them after creation (spec §1.5)::

        pages   [0, P) [P, 2P) ... [kP, num_tokens)      full layers, shared by id
        tails   [num_tokens - w, num_tokens)             each sliding layer, this payload's own
    """

    __slots__ = ("__weakref__", "_layout", "_nbytes", "_num_tokens", "_pages", "_tail_id", "_tails")

    def __init__(
        self,
        pages: Sequence[KVPage],
        tails: Sequence[LayerKV | None],
        num_tokens: int,
        layout: KVLayout,
    ) -> None:
        if len(tails) != len(layout.windows):
            raise ValueError(f"{len(tails)} layers for a layout of {len(layout.windows)}")
        num_full = sum(w is None for w in layout.windows)
        position = 0
        for page in pages if num_full else ():
            if page.start != position or len(page.keys) != num_full:
                raise ValueError("pages must cover [0, num_tokens) in order, one tensor per layer")
            position = page.end
        if (num_full and position != num_tokens) or (not num_full and pages):
            raise ValueError(f"pages cover {position} tokens, not {num_tokens}")
        for tail, window in zip(tails, layout.windows, strict=True):
            if (tail is None) != (window is None) or (tail is not None and tail.end != num_tokens):
                raise ValueError("sliding layers need a tail ending at num_tokens, full ones none")
        self._pages = tuple(pages)
        self._tails = tuple(tails)
        self._num_tokens = num_tokens
        self._layout = layout
        self._tail_id = new_part_id()
        self._nbytes = sum(p.nbytes for p in self._pages) + self._tails_nbytes()

    def _tails_nbytes(self) -> int:
        return sum(t.nbytes for t in self._tails if t is not None)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def parts(self) -> list[tuple[PartId, int]]:
        parts = [(page.page_id, page.nbytes) for page in self._pages]
        tails = self._tails_nbytes()
        if tails:
            parts.append((self._tail_id, tails))
        return parts

    @property
    def pages(self) -> tuple[KVPage, ...]:
        return self._pages

    @property
    def tails(self) -> tuple[LayerKV | None, ...]:
        return self._tails

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def device(self) -> str:
        for page in self._pages:
            return page.device
        for tail in self._tails:
            if tail is not None:
                return str(tail.keys.device)
        return "cpu"

    @property
    def layers(self) -> tuple[LayerKV, ...]:
        """Every layer's KV as one ``LayerKV``, full layers joined from their pages (a copy when
        there are several): for inspection and tests, not for the serving path."""
        layers: list[LayerKV] = []
        full = 0
        for tail, window in zip(self._tails, self._layout.windows, strict=True):
            if window is None:
                keys = _join([p.keys[full] for p in self._pages])
                values = _join([p.values[full] for p in self._pages])
                layers.append(LayerKV(keys, values, 0))
                full += 1
            else:
                assert tail is not None
                layers.append(tail)
        return tuple(layers)

    @property
    def min_restore_tokens(self) -> int:
        """The fewest tokens this payload can restore exactly (``num_tokens - 1`` once a sliding
        window dropped older positions; 0 when every layer holds its whole prefix)."""
        low = 0
        for tail, window in zip(self._tails, self._layout.windows, strict=True):
            if window is not None and tail is not None and tail.start > 0:
                # The first new query at R needs positions (R - w, R): start <= R - w + 1.
                low = max(low, tail.start + window - 1)
        return low

    def reusable_pages(self, reuse_tokens: int, page_tokens: int) -> dict[int, KVPage]:
        """Complete pages (by index) within ``[0, reuse_tokens)``: a request that restores this
        payload has exactly these values in its live cache, so its snapshots may share them."""
        return {
            index: page
            for index, page in enumerate(self._pages)
            if page.start == index * page_tokens
            and page.num_tokens == page_tokens
            and page.end <= reuse_tokens
        }

    def __repr__(self) -> str:
        return (
            f"HFKVPayload(num_tokens={self._num_tokens}, nbytes={self._nbytes}, "
            f"pages={len(self._pages)})"
        )


def _join(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=-2)


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


def export_snapshot(
    cache: DynamicCache,
    offset: int,
    layout: KVLayout,
    *,
    page_tokens: int = DEFAULT_PAGE_TOKENS,
    shared: dict[int, KVPage] | None = None,
    pool: PagePool | None = None,
) -> HFKVPayload:
    """Copy the state of a live ``cache`` that has processed exactly ``offset`` tokens.

    Full layers are cut into ``page_tokens`` pages. ``shared`` maps page indices to complete
    pages whose values the live cache already holds (from the restored payload and earlier
    snapshots of this prefill): those are reused, not copied, and new complete pages are added
    to it. Only the partial last page and the sliding tails are always this snapshot's own.
    """
    if len(cache.layers) != len(layout.windows):
        raise ValueError(f"cache has {len(cache.layers)} layers, layout {len(layout.windows)}")
    if cache.get_seq_length() != offset:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens, not {offset}")
    if page_tokens < 1:
        raise ValueError("page_tokens must be positive")
    shared = {} if shared is None else shared
    live: list[Any] = list(cache.layers)
    full = [i for i, w in enumerate(layout.windows) if w is None]
    tails: list[LayerKV | None] = []
    for layer, window in zip(live, layout.windows, strict=True):
        held = int(layer.keys.shape[-2])
        if window is None:
            if held != offset:
                raise ValueError(f"full layer holds {held} tokens, not {offset}")
            tails.append(None)
        else:
            tails.append(LayerKV(_copy(layer.keys), _copy(layer.values), offset - held))
    pages: list[KVPage] = []
    for index, start in enumerate(range(0, offset, page_tokens) if full else ()):
        end = min(start + page_tokens, offset)
        complete = end - start == page_tokens
        page = shared.get(index) if complete else None
        if page is None:
            page = KVPage(
                new_part_id(),
                start,
                tuple(_copy(live[i].keys[:, :, start:end]) for i in full),
                tuple(_copy(live[i].values[:, :, start:end]) for i in full),
            )
            if pool is not None:
                page = pool.adopt(page)
            if complete:
                shared[index] = page
        pages.append(page)
    return HFKVPayload(pages, tails, offset, layout)


def restore_cache(payload: HFKVPayload, reuse_tokens: int, layout: KVLayout) -> DynamicCache:
    """A live cache holding the state after ``reuse_tokens`` tokens of ``payload``.

    Sliding layers point into the payload's tails without copying; full layers join their pages
    (one copy, none for a single page). Every update concatenates into new tensors, so the
    payload stays unchanged (spec §1.5).
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
    pages = [p for p in payload.pages if p.start < reuse_tokens]
    full = 0
    for live, tail, window in zip(cache.layers, payload.tails, layout.windows, strict=True):
        if window is None:
            keys = _join([p.keys[full][:, :, : reuse_tokens - p.start] for p in pages])
            values = _join([p.values[full][:, :, : reuse_tokens - p.start] for p in pages])
            full += 1
            _fill(live, keys, values, reuse_tokens)
            continue
        assert tail is not None
        first = max(tail.start, reuse_tokens - window)
        lo, hi = first - tail.start, reuse_tokens - tail.start
        _fill(live, tail.keys[:, :, lo:hi], tail.values[:, :, lo:hi], reuse_tokens)
    return cache


__all__ = [
    "DEFAULT_PAGE_TOKENS",
    "HFKVPayload",
    "KVLayout",
    "KVPage",
    "LayerKV",
    "PagePool",
    "WindowLayer",
    "export_snapshot",
    "new_cache",
    "restore_cache",
    "to_device",
    "wait_for_copies",
]
