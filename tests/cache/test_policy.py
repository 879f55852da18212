from __future__ import annotations

import pytest

from promptcache.cache.policy import MarkRules, resolve_breakpoints
from promptcache.core.request import Block, CacheMark, ChatRequest, Message, Sampling
from promptcache.errors import InvalidRequest
from promptcache.types import Ttl


def mark(ttl: Ttl, path: str) -> CacheMark:
    return CacheMark(ttl, f"{path}.cache_control.ttl")


def request(
    contents: list[Block], *, tools: list[Block] | None = None, auto: CacheMark | None = None
) -> ChatRequest:
    return ChatRequest(
        model="m",
        messages=(Message("user", tuple(contents)),),
        sampling=Sampling(max_tokens=1),
        tools=tuple(tools or ()),
        auto_cache=auto,
    )


def resolve(req: ChatRequest, rules: MarkRules | None = None) -> list[tuple[int, str]]:
    bps = resolve_breakpoints(list(req.placed_blocks()), req.auto_cache, rules or MarkRules())
    return [(bp.block_index, bp.ttl) for bp in bps]


def text(t: str, m: CacheMark | None = None) -> Block:
    return Block("text", t, mark=m)


def test_five_markers_rejected_with_count() -> None:
    blocks = [text(f"b{i}", mark("5m", f"messages.0.content.{i}")) for i in range(5)]
    with pytest.raises(
        InvalidRequest,
        match=r"^A maximum of 4 blocks with cache_control may be provided\. Found 5\.$",
    ):
        resolve(request(blocks))


def test_four_markers_plus_automatic_on_unmarked_target_is_five() -> None:
    blocks = [text(f"b{i}", mark("5m", f"messages.0.content.{i}")) for i in range(4)]
    blocks.append(text("last"))
    with pytest.raises(InvalidRequest, match=r"Found 5\.$"):
        resolve(request(blocks, auto=CacheMark("5m")))


def test_four_markers_with_last_marked_same_ttl_plus_automatic_is_a_noop() -> None:
    blocks = [text(f"b{i}", mark("5m", f"messages.0.content.{i}")) for i in range(4)]
    assert resolve(request(blocks, auto=CacheMark("5m"))) == [(i, "5m") for i in range(4)]


def test_automatic_ttl_conflict() -> None:
    blocks = [text("a"), text("b", mark("1h", "messages.0.content.1"))]
    with pytest.raises(InvalidRequest, match="conflicts with ttl='1h'"):
        resolve(request(blocks, auto=CacheMark("5m")))


def test_ttl_order_message_has_path() -> None:
    tools = [Block("tool", "{}", name="t", mark=mark("5m", "tools.0"))]
    blocks = [text(str(i)) for i in range(4)] + [text("x", mark("1h", "messages.0.content.4"))]
    with pytest.raises(InvalidRequest) as info:
        resolve(request(blocks, tools=tools))
    assert info.value.message == (
        "messages.0.content.4.cache_control.ttl: a ttl='1h' cache_control block must not come "
        "after a ttl='5m' cache_control block. Note that blocks are processed in the following "
        "order: `tools`, `system`, `messages`."
    )


def test_1h_then_5m_accepted() -> None:
    blocks = [text("a", mark("1h", "p0")), text("b", mark("5m", "p1"))]
    assert resolve(request(blocks)) == [(0, "1h"), (1, "5m")]


def test_automatic_1h_after_explicit_5m_uses_top_level_path() -> None:
    blocks = [text("a", mark("5m", "messages.0.content.0")), text("b")]
    with pytest.raises(InvalidRequest, match=r"^cache_control\.ttl: a ttl='1h'"):
        resolve(request(blocks, auto=CacheMark("1h")))


def test_automatic_walks_back_over_ineligible_blocks() -> None:
    blocks = [text("a"), Block("thinking", "hm", cacheable=False), text("")]
    assert resolve(request(blocks, auto=CacheMark("5m"))) == [(0, "5m")]
    none = [Block("thinking", "hm", cacheable=False)]
    assert resolve(request(none, auto=CacheMark("5m"))) == []


def test_implicit_mode_takes_only_a_free_slot_and_lowers_ttl() -> None:
    rules = MarkRules(auto_mode="implicit")
    blocks = [text(f"b{i}", mark("5m", f"p{i}")) for i in range(4)] + [text("tail")]
    assert resolve(request(blocks, auto=CacheMark("1h")), rules) == [(i, "5m") for i in range(4)]
    blocks = [text("a", mark("5m", "p0")), text("tail")]
    assert resolve(request(blocks, auto=CacheMark("1h")), rules) == [(0, "5m"), (1, "5m")]
