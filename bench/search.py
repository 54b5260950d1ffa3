"""Benchmark of the search stage (issues 3, 14): wall time of the full default search on one core
against the paper's 0.05 h (180 s on a Jetson Nano CPU), the exhaustive optimum (time, feasible
count) and the evolutionary result as a fraction of it, the paper recipes' ranks among all
feasible designs under β = 1/16 and β = 1, and the Fig. 5 proxies side by side.

    python bench/search.py                 # T=100 000, M=512, K=64 at 60/110/160 GFLOPs, 3 repeats, 5 EA seeds
    python bench/search.py --quick         # T=10 000, one repeat, 2 seeds, 60 G only (while developing)

Budgets are the shipped configs' (search/flops-{60,110,160}g.yaml: 160 G is 163.05 G there, the
paper MeRino-64M's own cost).

Prints tables and writes runs/bench/search.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says (before numpy loads BLAS)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.core.config import load_recipe  # noqa: E402
from merino_pl.core.costs import count_flops, count_params  # noqa: E402
from merino_pl.core.space import load_space  # noqa: E402
from merino_pl.search import entropy as ent  # noqa: E402
from merino_pl.search import exhaustive  # noqa: E402
from merino_pl.search.api import SearchPlan, build_problem, decode, run_search  # noqa: E402
from merino_pl.search.budget import Genes, parse_budget  # noqa: E402
from merino_pl.search.entropy import EntropyConfig  # noqa: E402
from merino_pl.search.evolution import EvolutionConfig, evolve  # noqa: E402

PAPER_SECONDS = 0.05 * 3600  # paper Table 7: 0.05 h on a Jetson Nano CPU
PAPER_RECIPES = {60: "merino-52m", 110: "merino-61m", 160: "merino-64m"}


def budget_text(gflops: int) -> str:
    """The shipped config's budget for a paper target (``flops=163.05G`` for 160), else ``flops=NG``."""
    path = REPO / "search" / f"flops-{gflops}g.yaml"
    return str(yaml.safe_load(path.read_text())["budgets"][0]) if path.is_file() else f"flops={gflops}G"


def _cold_caches() -> None:
    for cached in (ent.matrix_entropy, ent._load_table, ent.shipped_table):
        cached.cache_clear()


def time_full_search(space, gflops: int, iterations: int, repeats: int) -> dict:
    """Wall time of table building (once per search) and of Algorithm 1 itself."""
    s = SearchPlan([parse_budget(budget_text(gflops))], space, evolution=EvolutionConfig(iterations=iterations))
    setups, searches, result = [], [], None
    for _ in range(repeats):
        _cold_caches()  # every repeat pays the table load and the entropy values, as a fresh process does
        t0 = time.perf_counter()
        problem = build_problem(s)
        t1 = time.perf_counter()
        result = evolve(problem, s.evolution, seed=0, progress=False)
        t2 = time.perf_counter()
        setups.append(t1 - t0)
        searches.append(t2 - t1)
    total = [a + b for a, b in zip(setups, searches)]
    best = decode(space, problem.genes, result.codes[0])
    return {
        "budget_gflops": gflops,
        "iterations": iterations,
        "generations": result.generations,
        "accepted": result.accepted,
        "setup_s": statistics.median(setups),
        "search_s": statistics.median(searches),
        "total_s_median": statistics.median(total),
        "total_s_min": min(total),
        "speedup_vs_paper": PAPER_SECONDS / statistics.median(total),
        "best_entropy": float(result.scores[0]),
        "best": _arch(best),
    }


def _arch(arch) -> dict:
    e = ent.recipe_entropy(arch)
    return {
        "E": [b.embed_dim for b in arch.blocks],
        "F": [b.ffn for b in arch.blocks],
        "L": [b.num_layers for b in arch.blocks],
        "entropy": round(e["total"], 1),
        "params_M": round(count_params(arch) / 1e6, 2),
        "gflops": round(count_flops(arch) / 1e9, 2),
    }


def compare_proxies(space, gflops: int, iterations: int) -> list[dict]:
    """Paper Fig. 5 baselines under the same budget, plus the paper's own recipe for reference."""
    rows = []
    for proxy in ("entropy", "params", "naive"):
        s = SearchPlan(
            [parse_budget(budget_text(gflops))], space, proxy=proxy, evolution=EvolutionConfig(iterations=iterations)
        )
        t0 = time.perf_counter()
        problem, result = run_search(s, progress=False)
        rows.append(
            {
                "budget_gflops": gflops,
                "method": proxy,
                "seconds": round(time.perf_counter() - t0, 3),
                **_arch(decode(space, problem.genes, result.codes[0])),
            }
        )
    paper = load_recipe(PAPER_RECIPES[gflops]).architecture
    rows.append({"budget_gflops": gflops, "method": f"paper {PAPER_RECIPES[gflops]}", "seconds": None, **_arch(paper)})
    return rows


def certify(space, gflops: int, iterations: int, seeds: int, repeats: int) -> dict:
    """Exhaustive optimum (cold: tables + enumeration, median of ``repeats``) vs the EA over ``seeds``."""
    s = SearchPlan([parse_budget(budget_text(gflops))], space, evolution=EvolutionConfig(iterations=iterations))
    times = []
    for _ in range(repeats):
        _cold_caches()
        t0 = time.perf_counter()
        opt = exhaustive.optimum(build_problem(s))
        times.append(time.perf_counter() - t0)
    problem = build_problem(s)
    runs = [evolve(problem, s.evolution, seed=k, progress=False) for k in range(seeds)]
    fractions = [float(r.scores[0] / opt.score) for r in runs]
    return {
        "budget": budget_text(gflops),
        "budget_gflops": gflops,
        "exhaustive_s": statistics.median(times),
        "feasible": opt.n_feasible,
        "optimum": opt.score,
        "optimum_arch": _arch(decode(space, problem.genes, opt.codes)),
        "ea_s": statistics.median(r.seconds for r in runs),
        "ea_iterations": iterations,
        "ea_fractions": fractions,
        "ea_fraction_seed0": fractions[0],
        "ea_fraction_min": min(fractions),
        "ea_fraction_mean": float(np.mean(fractions)),
    }


def paper_ranks(space, gflops: int, beta: float) -> dict:
    """Where the paper's recipe for a target ranks among all feasible designs under Eq. 15 with β."""
    s = SearchPlan([parse_budget(budget_text(gflops))], space, entropy=EntropyConfig(beta=beta))
    problem = build_problem(s)
    opt = exhaustive.optimum(problem)
    arch = load_recipe(PAPER_RECIPES[gflops]).architecture
    codes = Genes.encode(
        space,
        np.array([space.embed_dims.index(b.embed_dim) for b in arch.blocks]),
        np.array([space.ffn_choices.index(b.ffn_ratio) for b in arch.blocks]),
        np.array([space.num_layers.index(b.num_layers) for b in arch.blocks]),
    )
    score = float(problem.evaluate(codes[None])[0][0])
    rank = exhaustive.count_better(problem, score) + 1
    return {
        "budget": budget_text(gflops),
        "beta": beta,
        "recipe": PAPER_RECIPES[gflops],
        "rank": rank,
        "feasible": opt.n_feasible,
        "top_percent": 100 * rank / opt.n_feasible,
        "score": score,
        "fraction_of_optimum": score / opt.score,
        "optimum_arch": _arch(decode(space, problem.genes, opt.codes)),
    }


def time_entropy_paths(samples: int = 1) -> dict:
    """Entropy of MeRino-52M: exact (one sampled matrix per shape) vs the fast path."""
    arch = load_recipe("merino-52m").architecture
    shapes = {(b.embed_dim, b.embed_dim) for b in arch.blocks} | {(b.embed_dim, b.ffn) for b in arch.blocks}
    t0 = time.perf_counter()
    for n, m in shapes:
        ent.matrix_entropy_exact(n, m, rel_se=1.0, max_samples=samples)
    exact = time.perf_counter() - t0
    _cold_caches()
    t0 = time.perf_counter()
    ent.recipe_entropy(arch)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(1000):
        ent.recipe_entropy(arch)
    warm = (time.perf_counter() - t0) / 1000
    return {"exact_mc_one_sample_s": exact, "fast_cold_s": cold, "fast_cached_s": warm}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T=10 000, one repeat, 60 G only")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="EA seeds per budget for the fraction of the optimum (default 5; --quick: 2)",
    )
    p.add_argument("--budgets", default=None, help="comma-separated GFLOPs (default 60,110,160; --quick: 60)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "search.json"))
    args = p.parse_args()
    iterations = args.iterations or (10_000 if args.quick else 100_000)
    repeats = args.repeats or (1 if args.quick else 3)
    seeds = args.seeds or (2 if args.quick else 5)
    budgets = [int(b) for b in (args.budgets or ("60" if args.quick else "60,110,160")).split(",")]
    space = load_space(REPO / "search" / "space.yaml")

    timing = time_full_search(space, 60, iterations, repeats)
    print(f"\nFull default search at 60 GFLOPs (T={iterations:,}, M=512, K=64), one core, median of {repeats}:")
    print(f"{'setup (tables)':>16} {'search':>9} {'total':>9} {'paper':>7} {'speed-up':>9}")
    print(
        f"{timing['setup_s']:>15.3f}s {timing['search_s']:>8.3f}s {timing['total_s_median']:>8.3f}s "
        f"{PAPER_SECONDS:>6.0f}s {timing['speedup_vs_paper']:>8.0f}x"
    )

    cert = [certify(space, g, iterations, seeds, repeats) for g in budgets]
    print(f"\nExhaustive optimum vs the evolutionary search (T={iterations:,}, seeds 0..{seeds - 1}), one core:")
    print(f"{'budget':>15} {'feasible':>15} {'exhaustive':>10} {'EA':>7} {'EA/opt seed 0':>14} {'min':>9} {'mean':>9}")
    for c in cert:
        print(
            f"{c['budget']:>15} {c['feasible']:>15,} {c['exhaustive_s']:>9.3f}s {c['ea_s']:>6.2f}s "
            f"{c['ea_fraction_seed0']:>13.5%} {c['ea_fraction_min']:>8.4%} {c['ea_fraction_mean']:>8.4%}"
        )
    ranks = [paper_ranks(space, g, beta) for beta in (1 / 16, 1.0) for g in budgets if g in PAPER_RECIPES]
    print("\nThe paper's recipes among all feasible designs (Eq. 15, default ε / std / α):")
    print(
        f"{'β':>6} {'budget':>15} {'recipe':<11} {'rank':>12} {'of':>15} {'top':>8} {'vs optimum':>10}  optimum (E / L)"
    )
    for r in ranks:
        o = r["optimum_arch"]
        print(
            f"{r['beta']:>6.4g} {r['budget']:>15} {r['recipe']:<11} {r['rank']:>12,} {r['feasible']:>15,} "
            f"{r['top_percent']:>7.3f}% {r['fraction_of_optimum']:>10.4f}  {o['E']} / {o['L']}"
        )

    rows = [r for g in budgets for r in compare_proxies(space, g, iterations)]
    print(f"\nProxies side by side (paper Fig. 5), T={iterations:,}; entropy under the default config:")
    print(
        f"{'GFLOPs':>6} {'method':<18} {'E':<22} {'F':<24} {'L':<13} "
        f"{'entropy':>9} {'vs entropy':>10} {'params':>8} {'GFLOPs':>7}"
    )
    for r in rows:
        ref = next(x["entropy"] for x in rows if x["budget_gflops"] == r["budget_gflops"] and x["method"] == "entropy")
        print(
            f"{r['budget_gflops']:>6} {r['method']:<18} {str(r['E']):<22} {str(r['F']):<24} {str(r['L']):<13} "
            f"{r['entropy']:>9.0f} {r['entropy'] / ref:>9.3f}x {r['params_M']:>7.2f}M {r['gflops']:>7.2f}"
        )

    paths = time_entropy_paths()
    print(
        "\nEntropy of MeRino-52M: exact (1 Monte-Carlo sample per shape, eigvalsh) "
        f"{paths['exact_mc_one_sample_s'] * 1e3:.1f} ms, "
        f"fast cold {paths['fast_cold_s'] * 1e3:.2f} ms, cached {paths['fast_cached_s'] * 1e6:.1f} us"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "full_search": timing,
                "exhaustive": cert,
                "paper_ranks": ranks,
                "proxies": rows,
                "entropy_paths": paths,
                "paper_seconds": PAPER_SECONDS,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
