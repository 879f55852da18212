"""Load a ``PagedEngine`` from an embedded model, a GGUF file or a transformers directory.

``find_model`` turns ``--model`` into loadable files; ``load_engine`` builds the engine on them.
GGUF files (the embedded models' included) are dequantized by transformers, which
takes about a minute on a small CPU. That happens once: the result is saved as safetensors under
``<cache_dir>/converted/<gguf sha256[:16]>/`` and later starts load that copy in seconds. The
copy is written to a temporary directory and renamed into place, so an interrupted conversion is
never loaded. Nothing here touches the network (``local_files_only`` everywhere).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from promptcache.core.chatformat import CHATML, FORMATS, GEMMA, ChatFormat
from promptcache.engine.device import resolve_device
from promptcache.engine.hf.checkpoint import Checkpoint, import_transformers, load_checkpoint
from promptcache.engine.hf.tokenizer import BackendTokenizer, HFTokenizer
from promptcache.engine.models import DEFAULT, EmbeddedModel, resolve_model
from promptcache.engine.paged import native
from promptcache.engine.paged.codes import attach as attach_codes
from promptcache.engine.paged.compiled import compiler_available, use_cache_dir
from promptcache.engine.paged.engine import (
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    KV_FORMAT,
    PagedEngine,
    check_kv_dtype,
)
from promptcache.engine.paged.models import from_hf
from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.int8 import add_decode_int8, kernel_dtype
from promptcache.engine.paged.models.packed import pack_linears, packing_available
from promptcache.engine.paged.models.panels import panel_linears, panels_available
from promptcache.engine.paged.native_decode import codes_products

log = logging.getLogger("promptcache.engine")

DEFAULT_MODEL_ID = DEFAULT.name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MARKER = "promptcache-source.json"
_REVISION_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model")


class ModelFiles(NamedTuple):
    """A model ready for ``from_pretrained``: its directory, a digest of its source, its id.

    ``source`` (a GGUF's sha256 or a directory fingerprint) goes into the KV revision.
    """

    directory: Path
    source: str
    model_id: str


def find_model(model: str | None, cache_dir: Path) -> ModelFiles:
    """Resolve ``--model`` (see ``engine.models``) to loadable files, converting a GGUF once.

    Other engines reuse this: it only finds and converts, it builds nothing.
    """
    choice = resolve_model(model)
    if isinstance(choice, EmbeddedModel):
        return ModelFiles(ensure_embedded_converted(choice, cache_dir), choice.sha256, choice.name)
    if choice.suffix == ".gguf" and choice.is_file():
        directory, sha = ensure_converted(choice, cache_dir)
        return ModelFiles(directory, sha, choice.stem)
    return ModelFiles(choice, directory_fingerprint(choice), choice.resolve().name)


def gguf_finder(model: str | None, cache_dir: Path) -> Callable[[], Path] | None:
    """What finds the GGUF file ``--model`` was converted from (None: not from one). It may
    assemble an embedded model's file, so it is called only when that file is needed."""
    choice = resolve_model(model)
    if isinstance(choice, EmbeddedModel):
        return functools.partial(choice.gguf, cache_dir)
    if choice.suffix == ".gguf" and choice.is_file():
        return functools.partial(Path, choice)
    return None


def load_engine(
    model: str | None,
    *,
    cache_dir: Path,
    device: str = "cpu",
    dtype: str = "auto",
    chat_format: str | None = None,
    max_context_tokens: int | None = None,
    kv_pool_bytes: int = 2 << 30,
    max_batch_tokens: int | None = None,
    stream_time_share: float | None = None,
    prompt_products: str = "dense",
    kv_block_tokens: int = DEFAULT_BLOCK_TOKENS,
    kv_dtype: str = "auto",
    quantize: str | None = None,
    compile_mode: str = "off",
) -> PagedEngine:
    """Load ``model``: ``None`` (the embedded default), an embedded model's name (see
    ``engine.models``), a ``.gguf`` file or an HF model directory, into a ``PagedEngine`` with a
    KV pool of ``kv_pool_bytes``.

    ``dtype`` is ``auto`` (bfloat16 on CUDA and on CPUs with bf16 instructions, float32
    elsewhere) or a name in ``DTYPES``. ``chat_format`` names one of ``core.chatformat.FORMATS``;
    by default it is detected. ``max_context_tokens`` defaults to the config's
    ``max_position_embeddings``. ``quantize`` is ``auto``, ``int8`` or ``none``: int8 copies of
    the projections for narrow decode steps (``resolve_quantize``). ``compile_mode`` is ``auto``,
    ``on`` or ``off``: compile the decode-only steps (``resolve_compile``), in the background.
    ``stream_time_share``: see ``PagedEngine``; None: none (docs/architecture.md: why).
    ``prompt_products``: ``dense`` or ``int8`` (``PagedEngine``'s ``integer_prompts``: with
    int8 decode weights on a CPU whose kernels multiply int8 rows; elsewhere it changes
    nothing).
    ``kv_dtype``: the KV pool's, ``auto`` (float16 under a float32 model on a CPU, else the
    model's) or a name (``resolve_kv_dtype``).
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    kv_name = resolve_kv_dtype(kv_dtype, dtype, dev)
    if quantize not in (None, "auto", "none", "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; choose auto, int8 or none")
    if prompt_products not in ("dense", "int8"):
        raise ValueError(f"unknown prompt products {prompt_products!r}; choose dense or int8")
    if chat_format is not None and chat_format not in FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; choose one of {sorted(FORMATS)}")
    model_dir, source, model_id = find_model(model, Path(cache_dir))

    started = time.monotonic()
    # The converted copies are the engine's own: they keep their weights in the load dtype, and
    # their tokenizer as its Rust backend (BackendTokenizer.save), read without transformers.
    ours = model_dir.parent == Path(cache_dir) / "converted"
    # The tokenizer (a 33 MB tokenizer.json for Gemma) loads in a thread while the weights load.
    with ThreadPoolExecutor(1) as pool:
        tok_future = pool.submit(load_tokenizer, model_dir, save=ours)
        hf_model: Any = load_checkpoint(model_dir, DTYPES[dtype], keep_copy=ours)
        if hf_model is None:
            hf_model = _from_pretrained(model_dir, dtype)
        tokenizer = tok_future.result()
    log.info("loaded %s from %s in %.1f s", model_id, model_dir, time.monotonic() - started)
    fmt = FORMATS[chat_format] if chat_format else detect_chat_format(hf_model.config, tokenizer)
    quant = resolve_quantize(quantize, dev, hf_model)
    packed = packing_available(dev, DTYPES[dtype])
    # Built now (a second, once per machine) rather than in the first request; the kernels
    # round like PyTorch but add in another order, so KV computed with them is another
    # revision (a disk-tier entry from a process without them would not reproduce cold runs),
    # and so is KV whose prompt attention ran in the bfloat16 prefill kernel (AVX512-BF16).
    native.use_directory(Path(cache_dir) / "native")
    kernels = native.kernels() if dev.type == "cpu" else None
    tag = "" if kernels is None else "native" + "+prefill" * (kernels.prefill is not None)
    # Float32 prompts on the engine's own kernels (its product, ``models.panels``, and its
    # prompt attention) sum in another order than MKL's matmuls.
    panels = panels_available(dev, DTYPES[dtype])
    tag += "+panels" * panels
    # A pool of another dtype than the model's stores other bits (an entry's revision says it).
    tag += f"+kv-{kv_name}" * (kv_name != dtype)
    stops = stop_token_ids(fmt, tokenizer, hf_model)
    context = max_context_tokens or int(hf_model.config.max_position_embeddings)
    hf_model = hf_model.to(dev)
    try:
        lean = from_hf(hf_model, DTYPES[dtype])
    except AttributeError:
        if not isinstance(hf_model, Checkpoint):
            raise
        # Saved under other names than the model classes use: transformers maps them.
        lean = from_hf(_from_pretrained(model_dir, dtype).to(dev), DTYPES[dtype])
    del hf_model  # the lean model shares or copied its weights
    head_cache = Path(cache_dir) / "int4"
    switch = add_decode_int8(lean, head_cache=head_cache) if quant == "int8" else None
    # Decode steps read the GGUF file's own 4/5-bit codes where the engine's kernels do
    # (AVX512-VNNI, bfloat16 or float32 rows): fewer bytes a step than the int8 copies.
    coded = 0
    gguf = gguf_finder(model, Path(cache_dir))
    readable = kernels is not None and codes_products(kernels.library)
    if switch is not None and gguf is not None and readable:
        coded = attach_codes(lean, gguf, source, Path(cache_dir) / "codes")
    # Its decode tokens' keys and values are another revision's (see the kernels' above), and
    # so are those of float32 rows PyTorch's int8 kernel multiplies as bfloat16.
    tag += "+codes" * (coded > 0)
    tag += "+int8-rows-bf16" * (switch is not None and kernel_dtype(DTYPES[dtype]) != DTYPES[dtype])
    parts = (KV_FORMAT, source, fmt.name, dtype, dev.type, quant, "packed" * packed, tag)
    revision = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
    if packed:  # after the int8 copies, which are made from the plain weights
        pack_linears(lean)
    if panels:
        panel_linears(lean)
    compiled = resolve_compile(compile_mode, lean, switch is not None, native=kernels is not None)
    if compiled:
        use_cache_dir(Path(cache_dir))
    log.info(
        "engine: %s on %s, %s, KV %s, int8 decode weights: %s (%d projections from the "
        "file's codes), CPU kernels: %s, compiled decode: %s",
        model_id,
        dev,
        dtype,
        kv_name,
        quant,
        coded,
        "yes" if kernels else "no",
        "yes (compiling in the background)" if compiled else "no",
    )
    return PagedEngine(
        lean,
        tokenizer,
        fmt,
        model_id=model_id,
        revision=revision,
        max_context_tokens=context,
        stop_token_ids=stops,
        pool_bytes=kv_pool_bytes,
        kv_dtype=DTYPES[kv_name],
        block_tokens=kv_block_tokens,
        max_batch_tokens=max_batch_tokens or default_batch_tokens(dev),
        prompt_tokens_beside_streams=beside_streams(dev, max_batch_tokens),
        stream_time_share=stream_time_share or 0.0,
        integer_prompts=prompt_products == "int8" and switch is not None,
        decode_switch=switch,
        compile_decode=compiled,
    )


def _from_pretrained(model_dir: Path, dtype: str) -> Any:
    """The directory loaded by transformers' model class (what ``load_checkpoint`` does not
    read)."""
    import_transformers()
    from transformers import AutoModelForCausalLM

    with _quiet_transformers_bars():
        return AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=DTYPES[dtype], attn_implementation="sdpa"
        )


AUTO_INT8_MAX_BYTES = 4 << 30
"""``quantize=auto`` adds int8 decode weights on a CPU to models whose weights are smaller."""


def resolve_quantize(quantize: str | None, device: torch.device, model: Any) -> str:
    """``int8`` or ``none``. ``auto`` (the default): int8 decode weights on a CPU for models
    under ``AUTO_INT8_MAX_BYTES`` (a single stream decodes about 1.6x faster on Gemma 3 270M;
    the copy costs half the dense weights' memory), none on CUDA (int8 there would dequantize
    per call) or for larger models."""
    if quantize in ("int8", "none"):
        return quantize
    if quantize not in (None, "auto"):
        raise ValueError(f"unknown quantization {quantize!r}; choose auto, int8 or none")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return "int8" if device.type == "cpu" and size < AUTO_INT8_MAX_BYTES else "none"


AUTO_COMPILE_MIN_CORES = 4
"""``--compile auto`` compiles only on machines with at least this many cores: compiling takes
~25 s of CPU after each start (from Inductor's cache), and on 2 cores a request that meets it
ran 2-3x slower (a 2.4 s prefill took 6.7 s in ``bench qa``) even with the compile thread at
the lowest priority and only while idle (``CompiledDecode.start``)."""


def resolve_compile(mode: str, model: CausalLM, int8: bool, *, native: bool = False) -> bool:
    """Whether to compile the decode steps (``paged.compiled``): on a CPU, with int8 decode
    weights; ``auto`` also wants a C++ compiler (Inductor builds C++), a model without
    attention softcapping, ``AUTO_COMPILE_MIN_CORES`` and no ``native`` kernels (the engine's
    own, which decode narrow steps faster); ``on`` insists on the rest and fails loudly where
    it cannot."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"unknown compile mode {mode!r}; choose auto, on or off")
    if mode == "off":
        return False
    reasons = []
    if next(model.parameters()).device.type != "cpu":
        reasons.append("not on a CPU (the CUDA path is eager for now)")
    if not int8:
        reasons.append("no int8 decode weights (--quantize)")
    if not compiler_available():
        reasons.append("no C++ compiler (g++) on the PATH")
    if any(spec.softcap is not None for spec in model.attn_specs):
        reasons.append("the model softcaps attention logits")
    if mode == "auto" and (os.cpu_count() or 1) < AUTO_COMPILE_MIN_CORES:
        reasons.append(f"fewer than {AUTO_COMPILE_MIN_CORES} cores (use --compile on)")
    if mode == "auto" and native:
        # They run every decode step of up to native_decode.MAX_ROWS rows, faster than the
        # compiled graphs (10 vs 18 ms a step of Gemma 3 270M on 2 cores).
        reasons.append("the engine's own CPU kernels decode (use --compile on for wide batches)")
    if reasons and mode == "on":
        raise ValueError("cannot compile the decode step: " + "; ".join(reasons))
    return not reasons


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 on CUDA and on CPUs with bf16 instructions, else float32."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" or cpu_has_bf16() else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return dtype


def resolve_kv_dtype(kv_dtype: str, dtype: str, device: torch.device) -> str:
    """The KV pool's dtype name for a ``dtype`` model on ``device``: ``auto`` is float16 under
    a float32 model on a CPU (llama.cpp's cache type there: on Gemma 3 270M and SmolLM2 the
    same log-loss over this repository's docs to 2e-3, mean KL 2-4e-4, and ~10-20% faster
    decoding after 4k tokens, docs/benchmarks.md), else the model's own (as vLLM's
    ``--kv-cache-dtype auto``); a name must be one ``check_kv_dtype`` accepts."""
    if kv_dtype == "auto":
        return "float16" if dtype == "float32" and device.type == "cpu" else dtype
    if kv_dtype not in DTYPES:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; choose auto or one of {sorted(DTYPES)}")
    check_kv_dtype(DTYPES[dtype], DTYPES[kv_dtype])
    return kv_dtype


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without them bf16 is
    emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


STREAM_STEP_TOKENS = 256
"""On a CPU, the most prompt tokens of a step that also decodes streams: a 512-token chunk of
Gemma 3 270M took ~0.75 s on 2 Zen 3 cores (float32), so a stream beside a long prompt got
~1.4 tok/s; with 256, ~2.6 tok/s for a prompt read within ~0-5% of its time (128: ~4.5 tok/s,
but the prompt 10-25% later)."""


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per engine step: a CPU saturates with a few hundred (``DEFAULT_MAX_BATCH_TOKENS``,
    256: a prompt is read as fast in 256-token steps as in 512-token ones, and whatever arrives
    meanwhile, a hit's suffix, waits for half as long a step), a GPU wants more."""
    return 2048 if device.type == "cuda" else DEFAULT_MAX_BATCH_TOKENS


def beside_streams(device: torch.device, max_batch_tokens: int | None) -> int | None:
    """The most prompt tokens of a step that also decodes streams: on a CPU at most
    ``STREAM_STEP_TOKENS`` (the whole of a default step); on a GPU the whole step (None)."""
    if device.type == "cuda":
        return None
    return min(max_batch_tokens or default_batch_tokens(device), STREAM_STEP_TOKENS)


def load_tokenizer(directory: Path, *, save: bool = False) -> BackendTokenizer | HFTokenizer:
    """``directory``'s tokenizer: its Rust backend where transformers builds it on one (saved in
    ``directory`` when ``save``, and read from there by the next start), else transformers'."""
    if save and (saved := BackendTokenizer.load(directory)) is not None:
        return saved
    import_transformers()
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    backend = BackendTokenizer.from_transformers(hf_tok)
    if backend is None:
        return HFTokenizer(hf_tok)
    if save:
        try:
            backend.save(directory)
        except OSError as error:  # a read-only cache still serves, it starts slower
            log.warning("could not save the tokenizer in %s: %s", directory, error)
    return backend


def detect_chat_format(config: Any, tokenizer: BackendTokenizer | HFTokenizer) -> ChatFormat:
    """GEMMA for ``gemma*`` model types, CHATML if the vocabulary has ``<|im_start|>``, or PLAIN."""
    if str(getattr(config, "model_type", "")).startswith("gemma"):
        return GEMMA
    if tokenizer.token_id("<|im_start|>") is not None:
        return CHATML
    return FORMATS["plain"]


def stop_token_ids(
    fmt: ChatFormat, tokenizer: BackendTokenizer | HFTokenizer, model: Any
) -> frozenset[int]:
    """The format's end-of-turn token (if the vocabulary has it) plus every EOS id known."""
    ids: set[int] = set()
    end_of_turn = {GEMMA.name: "<end_of_turn>", CHATML.name: "<|im_end|>"}.get(fmt.name)
    if end_of_turn is not None and (tid := tokenizer.token_id(end_of_turn)) is not None:
        ids.add(tid)
    sources = (
        tokenizer.eos_token_id,
        getattr(model.config, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    )
    for eos in sources:
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(i) for i in eos)
    return frozenset(ids)


def directory_fingerprint(path: Path) -> str:
    """Digest of config.json plus names, sizes and mtimes of weights and tokenizer files."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.iterdir()):
        if file.suffix in (".safetensors", ".bin") or file.name in _REVISION_FILES:
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def ensure_embedded_converted(model: EmbeddedModel, cache_dir: Path) -> Path:
    """The converted directory of an embedded model, converting its GGUF once.

    Keyed by the pinned sha256, so a converted start neither locates nor hashes the GGUF.
    """
    target = cache_dir / "converted" / model.sha256[:16]
    if not _is_converted(target):
        gguf = model.gguf(cache_dir)
        log.info("embedded model %s: GGUF at %s", model.name, gguf)
        if file_sha256(gguf, cache_dir) != model.sha256:
            raise ValueError(
                f"{gguf}: sha256 differs from the pinned one of {model.name}; "
                f"install the {model.distribution} version this promptcache expects"
            )
        _convert(gguf, model.sha256, target)
    return target


def ensure_default_converted(cache_dir: Path) -> tuple[Path, str]:
    """The converted directory of the embedded default (Gemma 3 270M) and its sha256."""
    return ensure_embedded_converted(DEFAULT, cache_dir), DEFAULT.sha256


def ensure_converted(gguf: Path, cache_dir: Path) -> tuple[Path, str]:
    """The converted directory of ``gguf`` (keyed by its sha256), converting once."""
    sha = file_sha256(gguf, cache_dir)
    target = cache_dir / "converted" / sha[:16]
    if not _is_converted(target):
        _convert(gguf, sha, target)
    return target, sha


def file_sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) so large GGUFs hash once."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = cache_dir / "sha256.json"
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(memo.read_text())
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    known[key] = digest.hexdigest()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(memo, json.dumps(known, indent=1))
    return known[key]


def _is_converted(target: Path) -> bool:
    return (target / MARKER).is_file()


def _convert(gguf: Path, sha: str, target: Path) -> None:
    """Dequantize ``gguf`` and save it (safetensors + tokenizer) at ``target``, atomically."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    log.info("converting %s once into %s (about a minute on a small CPU)", gguf, target)
    steps = tqdm(total=3, desc="converting GGUF", file=sys.stderr, disable=not sys.stderr.isatty())
    try:
        _convert_steps(gguf, sha, tmp, target, steps)
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("conversion done in %.0f s", time.monotonic() - started)


def _convert_steps(gguf: Path, sha: str, tmp: Path, target: Path, steps: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers_bars():
        steps.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        steps.update()
        log.info("GGUF tokenizer read; dequantizing weights")
        steps.set_postfix_str("weights")
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
        )
        steps.update()
        log.info("weights dequantized; writing safetensors")
        steps.set_postfix_str("saving")
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not
        # serializable"), yet its weights are already plain float32 tensors: drop the marker.
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        marker = {"gguf": gguf.name, "gguf_sha256": sha}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        steps.update()
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_converted(target):  # not a concurrent conversion that won the race
            raise


def _remove_stale_tmp(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary directories that killed conversions left behind (each ~1 GB)."""
    for old in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """Hide transformers' own progress bars when stderr is not a terminal (logs, services)."""
    from transformers.utils import logging

    hf_logging: Any = logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


__all__ = [
    "DEFAULT_MODEL_ID",
    "DTYPES",
    "ModelFiles",
    "detect_chat_format",
    "directory_fingerprint",
    "ensure_converted",
    "ensure_default_converted",
    "ensure_embedded_converted",
    "find_model",
    "load_engine",
    "resolve_dtype",
    "stop_token_ids",
]
