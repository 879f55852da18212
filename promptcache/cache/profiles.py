"""Hosted models' caching profiles as data (spec §1.8, §1.9, §5.9).

A ``CacheProfile`` is what a hosted model enforces on prompt caching: the minimum prefix per
checkpoint, the most checkpoints a request may carry, whether tool definitions may carry one,
the most tokens it caches and whether 1h TTLs exist. A deployment picks one with
``--cache-profile NAME`` (``auto``: by the model name each request sends), per alias in the alias
table (``name = "served@profile"``), or defines its own in ``[cache_profiles.NAME]`` of the TOML
file, so one server can behave like several hosted models at once.

The built-in figures are those of the Bedrock table (Portkey's Bedrock caching guide quoting the
AWS user guide) and Anthropic's current models. The Bedrock table's models (Claude 3.7 Sonnet,
Claude 3.5 Haiku, Nova) predate the 1h TTL on Bedrock, so their profiles treat a 1h marker as 5m.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final

from promptcache.cache.policy import MarkRules, ModelCachePolicy
from promptcache.errors import PromptCacheError

AUTO: Final = "auto"
"""``--cache-profile auto``: each request gets the built-in profile its model name matches."""

NOVA_MAX_CACHED_TOKENS: Final = 32_000
""""The Amazon Nova models support a maximum of 32k tokens for prompt caching" (spec §5.9)."""


class ProfileError(PromptCacheError):
    """An unknown profile name or a malformed custom profile (a configuration error)."""


@dataclass(frozen=True, slots=True)
class CacheProfile:
    """One hosted model's caching limits. ``matches`` are substrings of the model names it
    stands for (Bedrock ids, ARNs, inference profiles and Anthropic names alike), used by
    ``--cache-profile auto``."""

    name: str
    policy: ModelCachePolicy = field(default_factory=ModelCachePolicy)
    max_breakpoints: int = 4
    matches: tuple[str, ...] = ()

    def rules(self, rules: MarkRules) -> MarkRules:
        """``rules`` with this profile's checkpoint count (the texts name the number)."""
        if self.max_breakpoints == rules.max_breakpoints:
            return rules
        old = f"maximum of {rules.max_breakpoints} "
        return replace(
            rules,
            max_breakpoints=self.max_breakpoints,
            count_message=rules.count_message.replace(old, f"maximum of {self.max_breakpoints} "),
        )


def _profile(
    name: str,
    minimum: int,
    *matches: str,
    maximum: int | None = None,
    tools: bool = True,
    ttl_1h: bool = True,
) -> CacheProfile:
    policy = ModelCachePolicy(minimum, maximum, tool_cache_points=tools, ttl_1h=ttl_1h)
    return CacheProfile(name, policy, 4, matches or (name,))


BUILTIN: Final[Mapping[str, CacheProfile]] = {
    p.name: p
    for p in (
        # The Bedrock table (spec §5.9).
        _profile("claude-3-7-sonnet", 1024, ttl_1h=False),
        _profile("claude-3-5-haiku", 2048, ttl_1h=False),
        _profile("nova-micro", 1000, maximum=NOVA_MAX_CACHED_TOKENS, tools=False, ttl_1h=False),
        _profile("nova-lite", 1000, maximum=NOVA_MAX_CACHED_TOKENS, tools=False, ttl_1h=False),
        _profile("nova-pro", 1000, maximum=NOVA_MAX_CACHED_TOKENS, tools=False, ttl_1h=False),
        # Anthropic's current models (and their Bedrock ids: same names inside).
        # Longest match wins: "claude-sonnet-4-5-2025..." is Sonnet 4.5, "claude-sonnet-4-2025..."
        # Sonnet 4, "claude-opus-4-1-..." Opus 4.1 (Opus 4's figures).
        _profile("claude-opus-4", 1024),
        _profile("claude-opus-4-5", 4096),
        _profile("claude-opus-4-7", 2048),
        _profile("claude-sonnet-4", 1024),
        _profile("claude-sonnet-4-5", 1024),
        _profile("claude-haiku-4-5", 4096),
    )
}
"""The built-in profiles by name."""

_POLICY_KEYS: Final = frozenset(f.name for f in fields(ModelCachePolicy))


def custom_profiles(table: Mapping[str, Any]) -> dict[str, CacheProfile]:
    """``[cache_profiles.NAME]`` tables -> profiles. A table may start from a built-in one with
    ``base = "nova-pro"``; its keys are those of ``ModelCachePolicy`` plus ``max_breakpoints``
    and ``matches`` (substrings of model names, for ``auto``)."""
    result: dict[str, CacheProfile] = {}
    for name, raw in table.items():
        if not isinstance(raw, Mapping):
            raise ProfileError(f"cache_profiles.{name}: expected a table")
        values = dict(raw)
        base = BUILTIN.get(str(values.pop("base", "")), CacheProfile(name))
        unknown = sorted(set(values) - _POLICY_KEYS - {"max_breakpoints", "matches", "base"})
        if unknown:
            raise ProfileError(f"cache_profiles.{name}: unknown keys {', '.join(unknown)}")
        try:
            policy = replace(base.policy, **{k: v for k, v in values.items() if k in _POLICY_KEYS})
            limit = int(values.get("max_breakpoints", base.max_breakpoints))
            matches = tuple(str(m) for m in values.get("matches", ()))
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"cache_profiles.{name}: {exc}") from exc
        if not 1 <= limit <= 4:
            raise ProfileError(f"cache_profiles.{name}: max_breakpoints must be 1 to 4")
        result[str(name)] = CacheProfile(str(name), policy, limit, matches)
    return result


_GEO_PREFIXES: Final = frozenset({"us", "us-gov", "eu", "apac", "jp", "au", "ca", "global"})


def spellings(model: str) -> tuple[str, ...]:
    """``model`` and the names it may stand for, most specific first, as the Bedrock surface
    resolves model ids (an ARN's resource, an inference profile's base model id)."""
    names = [model]
    if model.startswith("arn:") and "/" in model:
        names.append(model.rsplit("/", 1)[1])
    prefix, dot, base = names[-1].partition(".")
    if dot and prefix in _GEO_PREFIXES:
        names.append(base)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class ProfileTable:
    """Which profile a request gets, by the model name it sends.

    In order: the alias table's profile for the name, then ``selected`` (a profile name, or
    ``auto``: the first profile whose ``matches`` the name contains, longest match first), then
    ``default`` (the deployment's own flags, ``--min-cacheable-tokens`` and friends).
    """

    default: CacheProfile
    selected: str | None = None
    by_alias: Mapping[str, str] = field(default_factory=dict)
    custom: Mapping[str, CacheProfile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (self.selected, *self.by_alias.values()):
            if name is not None and name != AUTO:
                self.named(name)

    def named(self, name: str) -> CacheProfile:
        """The profile called ``name``; raises ``ProfileError``."""
        found = self.custom.get(name) or BUILTIN.get(name)
        if found is None:
            known = ", ".join(sorted({*BUILTIN, *self.custom}))
            raise ProfileError(f"unknown cache profile {name!r} (known: {known})")
        return found

    def matching(self, model: str) -> CacheProfile | None:
        """The profile whose ``matches`` ``model`` contains (longest match wins)."""
        best: tuple[int, CacheProfile] | None = None
        for profile in (*self.custom.values(), *BUILTIN.values()):
            for needle in profile.matches:
                if needle in model and (best is None or len(needle) > best[0]):
                    best = (len(needle), profile)
        return best[1] if best else None

    def for_model(self, model: str) -> CacheProfile:
        """The profile for a request naming ``model`` (any of its ``spellings``)."""
        names = spellings(model)
        for name in names:
            alias = self.by_alias.get(name)
            if alias is not None:
                return self._pick(alias, names)
        return self._pick(self.selected, names)

    def _pick(self, selected: str | None, names: tuple[str, ...]) -> CacheProfile:
        if selected is None:
            return self.default
        if selected != AUTO:
            return self.named(selected)
        for name in names:
            found = self.matching(name)
            if found is not None:
                return found
        return self.default


__all__ = [
    "AUTO",
    "BUILTIN",
    "NOVA_MAX_CACHED_TOKENS",
    "CacheProfile",
    "ProfileError",
    "ProfileTable",
    "custom_profiles",
    "spellings",
]
