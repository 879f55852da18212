"""Bedrock Converse's cachePoint rules (spec §5.3), rendered as ValidationException."""

from __future__ import annotations

from promptcache.service import MarkRules

BEDROCK_RULES = MarkRules(
    count_message="A maximum of 4 cachePoint blocks may be provided. Found {n}.",
    order_message=(
        "A cachePoint with ttl '1h' must not come after a cachePoint with ttl '5m'. "
        "Cache points are processed in the order toolConfig, system, messages."
    ),
)
"""The order message names no path. Converse has no request-level breakpoint, so the conflict
message and ``auto_mode`` never apply."""

__all__ = ["BEDROCK_RULES"]
