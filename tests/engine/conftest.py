"""Fixtures: tiny random-weight engines, real transformers models built in process (no files)."""

from __future__ import annotations

import pytest

from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.engine.paged.engine import PagedEngine


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def engine(request: pytest.FixtureRequest) -> PagedEngine:
    """Each tiny model in turn: Llama (full attention) and Gemma 3 (sliding + full layers)."""
    return build_tiny_engine(request.param)


@pytest.fixture(scope="module")
def gemma_engine() -> PagedEngine:
    """Gemma 3 text model: layers sliding(16) / full / sliding(16)."""
    return build_tiny_engine("gemma3")


@pytest.fixture(scope="module")
def llama_engine() -> PagedEngine:
    """Llama: two full-attention layers."""
    return build_tiny_engine("llama")
