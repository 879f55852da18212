from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from promptcache import cli


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
