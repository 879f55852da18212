"""``promptcache`` command line: ``promptcache serve [--model ...] [--port ...] [--config F]``,
``promptcache bench WORKLOAD --target URL | --peers``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from promptcache import config as config_mod

_HELP = {
    "host": "address to bind (default 127.0.0.1)",
    "port": "port to listen on (default 8000)",
    "model": "embedded model name (gemma-3-270m: the default; smollm2-135m-instruct), "
    "or a local Hugging Face model directory or GGUF file",
    "served_model_name": "model id reported to clients (default: gemma-3-270m or the model name)",
    "aliases": "other model names clients may send, e.g. 'claude-sonnet-5=gemma-3-270m,...'; "
    "'nova-pro=gemma-3-270m@nova-pro' also gives the name a caching profile",
    "api_keys": "credentials and their tenants, 'key=tenant,...' (default: open server)",
    "aws_credentials": "SigV4 keys of Bedrock clients, 'ACCESS_KEY_ID:SECRET=tenant,...'",
    "admin_keys": "credentials allowed to call admin endpoints, 'key1,key2'",
    "max_body_size": "largest request body accepted, e.g. 32MiB (default; larger: 413)",
    "engine": "engine implementation: hf (default) or fake",
    "device": "cpu (default) or cuda",
    "dtype": "auto (default: bfloat16 on CUDA and bf16-capable CPUs, else float32), float32, "
    "bfloat16 or float16",
    "kv_reserve_memory": "KV pool memory for live requests on top of cache_memory (default 1GiB)",
    "max_batch_tokens": "tokens per engine step: decode tokens plus prefill chunks "
    "(default 256 on CPU, 2048 on CUDA)",
    "stream_time_share": "while a long prompt is read beside decoding streams, the share of the "
    "time given to steps of the streams alone (default auto: 0, none), e.g. 0.2",
    "prompt_products": "dense (default: prompts' keys and values as the model's PyTorch forward "
    "computes them) or int8: on AVX512-VNNI or AVX2 CPUs with int8 decode weights, prompts "
    "multiply in the decode steps' integers (hits ~15-18%% and cold prompts ~11-27%% sooner; "
    "other bits than dense)",
    "kv_block_tokens": "tokens per KV pool block (default 32)",
    "kv_dtype": "KV pool dtype: auto (default: float16 under a float32 model on a CPU, as "
    "llama.cpp stores it, else the model's), float32, bfloat16 or float16",
    "quantize": "auto (default: int8 decode weights on a CPU for models under 4 GiB), int8 or none",
    "compile": "auto (default: compile the decode-only steps of a CPU engine with int8 decode "
    "weights where a C++ compiler is found; eager until compiled, cached in model_cache_dir), "
    "on or off",
    "chat_format": "chat format: gemma, chatml or plain (default: detected)",
    "max_context_tokens": "context window (default: from the model config)",
    "max_output_tokens": "cap on every request's max_tokens (default: none; the context limits)",
    "model_cache_dir": "where converted models are kept (default ~/.cache/promptcache)",
    "cache_memory": "KV cache budget in the engine's memory (GPU, or RAM on CPU), e.g. 4GiB",
    "host_cache_memory": "RAM tier below the GPU for demoted entries, e.g. 16GiB (default none)",
    "disk_cache_dir": "directory of the disk tier; entries there survive restarts (default none)",
    "disk_cache_size": "disk tier budget, e.g. 100GiB (default 16GiB)",
    "disk_write_behind": "copy new entries to the disk tier in the background, so a crash "
    "keeps them (default true)",
    "redis_url": "redis://host:port/db: a cache tier shared by every replica, below the local "
    "ones (default none)",
    "redis_timeout_s": "seconds one Redis operation may take before the shared tier counts as "
    "down until a retry finds it back (default 0.5)",
    "min_cacheable_tokens": "minimum cacheable prefix in tokens (default 1024)",
    "max_cacheable_tokens": "maximum cacheable prefix in tokens (default: none)",
    "tool_cache_points": "allow breakpoints on tool definitions (default true)",
    "ttl_1h": "honour 1h TTLs; when false they act as 5m (default true)",
    "tenant_cache_share": "share of each cache tier a tenant may hold when others need room, "
    "with api keys configured (default 0.5)",
    "cache_profile": "caching limits of a hosted model: a built-in profile (claude-3-7-sonnet, "
    "claude-3-5-haiku, nova-micro, nova-lite, nova-pro, claude-sonnet-4-5, claude-haiku-4-5, ...), "
    "a [cache_profiles.NAME] of the config file, or auto (by each request's model name); "
    "default: the flags above",
    "cache_profiles": "custom caching profiles: TOML tables [cache_profiles.NAME] only",
    "prompts_dir": "directory of prompt templates, <id>.json or .yaml (default none)",
    "prices": "price sheet (TOML/JSON, as bench --prices) for the live savings in "
    "/v1/cache/stats (default: a Claude Sonnet-class sheet)",
    "openai_round_cached_tokens": "report OpenAI cached_tokens in 128s (default false: exact)",
    "log_level": "debug, info (default), warning or error",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path, help="TOML file with any of the options below")
    for name in config_mod.option_names():
        serve.add_argument(f"--{name.replace('_', '-')}", dest=name, help=_HELP.get(name))
    # Only argparse is imported here; the benchmark's modules load when it runs.
    from promptcache.bench import command as bench_command

    bench_command.add_parser(sub)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted: 0. A bad option or model path: 2, before binding the
    port. A model that fails to load in the background: the server stops, 1. Both print why
    on stderr, as ``vllm serve`` and ``llama-server`` do."""
    import uvicorn

    from promptcache.api.app import build_app
    from promptcache.engine.registry import engine_factory
    from promptcache.service import Service

    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        cfg = config_mod.load(cli, config_file=args.config)
        factory = engine_factory(cfg.engine, cfg.cache.capacity_bytes)
        if cfg.engine.kind == "hf":
            check_model_path(cfg.engine.model)
    except (config_mod.ConfigError, ValueError) as exc:
        print(f"promptcache: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def stop(reason: str) -> None:
        server.should_exit = True

    service = Service(factory, cfg, on_load_error=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(service), host=cfg.api.host, port=cfg.api.port, log_level=cfg.log_level
        )
    )
    server.run()
    if service.load_error is not None:
        print(f"promptcache: {service.load_error}", file=sys.stderr)
        return 1
    return 0


_GGUF_MAGIC = b"GGUF"


def check_model_path(model: str | None) -> None:
    """Raise ``ConfigError`` when ``--model`` cannot be a model: what is cheap to see before the
    port is bound (the path, a GGUF file's magic, a directory's config.json). Whatever else is
    wrong with it shows when the model loads."""
    from promptcache.engine.models import EMBEDDED

    if model is None or (model.strip().lower() in EMBEDDED and not Path(model).exists()):
        return  # an embedded model
    path = Path(model).expanduser()
    if not path.exists():
        raise config_mod.ConfigError(
            f"--model {model}: no such file or directory, and not an embedded model "
            f"({', '.join(EMBEDDED)})"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise config_mod.ConfigError(
                f"--model {model}: not a Hugging Face model directory (no config.json)"
            )
        return
    if path.suffix != ".gguf":
        raise config_mod.ConfigError(
            f"--model {model}: expected a .gguf file or a Hugging Face model directory"
        )
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise config_mod.ConfigError(f"--model {model}: cannot read it ({exc})") from exc
    if magic != _GGUF_MAGIC:
        raise config_mod.ConfigError(f"--model {model}: not a GGUF file (bad magic {magic!r})")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "bench":
        from promptcache.bench import command as bench_command

        return bench_command.run(args)
    return 2


__all__ = ["main"]
