"""A hosted price sheet, to say what the benchmarked traffic would cost there.

The default is a Claude Sonnet-class sheet: input $3 and output $15 per million tokens, with the
prompt-caching multipliers of spec §3.10 (5-minute write ×1.25, 1-hour write ×2, read ×0.1).
Any of it can be replaced from a TOML or JSON file with the same keys.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Prices:
    """Dollars per million tokens, and the cache multipliers relative to the input price."""

    name: str = "Claude Sonnet-class"
    input_per_mtok: float = 3.0
    output_per_mtok: float = 15.0
    write_5m_multiplier: float = 1.25
    write_1h_multiplier: float = 2.0
    read_multiplier: float = 0.1

    def to_json(self) -> dict[str, Any]:
        """A plain dict (the keys a price file may set)."""
        return asdict(self)


DEFAULT = Prices()


def load(path: Path | None, base: Prices = DEFAULT, **overrides: float | None) -> Prices:
    """``base`` updated from a TOML or JSON file and then from non-None ``overrides``."""
    prices = base
    if path is not None:
        text = path.read_text()
        data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        known = {f.name for f in fields(Prices)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown price keys {unknown}; known: {sorted(known)}")
        prices = replace(prices, **data)
    set_: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    return replace(prices, **set_) if set_ else prices


def cost(
    prices: Prices,
    *,
    uncached: int,
    read: int = 0,
    write_5m: int = 0,
    write_1h: int = 0,
    output: int = 0,
) -> float:
    """Dollars for one request with these token counts."""
    per_in = prices.input_per_mtok / 1e6
    return (
        uncached * per_in
        + write_5m * per_in * prices.write_5m_multiplier
        + write_1h * per_in * prices.write_1h_multiplier
        + read * per_in * prices.read_multiplier
        + output * prices.output_per_mtok / 1e6
    )


__all__ = ["DEFAULT", "Prices", "cost", "load"]
