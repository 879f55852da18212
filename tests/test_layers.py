"""Import contracts of docs/architecture.md, checked on the source and in a clean interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import promptcache

ROOT = Path(promptcache.__file__).parent


def imports_of(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
    return found


def test_cache_and_core_need_no_torch_and_no_engine() -> None:
    for package in ("cache", "core"):
        names = imports_of(package)
        assert not {n for n in names if n.split(".")[0] in ("torch", "transformers")}
        assert not {n for n in names if n.startswith(("promptcache.engine", "promptcache.api"))}
        assert not {n for n in names if n.startswith("promptcache.service")}


def test_engine_never_imports_cache_or_api() -> None:
    names = imports_of("engine")
    assert not {n for n in names if n.startswith(("promptcache.cache", "promptcache.api"))}


def test_nothing_below_api_imports_api() -> None:
    for package in ("cache", "core", "engine"):
        assert not {n for n in imports_of(package) if n.startswith("promptcache.api")}


def test_cache_layer_imports_with_torch_blocked() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import promptcache, promptcache.cache.store, promptcache.cache.planner, "
        "promptcache.cache.policy, promptcache.cache.hashing, promptcache.core.layout, "
        "promptcache.service, promptcache.api.app, promptcache.engine.fake, "
        "promptcache.cache.remote\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_surface_is_sorted_and_importable() -> None:
    assert promptcache.__all__ == sorted(promptcache.__all__)
    for name in promptcache.__all__:
        assert hasattr(promptcache, name)
