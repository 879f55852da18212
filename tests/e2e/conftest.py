"""A live promptcache server on loopback (uvicorn in a thread), for the official SDKs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from promptcache.api.app import build_app
from promptcache.service import Service

STARTUP_TIMEOUT_S = 60.0


@dataclass
class LiveServer:
    """A running server and the service behind it."""

    service: Service
    base_url: str


def _serve(service: Service) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(service), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return server, thread, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.should_exit = True
    raise RuntimeError("server did not become ready")


@pytest.fixture
def live_server_factory() -> Iterator[object]:
    """Call it with a ``Service`` to get a ``LiveServer``; every server stops after the test."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(service: Service) -> LiveServer:
        server, thread, url = _serve(service)
        running.append((server, thread))
        return LiveServer(service, url)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=30)
