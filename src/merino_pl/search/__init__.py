"""Entropy-driven architecture search (paper Eq. 7–15, Algorithms 1–2): recipes from budgets.

The stage's entry is :mod:`merino_pl.search.api` (``search``, ``SearchSettings``). Other stages
import from the search stage only that, and ``recipe_entropy`` from here: the entropy ``info``
and ``fit`` report for any recipe (imported on first use, PEP 562: ``import merino_pl.search``
stays free of numpy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merino_pl.core.errors import MerinoError

__all__ = ["config_section", "recipe_entropy"]

if TYPE_CHECKING:
    from merino_pl.search.entropy import recipe_entropy


def __getattr__(name: str) -> Any:
    if name == "recipe_entropy":
        from merino_pl.search.entropy import recipe_entropy

        return recipe_entropy
    raise AttributeError(f"module 'merino_pl.search' has no attribute {name!r}")


def config_section(data: Any, known: set[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """A search-config section as a mapping, and one message per unknown key in it."""
    data = data or {}
    if not isinstance(data, dict):
        raise MerinoError(f"{source} must be a mapping, got {data!r}")
    return data, [f"unknown key {source}.{k} (valid: {', '.join(sorted(known))})" for k in data if k not in known]
