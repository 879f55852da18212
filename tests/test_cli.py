from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptcache import cli
from promptcache.config import ConfigError, ServerConfig
from promptcache.engine.base import Engine
from promptcache.service import Service


def test_serve_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--port", "--config", "--api-keys", "--cache-memory", "--device"):
        assert flag in out


def test_bad_config_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'red'\n")
    assert cli.main(["serve", "--config", str(bad)]) == 2
    assert "unknown keys" in capsys.readouterr().err
    assert cli.main(["serve", "--engine", "nope"]) == 2
    assert "unknown engine" in capsys.readouterr().err


def test_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "promptcache", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--served-model-name" in result.stdout


# -- start-up fails loudly ---------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def serve_subprocess(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m promptcache serve ARGS`` on a free port, this checkout's package first."""
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-m", "promptcache", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_missing_model_exits_before_binding(tmp_path: Path) -> None:
    started = time.monotonic()
    result = serve_subprocess(tmp_path, "--model", "/nonexistent")
    assert result.returncode == 2
    assert "promptcache: --model /nonexistent: no such file or directory" in result.stderr
    assert "Uvicorn running" not in result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("garbage.gguf", b"\x00\x01garbage bytes", "not a GGUF file (bad magic"),
        ("weights.bin", b"GGUF", "expected a .gguf file or a Hugging Face model directory"),
        ("emptydir", None, "not a Hugging Face model directory (no config.json)"),
    ],
)
def test_model_path_is_checked_cheaply(
    tmp_path: Path, name: str, content: bytes | None, problem: str
) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        cli.check_model_path(str(path))
    cli.check_model_path(None)  # the embedded default


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("damaged-gguf", "model failed to load: "),
        ("unknown-architecture", "does not recognize this architecture"),
    ],
)
def test_model_that_fails_to_load_stops_the_server(tmp_path: Path, kind: str, problem: str) -> None:
    """Past the cheap checks, the background load fails: the server stops, says why, exits 1."""
    if kind == "damaged-gguf":
        model = tmp_path / "damaged.gguf"
        model.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    else:
        model = tmp_path / "made-up"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "made-up-arch"}')
    result = serve_subprocess(
        tmp_path, "--model", str(model), "--model-cache-dir", str(tmp_path / "cache")
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()
    assert any(line.startswith("promptcache: model failed to load: ") for line in last)
    assert problem in result.stderr


def test_load_error_is_handed_to_the_callback() -> None:
    failures: list[str] = []

    def broken() -> Engine:
        raise OSError("no such model")

    async def main() -> None:
        service = Service(broken, ServerConfig(), on_load_error=failures.append)
        await service.start()
        for _ in range(500):
            if failures:
                break
            await asyncio.sleep(0.01)
        await service.stop()

    asyncio.run(main())
    assert failures == ["model failed to load: no such model"]
