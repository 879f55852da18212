"""Prompt templates (``--prompts-dir``): versioned chat bodies whose static part is cached.

One file per template, ``<id>.json`` (``.yaml`` / ``.yml`` too where PyYAML is installed), holding
an OpenAI-style chat body: ``messages`` whose text may contain Mustache-style ``{{variables}}``,
optional ``tools`` and parameters (``max_tokens``, ``temperature``, ...). Besides the body a file
may say::

    "version": 3                  else the file name's: support@3.json; else 1
    "tenants": ["team-a"]         who may use it where keys are configured (default: everyone;
                                  a file in a folder <tenant>/ belongs to that tenant)
    "variables": {"tone": "kind"} defaults
    "auto_cache": false           no automatic breakpoint (default true)
    "bedrock_id": "PROMPT1234"    the prompt id of a Bedrock prompt ARN naming it

Caching: ``cache_control`` markers on blocks (content parts, tools, string-content messages) are
kept as written. Without any marker, an automatic breakpoint closes the last block before the
first block that holds a variable (the last block when none does): that prefix, the template's
fixed part, is the same for every call and is what the cache keeps, while the variables come
after it.

``TemplateStore`` looks at the directory on every lookup (a ``stat`` per file) and parses again
a file whose size or modification time changed, so edits apply to the next request. A file
that cannot be used answers requests for its id with ``BadTemplate`` (422) naming the file and
the problem; the other templates keep working.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from promptcache.errors import InvalidRequest, NotFound

SUFFIXES: Final = (".json", ".yaml", ".yml")
_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_VARIABLE: Final = re.compile(r"\{\{(\{?)\s*(" + _NAME + r")\s*\}?\}\}")
_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_FILE: Final = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9_.\-]*?)(?:@(?P<version>\d+))?$")
_META: Final = frozenset({"id", "version", "tenants", "variables", "auto_cache", "bedrock_id"})


class BadTemplate(InvalidRequest):
    """A template file that cannot be used (the request was fine, the file is not)."""

    status = 422


class MissingVariable(InvalidRequest):
    """A variable the template uses that the request did not give."""


@dataclass(frozen=True, slots=True)
class Template:
    """One parsed template file."""

    id: str
    version: int
    body: Mapping[str, Any]
    """The chat body: ``messages``, optional ``tools`` and parameters."""
    source: str
    """The file name (relative to the directory), for error messages."""
    tenants: frozenset[str] | None = None
    defaults: Mapping[str, str] = field(default_factory=dict)
    auto_cache: bool = True
    bedrock_id: str | None = None

    @property
    def variables(self) -> list[str]:
        """The variable names the messages use, in order of first use."""
        names: dict[str, None] = {}
        for text in _texts(self.body.get("messages", ())):
            names.update((m.group(2), None) for m in _VARIABLE.finditer(text))
        return list(names)

    def visible_to(self, tenant: str, *, is_open: bool) -> bool:
        return is_open or self.tenants is None or tenant in self.tenants

    def render(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """The chat body with ``variables`` substituted and the automatic breakpoint placed.

        Raises ``MissingVariable`` naming every variable neither given nor defaulted.
        """
        values = {**self.defaults, **{k: _text(v) for k, v in variables.items()}}
        missing = [name for name in self.variables if name not in values]
        if missing:
            raise MissingVariable(
                f"prompt template {self.id!r} needs variable(s) {', '.join(missing)}: pass them "
                "in variables",
                param="variables",
                code="missing_variable",
            )
        body = copy.deepcopy(dict(self.body))
        if self.auto_cache and not _has_marker(body):
            _mark_static_prefix(body)
        for message in body.get("messages", ()):
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = _substitute(content, values)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = _substitute(part["text"], values)
        return body


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _substitute(text: str, values: Mapping[str, str]) -> str:
    return _VARIABLE.sub(lambda m: values[m.group(2)], text)


def _texts(messages: Any) -> Iterator[str]:
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


def _has_marker(body: Mapping[str, Any]) -> bool:
    def marked(item: Any) -> bool:
        return isinstance(item, dict) and (
            "cache_control" in item or "prompt_cache_breakpoint" in item
        )

    for tool in body.get("tools") or ():
        if marked(tool):
            return True
    for message in body.get("messages", ()):
        if marked(message):
            return True
        content = message.get("content")
        if isinstance(content, list) and any(marked(part) for part in content):
            return True
    return False


def _mark_static_prefix(body: dict[str, Any]) -> None:
    """``cache_control`` on the last block before the first one holding a variable."""
    last: dict[str, Any] | None = None
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            last = tool
    for message in body.get("messages", ()):
        content = message.get("content")
        holders: list[tuple[dict[str, Any], str]] = []
        if isinstance(content, str):
            holders = [(message, content)]  # a string-content message is one block
        elif isinstance(content, list):
            holders = [(p, str(p.get("text", ""))) for p in content if isinstance(p, dict)]
        for holder, text in holders:
            if _VARIABLE.search(text):
                if last is not None:
                    last["cache_control"] = {"type": "ephemeral"}
                return
            last = holder
    if last is not None:
        last["cache_control"] = {"type": "ephemeral"}


# -- files ------------------------------------------------------------------------------------


def _load_data(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    try:
        yaml = importlib.import_module("yaml")  # optional: typed as Any, no stubs needed
    except ImportError:
        raise ValueError("YAML templates need PyYAML (pip install pyyaml)") from None
    return yaml.safe_load(text)


def parse_template(path: Path, source: str, owner: str | None = None) -> Template:
    """The template in ``path``; raises ``BadTemplate`` saying what is wrong."""
    name = _FILE.match(path.stem)
    try:
        if name is None:
            raise ValueError("the file name must be <id>.json or <id>@<version>.json")
        data = _load_data(path)
        if not isinstance(data, dict):
            raise ValueError("expected an object holding a chat body")
        template_id = str(data.get("id", name.group("id")))
        if not _ID.match(template_id):
            raise ValueError(f"id {template_id!r}: letters, digits, '_', '.', '-' only")
        version = data.get("version", int(name.group("version") or 1))
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError("version: expected a whole number >= 1")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages.{i}: expected an object with a role")
        if not isinstance(data.get("tools", []), list):
            raise ValueError("tools: expected a list")
        for text in _texts(messages):
            # Anything in braces that is not a plain variable (sections, partials, comments).
            for opening in re.finditer(r"\{\{", text):
                if not _VARIABLE.match(text, opening.start()):
                    snippet = text[opening.start() : opening.start() + 24]
                    raise ValueError(f"unsupported tag {snippet!r}: only {{{{name}}}} variables")
        tenants = data.get("tenants")
        if tenants is not None and (
            not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants)
        ):
            raise ValueError("tenants: expected a list of tenant names")
        defaults = data.get("variables", {})
        if not isinstance(defaults, dict):
            raise ValueError("variables: expected an object of default values")
        auto_cache = data.get("auto_cache", True)
        if not isinstance(auto_cache, bool):
            raise ValueError("auto_cache: expected true or false")
        bedrock_id = data.get("bedrock_id")
        if bedrock_id is not None and not isinstance(bedrock_id, str):
            raise ValueError("bedrock_id: expected a string")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # json.JSONDecodeError and yaml.YAMLError (a ValueError subclass or not) land here.
        raise BadTemplate(f"prompt template file {source} is invalid: {exc}") from None
    except Exception as exc:  # a YAML parser error: not a ValueError
        raise BadTemplate(f"prompt template file {source} is invalid: {exc}") from None
    owners = frozenset({owner}) if owner is not None else None
    return Template(
        id=template_id,
        version=version,
        body={k: v for k, v in data.items() if k not in _META},
        source=source,
        tenants=frozenset(tenants) if tenants is not None else owners,
        defaults={str(k): _text(v) for k, v in defaults.items()},
        auto_cache=auto_cache,
        bedrock_id=bedrock_id,
    )


@dataclass(slots=True)
class _File:
    stamp: tuple[int, int]
    id: str
    parsed: Template | BadTemplate


def split_reference(reference: str) -> tuple[str, int | None]:
    """``support``, ``support@latest`` -> (``support``, None); ``support@3`` -> (``support``, 3).

    Portkey names versions ``<id>@<n>``; a Bedrock prompt ARN ``prompt/<id>:<n>``."""
    template_id, _, version = reference.partition("@")
    if version in ("", "latest"):
        return template_id, None
    if not version.isdigit():
        raise NotFound(f"prompt template version {version!r} of {template_id!r} not found")
    return template_id, int(version)


class TemplateStore:
    """The templates of one directory, parsed again when their files change."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[Path, _File] = {}

    def _scan(self) -> None:
        seen: set[Path] = set()
        for path, owner in self._paths():
            seen.add(path)
            try:
                stat = path.stat()
            except OSError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            known = self._files.get(path)
            if known is not None and known.stamp == stamp:
                continue
            source = str(path.relative_to(self.directory))
            match = _FILE.match(path.stem)
            file_id = match.group("id") if match else path.stem
            try:
                parsed: Template | BadTemplate = parse_template(path, source, owner)
            except BadTemplate as exc:
                parsed = exc
            self._files[path] = _File(stamp, file_id, parsed)
        for gone in set(self._files) - seen:
            del self._files[gone]

    def _paths(self) -> Iterator[tuple[Path, str | None]]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.is_dir():
                for inner in sorted(entry.iterdir()):
                    if inner.suffix in SUFFIXES and inner.is_file():
                        yield inner, entry.name
            elif entry.suffix in SUFFIXES:
                yield entry, None

    def get(self, reference: str, tenant: str, *, is_open: bool) -> Template:
        """The template ``reference`` (``id``, ``id@version``, ``id@latest``) that ``tenant``
        may use: its newest version unless one is named. Raises ``NotFound`` (unknown, or not
        the tenant's: the same answer, so ids do not leak) or ``BadTemplate``."""
        template_id, version = split_reference(reference)
        self._scan()
        found: list[Template] = []
        for file in self._files.values():
            parsed = file.parsed
            if isinstance(parsed, BadTemplate):
                if file.id == template_id:
                    raise parsed
                continue
            if template_id in (parsed.id, parsed.bedrock_id) and parsed.visible_to(
                tenant, is_open=is_open
            ):
                found.append(parsed)
        if version is not None:
            found = [t for t in found if t.version == version]
        if not found:
            named = template_id if version is None else f"{template_id}@{version}"
            raise NotFound(f"prompt template {named!r} not found", code="prompt_not_found")
        newest = max(t.version for t in found)
        chosen = [t for t in found if t.version == newest]
        if len(chosen) > 1:
            files = ", ".join(sorted(t.source for t in chosen))
            raise BadTemplate(
                f"prompt template {template_id!r} version {newest} is defined twice: {files}"
            )
        return chosen[0]


__all__ = [
    "SUFFIXES",
    "BadTemplate",
    "MissingVariable",
    "Template",
    "TemplateStore",
    "parse_template",
    "split_reference",
]
