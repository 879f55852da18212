"""The parameter ranges the hosted Chat Completions API enforces, with its texts and codes.

Checked on the parsed body before the schema, so a value of the right type but outside its range
gets the hosted 400::

    {"error": {"message": "Invalid 'temperature': decimal above maximum value. Expected a value
               <= 2, but got 3 instead.", "type": "invalid_request_error",
               "param": "temperature", "code": "decimal_above_max_value"}}

Values of the wrong type are left to the schema, which reports them in its own words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from promptcache.errors import InvalidRequest

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Range:
    """``low <= value <= high`` for a number (``decimal``) or an integer field."""

    kind: Literal["decimal", "integer"]
    low: float | None = None
    high: float | None = None


RANGES: Final[dict[str, Range]] = {
    "temperature": Range("decimal", 0, 2),
    "top_p": Range("decimal", 0, 1),
    "presence_penalty": Range("decimal", -2, 2),
    "frequency_penalty": Range("decimal", -2, 2),
    "max_tokens": Range("integer", 1),
    "max_completion_tokens": Range("integer", 1),
    "n": Range("integer", 1, 128),
    "top_logprobs": Range("integer", 0, 20),
    "seed": Range("integer", INT64_MIN, INT64_MAX),
}
"""Top-level field -> its hosted range."""

MAX_STOP_SEQUENCES: Final = 4


def check_limits(data: dict[str, Any]) -> None:
    """Raise the hosted 400 for the first field of ``data`` outside its range."""
    for name, limits in RANGES.items():
        value = data.get(name)
        number = int if limits.kind == "integer" else int | float
        if isinstance(value, number) and not isinstance(value, bool):
            _check(name, value, limits)
    stop = data.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"Invalid 'stop': array too long. Expected an array with maximum length "
            f"{MAX_STOP_SEQUENCES}, but got an array with length {len(stop)} instead.",
            param="stop",
            code="array_above_max_length",
        )


def _check(name: str, value: float, limits: Range) -> None:
    if limits.low is not None and value < limits.low:
        side, bound, relation = "below minimum", limits.low, ">="
    elif limits.high is not None and value > limits.high:
        side, bound, relation = "above maximum", limits.high, "<="
    else:
        return
    code = f"{limits.kind}_{side.replace('imum', '').replace(' ', '_')}_value"
    raise InvalidRequest(
        f"Invalid '{name}': {limits.kind} {side} value. Expected a value {relation} "
        f"{_number(bound)}, but got {_number(value)} instead.",
        param=name,
        code=code,
    )


def _number(value: float) -> str:
    # As the hosted texts write them: 2, 2.5, 200 (not 2.0 or 200.0).
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


__all__ = ["INT64_MAX", "INT64_MIN", "MAX_STOP_SEQUENCES", "RANGES", "Range", "check_limits"]
