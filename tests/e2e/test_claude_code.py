"""The real Claude Code CLI against a live server: a new question reads the system prompt and
tools the previous question wrote (spec §3.11: its attribution line is not prompt).

Claude Code comes from npm (``@anthropic-ai/claude-code``, pinned below), installed once into a
cache outside the repository (``$PROMPTCACHE_TEST_CACHE``, default ``~/.cache/promptcache-tests``).
Without npm or a reachable registry the test skips and says why. Each run gets a fresh HOME and
working directory, so no login, settings, CLAUDE.md or git state of the machine leaks in.

The engine is the fake one (byte tokenizer, so token counts are byte counts): the test is about
what the client sends and what the cache does with it, and it keeps the test to seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from promptcache.config import ApiConfig, EngineConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config
from tests.e2e.conftest import LiveServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLAUDE_CODE_VERSION = "2.1.332"
ADMIN_KEY = "admin-key"


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "promptcache-tests"
    return Path(os.environ.get("PROMPTCACHE_TEST_CACHE", default))


@pytest.fixture(scope="module")
def claude() -> Path:
    """The ``claude`` executable, installed with npm on first use."""
    prefix = _cache_dir() / f"claude-code-{CLAUDE_CODE_VERSION}"
    binary = prefix / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot install @anthropic-ai/claude-code")
        prefix.mkdir(parents=True, exist_ok=True)
        package = f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"
        try:
            done = subprocess.run(
                [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", package],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install {package} timed out (registry unreachable?)")
        if done.returncode != 0 or not binary.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip(f"npm install {package} failed: {' | '.join(tail)}")
    return binary


def run_claude(claude: Path, base_url: str, question: str, tmp_path: Path) -> dict[str, Any]:
    """``claude -p <question> --output-format json`` with a fresh HOME; its result object."""
    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    workdir.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "x",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    done = subprocess.run(
        [str(claude), "-p", question, "--output-format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=300,
    )
    assert done.returncode == 0, f"claude exited {done.returncode}: {done.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["is_error"] is False, result
    return result


def entry_sizes(server: LiveServer) -> list[int]:
    listed = httpx.get(f"{server.base_url}/v1/cache/entries", headers={"x-api-key": ADMIN_KEY})
    return sorted(entry["tokens"] for entry in listed.json()["data"])


def test_second_question_reads_what_the_first_wrote(
    claude: Path, live_server_factory: Callable[[Service], LiveServer], tmp_path: Path
) -> None:
    config = make_config()
    config = replace(
        config,
        # Claude Code asks for up to 128k output tokens; the deployment caps replies.
        engine=replace(EngineConfig(), max_output_tokens=64),
        api=replace(ApiConfig(), api_keys={"x": "claude-code"}, admin_keys=frozenset({ADMIN_KEY})),
    )
    server = live_server_factory(Service(FakeEngine(max_context_tokens=1 << 20), config))
    questions = ("What is 2+2?", "Name a colour.")
    first = run_claude(claude, server.base_url, questions[0], tmp_path)["usage"]
    written = entry_sizes(server)
    second = run_claude(claude, server.base_url, questions[1], tmp_path)["usage"]

    print(f"\nClaude Code {CLAUDE_CODE_VERSION}: run 1 {first}\nrun 2 {second}\nentries {written}")
    assert first["cache_read_input_tokens"] == 0
    assert first["cache_creation_input_tokens"] == max(written)
    # The second question reads the entry the first wrote at the end of system + tools ...
    read = second["cache_read_input_tokens"]
    assert read > 10_000 and read in written and read < max(written)
    # ... and the prompts differ in the question alone: the attribution line, whose hex changes
    # with the question, is in neither (byte tokenizer: tokens are bytes).
    total = [u["input_tokens"] + u["cache_creation_input_tokens"] for u in (first, second)]
    grown = len(questions[1].encode()) - len(questions[0].encode())
    assert total[1] + read == total[0] + grown
