from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from promptcache.cache.hashing import Namespace, block_hashes
from promptcache.core.layout import LayoutBlock
from promptcache.types import TenantId

NS = Namespace(TenantId("a"), "m", "r")


def blocks(*ids: tuple[int, ...]) -> list[LayoutBlock]:
    out, end = [], 0
    for token_ids in ids:
        end += len(token_ids)
        out.append(LayoutBlock("messages", "user", "text", token_ids, end))
    return out


def test_chain_prefix_property() -> None:
    a = block_hashes(blocks((1, 2), (3,), (4, 5)), NS)
    b = block_hashes(blocks((1, 2), (3,), (9,)), NS)
    assert a[:2] == b[:2] and a[2] != b[2]
    c = block_hashes(blocks((1, 3), (3,), (4, 5)), NS)
    assert all(x != y for x, y in zip(a, c, strict=True))  # an early change moves every key


def test_block_boundaries_matter() -> None:
    assert block_hashes(blocks((1, 2), (3,)), NS)[-1] != block_hashes(blocks((1,), (2, 3)), NS)[-1]


def test_section_and_role_are_part_of_the_key() -> None:
    user = [LayoutBlock("messages", "user", "text", (1,), 1)]
    assistant = [LayoutBlock("messages", "assistant", "text", (1,), 1)]
    system = [LayoutBlock("system", "system", "text", (1,), 1)]
    keys = {block_hashes(b, NS)[0] for b in (user, assistant, system)}
    assert len(keys) == 3


names = st.text(min_size=0, max_size=5)


@given(names, names, names, names, names)
def test_different_namespaces_never_share_a_key(t: str, m: str, r: str, a: str, p: str) -> None:
    ns = Namespace(TenantId(t), m, r, a, p)
    other = Namespace(TenantId(t + "x"), m, r, a, p)
    b = blocks((1, 2, 3))
    assert block_hashes(b, ns) == block_hashes(b, Namespace(TenantId(t), m, r, a, p))
    assert block_hashes(b, ns) != block_hashes(b, other)
    if m:  # length prefixes keep ("ab", "") apart from ("a", "b")
        assert block_hashes(b, Namespace(TenantId(t + m), "", r, a, p)) != block_hashes(b, ns)
