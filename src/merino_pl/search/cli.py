"""``merino-pl search``: budgets in, a recipe YAML out (plus a PNG and the final population, the
three replaced as one unit: the recipe, renamed last, records the others' SHA-256).

    merino-pl search --budget flops=60G --out recipes/my-60g.yaml
    merino-pl search --config search/flops-60g.yaml --budget params=60M --out recipes/x.yaml
    merino-pl search --budget latency=50ms --latency-table jetson.json --proxy params
    merino-pl search --config search/flops-60g.yaml --exhaustive --out recipes/opt-60g.yaml
    merino-pl search --budget flops=60G --proxy my-proxy --out r.yaml   (a plugin's, see docs/search.md)

``--exhaustive`` replaces the evolutionary search by exact enumeration (``exhaustive.optimum``):
the global optimum and the number of feasible architectures. Without it, the evolutionary
result is reported as a fraction of that optimum whenever it is cheap to compute.

A search config (``search/flops-*.yaml``) names the budgets, the space, the proxy, the seed and
the entropy (ε, init, α, β) and evolution (M, K, T, mutation steps) settings; command-line
options override it. The recipe records all of it under ``provenance``. An existing ``--out``
(or its PNG / population JSON) is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields

from merino_pl.search.api import SearchSettings, search


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="search config YAML (search/flops-60g.yaml, ...): budgets, space, entropy and evolution settings",
    )
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="COST=LIMIT",
        help="flops=60G, params=60M or latency=50ms; repeat for several (replaces the config's budgets)",
    )
    p.add_argument(
        "--latency-table", help="device latency table JSON (from `merino-pl latency profile`) for latency budgets"
    )
    p.add_argument(
        "--entropy-table",
        help="entropy table JSON for a custom space / config "
        "(python -m merino_pl.search.entropy build-table); default: the shipped one + the closed form",
    )
    p.add_argument("--space", help="search space YAML (default: the config's, else the shipped search/space.yaml)")
    p.add_argument(
        "--proxy",
        default=None,
        help="objective, a registered proxy: entropy (MeRino, default), params (LTS), naive (uniform scaling), "
        "flops, layer_applications, or a plugin's (an unknown name lists them)",
    )
    p.add_argument(
        "--exhaustive",
        action="store_true",
        help="return the global optimum by exact enumeration (and count the feasible architectures) "
        "instead of evolving",
    )
    p.add_argument(
        "--tokens",
        metavar="N|FIT_CONFIG",
        help="planned training tokens (600B, 4.9M, or the fit config to train with): record and print what the "
        "proxy studies measured for the chosen proxy at that many tokens per decoder parameter",
    )
    p.add_argument(
        "--evidence", help="proxy evidence JSON (`merino-pl study regime`; default: the shipped CPU study's)"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="T: candidates to generate (default 100000)")
    p.add_argument("--population", type=int, default=None, help="M (default 512)")
    p.add_argument("--parents", type=int, default=None, help="K (default 64)")
    p.add_argument("--name", help="recipe name (default: the --out file's stem)")
    p.add_argument("--out", help="write the recipe here (YAML), with NAME.png and NAME.population.json beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its PNG / population")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)"
    )


def settings(args: argparse.Namespace) -> SearchSettings:
    """The parsed flags as the stage's typed settings."""
    return SearchSettings(**{f.name: getattr(args, f.name) for f in fields(SearchSettings)})


def _command(opts: SearchSettings) -> str:
    """The command line that reproduces this search (the flags as resolved by argparse)."""
    parts = ["merino-pl search"]
    for key, value in asdict(opts).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            parts += [f"{flag} {v}" for v in value]
        elif value is True:
            parts.append(flag)
        elif value not in (None, False):
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``merino-pl search`` (see the module docstring)."""
    s = settings(args)
    search(s, _command(s))
    return 0
