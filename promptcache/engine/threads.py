"""Which threads run PyTorch's parallel kernels: the engine's, and no other that stays alive.

A thread that has once run a parallel kernel keeps its OpenMP thread team, idle or not. While
two teams live, the runtime (GNU OpenMP) counts more threads than cores and stops spinning
between parallel regions, so every kernel of the engine thread then pays a wake-up of its
workers: measured on this project's 2-core CPU, a decode step 1.5x slower (42 tok/s in the
engine's own thread, 28 tok/s once the model had been loaded on an executor thread that stayed
alive). So the event loop's executor threads (file reads, copies between tiers, encodes: work
that may touch tensors) compute on a single thread, and the model loads on a thread of its own
that ends with the load.

PyTorch keeps the count per thread, but a thread that never set it takes the last value any
thread set; so the engine's and the loading threads set theirs explicitly (``claim``).
This module never imports torch: servers with the fake engine do not need it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


_cores: int | None = None
"""PyTorch's own default thread count, seen before anything here changed it."""


def default_threads() -> int | None:
    """PyTorch's default thread count as ``claim`` restores it (None until torch is seen)."""
    return _cores


def confine() -> None:
    """Make PyTorch compute on this thread alone (no thread team of its own)."""
    global _cores
    torch = sys.modules.get("torch")
    if torch is not None:
        if _cores is None:
            _cores = torch.get_num_threads()
        torch.set_num_threads(1)


def claim() -> bool:
    """Make PyTorch compute on this thread with its default team (every physical core): the
    engine's thread, and the thread that loads the model. False when torch is not loaded (yet):
    nothing to claim."""
    global _cores
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    if _cores is None:
        _cores = torch.get_num_threads()
    torch.set_num_threads(_cores)
    return True


def side_executor() -> ThreadPoolExecutor:
    """An executor for ``asyncio.to_thread`` whose threads never start a thread team."""
    return ThreadPoolExecutor(thread_name_prefix="promptcache-io", initializer=confine)


async def in_own_thread(fn: Callable[[], T], name: str = "promptcache-load") -> T:
    """``fn()`` on a new thread with every core, which ends when ``fn`` returns (taking its
    thread team with it)."""
    future: Future[T] = Future()

    def run() -> None:
        claim()
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the awaiting task
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await asyncio.wrap_future(future)


__all__ = ["claim", "confine", "default_threads", "in_own_thread", "side_executor"]
