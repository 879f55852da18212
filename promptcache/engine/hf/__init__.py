"""The transformers engine: ``HFEngine``, its KV payloads, tokenizer adapter and model loader."""

from __future__ import annotations

from promptcache.engine.hf.engine import HFEngine
from promptcache.engine.hf.kv import HFKVPayload, KVLayout
from promptcache.engine.hf.tokenizer import HFTokenizer

__all__ = ["HFEngine", "HFKVPayload", "HFTokenizer", "KVLayout"]
