"""The bounded memories behind miss reasons: tombstones and the tenants' prompt history."""

from __future__ import annotations

from promptcache.cache.misses import PromptHistory, Tombstone, Tombstones, explain_from_history
from promptcache.types import BlockHash, TenantId

A, B = TenantId("a"), TenantId("b")


def chain(*names: str) -> list[BlockHash]:
    return [BlockHash(name.encode()) for name in names]


def test_tombstones_keep_the_latest_and_forget_a_key_written_again() -> None:
    stones = Tombstones(limit=2)
    for name in ("k1", "k2", "k3"):
        stones.add(BlockHash(name.encode()), Tombstone(A, "capacity", "host", 0.0))
    assert stones.get(BlockHash(b"k1")) is None and len(stones) == 2
    stones.discard(BlockHash(b"k3"))
    assert stones.get(BlockHash(b"k3")) is None and stones.get(BlockHash(b"k2")) is not None


def test_history_is_bounded_per_tenant_and_in_tenants() -> None:
    history = PromptHistory(per_tenant=2, tenants=2)
    for name in ("x", "y", "z"):
        history.remember(A, "m", chain(name, "tail"))
    assert history.nearest(A, chain("x", "tail")) is None  # the oldest went
    assert history.nearest(A, chain("z", "tail")) == ("m", 2)
    history.remember(B, "m", chain("b"))
    history.remember(TenantId("c"), "m", chain("c"))
    assert history.nearest(A, chain("z")) is None  # the least recently seen tenant went


def test_a_prefix_of_a_remembered_prompt_adds_nothing_and_an_extension_replaces_it() -> None:
    history = PromptHistory(per_tenant=1)
    history.remember(A, "m", chain("s", "t"))
    history.remember(A, "m", chain("s"))
    assert history.nearest(A, chain("s", "t")) == ("m", 2)
    history.remember(A, "m", chain("s", "t", "u"))
    assert history.nearest(A, chain("s", "t", "u")) == ("m", 3)


def test_explain_names_the_first_changed_block_and_never_another_tenant() -> None:
    history = PromptHistory()
    history.remember(A, "m", chain("tool", "system", "q1"))
    sections = ["tools", "system", "messages"]
    kwargs = {"model": "m", "block": 2, "tokens": 100, "sections": sections, "history": history}
    changed = explain_from_history(tenant=A, chain=chain("tool", "other", "q1"), **kwargs)  # type: ignore[arg-type]
    assert changed is not None
    assert (changed.reason, changed.first_diff, changed.section) == ("prefix_changed", 1, "system")
    assert explain_from_history(tenant=B, chain=chain("tool", "other", "q1"), **kwargs) is None  # type: ignore[arg-type]
    other_model = {**kwargs, "model": "m2"}
    moved = explain_from_history(tenant=A, chain=chain("tool", "system", "q1"), **other_model)  # type: ignore[arg-type]
    assert moved is not None and moved.reason == "model_changed"
