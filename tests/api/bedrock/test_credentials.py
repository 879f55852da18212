"""``aws_credentials`` configuration and the service's identity checks (spec §1.12, §5.1)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from promptcache.config import ApiConfig, AwsCredential, ConfigError, load
from promptcache.engine.fake import FakeEngine
from promptcache.errors import AuthenticationFailed
from promptcache.service import Service
from tests.conftest import make_config


def test_flag_environment_and_toml_forms(tmp_path: Path) -> None:
    cfg = load({"aws_credentials": "AKIDA:se/cr+et=team-a, AKIDB : s2=team-b"}, env={})
    assert cfg.api.aws_credentials == {
        "AKIDA": AwsCredential("se/cr+et", "team-a"),
        "AKIDB": AwsCredential("s2", "team-b"),
    }
    env = load(env={"PROMPTCACHE_AWS_CREDENTIALS": "AKIDC:a=b=team-c"})
    assert env.api.aws_credentials == {"AKIDC": AwsCredential("a=b", "team-c")}
    toml = tmp_path / "c.toml"
    toml.write_text('[aws_credentials]\nAKIDD = "secret=team-d"\n')
    assert load(config_file=toml, env={}).api.aws_credentials == {
        "AKIDD": AwsCredential("secret", "team-d")
    }


@pytest.mark.parametrize("value", ["AKIDA", "AKIDA:nosecret", ":s=t", "AKIDA:s="])
def test_malformed_values_never_echo_the_secret(value: str) -> None:
    with pytest.raises(ConfigError, match="aws_credentials") as info:
        load({"aws_credentials": value}, env={})
    assert "nosecret" not in str(info.value)


def test_secret_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(AwsCredential("hunter2", "team-a"))


def service_with(**api: object) -> Service:
    config = make_config()
    return Service(FakeEngine(), replace(config, api=replace(ApiConfig(), **api)))


def test_any_credentials_switch_authentication_on_everywhere() -> None:
    assert service_with().is_open
    only_aws = service_with(aws_credentials={"AKIDA": AwsCredential("s", "team-a")})
    assert not only_aws.is_open
    with pytest.raises(AuthenticationFailed):
        only_aws.authenticate("any-key")  # Anthropic/OpenAI keys: none configured
    assert only_aws.aws_credential("AKIDA").tenant == "team-a"
    with pytest.raises(AuthenticationFailed):
        only_aws.aws_credential("AKIDB")
