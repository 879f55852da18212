"""A compiled decode step (``CompiledDecode``): the model's forward for steps of decode tokens
only, as graphs that TorchInductor compiles to C++.

On a CPU, a decode step of a small model is bound by what surrounds its matmuls: Gemma 3
270M runs ~600 small kernels per token (norms, rope, casts, residual adds), each with the
dispatcher's and Python's cost, and those cost as much as the weights' bytes. One graph for the
whole body fuses the elementwise work into a few C++ loops and calls the matmuls directly.

Attention stays outside what Inductor generates: it is one custom operator
(``promptcache::decode_attention``) that writes the step's keys and values into the pool and
attends over the slots the step planned, with the same code as the eager path. So the graph's
shapes vary only in the number of decode rows and the (64-aligned) key width, and the pool
tensor is an input the operator mutates in place.

Compiling takes a minute or two (cached on disk after the first time: ~25 s then), so it
runs on a thread of its own after the engine is up; until it is ready, and for any step it does
not cover (prompt tokens, a shape it was not compiled for), the engine runs the eager model. The
graphs compute the same function as the eager model in another order of float operations, with
the same choice of int8 or dense weights (by the number of decode rows): which path a step takes
depends on the kind of step and on whether compilation is done, never on what its sequences
hold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from promptcache.engine import threads
from promptcache.engine.paged.attention import PagedAttention, decode_attend
from promptcache.engine.paged.models.base import CausalLM

log = logging.getLogger(__name__)


# Defined with the low-level registration: ``torch.library.custom_op`` wraps every call in
# Python autograd and view-tracking layers (16 us a call against 4 us, 18 calls a step), and
# the op never meets autograd (the engine runs in inference mode).
_LIBRARY = torch.library.Library("promptcache", "FRAGMENT")  # type: ignore[no-untyped-call]
_LIBRARY.define(  # type: ignore[no-untyped-call]
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, int layer, "
    "Tensor slot_mapping, Tensor slots, Tensor mask, float scale) -> Tensor"
)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    slot_mapping: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store ``k, v [B, kv_heads, D]`` at ``slot_mapping`` in layer ``layer`` of the pool ``kv``
    (``KVPool.kv``), then attend ``q [B, heads, D]`` over the keys at ``slots [B, W]`` with the
    additive float32 ``mask [B, 1, 1, W]``."""
    keys = kv[layer, 0].flatten(0, 1)
    values = kv[layer, 1].flatten(0, 1)
    keys.index_copy_(0, slot_mapping, k.to(keys.dtype))
    values.index_copy_(0, slot_mapping, v.to(values.dtype))
    return decode_attend(q, keys, values, slots, mask, scale)


_LIBRARY.impl("decode_attention", decode_attention, "CPU")  # type: ignore[no-untyped-call]


def _shape_only(q: torch.Tensor, *_: object) -> torch.Tensor:
    """What tracing sees of the op: an output shaped like ``q``."""
    return torch.empty_like(q)


torch.library.register_fake("promptcache::decode_attention", _shape_only, lib=_LIBRARY)


IDLE_POLL_S = 0.25
"""How often the compile thread looks whether the engine is idle."""

COMPILE_SWITCH_INTERVAL_S = 1e-4
"""The interpreter's GIL switch interval while the graphs compile (Python's default: 5 ms)."""


def _lower_priority() -> None:
    """Give the calling thread (and the compiler processes it starts) the lowest CPU priority,
    where the OS lets a thread have its own (Linux): the engine's threads come first."""
    # Where there is no per-thread priority, compile as is.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


MAX_FALLBACKS = 64
"""Steps the compiled graph may refuse (a shape it was not compiled for) before the engine
stops offering it any."""


def compiler_available() -> bool:
    """Whether Inductor can build C++ here (it needs a C++ compiler on the PATH)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def use_cache_dir(cache_dir: Path) -> None:
    """Keep Inductor's compiled kernels under ``cache_dir`` (unless the user chose a place), so
    a second start loads them instead of compiling again."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))


class CompiledDecode:
    """The forward of ``model`` for steps of decode tokens only, compiled: three graphs, for one
    row, for up to ``narrow_rows`` (the int8 weights' steps, ``DecodeSwitch``) and for more (the
    dense weights).

    ``start`` compiles on a thread of its own; ``__call__`` runs a step once ``ready`` is set
    and returns None for a step to run eagerly (not ready, or a shape that would need another
    compilation: those are never compiled on the engine's thread)."""

    def __init__(self, model: CausalLM, narrow_rows: int) -> None:
        if any(spec.softcap is not None for spec in model.attn_specs):
            raise ValueError("the compiled decode step does not do attention softcapping")
        self._model = model
        self.narrow_rows = narrow_rows
        self._windows = sorted(
            {s.window for s in model.attn_specs}, key=lambda w: -1 if w is None else w
        )
        self._which = [self._windows.index(s.window) for s in model.attn_specs]
        self._compiled = torch.compile(self._body, dynamic=True, fullgraph=True)
        self.ready = threading.Event()
        """Set once all three graphs are compiled."""
        self.done = threading.Event()
        """Set once compilation has ended, compiled (``ready``) or ``failed``."""
        self.failed: str | None = None
        """Why compilation failed, if it did (the engine then stays eager)."""
        self.num_steps = 0
        """Steps run compiled."""
        self.num_fallbacks = 0
        """Steps this covered by kind but ran eagerly because their shape was not compiled."""

    def _body(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: torch.Tensor,
        slot_mapping: torch.Tensor,
        slots: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        specs = self._model.attn_specs
        which = self._which

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            i = which[layer]
            out: torch.Tensor = torch.ops.promptcache.decode_attention(
                q, k, v, kv, layer, slot_mapping, slots[i], masks[i], specs[layer].scale
            )
            return out

        hidden: torch.Tensor = self._model(input_ids, positions, attend)
        return hidden

    def covers(self, num_decode: int, num_prefill_tokens: int) -> bool:
        """Whether a step of this kind runs compiled (once ready)."""
        return num_prefill_tokens == 0 and num_decode > 0 and self.ready.is_set()

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: PagedAttention
    ) -> torch.Tensor | None:
        """The final hidden states of a decode step ``attn`` has planned, or None when this
        step must run eagerly."""
        slots, masks = attn.decode_inputs(self._windows)
        try:
            # A shape outside what was compiled falls back rather than compiling here, on the
            # engine's thread, for seconds.
            with torch.compiler.set_stance("fail_on_recompile"):
                out: torch.Tensor = self._compiled(
                    input_ids, positions, attn.pool.kv, attn.slot_mapping, slots, masks
                )
        except RuntimeError as exc:  # what dynamo raises for the stance
            if "recompile" not in str(exc):
                raise
            self.num_fallbacks += 1
            if self.num_fallbacks == 1:
                log.info("compiled decode: a step it was not compiled for runs eagerly: %s", exc)
            if self.num_fallbacks == MAX_FALLBACKS:
                # Each costs a failed guard check: stop trying rather than slow every step.
                log.warning("compiled decode: %d steps fell back; decoding eagerly", MAX_FALLBACKS)
                self.ready.clear()
            return None
        self.num_steps += 1
        return out

    def warm(self, kv: torch.Tensor, idle: Callable[[], bool] = lambda: True) -> None:
        """Compile the three graphs, on scratch inputs shaped like steps over a pool like
        ``kv`` (written to a scratch pool, never the live one), each once ``idle()`` holds."""
        # Odd widths, a different one per window, so that no width coincides with another size
        # (the graph would be guarded on their equality).
        widths = [(37 + 4 * i) * 64 for i in range(len(self._windows))]
        width = max(widths)
        blocks = -(-width // kv.shape[3]) + 1
        # The pool is an ordinary tensor, every other input an inference tensor (as in the
        # engine's step): the graph is guarded on which kind each is.
        scratch = kv.new_zeros((*kv.shape[:2], blocks, *kv.shape[3:]))
        with torch.inference_mode():
            # Odd counts again; one per graph (the int8 projections' row limit splits them).
            for rows in sorted({1, min(3, self.narrow_rows), self.narrow_rows + 3}):
                while not idle():
                    time.sleep(IDLE_POLL_S)
                ids = torch.zeros(rows, dtype=torch.long)
                positions = torch.arange(rows) + width - 1
                slot_mapping = torch.arange(rows)
                slots = [torch.arange(w).repeat(rows, 1) for w in widths]
                masks = [torch.zeros(rows, 1, 1, w) for w in widths]
                self._compiled(ids, positions, scratch, slot_mapping, slots, masks)

    def start(self, kv: torch.Tensor, idle: Callable[[], bool] = lambda: True) -> threading.Thread:
        """Compile for a pool like ``kv`` on a thread of its own, which ends when done (and
        ``ready`` is set), one graph at a time and each only once ``idle()`` says the engine
        has nothing to do: tracing holds the GIL for seconds at a time, and a step running
        beside it waited for the GIL at every operator (a 2.5 s prefill took 30 s while
        the graphs compiled). It claims the engine's thread count: the compiled graph is
        guarded on it, so one compiled with another count would never run on the engine's
        thread."""

        def run() -> None:
            threads.claim()
            _lower_priority()
            started = time.monotonic()
            interval = sys.getswitchinterval()
            # A request that comes mid-graph waits for the GIL at each of its operators, up to
            # one switch interval each: hand it over sooner while this thread compiles.
            sys.setswitchinterval(COMPILE_SWITCH_INTERVAL_S)
            try:
                self.warm(kv, idle)
                log.info("compiled decode step ready in %.1f s", time.monotonic() - started)
                self.ready.set()
            except Exception as exc:  # a missing or failing compiler: stay eager
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("compiled decode unavailable, decoding eagerly: %s", self.failed)
            finally:
                sys.setswitchinterval(interval)
                self.done.set()  # after ``ready``: a waiter on ``done`` sees which it was

        thread = threading.Thread(target=run, name="promptcache-compile", daemon=True)
        thread.start()
        return thread


__all__ = ["CompiledDecode", "compiler_available", "decode_attention", "use_cache_dir"]
