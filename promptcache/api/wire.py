"""Wire-model helpers shared by the protocol adapters: validation with hosted-style errors, JSON.

``validate`` turns the first pydantic error into an ``InvalidRequest`` whose message is
``<dotted.path>: <problem>`` (the hosted Anthropic style) and whose ``param`` is the path, with
``code="invalid_value"`` for a value outside an enumeration (the OpenAI style, spec §4.8). Each
adapter renders the parts its envelope has.
"""

from __future__ import annotations

import json
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from promptcache.errors import InvalidRequest

_M = TypeVar("_M", bound=BaseModel)

_ENUM_ERRORS: Final = frozenset({"literal_error", "enum"})


def json_object(body: bytes) -> dict[str, Any]:
    """The request body parsed as a JSON object; anything else is a 400."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


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
        message = f"{where}: {error['msg']}" if where else error["msg"]
        code = "invalid_value" if error["type"] in _ENUM_ERRORS else None
        raise InvalidRequest(message, param=where or None, code=code) from None


__all__ = ["json_object", "one_of", "string_metadata", "to_json", "validate"]
