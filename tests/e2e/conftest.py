"""A live promptcache server on loopback (uvicorn in a thread), for the official SDKs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from promptcache.api.server import BackgroundServer
from promptcache.service import Service

LiveServer = BackgroundServer


@pytest.fixture
def live_server_factory() -> Iterator[Callable[[Service], BackgroundServer]]:
    """Call it with a ``Service`` to get a running server; every server stops after the test."""
    running: list[BackgroundServer] = []

    def start(service: Service) -> BackgroundServer:
        server = BackgroundServer(service).start(timeout_s=60)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()
