"""Comparing secrets (API keys, admin keys, SigV4 signatures) in constant time.

``==`` on strings and ``key in dict`` stop at the first differing byte (a dict first narrows by
hash, then compares), so response times tell an attacker how much of a guess is right.
``hmac.compare_digest`` takes the same time wherever the difference is. It refuses ``str`` with
non-ASCII characters, and headers may carry any Latin-1 text, so both sides are compared as
UTF-8 bytes (``surrogatepass``: every Python string has exactly one encoding, so distinct
strings never compare equal).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def secret_bytes(value: str) -> bytes:
    """``value`` as the bytes ``same_secret`` compares."""
    return value.encode("utf-8", "surrogatepass")


def same_secret(a: str | bytes, b: str | bytes) -> bool:
    """Whether two secrets are equal, in time that depends on their lengths only."""
    left = secret_bytes(a) if isinstance(a, str) else a
    right = secret_bytes(b) if isinstance(b, str) else b
    return hmac.compare_digest(left, right)


def find_secret(table: Iterable[tuple[bytes, T]], candidate: str | None) -> T | None:
    """The value paired with ``candidate`` in ``table`` (secrets as ``secret_bytes``), or None.

    Every configured secret is compared, with no early exit, so the time taken does not say
    which one matched, nor how close a wrong guess came to any of them.
    """
    if candidate is None:
        return None
    probe = secret_bytes(candidate)
    found: T | None = None
    for secret, value in table:
        if hmac.compare_digest(secret, probe):
            found = value
    return found


__all__ = ["find_secret", "same_secret", "secret_bytes"]
