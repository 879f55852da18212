"""Server configuration: frozen value objects built once from CLI flags, ``PROMPTCACHE_*``
environment variables and a TOML file (in that order of precedence), then passed down.

TOML keys are the flag names with underscores, at the top level or in ``[server]``; the tables
``[api_keys]`` (key = tenant) and ``[aliases]`` (name = served model, or "served@profile" to give
the name a caching profile) map credentials and names, ``[aws_credentials]`` (access key id =
"secret=tenant") holds Bedrock clients' SigV4 keys and ``[cache_profiles.NAME]`` defines caching
profiles (``cache/profiles.py``)::

    port = 8000
    model = "/models/my-model"
    cache_memory = "4GiB"
    [api_keys]
    sk-team-a-1 = "team-a"
    [aliases]
    claude-sonnet-5 = "gemma-3-270m"
    nova-pro = "gemma-3-270m@nova-pro"
    [cache_profiles.tight]
    base = "claude-3-5-haiku"
    max_breakpoints = 2
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from promptcache.cache.policy import ModelCachePolicy
from promptcache.cache.profiles import CacheProfile, ProfileError, ProfileTable, custom_profiles
from promptcache.errors import PromptCacheError

DEFAULT_MODEL_NAME = "gemma-3-270m"


class ConfigError(PromptCacheError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Which model runs where. ``model=None`` is the embedded default (Gemma 3 270M)."""

    kind: str = "hf"
    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    chat_format: str | None = None
    max_context_tokens: int | None = None
    max_output_tokens: int | None = None
    kv_reserve_bytes: int = 1 << 30
    """KV pool memory for live sequences, on top of the cache budget (``cache_memory``)."""
    max_batch_tokens: int | None = None
    """Tokens per engine step (decode tokens plus prefill chunks); None: by device."""
    stream_time_share: float | None = None
    """Share of the time decoding streams get steps of their own while a long prompt is read
    beside them; None: the engine's default (none)."""
    prompt_products: str = "dense"
    """Prompt chunks' products: ``dense`` (the model's weights) or ``int8`` (the int8 decode
    copies, in integers, where the CPU's kernels have them: ``PagedEngine``'s
    ``integer_prompts``)."""
    kv_block_tokens: int = 32
    kv_dtype: str = "auto"
    """The KV pool's dtype: ``auto`` (float16 under a float32 model on a CPU, else the
    model's) or a name; float16 holds twice a float32 pool's cached tokens a byte
    (``engine.hf.loader.resolve_kv_dtype``)."""
    quantize: str | None = None
    compile: str = "auto"
    """Compile the decode-only steps: ``auto`` (a CPU engine with int8 decode weights and a C++
    compiler), ``on`` or ``off``."""
    model_cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "promptcache")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The prefix store's tiers and the served model's caching limits (spec §1.8, §1.13).

    ``capacity_bytes`` is the budget in the engine's memory (GPU memory on CUDA, RAM on CPU);
    ``host_capacity_bytes`` adds a RAM tier below the GPU (CUDA only, 0 = none); with
    ``disk_dir`` set, entries are demoted to files there and survive a restart (and, with
    ``disk_write_behind``, a crash: each new entry is copied there soon after it is made).
    ``tenant_cache_share`` is the share of each tier a tenant may hold when others need room;
    it applies only when credentials are configured (an open server has one tenant).
    """

    capacity_bytes: int = 4 << 30
    host_capacity_bytes: int = 0
    disk_dir: Path | None = None
    disk_capacity_bytes: int = 16 << 30
    disk_write_behind: bool = True
    """Copy new memory entries to the disk tier in the background, so a crash keeps them."""
    redis_url: str | None = None
    """``redis://host:port/db``: the shared tier below the local ones, one cache for every
    replica of the model (``cache/remote/``); None: no shared tier."""
    redis_timeout_s: float = 0.5
    """How long one Redis operation may take (plus the transfer time of its bytes) before the
    shared tier counts as down and is skipped until a retry finds it back."""
    min_cacheable_tokens: int = 1024
    max_cacheable_tokens: int | None = None
    tool_cache_points: bool = True
    ttl_1h: bool = True
    inflight_wait_timeout_s: float = 60.0
    tenant_cache_share: float = 0.5
    profile: str | None = None
    """``--cache-profile``: a built-in or custom profile, or ``auto``; None: the flags above."""
    profiles: Mapping[str, CacheProfile] = field(default_factory=dict)
    """Custom profiles, ``[cache_profiles.NAME]``."""
    prices_file: Path | None = None
    """The price sheet live savings are counted on (``promptcache bench --prices`` format)."""


@dataclass(frozen=True, slots=True)
class AwsCredential:
    """A SigV4 secret access key and the tenant of its access key id (spec §5.1)."""

    secret_access_key: str = field(repr=False)
    tenant: str


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The HTTP edge: address, model names, credentials."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    alias_profiles: Mapping[str, str] = field(default_factory=dict)
    """Alias -> caching profile name, from ``name=served@profile`` entries of the alias table."""
    prompts_dir: Path | None = None
    """``--prompts-dir``: prompt templates (``promptcache/templates.py``)."""
    api_keys: Mapping[str, str] = field(default_factory=dict)
    aws_credentials: Mapping[str, AwsCredential] = field(default_factory=dict)
    admin_keys: frozenset[str] = frozenset()
    max_body_bytes: int = 32 << 20
    openai_round_cached_tokens: bool = False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``promptcache serve`` needs."""

    api: ApiConfig = field(default_factory=ApiConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log_level: str = "info"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_bytes(value: str | int) -> int:
    """``"4GiB"`` -> 4294967296; ``"512MB"`` -> 512000000; plain integers are bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ConfigError(f"not a size: {value!r} (use e.g. 512MiB or 4GiB)")
    unit = (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    scale = base ** "bkmgt".index(unit[0]) if unit and unit[0] != "b" else 1
    return int(float(match.group(1)) * scale)


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def _pairs(value: str | Mapping[str, str]) -> dict[str, str]:
    """``"a=x,b=y"`` (or ``a:x``) or a TOML table -> dict."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    result: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        key, sep, val = item.replace(":", "=", 1).partition("=")
        if not sep:
            raise ConfigError(f"expected name=value, got {item!r}")
        result[key.strip()] = val.strip()
    return result


def _aliases(value: str | Mapping[str, Any]) -> dict[str, str]:
    """``_pairs``, where a TOML value may also be ``{model = "...", cache_profile = "..."}``
    (kept as ``served@profile`` until ``load`` splits it)."""
    if isinstance(value, Mapping):
        value = {
            str(k): f"{v.get('model', '')}@{v.get('cache_profile', '')}".rstrip("@")
            if isinstance(v, Mapping)
            else str(v)
            for k, v in value.items()
        }
    return _pairs(value)


def _split_aliases(api: dict[str, Any]) -> None:
    """``served@profile`` alias values -> ``aliases`` and ``alias_profiles``."""
    aliases: dict[str, str] = {}
    profiles: dict[str, str] = {}
    for name, target in api.get("aliases", {}).items():
        served, _, profile = target.partition("@")
        aliases[name] = served
        if profile:
            profiles[name] = profile
    if "aliases" in api:
        api["aliases"] = aliases
        api["alias_profiles"] = profiles


def _profiles(value: Mapping[str, Any]) -> dict[str, CacheProfile]:
    if not isinstance(value, Mapping):
        raise ValueError("cache_profiles must be a TOML table of tables")
    try:
        return custom_profiles(value)
    except ProfileError as exc:
        raise ValueError(str(exc)) from None


def _aws_credentials(value: str | Mapping[str, str]) -> dict[str, AwsCredential]:
    """``"AKID:SECRET=tenant,..."`` or a TOML table ``AKID = "SECRET=tenant"`` -> credentials.

    Errors never quote the value: it holds secrets.
    """
    if isinstance(value, str):
        items = [item.strip().partition(":") for item in value.split(",") if item.strip()]
        if any(not sep for _, sep, _ in items):
            raise ConfigError("aws_credentials: expected ACCESS_KEY_ID:SECRET=tenant,...")
        value = {key_id: rest for key_id, _, rest in items}
    credentials: dict[str, AwsCredential] = {}
    for key_id, rest in value.items():
        secret, sep, tenant = str(rest).rpartition("=")
        if not (key_id.strip() and sep and secret.strip() and tenant.strip()):
            raise ConfigError(f"aws_credentials: expected SECRET=tenant for {key_id.strip()!r}")
        credentials[key_id.strip()] = AwsCredential(secret.strip(), tenant.strip())
    return credentials


def _keyset(value: str | list[str]) -> frozenset[str]:
    items = value if isinstance(value, list) else value.split(",")
    return frozenset(s.strip() for s in items if s.strip())


def _share(value: str | float) -> float:
    share = float(value)
    if not 0 < share <= 1:
        raise ValueError("must be a fraction in (0, 1]")
    return share


def _opt_time_share(value: str | float | None) -> float | None:
    if value in (None, "", "none", "auto"):
        return None
    share = float(value)
    if not 0 <= share < 1:
        raise ValueError("must be a fraction in [0, 1)")
    return share


def _opt_int(value: str | int | None) -> int | None:
    return None if value in (None, "", "none") else int(value)


def _opt_str(value: str | None) -> str | None:
    return None if value in (None, "", "none") else str(value)


def _compile_mode(value: str | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = value.lower()
    if mode == "auto":
        return mode
    try:
        return "on" if _bool(mode) else "off"
    except ConfigError:
        raise ConfigError(f"compile: expected auto, on or off, got {value!r}") from None


def _prompt_products(value: str) -> str:
    if value not in ("dense", "int8"):
        raise ConfigError(f"prompt_products: expected dense or int8, got {value!r}")
    return value


def _redis_url(value: str | None) -> str | None:
    url = _opt_str(value)
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"redis_url: expected redis://host:port/db, got {url!r}")
    return url


def _opt_path(value: str | Path | None) -> Path | None:
    return None if value in (None, "", "none") else Path(value).expanduser()


# option name -> (section, field, parser). The option name is the CLI flag, TOML key and
# environment variable suffix (PROMPTCACHE_<NAME>).
OPTIONS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "host": ("api", "host", str),
    "port": ("api", "port", int),
    "served_model_name": ("api", "served_model_name", str),
    "aliases": ("api", "aliases", _aliases),
    "prompts_dir": ("api", "prompts_dir", _opt_path),
    "api_keys": ("api", "api_keys", _pairs),
    "aws_credentials": ("api", "aws_credentials", _aws_credentials),
    "admin_keys": ("api", "admin_keys", _keyset),
    "max_body_size": ("api", "max_body_bytes", parse_bytes),
    "engine": ("engine", "kind", str),
    "model": ("engine", "model", str),
    "device": ("engine", "device", str),
    "dtype": ("engine", "dtype", str),
    "chat_format": ("engine", "chat_format", str),
    "max_context_tokens": ("engine", "max_context_tokens", _opt_int),
    "max_output_tokens": ("engine", "max_output_tokens", _opt_int),
    "model_cache_dir": ("engine", "model_cache_dir", Path),
    "kv_reserve_memory": ("engine", "kv_reserve_bytes", parse_bytes),
    "max_batch_tokens": ("engine", "max_batch_tokens", _opt_int),
    "stream_time_share": ("engine", "stream_time_share", _opt_time_share),
    "prompt_products": ("engine", "prompt_products", _prompt_products),
    "kv_block_tokens": ("engine", "kv_block_tokens", int),
    "kv_dtype": ("engine", "kv_dtype", str),
    "quantize": ("engine", "quantize", _opt_str),
    "compile": ("engine", "compile", _compile_mode),
    "cache_memory": ("cache", "capacity_bytes", parse_bytes),
    "host_cache_memory": ("cache", "host_capacity_bytes", parse_bytes),
    "disk_cache_dir": ("cache", "disk_dir", _opt_path),
    "disk_cache_size": ("cache", "disk_capacity_bytes", parse_bytes),
    "disk_write_behind": ("cache", "disk_write_behind", _bool),
    "redis_url": ("cache", "redis_url", _redis_url),
    "redis_timeout_s": ("cache", "redis_timeout_s", float),
    "min_cacheable_tokens": ("cache", "min_cacheable_tokens", int),
    "max_cacheable_tokens": ("cache", "max_cacheable_tokens", _opt_int),
    "tool_cache_points": ("cache", "tool_cache_points", _bool),
    "ttl_1h": ("cache", "ttl_1h", _bool),
    "inflight_wait_timeout_s": ("cache", "inflight_wait_timeout_s", float),
    "tenant_cache_share": ("cache", "tenant_cache_share", _share),
    "cache_profile": ("cache", "profile", _opt_str),
    "cache_profiles": ("cache", "profiles", _profiles),
    "prices": ("cache", "prices_file", _opt_path),
    "openai_round_cached_tokens": ("api", "openai_round_cached_tokens", _bool),
    "log_level": ("", "log_level", str),
}


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    flat = dict(data.pop("server", {}))
    flat.update(data)
    unknown = sorted(set(flat) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(unknown)}")
    return flat


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    return {
        name: env[f"PROMPTCACHE_{name.upper()}"]
        for name in OPTIONS
        if f"PROMPTCACHE_{name.upper()}" in env
    }


def load(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Merge TOML < environment < CLI into a ``ServerConfig``. ``None`` CLI values are unset."""
    env = os.environ if env is None else env
    if config_file is None and env.get("PROMPTCACHE_CONFIG"):
        config_file = Path(env["PROMPTCACHE_CONFIG"])
    merged: dict[str, Any] = _from_toml(config_file) if config_file else {}
    merged.update(_from_env(env))
    merged.update({k: v for k, v in (cli or {}).items() if v is not None})
    sections: dict[str, dict[str, Any]] = {"api": {}, "cache": {}, "engine": {}, "": {}}
    for name, value in merged.items():
        if name not in OPTIONS:
            raise ConfigError(f"unknown option: {name}")
        section, attr, parse = OPTIONS[name]
        try:
            sections[section][attr] = parse(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad value for {name}: {value!r} ({exc})") from exc
    _split_aliases(sections["api"])
    base = ServerConfig()
    config = replace(
        base,
        api=replace(base.api, **sections["api"]),
        cache=replace(base.cache, **sections["cache"]),
        engine=replace(base.engine, **sections["engine"]),
        **sections[""],
    )
    try:
        profile_table(config)  # every profile named must exist
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    return config


def profile_table(config: ServerConfig) -> ProfileTable:
    """The caching profiles of a deployment; raises ``ProfileError`` for an unknown name.

    Its default profile is the deployment's own flags (``min_cacheable_tokens`` and friends).
    """
    cache = config.cache
    policy = ModelCachePolicy(
        min_cacheable_tokens=cache.min_cacheable_tokens,
        max_cacheable_tokens=cache.max_cacheable_tokens,
        tool_cache_points=cache.tool_cache_points,
        ttl_1h=cache.ttl_1h,
    )
    return ProfileTable(
        default=CacheProfile("default", policy),
        selected=cache.profile,
        by_alias=config.api.alias_profiles,
        custom=cache.profiles,
    )


def option_names() -> list[str]:
    """Every option, for the CLI."""
    return list(OPTIONS)


def _check_fields() -> None:
    # Keep the option table honest: every target attribute must exist.
    targets = {"api": ApiConfig, "cache": CacheConfig, "engine": EngineConfig, "": ServerConfig}
    for name, (section, attr, _) in OPTIONS.items():
        if attr not in {f.name for f in fields(targets[section])}:
            raise AssertionError(f"option {name} targets a missing field {attr}")


_check_fields()

__all__ = [
    "DEFAULT_MODEL_NAME",
    "OPTIONS",
    "ApiConfig",
    "AwsCredential",
    "CacheConfig",
    "ConfigError",
    "EngineConfig",
    "ServerConfig",
    "load",
    "option_names",
    "parse_bytes",
    "profile_table",
]
