"""Rank correlations with bootstrap intervals (``scipy.stats``), as a proxy study reports them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Correlation:
    """Spearman ρ and Kendall τ of two paired samples, each with a bootstrap 95 % interval."""

    n: int
    spearman: float
    spearman_ci: tuple[float, float]
    kendall: float
    kendall_ci: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.spearmanr(x, y).statistic)


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.kendalltau(x, y).statistic)


def correlate(x: np.ndarray, y: np.ndarray, resamples: int = 2000, seed: int = 0) -> Correlation:
    """ρ and τ of (x, y) and percentile intervals over ``resamples`` bootstrap draws of the pairs.

    Draws whose x or y is constant (ρ undefined) are skipped.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    rhos, taus = [], []
    for _ in range(resamples):
        i = rng.integers(len(x), size=len(x))
        if np.ptp(x[i]) == 0 or np.ptp(y[i]) == 0:
            continue
        rhos.append(spearman(x[i], y[i]))
        taus.append(kendall(x[i], y[i]))

    def ci(v: list[float]) -> tuple[float, float]:
        if not v:
            return (float("nan"), float("nan"))
        lo, hi = np.nanpercentile(v, [2.5, 97.5])
        return (round(float(lo), 4), round(float(hi), 4))

    return Correlation(len(x), round(spearman(x, y), 4), ci(rhos), round(kendall(x, y), 4), ci(taus))
