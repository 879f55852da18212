"""The lock a fresh machine installs from was resolved from this pyproject.toml."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_lock_was_resolved_from_this_pyproject() -> None:
    header = (ROOT / "requirements.lock").read_text().splitlines()[:3]
    recorded = next(m.group(1) for line in header if (m := re.search(r"sha256 (\w+)", line)))
    actual = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    assert recorded == actual, "pyproject.toml changed since scripts/lock ran: run it again"
