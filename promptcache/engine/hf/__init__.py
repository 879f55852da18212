"""Hugging Face formats: finding and converting models (GGUF, transformers directories), the
tokenizer adapter, and tiny random models for tests. The engine that serves them is
``promptcache.engine.paged``."""

from __future__ import annotations

from promptcache.engine.hf.tokenizer import BackendTokenizer, HFTokenizer

__all__ = ["BackendTokenizer", "HFTokenizer"]
