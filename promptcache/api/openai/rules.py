"""OpenAI Chat's breakpoint rules (spec §4.2-§4.3, §4.8)."""

from __future__ import annotations

from dataclasses import replace

from promptcache.api.anthropic.rules import ANTHROPIC_RULES

OPENAI_RULES = replace(ANTHROPIC_RULES, auto_mode="implicit")
"""The Anthropic count and order texts, with OpenAI paths in the marks; the implicit breakpoint
only takes a free slot and never breaks the order."""

__all__ = ["OPENAI_RULES"]
