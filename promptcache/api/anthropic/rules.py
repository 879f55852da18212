"""Anthropic's breakpoint rules (spec §3.4, §3.5): the hosted count, order and conflict texts,
which are ``MarkRules``' defaults; the top-level breakpoint takes a slot."""

from __future__ import annotations

from promptcache.service import MarkRules

ANTHROPIC_RULES = MarkRules()
"""Anthropic Messages and Bedrock InvokeModel."""

__all__ = ["ANTHROPIC_RULES"]
