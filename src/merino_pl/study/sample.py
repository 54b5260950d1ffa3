"""Uniform sampling of architectures from a space's feasible set under budgets.

An architecture of the space is a choice of widths E_1 ≤ … ≤ E_N and, per block, an FFN choice
and a depth. Every width sequence admits the same number of (FFN, depth) choices, so drawing a
width sequence uniformly from all non-decreasing ones, then each block's (FFN, depth) uniformly,
draws uniformly from the whole space; keeping the draws that fit every budget (rejection) then
draws uniformly from the feasible set, as the paper samples its Fig. 3 architectures. Draws are
taken in batches from one seeded generator and de-duplicated in order, so the first n of a
larger sample are the sample of size n (a study can grow without changing what it trained).
"""

from __future__ import annotations

import itertools

import numpy as np

from merino_pl.core.config import MerinoConfig
from merino_pl.core.errors import MerinoError
from merino_pl.core.space import SearchSpace
from merino_pl.search.api import Budget, Genes, Problem, cost_tables, feasible_designs

MAX_DRAWS = 50_000_000  # architectures drawn at most for one sample (~8 s of rejection sampling)


def width_sequences(space: SearchSpace) -> np.ndarray:
    """Every non-decreasing sequence of width indices, (S, num_blocks)."""
    seqs = itertools.combinations_with_replacement(range(len(space.embed_dims)), space.num_blocks)
    return np.array(list(seqs), dtype=np.int64)


def feasible(
    space: SearchSpace, genes: Genes, budgets: list[Budget], codes: np.ndarray, tables: list | None = None
) -> np.ndarray:
    """Which rows of block codes fit every budget (widths are non-decreasing by construction);
    ``tables``: the budgets' cost tables, when the caller checks many batches."""
    ei = genes.embed_idx[codes]
    tables = tables or [cost_tables(b.cost, space, genes) for b in budgets]
    ok = np.ones(len(codes), dtype=bool)
    for b, t in zip(budgets, tables):
        ok &= t.evaluate(codes, ei) <= b.limit
    return ok


def draw(space: SearchSpace, widths: np.ndarray, rng: np.random.Generator, batch: int) -> np.ndarray:
    """``batch`` architectures drawn uniformly from the whole space (with replacement), as codes."""
    ei = widths[rng.integers(len(widths), size=batch)]
    fi = rng.integers(len(space.ffn_choices), size=ei.shape)
    li = rng.integers(len(space.num_layers), size=ei.shape)
    return Genes.encode(space, ei, fi, li)


def check_sample(space: SearchSpace, budgets: list[Budget], n: int, max_draws: int = MAX_DRAWS) -> None:
    """Refuse at once (one ``MerinoError`` naming the budget) a sample the budgets cannot give:
    a budget below the space's cheapest architecture, fewer than ``n`` feasible architectures,
    or so few of the space's that rejection sampling would not find ``n`` in ``max_draws`` draws.
    Counted exactly (``search.api.feasible_designs``, about a second at most); a space too large
    to count in passing is left to the sampler's own limit."""
    genes = Genes.of(space)
    tables = [cost_tables(b.cost, space, genes) for b in budgets]
    count, total = feasible_designs(Problem(space, genes, np.zeros(len(genes.embed_idx)), tables, budgets))
    if count is None:
        return
    text = ", ".join(b.text for b in budgets)
    if count < n:
        raise MerinoError(
            f"architectures: {n}: the budget {text} admits only {count:,} distinct architectures of {space.source}; "
            "sample fewer or relax the budget"
        )
    draws = total * sum(1 / (count - i) for i in range(n))  # expected draws until n distinct feasible ones
    if draws > max_draws:
        raise MerinoError(
            f"the budget {text} admits {count:,} of the {total:,} architectures of {space.source}: "
            f"sampling {n} of them would take ~{draws:,.0f} draws (limit {max_draws:,}); relax the budget"
        )


def sample_codes(
    space: SearchSpace, budgets: list[Budget], n: int, seed: int, batch: int = 65536, max_draws: int = MAX_DRAWS
) -> np.ndarray:
    """``n`` distinct feasible architectures as block-code rows, uniform over the feasible set
    (a sample the budgets cannot give is refused at once, ``check_sample``)."""
    check_sample(space, budgets, n, max_draws)
    genes = Genes.of(space)
    widths = width_sequences(space)
    tables = [cost_tables(b.cost, space, genes) for b in budgets]  # built once, not per batch
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out: list[np.ndarray] = []
    drawn = 0
    while len(out) < n:
        if drawn >= max_draws:
            raise MerinoError(
                f"only {len(out)} distinct feasible architectures found in {drawn:,} draws (asked for {n}): "
                f"the budget {', '.join(b.text for b in budgets)} admits too few designs of {space.source}"
            )
        codes = draw(space, widths, rng, batch)
        drawn += batch
        for row in codes[feasible(space, genes, budgets, codes, tables)]:
            key = tuple(int(c) for c in row)
            if key not in seen:
                seen.add(key)
                out.append(row)
                if len(out) == n:
                    break
    return np.stack(out)


def sample_architectures(space: SearchSpace, budgets: list[Budget], n: int, seed: int) -> list[MerinoConfig]:
    """``n`` distinct architectures drawn uniformly from the feasible set (see module docstring)."""
    from merino_pl.search.api import decode

    genes = Genes.of(space)
    return [decode(space, genes, row) for row in sample_codes(space, budgets, n, seed)]
