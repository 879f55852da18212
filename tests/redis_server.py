"""A throwaway ``redis-server`` on a free loopback port, for the shared tier's tests.

No persistence (``--save ""``, ``--appendonly no``), its files in a temporary directory. ``kill``
ends it abruptly (SIGKILL, as a crash or a lost host would) and ``restart`` starts a new empty
one on the same port, so tests can take Redis away and bring it back under a client; ``pause``
and ``resume`` freeze and thaw it (a hung server).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def find_redis_server() -> str:
    """The ``redis-server`` on PATH; skips the test, saying why, without one."""
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process; ``url`` stays the same across ``restart``."""

    def __init__(self, directory: Path, executable: str | None = None) -> None:
        self.executable = executable or find_redis_server()
        self.directory = directory
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start it and wait until it answers PING."""
        assert not self.running, "already running"
        log = (self.directory / "redis.log").open("ab")
        args = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": str(self.directory),
            "daemonize": "no",
        }
        self._process = subprocess.Popen(
            [self.executable, *(x for name, value in args.items() for x in (f"--{name}", value))],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._pong():
            if self._process.poll() is not None:
                output = (self.directory / "redis.log").read_text(errors="replace")
                code = self._process.returncode
                raise RuntimeError(f"redis-server exited with {code}:\n{output}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING in {timeout_s} s")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """End it at once (SIGKILL) and wait until it is gone."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections open, no answers, as a hung or overloaded host."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.kill()
        self.start()

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


__all__ = ["RedisServer", "find_redis_server", "free_port"]
