"""Engine factories by name. Heavy imports (torch, transformers) happen inside the factory, so
``import promptcache`` and the cache and API test suites never load them."""

from __future__ import annotations

from collections.abc import Callable

from promptcache.config import EngineConfig
from promptcache.engine.base import Engine


def _fake(config: EngineConfig) -> Engine:
    from promptcache.engine.fake import FakeEngine

    return FakeEngine(max_context_tokens=config.max_context_tokens or 32768)


def _hf(config: EngineConfig) -> Engine:
    from promptcache.engine.hf.loader import load_engine

    return load_engine(
        config.model,
        cache_dir=config.model_cache_dir,
        device=config.device,
        dtype=config.dtype,
        chat_format=config.chat_format,
        max_context_tokens=config.max_context_tokens,
    )


FACTORIES: dict[str, Callable[[EngineConfig], Engine]] = {"fake": _fake, "hf": _hf}


def engine_factory(config: EngineConfig) -> Callable[[], Engine]:
    """A thunk that builds the configured engine (called off the event loop)."""
    try:
        factory = FACTORIES[config.kind]
    except KeyError:
        raise ValueError(
            f"unknown engine {config.kind!r}; choose from {sorted(FACTORIES)}"
        ) from None
    return lambda: factory(config)


__all__ = ["FACTORIES", "engine_factory"]
