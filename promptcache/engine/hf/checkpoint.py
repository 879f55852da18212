"""A checkpoint's weights as the lean model builders read them, without transformers' model
classes.

``from_hf`` reads a loaded transformers model by attribute (``model.model.layers[3].mlp.
gate_proj.weight``, a norm's ``eps``, ``model.config``). Importing a model class pulls in most of
transformers and ``torch.distributed`` (~3.8 s of a 2-core machine's ~9 s start for Gemma 3
270M), and ``from_pretrained`` builds modules only for the lean model to take their tensors.
``load_checkpoint`` reads the safetensors files of a directory saved in transformers' layout
(the embedded models' converted copies, most Hugging Face directories) into a tree with the
same attribute paths: each weight cast to the load dtype as ``from_pretrained(dtype=...)``
casts it, a tied head the embedding's own tensor, every norm's ``eps`` the config's. What the
tree lacks (other key names, an untied head not saved) fails the build, and the caller loads the
directory with transformers instead. The engine's own directories keep their configs resolved
(``load_configs``), so that with their saved tokenizer a later start imports no transformers at
all (serving Gemma 3 270M: ready in ~4.5 s instead of ~9).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from promptcache.engine.paged.models.gemma3 import GEMMA3_TYPES
from promptcache.engine.paged.models.llama import LLAMA_FAMILY

log = logging.getLogger(__name__)

TEXT_TYPES = tuple(t for t in GEMMA3_TYPES if t != "gemma3") + LLAMA_FAMILY
"""Model types whose checkpoints hold one text model under ``model.`` (Gemma 3's multimodal
``gemma3`` keeps its language model elsewhere and goes through transformers)."""


class Node:
    """One dotted prefix of a state dict: its children and tensors as attributes, its numbered
    children (``layers.0``, ``layers.1``, ...) in order when iterated."""

    def __init__(self) -> None:
        self._children: dict[str, Node] = {}

    def __getattr__(self, name: str) -> Any:
        children = self.__dict__.get("_children", {})
        if name in children:
            return children[name]
        raise AttributeError(name)

    def __iter__(self) -> Iterator[Node]:
        numbered = sorted((int(k), v) for k, v in self._children.items() if k.isdigit())
        return iter(v for _, v in numbered)

    def child(self, name: str) -> Node:
        return self._children.setdefault(name, Node())

    def put(self, name: str, value: Any) -> None:
        """An attribute read as a module's (a tensor, a norm's ``eps``)."""
        self.__dict__[name] = value

    def nodes(self) -> Iterator[Node]:
        yield self
        for c in self._children.values():
            yield from c.nodes()


class Checkpoint(Node):
    """The root: ``config``, ``generation_config`` (or None), the tensors under ``model.`` and
    ``lm_head.``; ``parameters()`` and ``to()`` as a module's, tied tensors counted and moved
    once."""

    def __init__(self, config: Any, generation_config: Any) -> None:
        super().__init__()
        self.config = config
        self.generation_config = generation_config

    def tensors(self) -> Iterator[tuple[Node, str, torch.Tensor]]:
        for node in self.nodes():
            for name, value in vars(node).items():
                if isinstance(value, torch.Tensor):
                    yield node, name, value

    def parameters(self) -> Iterator[torch.Tensor]:
        seen: set[int] = set()
        for _, _, tensor in self.tensors():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor

    def to(self, device: torch.device) -> Checkpoint:
        moved: dict[int, torch.Tensor] = {}
        for node, name, tensor in list(self.tensors()):
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(device)
            node.put(name, moved[id(tensor)])
        return self


RESOLVED_CONFIGS = "config.resolved.json"
"""Where ``load_configs(..., save=True)`` keeps a directory's configs as transformers resolved
them (every attribute, defaults included) with the transformers version that did."""


def load_configs(directory: Path, *, save: bool = False) -> tuple[Any, Any]:
    """``directory``'s model config and generation config (None without one), as the attributes
    the engine reads (``config.num_hidden_layers``, ``generation.eos_token_id``, ...).

    ``save`` (a directory of the engine's own): keep them resolved in ``RESOLVED_CONFIGS``, and
    read them from there on later starts without importing transformers (~1.3 s of a 2-core
    machine's ~9 s start, for two JSON files). The saved copy is used only when the installed
    transformers is the version that resolved it, for a text model of a family the engine
    builds with rope it computes itself; otherwise transformers reads the directory."""
    if save:
        saved = _saved_configs(directory)
        if saved is not None:
            return saved
    import_transformers()
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    generation = None
    if (directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(directory, local_files_only=True)
    if save:
        _save_configs(directory, config, generation)
    return config, generation


_IMPORT = threading.Lock()


def import_transformers() -> None:
    """Import transformers, one thread at a time: a start reads the tokenizer in a thread while
    it reads the configs, and two first imports of transformers' lazy package at once fail
    (``ImportError: cannot import name 'AutoTokenizer'``)."""
    with _IMPORT:
        import transformers  # noqa: F401


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _usable(config: dict[str, Any]) -> bool:
    """A resolved config the engine can read as plain attributes: a text model's, its rope
    (per layer type or one) all the default kind, which the engine computes without
    transformers."""
    rope = config.get("rope_parameters")
    if config.get("model_type") not in TEXT_TYPES or not isinstance(rope, dict):
        return False
    kinds = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    return all(k.get("rope_type", "default") == "default" for k in kinds)


def _saved_configs(directory: Path) -> tuple[Any, Any] | None:
    try:
        saved = json.loads((directory / RESOLVED_CONFIGS).read_text())
        config, generation = saved["config"], saved["generation"]
        if saved["transformers"] != _transformers_version() or not _usable(config):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, damaged, or another layout: transformers reads it anew
    return SimpleNamespace(**config), (
        None if generation is None else SimpleNamespace(**generation)
    )


def _save_configs(directory: Path, config: Any, generation: Any) -> None:
    resolved = {
        "transformers": _transformers_version(),
        "config": config.to_dict(),
        "generation": None if generation is None else generation.to_dict(),
    }
    if not _usable(resolved["config"]):
        return
    target = directory / RESOLVED_CONFIGS
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(resolved, indent=1, default=str))
        os.replace(tmp, target)
    except OSError as error:  # a read-only directory: transformers reads it at each start
        log.warning("could not keep the resolved configs in %s: %s", directory, error)
        tmp.unlink(missing_ok=True)


def _files(directory: Path) -> list[Path] | None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else None


def dtype_copy(directory: Path, dtype: torch.dtype) -> Path:
    """Where ``load_checkpoint(..., keep_copy=True)`` keeps ``directory``'s weights in
    ``dtype``."""
    return directory / f"model.{str(dtype).removeprefix('torch.')}.safetensors"


def load_checkpoint(
    directory: Path, dtype: torch.dtype, *, keep_copy: bool = False
) -> Checkpoint | None:
    """The tree of ``directory``'s weights in ``dtype``, or None where this does not read it
    (another model type, no safetensors, keys outside ``model.`` / ``lm_head.``, an untied head
    that is not saved).

    ``keep_copy`` (a directory of the engine's own, an embedded model's converted copy): keep the
    weights in ``dtype`` beside the float32 ones (``dtype_copy``), written by the first load in a
    dtype other than float32 and read by the later ones as they are. Casting Gemma 3 270M's
    1.07 GB of float32 to bfloat16 took ~3 s of a 2-core machine's start; the copy is the same
    bits (a cast is deterministic), half the bytes, and 0.54 GB more on disk. Its configs are
    kept resolved too (``load_configs``)."""
    config, generation = load_configs(directory, save=keep_copy)
    files = _files(directory)
    eps = getattr(config, "rms_norm_eps", None)
    if getattr(config, "model_type", None) not in TEXT_TYPES or files is None or eps is None:
        return None
    keep_copy = keep_copy and dtype != torch.float32
    copy = dtype_copy(directory, dtype)
    if keep_copy and copy.is_file():
        files, keep_copy = [copy], False
    root = Checkpoint(config, generation)
    cast: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in load_file(str(file)).items():
            *path, leaf = key.split(".")
            if path[0] not in ("model", "lm_head"):
                return None
            node: Node = root
            for part in path:
                node = node.child(part)
            cast[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            node.put(leaf, cast[key])
    if keep_copy:
        _save_atomically(cast, copy)
    if getattr(config, "tie_word_embeddings", False):
        try:
            embed = root.model.embed_tokens.weight
        except AttributeError:
            return None
        root.child("lm_head").put("weight", embed)
    elif "lm_head" not in root._children:
        return None
    for node in root.nodes():
        node.put("eps", float(eps))
    return root


def _save_atomically(tensors: dict[str, torch.Tensor], target: Path) -> None:
    """``tensors`` saved at ``target`` under a temporary name first: a concurrent start reads
    the whole file or none (and a full disk leaves no half file, only no copy)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, target)
    except Exception as error:  # safetensors raises its own errors too: a copy is optional
        log.warning("could not keep %s (%s): later starts cast the weights again", target, error)
        tmp.unlink(missing_ok=True)


__all__ = ["TEXT_TYPES", "Checkpoint", "Node", "dtype_copy", "load_checkpoint"]
