"""A live promptcache server on loopback (uvicorn in a thread), for the official SDKs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import boto3
import pytest
from botocore.config import Config

from promptcache.api.server import BackgroundServer
from promptcache.service import Service

LiveServer = BackgroundServer


class ServerFactory(Protocol):
    """``live_server_factory``'s: a ``Service`` to a running server, once its model has loaded
    (``wait_ready=False``: as soon as it answers, while the model may still load)."""

    def __call__(self, service: Service, *, wait_ready: bool = True) -> BackgroundServer: ...


@pytest.fixture
def live_server_factory() -> Iterator[ServerFactory]:
    """Call it with a ``Service`` to get a running server; every server stops after the test."""
    running: list[BackgroundServer] = []

    def start(service: Service, *, wait_ready: bool = True) -> BackgroundServer:
        server = BackgroundServer(service).start(timeout_s=60, wait_ready=wait_ready)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


BedrockConnect = Callable[[BackgroundServer, str, str], Any]
"""(server, access key id, secret) -> a boto3 ``bedrock-runtime`` client for that server."""


@pytest.fixture
def bedrock_connect(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[BedrockConnect]:
    """boto3 on loopback only (no IMDS, no profile or config files, no host bearer token); every
    client is closed after the test, so no socket is left for the garbage collector to report in
    a later test."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name in ("AWS_PROFILE", "AWS_BEARER_TOKEN_BEDROCK", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    clients: list[Any] = []

    def connect(server: BackgroundServer, access_key: str, secret: str) -> Any:
        client = boto3.client(
            "bedrock-runtime",
            region_name="us-east-1",
            endpoint_url=server.base_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=120),
        )
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def slow_to_load(engine: Any, seconds: float) -> Callable[[], Any]:
    """A loader that hands over ``engine`` after ``seconds`` (a model still loading)."""

    def load() -> Any:
        time.sleep(seconds)
        return engine

    return load
