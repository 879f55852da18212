"""``load_checkpoint``: the lean model built from a directory's tensors is the one built from
transformers' model class, every tensor the same bits, in every supported family and dtype,
and a start that reads a checkpoint this way imports no model class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from promptcache.engine.hf import checkpoint as checkpoint_module
from promptcache.engine.hf.checkpoint import (
    RESOLVED_CONFIGS,
    Checkpoint,
    dtype_copy,
    load_checkpoint,
    load_configs,
)
from promptcache.engine.paged.models import from_hf
from tests.engine.paged.tiny_models import KINDS, build


def saved(kind: str, root: Path) -> Path:
    path = root / kind
    if not path.exists():
        build(kind).save_pretrained(path)
    return path


def lean_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_the_lean_model_is_the_one_transformers_gives(
    kind: str, dtype: torch.dtype, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from transformers import AutoModelForCausalLM

    path = saved(kind, tmp_path_factory.getbasetemp() / "checkpoints")
    checkpoint = load_checkpoint(path, dtype)
    assert isinstance(checkpoint, Checkpoint)
    fast = from_hf(checkpoint, dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    slow = from_hf(hf, dtype)
    got, want = lean_tensors(fast), lean_tensors(slow)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    # A tied head stays one tensor with the embedding, as from transformers.
    tied = [n for n, t in want.items() if t.data_ptr() == want["embed"].data_ptr()]
    assert [n for n, t in got.items() if t.data_ptr() == got["embed"].data_ptr()] == tied
    assert sum(t.numel() for t in checkpoint.parameters()) == sum(
        p.numel() for p in hf.parameters()
    )


def test_what_it_does_not_read_is_left_to_transformers(tmp_path: Path) -> None:
    path = saved("llama", tmp_path)
    weights = load_file(str(path / "model.safetensors"))
    # Other key names than the model classes' (transformers renames or refuses them).
    save_file({f"transformer.{k}": v for k, v in weights.items()}, str(path / "model.safetensors"))
    assert load_checkpoint(path, torch.float32) is None
    # An untied head that was not saved.
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("lm_head")},
        str(path / "model.safetensors"),
    )
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(path, torch.float32) is None


def test_a_start_imports_no_model_class(tmp_path: Path) -> None:
    """The family's modeling module (with ``torch.distributed``: ~3.8 s of a start) stays
    unimported; the engine is whole (it generated in the loader tests)."""
    from tests.engine.test_loader import GEMMA_SPECIALS, save_tiny_model

    path = save_tiny_model(tmp_path / "tiny-gemma", "gemma3", GEMMA_SPECIALS)
    code = (
        "import sys; from pathlib import Path; from promptcache.engine.hf import loader; "
        f"engine = loader.load_engine({str(path)!r}, cache_dir=Path({str(tmp_path)!r}) / 'cache'); "
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') "
        "and '.modeling_' in m and not m.startswith('transformers.models.auto.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_tree_the_builders_cannot_read_is_loaded_by_transformers(tmp_path: Path) -> None:
    """Keys under ``model.`` that the model classes name otherwise (here a layer's MLP): the
    build from the tree fails, and the engine loads the directory through transformers, as
    it did before the tree existed."""
    from tests.engine.test_loader import save_tiny_model

    path = save_tiny_model(tmp_path / "tiny", "llama", [])
    weights = load_file(str(path / "model.safetensors"))
    renamed = {k.replace(".mlp.", ".feed_forward."): v for k, v in weights.items()}
    save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = load_checkpoint(path, torch.float32)
    assert checkpoint is not None
    with pytest.raises(AttributeError):
        from_hf(checkpoint, torch.float32)
    from promptcache.engine.hf import loader
    from promptcache.engine.paged.engine import PagedEngine

    engine = loader.load_engine(str(path), cache_dir=tmp_path / "cache", dtype="float32")
    assert isinstance(engine, PagedEngine)


def test_a_converted_copy_keeps_its_weights_in_the_load_dtype(tmp_path: Path) -> None:
    """The engine's own converted directories keep a copy in the load dtype: the first bfloat16
    load writes it, the later ones read it (the same tensors), float32 loads need none, and a
    user's directory is never written to."""
    path = saved("gemma3", tmp_path)
    first = load_checkpoint(path, torch.bfloat16, keep_copy=True)
    copy = dtype_copy(path, torch.bfloat16)
    assert first is not None and copy.is_file()
    second = load_checkpoint(path, torch.bfloat16, keep_copy=True)
    assert second is not None
    pairs = list(zip(first.tensors(), second.tensors(), strict=True))
    for (_, name, a), (_, other, b) in pairs:
        assert name == other and a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    # Read from the copy: what it holds is what loads.
    tensors = load_file(str(copy))
    key = next(k for k in tensors if k.endswith("input_layernorm.weight"))
    tensors[key] = torch.full_like(tensors[key], 3.0)
    save_file(tensors, str(copy))
    third = load_checkpoint(path, torch.bfloat16, keep_copy=True)
    assert third is not None
    node: Any = third
    for part in key.split("."):
        node = getattr(node, part)
    assert torch.equal(node, torch.full_like(node, 3.0))
    load_checkpoint(path, torch.float32, keep_copy=True)
    assert not dtype_copy(path, torch.float32).exists()
    user = saved("llama", tmp_path)
    assert load_checkpoint(user, torch.bfloat16) is not None
    assert not dtype_copy(user, torch.bfloat16).exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_converted_copy_reads_its_configs_without_transformers(kind: str, tmp_path: Path) -> None:
    """The engine's own directories keep their configs as transformers resolved them; a later
    load reads that file instead, and builds the same lean model (every tensor, every layer's
    attention: scale and window). Rope that transformers computes (Llama 3's) keeps reading
    through transformers."""
    path = saved(kind, tmp_path)
    config, generation = load_configs(path, save=True)
    want = from_hf(load_checkpoint(path, torch.float32), torch.float32)
    resolved = path / RESOLVED_CONFIGS
    rope = config.rope_parameters
    kinds = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    if any(k.get("rope_type", "default") != "default" for k in kinds):
        assert not resolved.exists()
        return
    assert resolved.is_file()
    again, generation_again = load_configs(path, save=True)
    assert type(again).__module__ == "types"  # not transformers' config class
    # Every attribute, as JSON keeps it (id2label's keys become strings; the engine reads none).
    for key, value in json.loads(json.dumps(config.to_dict(), default=str)).items():
        assert getattr(again, key) == value, key
    assert getattr(generation_again, "eos_token_id", None) == getattr(
        generation, "eos_token_id", None
    )
    checkpoint = load_checkpoint(path, torch.float32, keep_copy=True)
    assert checkpoint is not None and checkpoint.config.__class__ is again.__class__
    got = from_hf(checkpoint, torch.float32)
    assert got.attn_specs == want.attn_specs
    a, b = lean_tensors(got), lean_tensors(want)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # A user's directory is never written to.
    user = saved(kind, tmp_path / "user")
    load_configs(user)
    assert not (user / RESOLVED_CONFIGS).exists()


def test_resolved_configs_from_another_transformers_or_damaged_are_read_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved("gemma3", tmp_path)
    load_configs(path, save=True)
    resolved = path / RESOLVED_CONFIGS
    monkeypatch.setattr(checkpoint_module, "_transformers_version", lambda: "0.0.1")
    config, _ = load_configs(path, save=True)
    assert type(config).__module__ != "types"
    assert json.loads(resolved.read_text())["transformers"] == "0.0.1"  # rewritten
    monkeypatch.undo()
    for damage in ("{", "[]", '{"config": {}}'):
        resolved.write_text(damage)
        config, _ = load_configs(path, save=True)
        assert type(config).__module__ != "types"
        assert type(load_configs(path, save=True)[0]).__module__ == "types"


def test_a_second_start_of_a_converted_copy_imports_no_transformers(tmp_path: Path) -> None:
    """transformers' import (~1.3 s, and what it pulls in of torch) is left out of a start
    whose configs and tokenizer the engine kept: the engine is whole (it generates)."""
    from tests.engine.test_loader import GEMMA_SPECIALS, save_tiny_model

    cache = tmp_path / "cache"
    path = save_tiny_model(cache / "converted" / "tiny", "gemma3", GEMMA_SPECIALS)
    code = (
        "import sys; from pathlib import Path; from promptcache.engine.hf import loader; "
        "from promptcache.core.request import Sampling; "
        "from promptcache.engine.base import EngineRequest; "
        f"engine = loader.load_engine({str(path)!r}, cache_dir=Path({str(cache)!r})); "
        "seq = engine.add(EngineRequest([5, 6, 7], Sampling(max_tokens=3, temperature=0.0))); "
        "[engine.step() for _ in range(8)]; "
        "print(any(m == 'transformers' or m.startswith('transformers.') for m in sys.modules))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert [r.stdout.strip() for r in runs] == ["True", "False"]
