"""The opaque handle to KV bytes that the cache layer stores and the engine produces.

The cache layer never looks inside a payload: it only needs its size to keep the budget, and the
number of prompt tokens whose KV state it holds. The engine supplies the implementation.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class KVPayload(Protocol):
    """KV state of the first ``num_tokens`` tokens of a prompt, immutable once created."""

    @property
    def num_tokens(self) -> int:
        """Tokens whose state the payload restores."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes the payload occupies in its tier, counted against the cache budget."""
        ...


__all__ = ["KVPayload"]
