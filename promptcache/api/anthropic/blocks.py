"""Anthropic content blocks -> canonical ``Block``s (spec §1.1, §3.2, §3.3).

One wire content block gives one leaf block, except a ``tool_result`` with array content, which
gives one per nested item (its marker marks the last one). Markers become ``CacheMark``s whose
``ttl_path`` names the block (``messages.3.content.0.cache_control.ttl``); their shape, thinking
blocks and empty text are checked here, with the hosted error texts (validation step 3, §1.14).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from promptcache.api.anthropic.schema import (
    CacheControl,
    ContentSource,
    DocumentBlock,
    Marked,
    RawBlock,
    RedactedThinkingBlock,
    SearchResultBlock,
    ServerToolResultBlock,
    TextBlock,
    TextSource,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from promptcache.api.wire import to_json, validate
from promptcache.core.request import Block, CacheMark
from promptcache.errors import InvalidRequest

_Render = Callable[[RawBlock, str], list[Block]]


def content_blocks(raw: RawBlock, path: str) -> list[Block]:
    """The canonical block(s) for one wire content block at ``path``."""
    kind = raw.get("type")
    if not isinstance(kind, str):
        problem = "Field required" if kind is None else "Input should be a valid string"
        raise InvalidRequest(f"{path}.type: {problem}")
    render = _BLOCKS.get(kind)
    if render is None:
        render = _server_tool_result if kind.endswith("_tool_result") else _as_json
    return render(raw, path)


def _text(raw: RawBlock, path: str) -> list[Block]:
    item = validate(TextBlock, raw, path)
    return [text_block(item.text, item.cache_control, path)]


def _image(raw: RawBlock, path: str) -> list[Block]:
    raise InvalidRequest(f"{path}: images are not supported by this model")


def _document(raw: RawBlock, path: str) -> list[Block]:
    doc = validate(DocumentBlock, raw, path)
    text = _document_text(doc.source, f"{path}.source")
    parts = (doc.title, doc.context, text)
    return [
        Block(
            "document",
            text="\n\n".join(part for part in parts if part),
            mark=cache_mark(doc.cache_control, path),
        )
    ]


def _document_text(source: dict[str, Any], path: str) -> str:
    kind = source.get("type")
    if kind == "text":
        return validate(TextSource, source, path).data
    if kind == "content":
        content = validate(ContentSource, source, path).content
        if isinstance(content, str):
            return content
        texts = []
        for j, item in enumerate(content):
            if item.get("type") == "image":
                _image(item, f"{path}.content.{j}")
            texts.append(validate(TextBlock, item, f"{path}.content.{j}").text)
        return "\n\n".join(texts)
    raise InvalidRequest(
        f"{path}.type: only plain-text document sources ('text' or 'content') are supported "
        f"by this model, not {kind!r}"
    )


def _search_result(raw: RawBlock, path: str) -> list[Block]:
    result = validate(SearchResultBlock, raw, path)
    text = "\n".join([result.title, result.source, *(item.text for item in result.content)])
    return [Block("document", text=text, mark=cache_mark(result.cache_control, path))]


def _tool_use(raw: RawBlock, path: str) -> list[Block]:
    call = validate(ToolUseBlock, raw, path)
    mark = cache_mark(call.cache_control, path)
    return [Block("tool_use", text=to_json(call.input), name=call.name, ref_id=call.id, mark=mark)]


def _tool_result(raw: RawBlock, path: str) -> list[Block]:
    result = validate(ToolResultBlock, raw, path)
    leaf = Block("tool_result", ref_id=result.tool_use_id, is_error=bool(result.is_error))
    mark = cache_mark(result.cache_control, path)
    if not isinstance(result.content, list):
        return [replace(leaf, text=result.content or "", mark=mark)]
    if not result.content:
        return [replace(leaf, mark=mark)]
    items = [
        replace(leaf, text=block.text, mark=block.mark)
        for j, item in enumerate(result.content)
        for block in content_blocks(item, f"{path}.content.{j}")
    ]
    if mark is not None:
        # The tool_result's own marker lands on its last nested item (spec §3.3).
        last = len(result.content) - 1
        if result.content[last].get("type") == "text" and items[-1].text == "":
            raise _empty_text(f"{path}.content.{last}")
        items[-1] = replace(items[-1], mark=mark)
    return items


def _server_tool_result(raw: RawBlock, path: str) -> list[Block]:
    result = validate(ServerToolResultBlock, raw, path)
    text = result.content if isinstance(result.content, str) else to_json(result.content)
    mark = cache_mark(result.cache_control, path)
    return [Block("tool_result", text=text, ref_id=result.tool_use_id, mark=mark)]


def _thinking(raw: RawBlock, path: str) -> list[Block]:
    _forbid_mark(raw, path)
    block = validate(ThinkingBlock, raw, path)
    return [Block("thinking", text=block.thinking, cacheable=False)]


def _redacted_thinking(raw: RawBlock, path: str) -> list[Block]:
    _forbid_mark(raw, path)
    validate(RedactedThinkingBlock, raw, path)
    # ``data`` is ciphertext only Anthropic can read: it would cost tokens and tell a local model
    # nothing. The block keeps its position in the prompt (spec §1.1) with empty text.
    return [Block("redacted_thinking", cacheable=False)]


def _as_json(raw: RawBlock, path: str) -> list[Block]:
    # Block types we do not interpret (container_upload, tool_reference, compaction, newer
    # types) are shown to the model as their JSON, so a body the hosted API accepts is accepted.
    item = validate(Marked, raw, path)
    shown = {key: value for key, value in raw.items() if key != "cache_control"}
    return [Block("text", text=to_json(shown), mark=cache_mark(item.cache_control, path))]


_BLOCKS: Final[dict[str, _Render]] = {
    "text": _text,
    "image": _image,
    "document": _document,
    "search_result": _search_result,
    "tool_use": _tool_use,
    "server_tool_use": _tool_use,
    "mcp_tool_use": _tool_use,
    "tool_result": _tool_result,
    "thinking": _thinking,
    "redacted_thinking": _redacted_thinking,
}
"""Content block type -> renderer. Other ``*_tool_result`` types render as tool results, and any
other type as JSON text."""


def text_block(text: str, cache_control: CacheControl | None, path: str) -> Block:
    """A text block at ``path``; a marker on empty text is a 400 (spec §3.3, §3.5)."""
    mark = cache_mark(cache_control, path)
    if mark is not None and text == "":
        raise _empty_text(path)
    return Block("text", text=text, mark=mark)


def _empty_text(path: str) -> InvalidRequest:
    return InvalidRequest(f"{path}.text: cache_control cannot be set for empty text blocks")


def _forbid_mark(raw: RawBlock, path: str) -> None:
    # Thinking blocks cannot be marked; the hosted error names the block type in the path.
    if raw.get("cache_control") is not None:
        raise InvalidRequest(f"{path}.{raw['type']}.cache_control: Extra inputs are not permitted")


def cache_mark(cache_control: CacheControl | None, path: str) -> CacheMark | None:
    """The breakpoint of a validated marker at ``path`` (``""`` for the top level), if any."""
    if cache_control is None:
        return None
    prefix = f"{path}." if path else ""
    return CacheMark(cache_control.ttl, f"{prefix}cache_control.ttl")


__all__ = ["cache_mark", "content_blocks", "text_block", "to_json", "validate"]
