"""Wire-model helpers shared by the protocol adapters: validation with hosted-style errors, JSON.

``validate`` turns the first pydantic error into an ``InvalidRequest`` whose message is
``<dotted.path>: <problem>`` (the hosted Anthropic style) and whose ``param`` is the path, with
``code="invalid_value"`` for a value outside an enumeration (the OpenAI style, spec §4.8). Each
adapter renders the parts its envelope has.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from promptcache.errors import InvalidRequest

_M = TypeVar("_M", bound=BaseModel)

_ENUM_ERRORS: Final = frozenset({"literal_error", "enum"})

MAX_DEPTH: Final = 128
"""Deepest nesting of arrays and objects a body may have. Real requests (tool schemas included)
stay far below it; deeper ones would only reach recursion limits in the encoders downstream."""


def json_object(body: bytes) -> dict[str, Any]:
    """The request body parsed as a JSON object; anything else is a 400.

    Stricter than ``json.loads``, so nothing a tokenizer or JSON encoder cannot take gets past
    the edge: the body must be UTF-8, ``NaN``/``Infinity`` (and numbers too large for a float)
    are not JSON, and no string or key may hold an unpaired UTF-16 surrogate (``"\\ud800"``,
    which ``json.loads`` accepts and UTF-8 cannot encode). Nesting is capped at ``MAX_DEPTH``.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: invalid UTF-8 at byte {exc.start}"
        ) from None
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise InvalidRequest(
            f"request body is not valid JSON: nesting deeper than {MAX_DEPTH} levels is not "
            "supported"
        ) from None
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {printable(str(exc))}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    _check_values(data)
    return data


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) written as ``\\udXXX``.

    Every message that quotes client input goes through it before it is rendered, so an error
    about a bad string can never fail to encode itself.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:32]} is out of range")
    return value


def _check_values(data: dict[str, Any]) -> None:
    """Reject unpaired surrogates and over-deep nesting, naming the field (iteratively: the
    walk itself must not recurse on a hostile body)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            _check_text(value, loc)
            continue
        if not isinstance(value, dict | list):
            continue
        if len(loc) >= MAX_DEPTH:
            raise InvalidRequest(
                f"{_dotted(loc)}: nesting deeper than {MAX_DEPTH} levels is not supported",
                param=_dotted(loc),
            )
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, loc)
                stack.append((item, (*loc, key)))
        else:
            stack.extend((item, (*loc, i)) for i, item in enumerate(value))


def _check_text(text: str, loc: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = _dotted(loc) or "body"
        bad = printable(exc.object[exc.start : exc.end])
        raise InvalidRequest(
            f"{where}: the request body is not valid JSON: unpaired UTF-16 surrogate {bad} "
            "in a string",
            param=where,
        ) from None


def _dotted(loc: tuple[str | int, ...]) -> str:
    return printable(".".join(map(str, loc)))


def string_metadata(metadata: dict[str, Any] | None) -> dict[str, str]:
    """The string entries of a request's ``metadata``: informational only, they never select a
    cache namespace (spec §1.12)."""
    return {key: value for key, value in (metadata or {}).items() if isinstance(value, str)}


def one_of(message: str) -> WrapValidator:
    """Report a failed union (e.g. ``str | list``) as one error at the field, not one per member."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            raise PydanticCustomError("union_type", message) from exc

    return WrapValidator(validate)


def to_json(value: Any) -> str:
    """The JSON a tool definition or call input renders as."""
    # Key order as received (spec §1.2); json.dumps' default separators match how the chat
    # format writes the tool calls the model itself emits.
    return json.dumps(value, ensure_ascii=False)


def validate(model: type[_M], data: Any, path: str) -> _M:
    """``model.model_validate(data)``, turning the first error into a hosted-style 400."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join([path, *map(str, error["loc"])] if path else map(str, error["loc"]))
        where = printable(where)
        message = f"{where}: {error['msg']}" if where else error["msg"]
        code = "invalid_value" if error["type"] in _ENUM_ERRORS else None
        raise InvalidRequest(message, param=where or None, code=code) from None


__all__ = [
    "MAX_DEPTH",
    "json_object",
    "one_of",
    "printable",
    "string_metadata",
    "to_json",
    "validate",
]
