"""A disk tier across a restart, through the real HTTP server and the ``anthropic`` SDK, on a
tiny real model (Gemma 3 layout: sliding and full layers). The model is built twice with the same
seed, so its revision, hence every key's namespace, is the same after the restart."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from promptcache.engine.hf.testing import build_tiny_engine
from promptcache.service import Service
from tests.conftest import make_config, words
from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

SYSTEM = words(600, 5)
Factory = Callable[[Service], LiveServer]


def serve(factory: Factory, disk: Path) -> LiveServer:
    engine = build_tiny_engine("gemma3", stop_token_ids=())  # answers run to max_tokens
    return factory(Service(engine, make_config(disk_dir=disk, min_cacheable_tokens=256)))


def ask(server: LiveServer, question: str = "What is this about?") -> Any:
    with anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0) as client:
        return client.messages.create(
            model="m",
            max_tokens=10,
            extra_body={"temperature": 0.0},
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": question}],
        )


def test_a_restarted_server_reads_what_it_wrote(
    live_server_factory: Factory, tmp_path: Path
) -> None:
    first_server = serve(live_server_factory, tmp_path)
    first = ask(first_server)
    written = first.usage.cache_creation_input_tokens
    assert written > 512 and first.usage.cache_read_input_tokens == 0
    first_server.stop()  # shutdown writes the entry to the disk tier
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    second_server = serve(live_server_factory, tmp_path)
    second = ask(second_server)
    assert second.usage.cache_read_input_tokens == written
    assert second.usage.cache_creation_input_tokens == 0
    assert second.content == first.content  # greedy: the restored KV gives the same tokens


def test_an_entry_written_behind_outlives_a_crash(
    live_server_factory: Factory, tmp_path: Path
) -> None:
    """The paged engine's payload, copied to disk off the request path while the server runs,
    is what a crash leaves: a second server on a snapshot of the directory (taken while the
    first still runs, so no shutdown wrote anything) reads it."""
    live = tmp_path / "live"
    first_server = serve(live_server_factory, live)
    first = ask(first_server)
    written = first.usage.cache_creation_input_tokens
    assert written > 512
    deadline = time.monotonic() + 30
    while not list(live.glob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    snapshot = tmp_path / "crashed"
    snapshot.mkdir()
    for path in live.glob("*.safetensors"):  # what kill -9 would leave (*.tmp is deleted anyway)
        shutil.copy(path, snapshot / path.name)
    assert len(list(snapshot.iterdir())) == 1

    second = ask(serve(live_server_factory, snapshot))
    assert second.usage.cache_read_input_tokens == written
    assert second.usage.cache_creation_input_tokens == 0
    assert second.content == first.content


def test_a_damaged_file_is_a_miss_with_the_right_answer(
    live_server_factory: Factory, tmp_path: Path
) -> None:
    first_server = serve(live_server_factory, tmp_path)
    first = ask(first_server)
    first_server.stop()
    (path,) = tmp_path.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-64] ^= 0x40  # inside the tensors: the header still reads, the checksum fails
    path.write_bytes(bytes(data))

    second_server = serve(live_server_factory, tmp_path)
    second = ask(second_server)
    assert second.usage.cache_read_input_tokens == 0
    assert second.usage.cache_creation_input_tokens == first.usage.cache_creation_input_tokens
    assert second.content == first.content
    # Removed on the failed read; the new entry may have been written behind under its name.
    assert not path.exists() or path.read_bytes() != bytes(data)
