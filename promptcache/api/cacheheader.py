"""The ``x-promptcache-cache`` response header: what a request read and wrote, and why each
breakpoint that was not read missed. Every surface sends it, streams included (it is known
before the first byte), so OpenAI and Bedrock clients see the reasons too.

Grammar (ABNF-ish; ``;``-separated items, ``miss`` repeated once per missed breakpoint, in
render order)::

    x-promptcache-cache = "read=" R "; written=" W [ "; tier=" TIER ] *( "; miss=" MISS )
    TIER   = "device" / "host" / "disk"                ; where the read entry was found
    MISS   = BLOCK ":" REASON [ ":" DETAIL *( "," DETAIL ) ]
    BLOCK  = 1*DIGIT                                   ; the breakpoint's block, render order
    REASON = "never_written" / "expired" / "evicted" / "below_minimum"
           / "outside_lookback" / "prefix_changed" / "model_changed"
    DETAIL = "tokens=" N                               ; the breakpoint's offset (always)
           / "age=" SECONDS                            ; expired: seconds since it expired
           / "tier=" TIER / "cause=" CAUSE             ; evicted: from where, why
           / "matched=" N / "first_diff=" BLOCK / "section=" SECTION   ; prefix_changed
           / "found=" BLOCK                            ; outside_lookback: the live entry

For example ``read=0; written=2048; miss=5:expired:tokens=1900,age=312``.
"""

from __future__ import annotations

from typing import Final

from promptcache.core.response import CacheMiss, Started

CACHE_HEADER: Final = "x-promptcache-cache"


def miss_text(miss: CacheMiss) -> str:
    """One ``MISS`` item of the grammar."""
    age = None if miss.age_s is None else round(miss.age_s)
    optional = (
        ("age", age),
        ("tier", miss.tier),
        ("cause", miss.cause),
        ("matched", miss.matched_blocks),
        ("first_diff", miss.first_diff),
        ("section", miss.section),
        ("found", miss.found),
    )
    details = [f"tokens={miss.tokens}"]
    details += [f"{name}={value}" for name, value in optional if value is not None]
    return f"{miss.block}:{miss.reason}:{','.join(details)}"


def cache_header(started: Started) -> str:
    """The header's value for a request that started with ``started``."""
    usage = started.usage
    items = [f"read={usage.read_tokens}", f"written={usage.written_total}"]
    if started.read_tier is not None and usage.read_tokens:
        items.append(f"tier={started.read_tier}")
    items += [f"miss={miss_text(miss)}" for miss in started.misses]
    return "; ".join(items)


def parse_cache_header(value: str) -> dict[str, list[str]]:
    """The header's items by name (``miss`` may repeat): for tests and clients."""
    parsed: dict[str, list[str]] = {}
    for item in value.split(";"):
        name, _, text = item.strip().partition("=")
        parsed.setdefault(name, []).append(text)
    return parsed


__all__ = ["CACHE_HEADER", "cache_header", "miss_text", "parse_cache_header"]
