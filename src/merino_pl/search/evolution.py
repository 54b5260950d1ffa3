"""Evolutionary search (paper Algorithms 1–2), vectorised over the whole population.

An architecture is a row of ``num_blocks`` block codes (E, F, L indices; see ``budget.Genes``).
Scores (the Eq. 15 entropy, or a baseline proxy) and costs are per-code tables, so one
generation is a handful of numpy gathers over M rows, not M Python objects.

Algorithm 1, as implemented: keep the K best architectures as P; make M − K children, each a
copy of a random member of P with ONE block mutated (Algorithm 2: its depth, width and FFN each
moved by a random step within ±``*_steps``); reject children that leave the space, break the
non-decreasing widths, or exceed any budget; add the others to P at once, so that later children
of the same generation may descend from them (as in Algorithm 1, where P grows inside the inner
loop; done here in rounds of K children); drop duplicates, keep the K best; repeat.
T (``iterations``) counts mutations, i.e. candidates generated (rejected ones included):
100 000 candidates in ~200 generations of 448. That is what the paper's 0.05 h on a Jetson
Nano CPU can evaluate in Python (~1.8 ms a candidate); T generations of 448 would be 45 M.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from merino_pl.core.errors import MerinoError
from merino_pl.core.space import SearchSpace
from merino_pl.search import config_section
from merino_pl.search.budget import Budget, CostTables, Genes, min_cost

PROXIES = ("entropy", "params", "naive")


@dataclass(frozen=True)
class EvolutionConfig:
    """Algorithm 1–2 settings (paper appendix defaults)."""

    population: int = 512  # M
    parents: int = 64  # K
    iterations: int = 100_000  # T: mutations (candidates) generated
    embed_steps: int = 2  # a mutation moves E by up to ±2 choices,
    ffn_steps: int = 2  # F (or the FFN ratio) by up to ±2,
    layer_steps: int = 1  # and L by up to ±1
    init_tries: int = 64  # random batches of M to seed the population before giving up

    @classmethod
    def from_dict(cls, data: Any, source: str = "evolution") -> EvolutionConfig:
        known = set(cls.__dataclass_fields__)
        data, problems = config_section(data, known, source)
        for k, v in data.items():
            if k in known and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k.endswith("steps") else 1)):
                problems.append(
                    f"{source}.{k} must be a {'non-negative' if k.endswith('steps') else 'positive'} integer, got {v!r}"
                )
        cfg = None if problems else cls(**data)
        if cfg is not None and cfg.parents >= cfg.population:
            problems.append(f"{source}.parents ({cfg.parents}) must be smaller than population ({cfg.population})")
        if problems:
            raise MerinoError("; ".join(problems))
        return cfg  # type: ignore[return-value]


@dataclass
class Problem:
    """What to maximise (per-code ``score`` table) subject to ``budgets`` over a space."""

    space: SearchSpace
    genes: Genes
    score: np.ndarray  # (num_codes,): a block's contribution to the objective
    costs: list[CostTables]
    budgets: list[Budget]
    extra_score: CostTables | None = None  # position-dependent proxies (decoder params)

    @property
    def limits(self) -> np.ndarray:
        return np.array([b.limit for b in self.budgets])

    def evaluate(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, costs (P, n_budgets), feasible) of a population of code rows."""
        ei = self.genes.embed_idx[codes]
        score = self.score[codes].sum(axis=1)
        if self.extra_score is not None:
            score = score + self.extra_score.evaluate(codes, ei)
        costs = np.stack([c.evaluate(codes, ei) for c in self.costs], axis=1)
        ok = (np.diff(ei, axis=1) >= 0).all(axis=1) & (costs <= self.limits).all(axis=1)
        return score, costs, ok


@dataclass
class SearchResult:
    """The final population (best first), its scores and costs, and the search trace."""

    codes: np.ndarray  # (P, num_blocks), sorted by score, best first
    scores: np.ndarray
    costs: np.ndarray  # (P, n_budgets)
    history: list[tuple[int, float]] = field(default_factory=list)  # (candidates so far, best score)
    candidates: int = 0
    generations: int = 0
    accepted: int = 0
    seconds: float = 0.0
    method: str = "evolution"  # "evolution", "exhaustive" or "naive scaling"
    optimum: Any = None  # exhaustive.Optimum of the same problem, or why it was not computed (str)


def check_meetable(problem: Problem) -> list[np.ndarray]:
    """Raise ``MerinoError`` if some budget is below the space's cheapest architecture.

    Returns the cheapest architecture for each cost (the search seeds with the feasible ones).
    """
    seeds, problems = [], []
    for tables, budget in zip(problem.costs, problem.budgets):
        cost, codes = min_cost(tables)
        if cost > budget.limit:
            problems.append(
                f"budget {budget.text} cannot be met: the cheapest architecture of the space needs "
                f"{cost:.4g} ({problem.space.source})"
            )
        seeds.append(np.array(codes))
    if problems:
        raise MerinoError("; ".join(problems))
    return seeds


def _random_population(problem: Problem, n: int, rng: np.random.Generator) -> np.ndarray:
    space, nb = problem.space, problem.space.num_blocks
    ei = np.sort(rng.integers(len(space.embed_dims), size=(n, nb)), axis=1)  # widths non-decreasing
    fi = rng.integers(len(space.ffn_choices), size=(n, nb))
    li = rng.integers(len(space.num_layers), size=(n, nb))
    return Genes.encode(space, ei, fi, li)


def initial_population(problem: Problem, cfg: EvolutionConfig, rng: np.random.Generator) -> np.ndarray:
    """Feasible random architectures (up to M), plus the cheapest ones that meet every budget."""
    seeds = np.stack(check_meetable(problem))
    found = [seeds[problem.evaluate(seeds)[2]]]
    count = len(found[0])
    for _ in range(cfg.init_tries):
        if count >= cfg.population:
            break
        cand = _random_population(problem, cfg.population, rng)
        found.append(cand[problem.evaluate(cand)[2]])
        count += len(found[-1])
    pop = np.unique(np.concatenate(found), axis=0)[: cfg.population]
    if not len(pop):
        text = ", ".join(b.text for b in problem.budgets)
        raise MerinoError(
            f"no architecture of the space meets all budgets at once ({text}); each alone can be met: relax one"
        )
    return pop


def mutate(problem: Problem, parents: np.ndarray, n: int, cfg: EvolutionConfig, rng: np.random.Generator) -> np.ndarray:
    """Algorithm 2 for ``n`` children: one random block of a random parent, every gene nudged.

    Out-of-range genes are marked with code -1 (rejected), never clipped: clipping would pile
    children onto the space's edges.
    """
    g, space = problem.genes, problem.space
    children = parents[rng.integers(len(parents), size=n)].copy()
    block = rng.integers(space.num_blocks, size=n)
    rows = np.arange(n)
    code = children[rows, block]
    sizes = (len(space.embed_dims), len(space.ffn_choices), len(space.num_layers))
    steps = (cfg.embed_steps, cfg.ffn_steps, cfg.layer_steps)
    new, inside = [], np.ones(n, bool)
    for gene, size, step in zip((g.embed_idx, g.ffn_idx, g.layer_idx), sizes, steps):
        v = gene[code] + rng.integers(-step, step + 1, size=n)
        inside &= (v >= 0) & (v < size)
        new.append(np.clip(v, 0, size - 1))
    children[rows, block] = np.where(inside, Genes.encode(space, *new), -1)
    return children


def evolve(problem: Problem, cfg: EvolutionConfig, seed: int = 0, progress: bool | None = None) -> SearchResult:
    """Algorithm 1. Deterministic for a given seed; ``progress=None``: a bar only on a terminal."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    pop = initial_population(problem, cfg, rng)
    score, costs, _ = problem.evaluate(pop)
    res = SearchResult(pop, score, costs)
    bar = tqdm(
        total=cfg.iterations, desc="search", unit="cand", disable=(not progress) if progress is not None else None
    )
    while res.candidates < cfg.iterations:
        keep = np.argsort(-res.scores, kind="stable")[: cfg.parents]
        codes, scores, costs = [res.codes[keep]], [res.scores[keep]], [res.costs[keep]]
        budget = min(cfg.population - cfg.parents, cfg.iterations - res.candidates)
        done = 0
        while done < budget:  # Alg. 1's inner loop: P grows, and children may be chosen as parents
            n = min(cfg.parents, budget - done)
            children = mutate(problem, np.concatenate(codes), n, cfg, rng)
            children = children[(children >= 0).all(axis=1)]
            c_score, c_costs, ok = problem.evaluate(children)
            codes.append(children[ok]), scores.append(c_score[ok]), costs.append(c_costs[ok])
            done += n
            res.accepted += int(ok.sum())
        merged, first = np.unique(np.concatenate(codes), axis=0, return_index=True)  # no clones
        m_score, m_costs = np.concatenate(scores)[first], np.concatenate(costs)[first]
        order = np.argsort(-m_score, kind="stable")
        res.codes, res.scores, res.costs = merged[order], m_score[order], m_costs[order]
        res.candidates += budget
        res.generations += 1
        res.history.append((res.candidates, float(res.scores[0])))
        bar.update(budget)
        bar.set_postfix(best=f"{res.scores[0]:.1f}", refresh=False)
    bar.close()
    res.seconds = time.perf_counter() - start
    return res


def naive_scaling(problem: Problem) -> SearchResult:
    """Paper Fig. 5's naive baseline: identical blocks (E, F = the ratio nearest 4, L) everywhere,
    scaled up in width and depth until the first budget is reached. Exhaustive (the uniform
    subspace is small), so no evolution is needed.
    """
    start = time.perf_counter()
    g, nb = problem.genes, problem.space.num_blocks
    standard = np.zeros(len(g.embed_idx), bool)
    for e in np.unique(g.embed_dim):  # per width, the FFN choice closest to the usual F = 4E
        rows = np.flatnonzero(g.embed_dim == e)
        gap = np.abs(np.log(g.ffn_dim[rows] / (4.0 * e)))
        standard[rows[gap == gap.min()]] = True
    codes = np.repeat(np.flatnonzero(standard)[:, None], nb, axis=1)
    _, costs, ok = problem.evaluate(codes)
    if not ok.any():
        raise MerinoError("naive scaling: no uniform architecture (identical blocks, F ≈ 4E) meets the budget")
    codes, costs = codes[ok], costs[ok]
    key = np.lexsort((g.num_layers[codes[:, 0]], g.embed_dim[codes[:, 0]], costs[:, 0]))[::-1]
    codes, costs = codes[key], costs[key]
    score = costs[:, 0] / problem.budgets[0].limit  # how much of the budget it uses
    return SearchResult(
        codes,
        score,
        costs,
        [(len(codes), float(score[0]))],
        candidates=len(ok),
        generations=1,
        accepted=len(codes),
        seconds=time.perf_counter() - start,
        method="naive scaling",
    )
