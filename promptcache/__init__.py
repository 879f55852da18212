"""promptcache: Anthropic-, OpenAI- and Bedrock-style prompt caching for self-hosted models."""

from __future__ import annotations

from promptcache.config import ServerConfig
from promptcache.core.request import Block, CacheMark, ChatRequest, Message, Sampling
from promptcache.core.response import CacheUsage, ChatResult
from promptcache.errors import InvalidRequest, PromptCacheError

__version__ = "0.1.0"

__all__ = [
    "Block",
    "CacheMark",
    "CacheUsage",
    "ChatRequest",
    "ChatResult",
    "InvalidRequest",
    "Message",
    "PromptCacheError",
    "Sampling",
    "ServerConfig",
    "__version__",
]
