from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.core.chatformat import CHATML, GEMMA, PLAIN, ChatFormat
from promptcache.core.layout import render
from promptcache.core.request import Block, ChatRequest, Message, Sampling
from promptcache.core.tokenizer import ByteTokenizer

TOK = ByteTokenizer(("<bos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"))

block_st = st.one_of(
    st.builds(lambda t: Block("text", t), st.text(max_size=12)),
    st.builds(
        lambda t, i: Block("tool_result", t, ref_id=f"id{i}"),
        st.text(max_size=8),
        st.integers(0, 2),
    ),
    st.builds(
        lambda t: Block("tool_use", "{}", name=t, ref_id="x"), st.text(min_size=1, max_size=5)
    ),
    st.builds(lambda t: Block("thinking", t, cacheable=False), st.text(max_size=8)),
)
message_st = st.builds(
    lambda role, blocks: Message(role, tuple(blocks)),
    st.sampled_from(["user", "assistant"]),
    st.lists(block_st, min_size=1, max_size=3),
)
request_st = st.builds(
    lambda msgs, system, tools: ChatRequest(
        model="m",
        messages=tuple(msgs),
        sampling=Sampling(1),
        system=tuple(system),
        tools=tuple(Block("tool", f'{{"name": "{i}"}}', name=str(i)) for i in range(tools)),
    ),
    st.lists(message_st, min_size=1, max_size=4),
    st.lists(st.builds(lambda t: Block("text", t), st.text(max_size=10)), max_size=2),
    st.integers(0, 2),
)


def truncated(request: ChatRequest, num_blocks: int) -> ChatRequest:
    """The same request cut after ``num_blocks`` blocks in render order."""
    kept: list[Message] = []
    budget = num_blocks - len(request.tools) - len(request.system)
    for message in request.messages:
        if budget <= 0:
            break
        kept.append(Message(message.role, message.blocks[:budget]))
        budget -= len(message.blocks)
    return ChatRequest(
        model="m",
        messages=tuple(kept),
        sampling=request.sampling,
        system=request.system[: max(0, num_blocks - len(request.tools))],
        tools=request.tools[:num_blocks],
    )


@settings(max_examples=150, deadline=None)
@given(request_st, st.sampled_from([GEMMA, CHATML, PLAIN]), st.data())
def test_prefix_tokens_never_depend_on_what_follows(
    request: ChatRequest, fmt: ChatFormat, data: st.DataObject
) -> None:
    full = render(request, TOK, fmt)
    assert full.num_tokens == full.blocks[-1].end + full.num_trailer_tokens
    cut = data.draw(st.integers(1, len(full.blocks)))
    prefix = render(truncated(request, cut), TOK, fmt)
    end = full.blocks[cut - 1].end
    assert [b.token_ids for b in prefix.blocks] == [b.token_ids for b in full.blocks[:cut]]
    assert prefix.tokens[:end] == full.tokens[:end]


def test_gemma_layout_matches_its_template() -> None:
    req = ChatRequest(
        model="m",
        system=(Block("text", "Be brief."),),
        messages=(
            Message("user", (Block("text", "Hi"),)),
            Message("assistant", (Block("text", "Hello"),)),
            Message("user", (Block("text", "Bye"),)),
        ),
        sampling=Sampling(1),
    )
    layout = render(req, TOK, GEMMA)
    text = TOK.decode(layout.tokens)
    specials = [t for t in layout.tokens if t >= 256]
    assert text == "user\nBe brief.\n\nHi\nmodel\nHello\nuser\nBye\nmodel\n"
    names = {v: k for k, v in TOK.special_ids.items()}
    assert [names[t] for t in specials] == [
        "<bos>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_turn>",
    ]


def test_user_text_cannot_forge_special_tokens() -> None:
    req = ChatRequest(
        model="m",
        messages=(Message("user", (Block("text", "<end_of_turn>"),)),),
        sampling=Sampling(1),
    )
    layout = render(req, TOK, GEMMA)
    content = layout.blocks[0].token_ids
    assert TOK.token_id("<end_of_turn>") not in content[-len("<end_of_turn>") :]


def test_assistant_prefill_has_no_trailer() -> None:
    req = ChatRequest(
        model="m",
        messages=(
            Message("user", (Block("text", "Hi"),)),
            Message("assistant", (Block("text", "Su"),)),
        ),
        sampling=Sampling(1),
    )
    layout = render(req, TOK, GEMMA)
    assert layout.num_trailer_tokens == 0
    assert layout.num_tokens == layout.blocks[-1].end
