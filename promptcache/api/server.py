"""``BackgroundServer``: uvicorn on a free loopback port in a thread, for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from promptcache.api.app import build_app
from promptcache.service import Service


class BackgroundServer:
    """Serves ``service`` until ``stop``. ``start`` returns once ``/health`` answers 200 (or,
    with ``wait_ready=False``, once it answers at all: the model may still be loading)."""

    def __init__(self, service: Service, host: str = "127.0.0.1") -> None:
        self.service = service
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.base_url = f"http://{host}:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(build_app(service), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout_s: float = 600.0, *, wait_ready: bool = True) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                break
            try:
                status = httpx.get(f"{self.base_url}/health", timeout=2.0).status_code
                if status == 200 or not wait_ready:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server at {self.base_url} did not become ready")

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._sock.close()


__all__ = ["BackgroundServer"]
