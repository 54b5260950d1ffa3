"""Certified search: the global optimum of a ``Problem`` by exact enumeration (meet in the middle).

The objective and every cost are additive over the blocks plus the projections between
consecutive widths (see ``budget``), so an architecture splits into a left half (blocks
``0 .. h−1``) and a right half (``h .. N−1``) joined by ONE projection ``E_{h−1} → E_h``. Both
halves are enumerated (2 blocks each for N = 4: ~10⁵ rows in the default space instead of
~2.4 × 10⁹ whole architectures), grouped by the width where they meet:

* one budget: per right group (first width b), sort by cost and take prefix maxima of the
  score; every left row (last width a ≤ b) then finds its best affordable partner, and the
  number of affordable partners, with one ``searchsorted``. Exact, O(rows · widths · log rows).
* several budgets: the same sort on the budget that admits the fewest architectures alone, then
  every pair that budget admits is enumerated (ragged, chunked) and checked against the others,
  so the work is that budget's feasible count, not the space's size.

``optimum(problem)`` returns the best block codes, their score and the number of feasible
architectures; ``count_feasible(problem)`` only counts. Costs compare exactly as in
``Problem.evaluate`` for FLOPs and parameters (integers in float64); latency costs may differ
from it by float rounding on the budget's edge.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from merino_pl.core.errors import MerinoError
from merino_pl.search.evolution import Problem, SearchResult, check_meetable

MAX_HALF_ROWS = 30_000_000  # one half's rows (codes + costs in memory: ~1 GB at this size)
MAX_PAIRS = 2_000_000_000  # pairs to check with several budgets (~20 s on one core)
CHEAP_HALF_ROWS = 500_000  # certify() stays under ~1 s: the default space's halves have ~10⁵ rows
CHEAP_PAIRS = 100_000_000
CHUNK = 1_000_000  # pairs per vectorised step (bounded memory, cache-sized)


class TooLarge(MerinoError):
    """The enumeration would exceed a work limit (bad input for ``--exhaustive``)."""

    def __init__(self, what: str, work: int, limit: int, full_limit: int, advice: str) -> None:
        super().__init__(f"--exhaustive: {what}: {work:,} (limit {limit:,}); {advice}")
        self.what, self.work, self.full_limit = what, work, full_limit  # full: the --exhaustive limit


@dataclass(frozen=True)
class Optimum:
    """The global optimum of a problem: its codes, score, and how many architectures are feasible."""

    codes: np.ndarray  # (num_blocks,) block codes
    score: float
    n_feasible: int
    seconds: float
    method: str  # how it was found (for provenance)


@dataclass(frozen=True)
class _Half:
    """Every width-non-decreasing sequence of block codes over a range of positions."""

    codes: np.ndarray  # (n, k)
    first: np.ndarray  # (n,) width index of the first block
    last: np.ndarray  # (n,) width index of the last block
    score: np.ndarray  # (n,)
    costs: np.ndarray  # (n, n_budgets)


def _block_terms(problem: Problem, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Score (n_codes,) and costs (n_codes, n_budgets) of each block code at position j."""
    score = problem.score.astype(float)
    if problem.extra_score is not None:
        score = score + problem.extra_score.block[j]
    return score, np.stack([c.block[j] for c in problem.costs], axis=1)


def _pair_terms(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Score (ne, ne) and costs (ne, ne, n_budgets) of the projection E_a → E_b."""
    ne = len(problem.space.embed_dims)
    score = problem.extra_score.pair if problem.extra_score is not None else np.zeros((ne, ne))
    return score, np.stack([c.pair for c in problem.costs], axis=2)


def sequences(space_widths: int, per_width: int, length: int) -> int:
    """How many width-non-decreasing sequences of ``length`` blocks a space has (no enumeration)."""
    ways = [per_width] * space_widths  # ways[k]: sequences so far ending at width index k
    for _ in range(length - 1):
        ways = list(np.cumsum(ways) * per_width)
    return int(sum(ways)) if length else 1


def _half(problem: Problem, lo: int, hi: int, max_rows: int) -> _Half:
    """Enumerate positions ``lo .. hi−1`` (their own projections included, not the one into ``lo``)."""
    space, ei = problem.space, problem.genes.embed_idx
    rows = sequences(len(space.embed_dims), len(ei) // len(space.embed_dims), hi - lo)
    if rows > max_rows:
        raise TooLarge(
            f"block sequences to enumerate in half of the space {space.source} ({hi - lo} blocks)",
            rows,
            max_rows,
            MAX_HALF_ROWS,
            "use fewer choices or the evolutionary search",
        )
    pair_score, pair_cost = _pair_terms(problem)
    score, costs = _block_terms(problem, lo)
    codes = np.arange(len(ei))[:, None]
    of_width = [np.flatnonzero(ei == w) for w in range(len(space.embed_dims))]
    for j in range(lo + 1, hi):
        b_score, b_costs = _block_terms(problem, j)
        order = np.argsort(ei[codes[:, -1]], kind="stable")
        codes, score, costs = codes[order], score[order], costs[order]
        last = ei[codes[:, -1]]
        ends = np.searchsorted(last, np.arange(len(of_width)), side="right")  # rows [0, ends[w]) fit below w
        r = np.concatenate([np.repeat(np.arange(ends[w]), len(c)) for w, c in enumerate(of_width)])
        c = np.concatenate([np.tile(c, ends[w]) for w, c in enumerate(of_width)])  # widths never decrease
        a, b = last[r], ei[c]
        score = score[r] + b_score[c] + pair_score[a, b]
        costs = costs[r] + b_costs[c] + pair_cost[a, b]
        codes = np.concatenate([codes[r], c[:, None]], axis=1)
    return _Half(codes, ei[codes[:, 0]], ei[codes[:, -1]], score, costs)


def _groups(half: _Half, key: np.ndarray, n: int, by: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices of ``half`` per width index (``key``), each sorted by ``by`` when given."""
    order = np.lexsort((by, key)) if by is not None else np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(n + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(n)]


def _prefix_best(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running maximum of ``score`` and the index where it is reached."""
    best = np.maximum.accumulate(score)
    at = np.maximum.accumulate(np.where(score >= best, np.arange(len(score)), 0))
    return best, at


@dataclass
class _Best:
    """The running optimum (a left row joined to a right row) and the feasible count."""

    score: float = -np.inf
    left: int = -1
    right: int = -1
    count: int = 0

    def offer(self, totals: np.ndarray, lefts: np.ndarray, rights: np.ndarray) -> None:
        if len(totals) and totals.max() > self.score:
            i = int(totals.argmax())
            self.score, self.left, self.right = float(totals[i]), int(lefts[i]), int(rights[i])


@dataclass(frozen=True)
class _Split:
    """A problem as two enumerated halves plus the terms of the projection that joins them."""

    left: _Half
    right: _Half
    pair_score: np.ndarray  # (ne, ne)
    pair_cost: np.ndarray  # (ne, ne, n_constraints)
    limits: np.ndarray  # (n_constraints,): budgets less the constant part of each cost
    score_const: float

    def with_floor(self, floor: float) -> _Split:
        """The same split with one more constraint: score > ``floor`` (as the cost −score < −floor)."""

        def add(half: _Half) -> _Half:
            return _Half(half.codes, half.first, half.last, half.score, np.column_stack([half.costs, -half.score]))

        below = -(floor - self.score_const)
        limit = np.nextafter(below, -np.inf) - 1e-9 * abs(below)  # strictly better, beyond float noise
        return _Split(
            add(self.left),
            add(self.right),
            self.pair_score,
            np.concatenate([self.pair_cost, -self.pair_score[..., None]], axis=2),
            np.append(self.limits, limit),
            self.score_const,
        )


def _split(problem: Problem, max_rows: int = MAX_HALF_ROWS) -> _Split:
    n = problem.space.num_blocks
    h = max(1, n // 2)
    pair_score, pair_cost = _pair_terms(problem)
    left = _half(problem, 0, h, max_rows)
    right = _half(problem, h, n, max_rows) if h < n else None
    if right is None:  # one block: an empty right half that costs nothing and joins freely
        ne = len(problem.space.embed_dims)
        right = _Half(
            np.zeros((1, 0), int),
            np.array([ne - 1]),
            np.array([ne - 1]),
            np.zeros(1),
            np.zeros((1, len(problem.costs))),
        )
        pair_score, pair_cost = np.zeros_like(pair_score), np.zeros_like(pair_cost)
    consts = np.array([c.const for c in problem.costs])
    score_const = problem.extra_score.const if problem.extra_score is not None else 0.0
    return _Split(left, right, pair_score, pair_cost, problem.limits - consts, float(score_const))


def _meeting_groups(sp: _Split, k: int) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
    """(number of meeting embeddings, left rows by their last block's embedding, right rows by
    their first block's, each right group sorted by constraint ``k``'s cost)."""
    ne = sp.pair_score.shape[0]
    return ne, _groups(sp.left, sp.left.last, ne), _groups(sp.right, sp.right.first, ne, by=sp.right.costs[:, k])


def _single(sp: _Split, k: int) -> _Best:
    """Best pair and feasible count under constraint ``k`` alone (prefix maxima + searchsorted)."""
    ne, lefts, rights = _meeting_groups(sp, k)
    best = _Best()
    for b in range(ne):
        R = rights[b]
        if not len(R):
            continue
        costs = sp.right.costs[R, k]
        top, at = _prefix_best(sp.right.score[R])
        for a in range(b + 1):
            L = lefts[a]
            n = np.searchsorted(costs, sp.limits[k] - sp.pair_cost[a, b, k] - sp.left.costs[L, k], side="right")
            has = np.flatnonzero(n)
            best.count += int(n.sum())
            totals = sp.left.score[L[has]] + top[n[has] - 1] + sp.pair_score[a, b]
            best.offer(totals, L[has], R[at[n[has] - 1]])
    return best


def _chunks(widths: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """Slices of rows (``widths`` sorted ascending) whose rows × widest row stays ≤ ``chunk``."""
    start = 0
    while start < len(widths):
        area = (np.arange(1, len(widths) - start + 1)) * widths[start:]  # non-decreasing
        stop = start + max(int(np.searchsorted(area, chunk, side="right")), 1)
        yield np.arange(start, stop)
        start = stop


def _several(sp: _Split, primary: int) -> _Best:
    """Every pair constraint ``primary`` admits, checked against all the others in dense chunks.

    Left rows sorted by how many right partners the primary constraint leaves them (a prefix of
    the right group sorted by that cost), so a chunk's rectangle wastes little beyond the pairs.
    """
    ne, lefts, rights = _meeting_groups(sp, primary)
    best = _Best()
    for b in range(ne):
        R = rights[b]
        costs, r_score = np.ascontiguousarray(sp.right.costs[R].T), sp.right.score[R]  # (constraints, rows)
        r_top = np.maximum.accumulate(r_score) if len(R) else r_score
        for a in range(b + 1):
            L = lefts[a]
            if not (len(L) and len(R)):
                continue
            room = sp.limits - sp.pair_cost[a, b] - sp.left.costs[L]  # (rows, constraints)
            n = np.searchsorted(costs[primary], room[:, primary], side="right")
            order = np.argsort(n, kind="stable")
            L, room, n = L[order], room[order], n[order]
            l_score = sp.left.score[L] + sp.pair_score[a, b]
            for rows in _chunks(n, CHUNK):
                w = int(n[rows[-1]])
                if w == 0:
                    continue
                ok = costs[0, None, :w] <= room[rows, 0, None]  # (rows, w), one constraint at a time:
                for k in range(1, room.shape[1]):  # 2-D compares run ~3× faster than a 3-D .all()
                    ok &= costs[k, None, :w] <= room[rows, k, None]
                best.count += int(ok.sum())
                if l_score[rows].max() + r_top[w - 1] <= best.score:
                    continue  # no pair here can beat the incumbent: counting was all it needed
                totals = np.where(ok, l_score[rows, None] + r_score[None, :w], -np.inf)
                i, j = np.unravel_index(int(totals.argmax()), totals.shape)
                best.offer(totals[i, j : j + 1], L[rows[i : i + 1]], R[j : j + 1])
    return best


def _solve(sp: _Split, max_pairs: int) -> tuple[_Best, str]:
    """One constraint: exact meet in the middle; several: enumerate the tightest one's pairs."""
    n = sp.limits.shape[0]
    singles = [_single(sp, k) for k in range(n)]
    if n == 1:
        return singles[0], "meet in the middle, prefix maxima + searchsorted"
    primary = int(np.argmin([s.count for s in singles]))
    if singles[primary].count > max_pairs:
        raise TooLarge(
            "several budgets: pairs of half-architectures the tightest budget admits, each checked against the others",
            singles[primary].count,
            max_pairs,
            MAX_PAIRS,
            "give one budget or a smaller space",
        )
    return _several(
        sp, primary
    ), f"meet in the middle, {singles[primary].count:,} pairs of the tightest constraint checked"


def optimum(problem: Problem, max_pairs: int = MAX_PAIRS, max_half_rows: int = MAX_HALF_ROWS) -> Optimum:
    """The global optimum of ``problem`` under all its budgets, and the number of feasible designs.

    Raises ``MerinoError`` (one line) when a budget cannot be met, when no architecture meets all
    of them at once, or when the space is too large to enumerate (see the module docstring).
    """
    start = time.perf_counter()
    check_meetable(problem)
    sp = _split(problem, max_half_rows)
    best, method = _solve(sp, max_pairs)
    if best.count == 0:
        text = ", ".join(b.text for b in problem.budgets)
        raise MerinoError(
            f"no architecture of the space meets all budgets at once ({text}); each alone can be met: relax one"
        )
    codes = np.concatenate([sp.left.codes[best.left], sp.right.codes[best.right]])
    score, _, ok = problem.evaluate(codes[None])
    assert ok[0], "the optimum must meet every budget"  # a bug, not bad input
    return Optimum(codes, float(score[0]), best.count, time.perf_counter() - start, method)


def count_feasible(problem: Problem, max_pairs: int = MAX_PAIRS, max_half_rows: int = MAX_HALF_ROWS) -> int:
    """How many architectures of the space meet every budget of ``problem`` (0 when none)."""
    return _solve(_split(problem, max_half_rows), max_pairs)[0].count


def feasible_designs(problem: Problem) -> tuple[int | None, int]:
    """(how many architectures meet every budget, how many the space has) without enumerating
    the space; the first is None when counting would take more than about a second (a large
    space, several budgets). A budget below the space's cheapest architecture is a ``MerinoError``
    naming it (``check_meetable``)."""
    space = problem.space
    total = sequences(len(space.embed_dims), len(problem.genes.embed_idx) // len(space.embed_dims), space.num_blocks)
    check_meetable(problem)
    try:
        return count_feasible(problem, CHEAP_PAIRS, CHEAP_HALF_ROWS), total
    except TooLarge:
        return None, total


def count_better(problem: Problem, score: float, max_pairs: int = MAX_PAIRS) -> int:
    """How many feasible architectures score strictly more than ``score`` (rank = this + 1).

    Scores within 1e-9 (relative) of ``score`` count as ties, not better: permuting equal-width
    blocks gives exactly equal scores, summed in another order.
    """
    return _solve(_split(problem).with_floor(score), max_pairs)[0].count


def certify(problem: Problem) -> Optimum | str:
    """The optimum when it is cheap (about a second), else the reason it was not computed."""
    try:
        return optimum(problem, CHEAP_PAIRS, CHEAP_HALF_ROWS)
    except TooLarge as e:
        hint = "run --exhaustive for it" if e.work <= e.full_limit else "too large for --exhaustive too"
        return f"{e.what}: {e.work:,}, more than a search checks in passing; {hint}"


def as_result(problem: Problem, opt: Optimum) -> SearchResult:
    """The optimum in the evolutionary search's result shape (one member; CLI outputs unchanged)."""
    codes = opt.codes[None]
    score, costs, _ = problem.evaluate(codes)
    return SearchResult(
        codes,
        score,
        costs,
        [(opt.n_feasible, opt.score)],
        candidates=opt.n_feasible,
        generations=0,
        accepted=opt.n_feasible,
        seconds=opt.seconds,
        method="exhaustive",
        optimum=opt,
    )
