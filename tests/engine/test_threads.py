"""Only the engine's thread keeps a PyTorch thread team: executor threads compute on one thread,
and the model loads on a thread that ends with the load."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from promptcache.engine import threads


def test_executor_threads_compute_alone_and_leave_others_alone() -> None:
    before = torch.get_num_threads()
    with threads.side_executor() as pool:
        inside = pool.submit(torch.get_num_threads).result()
    assert inside == 1
    assert torch.get_num_threads() == before  # per thread: the caller keeps its own


def test_in_own_thread_returns_raises_and_ends() -> None:
    seen: list[threading.Thread] = []

    def load() -> int:
        seen.append(threading.current_thread())
        return torch.get_num_threads()

    def fail() -> None:
        raise ValueError("no model")

    async def scenario() -> int:
        with threads.side_executor() as pool:  # a confined thread ran first (sets the default)
            pool.submit(torch.get_num_threads).result()
        result = await threads.in_own_thread(load)
        with pytest.raises(ValueError, match="no model"):
            await threads.in_own_thread(fail)
        return result

    # Every core for the load (PyTorch's default as first seen), whatever ran before.
    assert asyncio.run(scenario()) == threads.default_threads()
    assert seen[0] is not threading.main_thread()
    seen[0].join(timeout=5)
    assert not seen[0].is_alive()
