"""Secrets compared in constant time: API keys, admin keys (``credentials.py``, the service)."""

from __future__ import annotations

import hmac
from dataclasses import replace

import pytest

from promptcache import credentials
from promptcache.config import ApiConfig, ServerConfig
from promptcache.credentials import find_secret, same_secret, secret_bytes
from promptcache.engine.fake import FakeEngine
from promptcache.errors import AuthenticationFailed
from promptcache.service import Service
from promptcache.types import TenantId


def test_same_secret() -> None:
    assert same_secret("sk-a", "sk-a") and same_secret(b"sk-a", "sk-a")
    assert not same_secret("sk-a", "sk-b") and not same_secret("sk-a", "sk-a ")
    assert not same_secret("abc", "é") and same_secret("é\ud800", "é\ud800")


def test_find_secret_compares_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(credentials.hmac, "compare_digest", spy)
    table = [(secret_bytes(k), k.upper()) for k in ("k1", "k2", "k3")]
    assert find_secret(table, "k1") == "K1"
    assert len(calls) == 3  # no early exit on the match
    assert find_secret(table, "k") is None and find_secret(table, None) is None


def service(**api: object) -> Service:
    return Service(FakeEngine(), replace(ServerConfig(), api=replace(ApiConfig(), **api)))


def test_service_authenticates_and_checks_admin_keys_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(credentials.hmac, "compare_digest", spy)
    served = service(
        api_keys={"sk-a": "team-a", "sk-a2": "team-a", "sk-b": "team-b"},
        admin_keys=frozenset({"adm-1", "adm-2"}),
    )
    assert served.authenticate("sk-b") == TenantId("team-b")
    assert served.authenticate("sk-a2") == TenantId("team-a")
    assert calls == [b"sk-b"] * 3 + [b"sk-a2"] * 3
    for wrong in (None, "sk-", "sk-bb", "é", "\ud800"):
        with pytest.raises(AuthenticationFailed):
            served.authenticate(wrong)
    calls.clear()
    assert served.is_admin("adm-2") and not served.is_admin("adm-3")
    assert not served.is_admin(None) and not served.is_admin("sk-a")
    assert calls == [b"adm-2"] * 2 + [b"adm-3"] * 2 + [b"sk-a"] * 2


def test_open_server_accepts_anyone() -> None:
    open_server = service()
    assert open_server.is_open and open_server.authenticate("anything") == TenantId("default")
