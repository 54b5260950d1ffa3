"""Entropy-driven architecture search (paper Eq. 7–15, Algorithms 1–2): recipes from budgets."""

from __future__ import annotations

from typing import Any

from merino_pl.errors import MerinoError


def config_section(data: Any, known: set[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """A search-config section as a mapping, and one message per unknown key in it."""
    data = data or {}
    if not isinstance(data, dict):
        raise MerinoError(f"{source} must be a mapping, got {data!r}")
    return data, [f"unknown key {source}.{k} (valid: {', '.join(sorted(known))})" for k in data if k not in known]
