"""Engine factories by name. Heavy imports (torch, transformers) happen inside the factory, so
``import promptcache`` and the cache and API test suites never load them."""

from __future__ import annotations

from collections.abc import Callable

from promptcache.config import EngineConfig
from promptcache.engine.base import Engine


def _fake(config: EngineConfig, cache_bytes: int) -> Engine:
    from promptcache.engine.fake import FakeEngine

    return FakeEngine(max_context_tokens=config.max_context_tokens or 32768)


def _hf(config: EngineConfig, cache_bytes: int) -> Engine:
    from promptcache.engine.hf.loader import load_engine

    return load_engine(
        config.model,
        cache_dir=config.model_cache_dir,
        device=config.device,
        dtype=config.dtype,
        chat_format=config.chat_format,
        max_context_tokens=config.max_context_tokens,
        kv_pool_bytes=cache_bytes + config.kv_reserve_bytes,
        max_batch_tokens=config.max_batch_tokens,
        stream_time_share=config.stream_time_share,
        prompt_products=config.prompt_products,
        kv_block_tokens=config.kv_block_tokens,
        kv_dtype=config.kv_dtype,
        quantize=config.quantize,
        compile_mode=config.compile,
    )


FACTORIES: dict[str, Callable[[EngineConfig, int], Engine]] = {"fake": _fake, "hf": _hf}


def engine_factory(config: EngineConfig, cache_bytes: int = 4 << 30) -> Callable[[], Engine]:
    """A thunk that builds the configured engine (called off the event loop). ``cache_bytes``
    is the cache budget in the engine's memory: its KV pool holds that plus the live reserve."""
    try:
        factory = FACTORIES[config.kind]
    except KeyError:
        raise ValueError(
            f"unknown engine {config.kind!r}; choose from {sorted(FACTORIES)}"
        ) from None
    return lambda: factory(config, cache_bytes)


__all__ = ["FACTORIES", "engine_factory"]
