"""The search's plugin points: proxies (what it maximises) and budget kinds (what it bounds), by name.

A proxy scores an architecture so that higher predicts lower loss. The search needs it as a
table over the space's block codes (``Genes``), summed over the blocks, so that a population is
scored with a few array gathers; the proxy study (``merino_pl.study.proxies``) reads the same
registry and scores single architectures with ``Proxy.arch``. A budget kind is an additive cost
(``cost_tables``' ``CostTables``) and the units its ``--budget`` values take.

Register one with the decorators, in any module that is imported before the search runs::

    @register_proxy("depth", arch=lambda arch, entropy: float(arch.num_layer_applications))
    def depth(plan, genes):
        return genes.num_layers.astype(float)  # Σ_j L_j

or from another package, without editing merino-pl, through the entry-point groups
``merino_pl.proxies`` / ``merino_pl.budgets`` (in that package's ``pyproject.toml``)::

    [project.entry-points."merino_pl.proxies"]
    depth = "my_package.proxies"          # a module: its decorators register
    width = "my_package.proxies:width"    # a function: registered under the entry point's name

The shipped ones register the same way (``search/proxies.py``, ``search/budget.py``), and the
entry points are read once, on the first look-up. (lm-eval's ``@register_model`` and
Python's entry points are the pattern; neither ships a registry we could reuse for this.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from merino_pl.core.errors import MerinoError

if TYPE_CHECKING:
    import numpy as np

    from merino_pl.core.config import MerinoConfig
    from merino_pl.core.latency_table import LatencyTable
    from merino_pl.core.space import SearchSpace
    from merino_pl.search.budget import CostTables, Genes
    from merino_pl.search.entropy import EntropyConfig
    from merino_pl.search.evolution import Problem, SearchResult

PROXY_GROUP = "merino_pl.proxies"
BUDGET_GROUP = "merino_pl.budgets"
SHIPPED = {PROXY_GROUP: "merino_pl.search.proxies", BUDGET_GROUP: "merino_pl.search.budget"}


@dataclass(frozen=True)
class Proxy:
    """A search objective. ``table(plan, genes)``: one score per block code (``(num_codes,)``,
    summed over the blocks), or a ``CostTables`` when the score depends on the block's position
    and the projections between blocks; ``arch(architecture, entropy_config)``: the same score
    of one architecture (the proxy study; None: the proxy is a rule, not a score); ``search``:
    a search of its own replacing evolution (naive scaling)."""

    name: str
    table: Callable[[Any, Genes], np.ndarray | CostTables]
    arch: Callable[[MerinoConfig, EntropyConfig], float] | None = None
    search: Callable[[Problem], SearchResult] | None = None
    help: str = ""


@dataclass(frozen=True)
class BudgetKind:
    """A cost ``--budget NAME=VALUE`` bounds: ``tables(space, genes, latency_table)`` and the
    unit suffixes its values take (suffix -> factor)."""

    name: str
    tables: Callable[[SearchSpace, Genes, LatencyTable | None], CostTables]
    units: dict[str, float]
    help: str = ""


_REGISTRY: dict[str, dict[str, Any]] = {PROXY_GROUP: {}, BUDGET_GROUP: {}}
_LOADED: set[str] = set()


def register_proxy(
    name: str,
    *,
    arch: Callable[[MerinoConfig, EntropyConfig], float] | None = None,
    search: Callable[[Problem], SearchResult] | None = None,
    help: str = "",
) -> Callable[[Callable], Callable]:
    """Decorator: register ``table(plan, genes)`` as the proxy ``name`` (see ``Proxy``)."""

    def add(table: Callable) -> Callable:
        _add(PROXY_GROUP, Proxy(name, table, arch, search, help or (table.__doc__ or "").strip().split("\n")[0]), table)
        return table

    return add


def register_budget(name: str, *, units: dict[str, float], help: str = "") -> Callable[[Callable], Callable]:
    """Decorator: register ``tables(space, genes, latency_table)`` as the budget kind ``name``."""

    def add(tables: Callable) -> Callable:
        _add(BUDGET_GROUP, BudgetKind(name, tables, dict(units), help), tables)
        return tables

    return add


def _add(group: str, entry: Proxy | BudgetKind, fn: Callable) -> None:
    """Register ``entry``; another function under a taken name is an error (a module imported
    twice registers the same function again, which is not)."""
    old = _REGISTRY[group].get(entry.name)
    if old is not None:
        was = old.table if isinstance(old, Proxy) else old.tables
        if (was.__module__, was.__qualname__) != (fn.__module__, fn.__qualname__):
            raise MerinoError(
                f"{group}: {entry.name!r} is registered twice ({was.__module__}.{was.__qualname__}, "
                f"{fn.__module__}.{fn.__qualname__})"
            )
    _REGISTRY[group][entry.name] = entry


def _load(group: str) -> dict[str, Any]:
    """The group's entries: the shipped module's, then every installed entry point's (once)."""
    if group not in _LOADED:
        _LOADED.add(group)
        __import__(SHIPPED[group])
        for ep in entry_points(group=group):
            try:
                obj = ep.load()
            except Exception as e:  # a plugin's bug is the user's one line, not our traceback
                raise MerinoError(f"entry point {ep.name} = {ep.value} ({group}): {type(e).__name__}: {e}") from None
            if ep.name not in _REGISTRY[group] and callable(obj):
                (register_proxy if group == PROXY_GROUP else _budget_from_function)(ep.name)(obj)
    return _REGISTRY[group]


def _budget_from_function(name: str) -> Callable[[Callable], Callable]:
    return register_budget(name, units={"": 1.0})


def _shipped_first(group: str) -> dict[str, Any]:
    entries = _load(group).items()
    shipped = {n: e for n, e in entries if (e.table if group == PROXY_GROUP else e.tables).__module__ == SHIPPED[group]}
    return {**shipped, **dict(entries)}


def proxies() -> dict[str, Proxy]:
    """Every registered proxy, by name: the shipped ones first, then the others as registered."""
    return _shipped_first(PROXY_GROUP)


def budget_kinds() -> dict[str, BudgetKind]:
    """Every registered budget kind, by name: the shipped ones first."""
    return _shipped_first(BUDGET_GROUP)


def get_proxy(name: str) -> Proxy:
    """The proxy ``name``; an unknown one is a ``MerinoError`` listing the registered names."""
    known = proxies()
    if name not in known:
        raise MerinoError(f"unknown proxy {name!r} (registered: {', '.join(known)})")
    return known[name]


def get_budget_kind(name: str, text: str | None = None) -> BudgetKind:
    """The budget kind ``name`` (``text``: the budget as written, for the message)."""
    known = budget_kinds()
    if name not in known:
        where = f" in budget {text!r}" if text else ""
        raise MerinoError(f"unknown cost {name!r}{where} (valid: {', '.join(known)})")
    return known[name]
