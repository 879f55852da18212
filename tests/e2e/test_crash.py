"""A crash: ``promptcache serve`` in its own process, killed with SIGKILL once its entry is on
disk, then started again on the same disk directory. The entry was written behind the request
(no shutdown ran), so the restarted server reads it. The fake engine (``--engine fake``) keeps
its model revision across processes, so every key's namespace is the same after the restart.
With a shared Redis, the restarted replica still reads its own disk, and another replica reads
the entry from Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import anthropic
import httpx
import pytest

from promptcache.bench.peers import free_port
from tests.conftest import words
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SYSTEM = words(3000, 5)


class Process:
    """``python -m promptcache serve ARGS`` on a free loopback port, this checkout first."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        argv = [sys.executable, "-m", "promptcache", "serve", "--port", str(self.port), *args]
        self.log_path = workdir / f"serve-{self.port}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> Process:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout_s} s")

    def kill(self) -> int:
        """SIGKILL: nothing runs on the way out (no shutdown, no persist)."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Call it with ``serve`` flags to get a ready server process; all are closed after."""
    started: list[Process] = []

    def start(*args: str) -> Process:
        process = Process(tmp_path, *args)
        started.append(process)
        return process.wait_ready()

    yield start
    for process in started:
        process.close()


def ask(server: Process) -> Any:
    with anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0) as client:
        return client.messages.create(
            model="m",
            max_tokens=16,
            extra_body={"temperature": 0.0},
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "What is this about?"}],
        )


def test_a_killed_server_keeps_what_it_wrote_behind(serve: Any, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    flags = ("--engine", "fake", "--disk-cache-dir", str(disk))
    first_server = serve(*flags)
    first = ask(first_server)
    written = first.usage.cache_creation_input_tokens
    assert written > 1024 and first.usage.cache_read_input_tokens == 0
    deadline = time.monotonic() + 30  # written behind: within moments, bounded here
    while not list(disk.glob("*.fakekv")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(list(disk.glob("*.fakekv"))) == 1
    assert first_server.kill() == -signal.SIGKILL

    second = ask(serve(*flags))
    assert second.usage.cache_read_input_tokens == written
    assert second.usage.cache_creation_input_tokens == 0
    assert second.content == first.content  # greedy: the restored state gives the same tokens


def ask_raw(server: Process) -> tuple[Any, str]:
    """The message and its ``x-promptcache-cache`` header."""
    with anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0) as client:
        raw = client.messages.with_raw_response.create(
            model="m",
            max_tokens=16,
            extra_body={"temperature": 0.0},
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "What is this about?"}],
        )
        return raw.parse(), raw.headers["x-promptcache-cache"]


def test_with_redis_a_killed_replica_reads_its_disk_and_the_others_read_redis(
    serve: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    shared = ("--engine", "fake", "--redis-url", redis_server.url, "--redis-timeout-s", "5")
    first_server = serve(*shared, "--disk-cache-dir", str(tmp_path / "disk-1"))
    first, _ = ask_raw(first_server)
    written = first.usage.cache_creation_input_tokens
    assert written > 1024
    deadline = time.monotonic() + 30  # written behind, to disk and to Redis
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{first_server.base_url}/metrics").text
        on_disk = list((tmp_path / "disk-1").glob("*.fakekv"))
        if on_disk and "promptcache_remote_writes_total 1.0" in metrics:
            break
        time.sleep(0.02)
    assert first_server.kill() == -signal.SIGKILL

    again, header = ask_raw(serve(*shared, "--disk-cache-dir", str(tmp_path / "disk-1")))
    assert "tier=disk" in header and again.usage.cache_read_input_tokens == written
    other, header = ask_raw(serve(*shared, "--disk-cache-dir", str(tmp_path / "disk-2")))
    assert "tier=remote" in header and other.usage.cache_read_input_tokens == written
    assert other.usage.cache_creation_input_tokens == 0
    assert again.content == other.content == first.content
