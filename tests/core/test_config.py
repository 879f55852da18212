from __future__ import annotations

from pathlib import Path

import pytest

from promptcache.config import ConfigError, load, parse_bytes


def test_precedence_cli_over_env_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        'port = 9000\nhost = "0.0.0.0"\ncache_memory = "1GiB"\n'
        '[api_keys]\nk1 = "a"\n[aliases]\nclaude-x = "gemma"\n'
    )
    env = {"PROMPTCACHE_PORT": "9100", "PROMPTCACHE_MIN_CACHEABLE_TOKENS": "512"}
    cfg = load({"port": "9200", "model": None}, config_file=toml, env=env)
    assert cfg.api.port == 9200
    assert cfg.api.host == "0.0.0.0"
    assert cfg.cache.capacity_bytes == 1 << 30
    assert cfg.cache.min_cacheable_tokens == 512
    assert cfg.api.api_keys == {"k1": "a"}
    assert cfg.api.aliases == {"claude-x": "gemma"}
    assert cfg.engine.model is None


def test_env_pairs_and_config_path_from_env(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[server]\nport = 7000\n")
    env = {"PROMPTCACHE_CONFIG": str(toml), "PROMPTCACHE_API_KEYS": "a=t1, b:t2"}
    cfg = load(env=env)
    assert cfg.api.port == 7000
    assert cfg.api.api_keys == {"a": "t1", "b": "t2"}


@pytest.mark.parametrize(
    ("text", "value"),
    [("4GiB", 4 << 30), ("512MB", 512_000_000), ("100", 100), ("1.5k", 1500), ("2 MiB", 2 << 20)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_bytes("lots")
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load(config_file=bad, env={})
    with pytest.raises(ConfigError, match="bad value for port"):
        load({"port": "eighty"}, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load(config_file=tmp_path / "missing.toml", env={})


def test_tier_options(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(f'host_cache_memory = "16GiB"\ndisk_cache_dir = "{tmp_path / "kv"}"\n')
    cfg = load({"disk_cache_size": "100GB"}, config_file=toml, env={})
    assert cfg.cache.host_capacity_bytes == 16 << 30
    assert cfg.cache.disk_dir == tmp_path / "kv"
    assert cfg.cache.disk_capacity_bytes == 100 * 1000**3
    defaults = load({}, env={}).cache
    assert defaults.host_capacity_bytes == 0 and defaults.disk_dir is None
    assert load({}, env={"PROMPTCACHE_DISK_CACHE_DIR": ""}).cache.disk_dir is None


def test_tenant_cache_share(tmp_path: Path) -> None:
    assert load({}, env={}).cache.tenant_cache_share == 0.5
    toml = tmp_path / "c.toml"
    toml.write_text("tenant_cache_share = 0.3\n")
    assert load(config_file=toml, env={}).cache.tenant_cache_share == 0.3
    env = {"PROMPTCACHE_TENANT_CACHE_SHARE": "0.4"}
    assert load(config_file=toml, env=env).cache.tenant_cache_share == 0.4
    assert load({"tenant_cache_share": "1"}, env=env).cache.tenant_cache_share == 1.0
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ConfigError, match="bad value for tenant_cache_share"):
            load({"tenant_cache_share": bad}, env={})


def test_compile_mode() -> None:
    assert load({}, env={}).engine.compile == "auto"
    assert load({"compile": "off"}, env={}).engine.compile == "off"
    assert load({}, env={"PROMPTCACHE_COMPILE": "true"}).engine.compile == "on"
    with pytest.raises(ConfigError, match="expected auto, on or off"):
        load({"compile": "sometimes"}, env={})
