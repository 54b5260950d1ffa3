"""The search stage's library: settings, the proxy's tables, the search and its outputs.

``search(settings)`` is the stage's entry function (``merino-pl search`` calls it after parsing
its flags, see ``search/cli.py``): budgets in, a recipe YAML out (plus a PNG and the final
population, the three replaced as one unit: the recipe, renamed last, records the others'
SHA-256). ``SearchSettings`` holds the settings as given (a search config file plus overrides);
``resolve_plan`` merges and checks them into the ``SearchPlan`` the search runs. The proxy and
the budget kinds are looked up by name in ``merino_pl.search.registry`` (plugins included).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merino_pl.core.config import MerinoConfig, Recipe
from merino_pl.core.costs import count_flops, count_params
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_path, check_out, read_yaml, sha256_file
from merino_pl.core.latency_table import LatencyTable
from merino_pl.core.space import SearchSpace, load_space
from merino_pl.search import evidence, exhaustive
from merino_pl.search.budget import Budget, CostTables, Genes, cost_tables, parse_budget
from merino_pl.search.entropy import EntropyConfig, arch_entropy
from merino_pl.search.evolution import EvolutionConfig, Problem, SearchResult, evolve
from merino_pl.search.exhaustive import feasible_designs, optimum
from merino_pl.search.registry import (
    Proxy,
    budget_kinds,
    get_proxy,
    proxies,
    register_budget,
    register_proxy,
)

# What other stages may use of the search (the proxy study re-runs its pieces): these names,
# imported from this module. The modules behind them are the stage's internals.
__all__ = [
    "SearchSettings",
    "SearchPlan",
    "search",
    "resolve_plan",
    "build_problem",
    "decode",
    "run_search",
    "Budget",
    "Genes",
    "cost_tables",
    "parse_budget",
    "EntropyConfig",
    "arch_entropy",
    "Proxy",
    "proxies",
    "get_proxy",
    "register_proxy",
    "budget_kinds",
    "register_budget",
    "optimum",
    "feasible_designs",
    "Problem",
]

CONFIG_KEYS = ("budgets", "space", "proxy", "seed", "entropy", "evolution", "name")


@dataclass
class SearchPlan:
    """Everything one search needs, resolved and checked (``resolve_plan``)."""

    budgets: list[Budget]
    space: SearchSpace
    proxy: str = "entropy"  # a registered proxy's name (merino_pl.search.registry)
    seed: int = 0
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    latency: LatencyTable | None = None
    name: str | None = None
    exhaustive: bool = False  # the global optimum by enumeration instead of Algorithm 1


@dataclass
class SearchSettings:
    """One search as asked for: a search config file and the values that override it (None =
    the config's, else the default). ``merino-pl search``'s flags map one to one onto it."""

    config: str | None = None
    budget: list[str] = field(default_factory=list)  # replaces the config's budgets when given
    latency_table: str | None = None
    entropy_table: str | None = None
    space: str | None = None
    proxy: str | None = None
    exhaustive: bool = False
    seed: int | None = None
    iterations: int | None = None
    population: int | None = None
    parents: int | None = None
    name: str | None = None
    out: str | None = None  # the recipe YAML (NAME.png, NAME.population.json beside it); None: print it
    overwrite: bool = False  # replace an existing --out (and its companions)
    no_plot: bool = False
    progress: bool | None = None  # None: on a terminal
    tokens: str | None = None  # planned training tokens (a count or a fit config): record the proxy's evidence
    evidence: str | None = None  # the proxy evidence file (default: the shipped CPU study's)


def _read_config(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        data = read_yaml(path, "search config") or {}
    except MerinoError as e:
        problems.append(str(e))
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: a search config must be a mapping")
        return {}
    problems += [f"{path}: unknown key {k!r} (valid: {', '.join(CONFIG_KEYS)})" for k in data if k not in CONFIG_KEYS]
    if isinstance(data.get("space"), str):  # relative to the config file, as users expect
        data["space"] = str((Path(path).parent / data["space"]).resolve())
    return data


def _collect(problems: list[str], fn: Any, *args: Any) -> Any:
    """Run one check; a ``MerinoError`` joins the list instead of stopping the others."""
    try:
        return fn(*args)
    except MerinoError as e:
        problems.append(str(e))
        return None


def resolve_plan(settings: SearchSettings) -> SearchPlan:
    """Merge config file and options; report every problem in one ``MerinoError``."""
    problems: list[str] = []
    cfg = _read_config(settings.config, problems) if settings.config else {}
    budget_texts = settings.budget or cfg.get("budgets") or []
    if isinstance(budget_texts, str):
        budget_texts = [budget_texts]
    budgets = [b for b in (_collect(problems, parse_budget, str(t)) for t in budget_texts) if b]
    if not budget_texts:
        problems.append("no budget: give at least one --budget (flops=60G, params=60M, latency=50ms) or --config")
    names = [b.cost for b in budgets]
    if len(set(names)) < len(names):
        problems.append(f"each cost may be budgeted once, got {', '.join(b.text for b in budgets)}")
    space = _collect(problems, load_space, settings.space or cfg.get("space"))
    entropy_cfg = cfg.get("entropy") or {}
    if settings.entropy_table and isinstance(entropy_cfg, dict):
        entropy_cfg = {**entropy_cfg, "table": settings.entropy_table}
    entropy = _collect(problems, EntropyConfig.from_dict, entropy_cfg)
    evo = dict(cfg.get("evolution") or {}) if isinstance(cfg.get("evolution") or {}, dict) else cfg.get("evolution")
    for key in ("iterations", "population", "parents"):
        if getattr(settings, key) is not None and isinstance(evo, dict):
            evo[key] = getattr(settings, key)
    evolution = _collect(problems, EvolutionConfig.from_dict, evo)
    proxy = settings.proxy or cfg.get("proxy", "entropy")
    _collect(problems, get_proxy, str(proxy))
    seed = settings.seed if settings.seed is not None else cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    latency = _collect(problems, LatencyTable.load, settings.latency_table) if settings.latency_table else None
    if "latency" in names and not settings.latency_table:
        problems.append("a latency budget needs --latency-table FILE (written by `merino-pl latency profile`)")
    exhaustive = bool(settings.exhaustive)
    evo_flags = [f"--{k}" for k in ("iterations", "population", "parents") if getattr(settings, k) is not None]
    if exhaustive and evo_flags:
        problems.append(f"--exhaustive does not evolve: drop {', '.join(evo_flags)}")
    if settings.out and (Path(settings.out).is_dir() or Path(settings.out).suffix not in (".yaml", ".yml")):
        problems.append(f"--out {settings.out} must be a .yaml file path")
    elif settings.out:
        problems += _check_out(Path(settings.out), settings)
    if problems:
        raise MerinoError("; ".join(problems))
    return SearchPlan(
        budgets, space, proxy, seed, entropy, evolution, latency, settings.name or cfg.get("name"), exhaustive
    )


def build_problem(s: SearchPlan) -> Problem:
    """Per-code score and cost tables for the plan's space, budgets and proxy."""
    genes = Genes.of(s.space)
    costs = [cost_tables(b.cost, s.space, genes, s.latency) for b in s.budgets]
    table = get_proxy(s.proxy).table(s, genes)
    if isinstance(table, CostTables):  # position-dependent: blocks and the projections between them
        return Problem(s.space, genes, np.zeros(len(genes.embed_idx)), costs, s.budgets, table)
    score = np.asarray(table, dtype=float)
    if score.shape != genes.embed_idx.shape:
        raise MerinoError(
            f"proxy {s.proxy!r} returned a table of shape {score.shape}, expected one score per block code "
            f"{genes.embed_idx.shape} (or a CostTables)"
        )
    return Problem(s.space, genes, score, costs, s.budgets)


def decode(space: SearchSpace, genes: Genes, codes: np.ndarray) -> MerinoConfig:
    """A row of block codes as an architecture."""
    blocks = [space.block(genes.embed_dim[c], space.ffn_choices[genes.ffn_idx[c]], genes.num_layers[c]) for c in codes]
    return space.config(blocks)


def run_search(s: SearchPlan, progress: bool | None = None) -> tuple[Problem, SearchResult]:
    """Build the tables and run the proxy's search: its own (naive scaling, already exhaustive
    over its designs), exhaustive, or evolution (certified against the exhaustive optimum when
    that is cheap)."""
    problem = build_problem(s)
    own = get_proxy(s.proxy).search
    if own is not None:
        return problem, own(problem)
    if s.exhaustive:
        return problem, exhaustive.as_result(problem, exhaustive.optimum(problem))
    result = evolve(problem, s.evolution, seed=s.seed, progress=progress)
    result.optimum = exhaustive.certify(problem)
    return problem, result


def arch_costs(arch: MerinoConfig, s: SearchPlan) -> dict[str, float]:
    """Costs of one architecture, from the reference implementations (not the search's tables)."""
    out: dict[str, float] = {"params": count_params(arch), "flops": count_flops(arch)}
    if s.latency is not None:
        out["latency_ms"] = round(s.latency.estimate_ms(arch), 4)
    return out


def make_recipe(s: SearchPlan, problem: Problem, result: SearchResult, name: str, command: str | None = None) -> Recipe:
    """The best architecture as a recipe whose provenance says how it was found."""
    arch = decode(s.space, problem.genes, result.codes[0])
    entropy = {k: round(v, 3) for k, v in arch_entropy(arch, s.entropy).items()}
    provenance = {
        "source": "search",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "budgets": [b.text for b in s.budgets],
        "costs": arch_costs(arch, s),
        "entropy": entropy,
        "proxy": s.proxy,
        "proxy_score": round(float(result.scores[0]), 4),
        "seed": s.seed,
        "entropy_config": s.entropy.to_dict(),
        "evolution": vars(s.evolution).copy() if result.method == "evolution" else None,
        "space": {"file": s.space.source, **s.space.to_dict()},
        "search": search_provenance(result),
    }
    if s.latency is not None:
        provenance["latency_table"] = {"file": s.latency.source, "device": s.latency.device}
    return Recipe(name=name, architecture=arch, provenance={k: v for k, v in provenance.items() if v is not None})


def search_provenance(result: SearchResult) -> dict[str, Any]:
    """How the result was found; an evolutionary one with its fraction of the global optimum."""
    opt = result.optimum
    if result.method == "exhaustive":
        return {
            "method": "exhaustive",
            "algorithm": opt.method,
            "feasible": opt.n_feasible,
            "seconds": round(opt.seconds, 3),
        }
    out: dict[str, Any] = {
        "method": result.method,
        "candidates": result.candidates,
        "accepted": result.accepted,
        "generations": result.generations,
        "seconds": round(result.seconds, 3),
    }
    if isinstance(opt, exhaustive.Optimum):
        out["optimum"] = {
            "score": round(opt.score, 4),
            "fraction": float(result.scores[0] / opt.score) if opt.score else None,
            "feasible": opt.n_feasible,
            "seconds": round(opt.seconds, 3),
        }
    elif opt is not None:
        out["optimum"] = f"not computed: {opt}"
    return out


def population_json(s: SearchPlan, problem: Problem, result: SearchResult) -> dict[str, Any]:
    g = problem.genes
    members = [
        {
            "embed_dims": g.embed_dim[c].tolist(),
            "ffn_dims": g.ffn_dim[c].tolist(),
            "num_layers": g.num_layers[c].tolist(),
            "score": round(float(sc), 4),
            "costs": dict(zip((b.cost for b in s.budgets), co.tolist())),
        }
        for c, sc, co in zip(result.codes, result.scores, result.costs)
    ]
    return {"proxy": s.proxy, "budgets": [b.text for b in s.budgets], "history": result.history, "population": members}


def plot(path: Path, s: SearchPlan, result: SearchResult) -> None:
    """Best score over the search, and the final population's score vs its first cost, as a PNG
    at ``path`` (``write_outputs`` passes a temporary file, renamed with the recipe)."""
    from merino_pl.core.plotting import pyplot, save_figure

    budget = s.budgets[0]
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(11, 4))
    x, y = zip(*result.history)
    a.plot(x, y, marker="o" if len(x) == 1 else None)
    xlabel = "feasible architectures (exhaustive)" if result.method == "exhaustive" else "candidates generated"
    a.set(xlabel=xlabel, ylabel=f"best {s.proxy} score", title=f"search progress ({result.method})")
    b.scatter(result.costs[:, 0], result.scores, s=10, alpha=0.6, label="final population")
    b.scatter(result.costs[:1, 0], result.scores[:1], s=60, c="red", marker="*", label="best (the recipe)")
    b.axvline(budget.limit, ls="--", c="gray", label=f"budget {budget.text}")
    b.set(xlabel=budget.cost, ylabel=f"{s.proxy} score", title="final population")
    b.legend(loc="lower right")
    save_figure(fig, path, dpi=110)


def summary(recipe: Recipe, result: SearchResult) -> str:
    p = recipe.provenance
    blocks = recipe.architecture.blocks
    return "\n".join(
        [
            f"{recipe.name}: {p['proxy']} search, budgets {', '.join(p['budgets'])}, seed {p['seed']}",
            "  E = "
            + str([b.embed_dim for b in blocks])
            + "  F = "
            + str([b.ffn for b in blocks])
            + "  L = "
            + str([b.num_layers for b in blocks]),
            f"  params {p['costs']['params'] / 1e6:.2f} M, FLOPs {p['costs']['flops'] / 1e9:.2f} G"
            + (f", latency {p['costs']['latency_ms']:.2f} ms" if "latency_ms" in p["costs"] else ""),
            f"  entropy MHSA {p['entropy']['mhsa']:.1f}  FFN {p['entropy']['ffn']:.1f}  "
            f"total {p['entropy']['total']:.1f}",
            *_search_lines(result),
        ]
    )


def _search_lines(result: SearchResult) -> list[str]:
    opt = result.optimum
    if result.method == "exhaustive":
        return [
            f"  exhaustive ({opt.method}): the global optimum of {opt.n_feasible:,} feasible architectures, "
            f"{opt.seconds:.2f} s"
        ]
    lines = [
        f"  {result.candidates} candidates ({result.accepted} accepted) in {result.generations} generations, "
        f"{result.seconds:.2f} s"
    ]
    if isinstance(opt, exhaustive.Optimum):
        lines.append(
            f"  {result.scores[0] / opt.score:.4%} of the global optimum {opt.score:.1f} "
            f"({opt.n_feasible:,} feasible architectures, exhaustive in {opt.seconds:.2f} s)"
        )
    elif opt is not None:
        lines.append(f"  global optimum not computed: {opt}")
    return lines


def search(settings: SearchSettings, command: str | None = None) -> Recipe:
    """The stage's entry function: resolve and check ``settings`` (every problem in one
    ``MerinoError``), search, print the summary and write the recipe (with its PNG and
    population) to ``settings.out``, or print it when there is no ``out``. ``command``: the
    command line recorded in the recipe's provenance."""
    s = resolve_plan(settings)
    if settings.tokens:  # checked before the search: a bad count or evidence file is one line, at once
        evidence.planned_tokens(settings.tokens)
        evidence.load_evidence(settings.evidence)
    name = s.name or (
        Path(settings.out).stem if settings.out else f"search-{s.budgets[0].text.replace('=', '-').lower()}"
    )
    searched: list[Any] = []  # the last search's (problem, result)

    def found(plan: SearchPlan) -> Recipe:
        problem, result = run_search(plan, progress=settings.progress)
        searched[:] = [problem, result]
        return make_recipe(plan, problem, result, name, command)

    recipe, verdict = found(s), None
    if settings.tokens:
        recipe, verdict = evidence.apply_evidence(settings, s, recipe, found)
    problem, result = searched
    print(summary(recipe, result))
    if verdict:
        print(f"  {verdict.line()}")
    if not settings.out:
        print(recipe.to_yaml())
        return recipe
    out = Path(settings.out)
    extra = write_outputs(out, recipe, population_json(s, problem, result), None if settings.no_plot else (s, result))
    print(f"wrote {out} (+ {' '.join(p.name for p in extra)})")
    return recipe


def companions(out: Path, plot: bool = True) -> list[Path]:
    """The files written beside the recipe ``out``: the population JSON, and the PNG."""
    return [out.with_suffix(".population.json")] + ([out.with_suffix(".png")] if plot else [])


def _check_out(out: Path, s: SearchSettings) -> list[str]:
    """An unwritable ``--out`` is found before the search, not after it; an existing recipe or
    companion is replaced only with ``--overwrite`` (nothing the user did not name is touched)."""
    problems = check_out(out, file=True)
    taken = [p for p in [out, *companions(out, not s.no_plot)] if p.exists() or p.is_symlink()]
    if taken and not s.overwrite:
        problems.append(
            f"--out {out}: {', '.join(map(str, taken))} already exists (pass --overwrite to replace "
            f"{', '.join(p.name for p in [out, *companions(out, not s.no_plot)])})"
        )
    return problems


def write_outputs(out: Path, recipe: Recipe, population: dict[str, Any], plot_args: tuple | None) -> list[Path]:
    """Recipe, population JSON and PNG as one unit: all three are written to temporary files
    first (a failure leaves the previous run's files untouched), then renamed into place, the
    recipe last. Its ``provenance.outputs`` holds the SHA-256 of the two others, so a kill
    between the renames leaves files that say they do not belong together, never a silent mix."""
    extra = companions(out, plot_args is not None)
    with contextlib.ExitStack() as stack:  # renames run in reverse order of entry: the recipe last
        recipe_tmp = stack.enter_context(atomic_path(out))
        staged = [stack.enter_context(atomic_path(path)) for path in extra]
        staged[0].write_text(json.dumps(population, indent=2, default=str) + "\n", encoding="utf-8")
        if plot_args:
            plot(staged[1], *plot_args)
        recipe.provenance["outputs"] = {path.name: sha256_file(tmp) for path, tmp in zip(extra, staged)}
        recipe_tmp.write_text(recipe.to_yaml(), encoding="utf-8")
    return extra
