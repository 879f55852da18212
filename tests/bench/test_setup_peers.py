"""``scripts/build-llama-server``, the build step of ``scripts/setup-peers``, on a stand-in sdist.

The real build compiles llama.cpp (minutes) and needs the sdist from the package index, so the
suite builds a one-file CMake project laid out as the llama-cpp-python sdist lays out its
vendored llama.cpp. CI (.ci/run) never builds the real peers.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-llama-server"

pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed"),
    pytest.mark.skipif(
        shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
    ),
]

CMAKE = """cmake_minimum_required(VERSION 3.14)
project(stand_in C)
add_executable(llama-server main.c)
add_executable(not-built main.c)
"""
MAIN = '#include <stdio.h>\nint main(void) { puts("stand-in llama-server"); return 0; }\n'


def sdist(tmp_path: Path, name: str = "llama_cpp_python-9.9.9", vendored: bool = True) -> Path:
    root = tmp_path / "tree" / name
    src = root / ("vendor/llama.cpp" if vendored else "src")
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(CMAKE)
    (src / "main.c").write_text(MAIN)
    (root / "pyproject.toml").write_text("[project]\nname = 'stand-in'\n")
    path = tmp_path / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname=name)
    return path


def build(archive: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), str(archive), str(dest)], capture_output=True, text=True, timeout=300
    )


def test_builds_llama_server_from_the_vendored_sources(tmp_path: Path) -> None:
    dest = tmp_path / "venv" / "bin" / "llama-server"
    done = build(sdist(tmp_path), dest)
    assert done.returncode == 0, done.stderr
    ran = subprocess.run([str(dest)], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "stand-in llama-server"
    assert (tmp_path / "venv/bin/llama-server.sdist").read_text().strip() == (
        "llama_cpp_python-9.9.9.tar.gz"
    )
    # Only the llama-server target is built, and the sources and objects are cleaned away.
    assert not (tmp_path / "venv/bin/llama-server.build").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["llama-server", "llama-server.sdist"]


def test_a_binary_from_the_same_sdist_is_kept(tmp_path: Path) -> None:
    archive, dest = sdist(tmp_path), tmp_path / "llama-server"
    assert build(archive, dest).returncode == 0
    before = dest.stat().st_mtime_ns
    again = build(archive, dest)
    assert again.returncode == 0 and "Build files" not in again.stdout  # cmake never ran
    assert dest.stat().st_mtime_ns == before


def test_an_sdist_without_vendored_llama_cpp_fails_clearly(tmp_path: Path) -> None:
    done = build(sdist(tmp_path, vendored=False), tmp_path / "llama-server")
    assert done.returncode != 0 and "vendor/llama.cpp" in done.stderr
    assert not (tmp_path / "llama-server").exists()


def test_usage() -> None:
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
