from __future__ import annotations

from promptcache.core.output import OutputParser
from promptcache.core.response import TextOut, ToolCallOut


def feed_all(parser: OutputParser, text: str) -> list[TextOut | ToolCallOut]:
    out: list[TextOut | ToolCallOut] = []
    for i in range(1, len(text) + 1):
        out += parser.feed(text[:i])
        if parser.stop:
            return out
    return out + parser.feed(text, final=True)


def joined(pieces: list[TextOut | ToolCallOut]) -> str:
    return "".join(p.text for p in pieces if isinstance(p, TextOut))


def test_plain_text_streams_through() -> None:
    parser = OutputParser((), frozenset())
    assert joined(feed_all(parser, "hello world")) == "hello world"
    assert parser.stop is None


def test_stop_sequence_cuts_and_is_reported() -> None:
    parser = OutputParser(("END", "xyz"), frozenset())
    assert joined(feed_all(parser, "abc ENxEND tail")) == "abc ENx"
    assert parser.stop is not None and parser.stop.sequence == "END"


def test_held_back_text_is_released_at_the_end() -> None:
    parser = OutputParser(("ENDING",), frozenset())
    assert joined(feed_all(parser, "so END")) == "so END"


def test_tool_call_is_parsed() -> None:
    parser = OutputParser((), frozenset({"get_weather"}))
    text = 'Let me check.\n```tool_call\n{"name": "get_weather", "input": {"city": "Paris"}}\n```'
    pieces = feed_all(parser, text)
    assert joined(pieces) == "Let me check.\n"
    call = pieces[-1]
    assert isinstance(call, ToolCallOut) and call.name == "get_weather"
    assert call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    assert parser.stop is not None and parser.stop.reason == "tool_use"


def test_unknown_tool_or_bad_json_stays_text() -> None:
    parser = OutputParser((), frozenset({"t"}))
    text = '```tool_call\n{"name": "other"}\n``` done'
    assert joined(feed_all(parser, text)) == text
    parser = OutputParser((), frozenset({"t"}))
    assert joined(feed_all(parser, "```tool_call\n{not json")) == "```tool_call\n{not json"


def test_fence_is_plain_text_without_tools() -> None:
    parser = OutputParser((), frozenset())
    text = '```tool_call\n{"name": "t", "input": {}}\n```'
    assert joined(feed_all(parser, text)) == text


def test_partial_utf8_is_held_back() -> None:
    parser = OutputParser((), frozenset())
    assert parser.feed("ab\ufffd") == [TextOut("ab")]
    assert parser.feed("abé") == [TextOut("é")]
