"""Entropy of a transformer decoder (paper Eq. 7–15), exact and fast.

Matrix entropy (Eq. 7) of a randomly initialised ``W`` (rows × cols, iid N(0, std²))::

    H(W) = E[ Σ_j log(1 + s_j² / ε²) ]     s_j: singular values of W

It depends on std and ε only through ``c = std² / ε²``. Three ways to get it:

* ``matrix_entropy_exact``: Monte-Carlo over sampled matrices (the verification path). The squared
  singular values are taken as the eigenvalues of W·Wᵀ (the same numbers as an SVD to ~1e-14,
  3–4× faster); ``log det(c·XXᵀ)`` is used as a control variate because its mean is known exactly
  for Gaussian X (a sum of digammas), which cuts the samples needed ~100× for wide matrices.
* ``matrix_entropy_closed_form``: the Marchenko–Pastur integral plus the Bai–Silverstein O(1)
  correction for real Gaussian matrices. For rectangular shapes it matches the exact value to
  ~1e-6 (relative); for square ones the hard edge of the spectrum at 0 leaves an error of 5e-4 at
  64 × 64, 2e-4 at 128, 7e-5 at 256, shrinking with size.
* the shipped table (``assets/entropy/table.json``): exact values (relative standard error
  ≤ 4e-5) of the square shapes E × E of ``search/space.yaml`` (the MHSA matrices, where the closed
  form is weakest) under the default config. Regenerate with
  ``python -m merino_pl.search.entropy build-table --out src/merino_pl/assets/entropy/table.json``
  (``--all-shapes`` also tabulates the rectangular ones; ``--space`` / ``--eps`` / ``--init-std``
  build one for another space or config, used with ``merino-pl search --entropy-table``).

``matrix_entropy`` (the fast path the search uses) = table, else closed form.

Layer entropy of block j: MHSA over Q, K, V, O (E×E each), FFN over E×F and F×E; effectiveness
``1 − β·L/log2(width)`` with widths E (MHSA) and F (FFN); Eq. 15 objective
``Σ_j L_j·[α1·(1 − βL_j/log2 E_j)·H_MHSA(E_j) + α2·(1 − βL_j/log2 F_j)·H_FFN(E_j, F_j)]``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merino_pl.core.assets import asset
from merino_pl.core.config import MerinoConfig
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_json, write_json
from merino_pl.search import config_section

INITS = ("normal",)
TABLE_FORMAT = "merino-entropy-table/1"
EULER_GAMMA = 0.5772156649015329


@dataclass(frozen=True)
class EntropyConfig:
    """What the entropy means: the init distribution, ε, the weights α and the depth penalty β.

    Recorded in every searched recipe. Defaults: the model's own init (N(0, 0.02²), as
    ``MerinoConfig.init_std``), ε = 1e-3, α = (1, 1) (the paper does not publish its α), β = 1/16.
    """

    init: str = "normal"
    init_std: float = 0.02
    eps: float = 1e-3
    alpha_mhsa: float = 1.0
    alpha_ffn: float = 1.0
    beta: float = 1 / 16
    table: str | None = None  # an entropy table JSON (None: the shipped one)

    @property
    def c(self) -> float:
        """The one number the matrix entropy depends on: std² / ε²."""
        return (self.init_std / self.eps) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "entropy") -> EntropyConfig:
        """Build from a mapping; ``MerinoError`` listing every bad key / value at once."""
        known = set(cls.__dataclass_fields__)
        data, problems = config_section(data, known, source)
        if data.get("init", "normal") not in INITS:
            problems.append(f"{source}.init {data['init']!r} is not one of {', '.join(INITS)}")
        table = data.get("table")
        if table is not None and not Path(str(table)).is_file():
            problems.append(f"{source}.table: entropy table not found: {table}")
        for k in ("init_std", "eps", "alpha_mhsa", "alpha_ffn", "beta"):
            v = data.get(k, 1.0)
            if k in known and (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not math.isfinite(v)
                or v < 0
                or (v == 0 and k in ("init_std", "eps"))
            ):
                problems.append(
                    f"{source}.{k} must be a {'positive' if k in ('init_std', 'eps') else 'non-negative'} number, "
                    f"got {v!r}"
                )
        if problems:
            raise MerinoError("; ".join(problems))
        cfg = cls(**{k: (v if k in ("init", "table") else float(v)) for k, v in data.items()})
        if table is not None and not EntropyTable.load(str(table)).matches(cfg):
            raise MerinoError(
                f"{source}.table {table}: built for another init / std / eps than {cfg.init}, {cfg.init_std}, {cfg.eps}"
            )
        return cfg


DEFAULT = EntropyConfig()


# ---- exact (Monte-Carlo) -------------------------------------------------------------------------
def _digamma_half(k2: np.ndarray) -> np.ndarray:
    """ψ(k2 / 2) for positive integers k2, exactly (ψ(n) and ψ(n + ½) are finite sums)."""
    top = int(k2.max())
    inv = 1.0 / np.arange(1, top + 1)
    psi_int = -EULER_GAMMA + np.concatenate([[0.0], np.cumsum(inv[: top // 2 + 1])])  # ψ(1), ψ(2), ...
    odd = 2.0 / (2 * np.arange(1, top // 2 + 2) - 1)
    psi_half = -EULER_GAMMA - 2 * math.log(2) + np.concatenate([[0.0], np.cumsum(odd)])  # ψ(½), ψ(3/2), ...
    return np.where(k2 % 2 == 0, psi_int[np.maximum(k2 // 2 - 1, 0)], psi_half[k2 // 2])


def expected_log_det(n: int, m: int, c: float) -> float:
    """E log det(c·XXᵀ) for X n×m (n ≤ m) standard Gaussian: Σ_i log c + ψ((m−i)/2) + log 2."""
    k2 = m - np.arange(n)
    return float(n * (math.log(c) + math.log(2)) + _digamma_half(k2).sum())


def matrix_entropy_exact(
    rows: int,
    cols: int,
    cfg: EntropyConfig = DEFAULT,
    rel_se: float = 5e-5,
    max_samples: int = 20000,
    seed: int = 0,
) -> tuple[float, float]:
    """Monte-Carlo H(W) and its standard error: sample until the relative SE ≤ ``rel_se``."""
    n, m = min(rows, cols), max(rows, cols)
    rng = np.random.default_rng([seed, n, m])
    base = expected_log_det(n, m, cfg.c)
    batch = max(1, min(256, max_samples, 2**22 // (n * m)))  # stack small matrices: one LAPACK call each batch
    resid: list[np.ndarray] = []
    while True:
        x = rng.standard_normal((batch, n, m))
        lam = np.clip(np.linalg.eigvalsh(x @ x.transpose(0, 2, 1)), 1e-300, None) * cfg.c  # s²/ε² = c·eig(XXᵀ)
        # H = log det(c·XXᵀ) + Σ log(1 + 1/(c·λ)); the first term's mean is exact (control variate)
        resid.append(np.log1p(1.0 / lam).sum(axis=1))
        r = np.concatenate(resid)
        mean = base + r.mean()
        se = r.std(ddof=1) / math.sqrt(len(r)) if len(r) > 1 else math.inf
        if (len(r) >= 2 and se <= rel_se * mean) or len(r) >= max_samples:
            return float(mean), float(se)
        batch = min(max(batch, len(r)), max_samples - len(r))  # grow geometrically


# ---- closed form ---------------------------------------------------------------------------------
def matrix_entropy_closed_form(rows: int, cols: int, cfg: EntropyConfig = DEFAULT) -> float:
    """Marchenko–Pastur mean plus the Bai–Silverstein (2004) real-Gaussian O(1) correction.

    With n ≤ m, y = n/m and x = 1 + y − 2√y·cos θ (θ ∈ (0, π)): the MP law is
    dF = 2 sin²θ / (π x) dθ and the correction is (f(a) + f(b))/4 − (1/2π)∫ f dθ,
    f(x) = log(1 + c·m·x). A midpoint rule in θ (2048 nodes) is exact to ~1e-9 here.
    """
    return float(closed_form_many(np.array([rows]), np.array([cols]), cfg)[0])


def closed_form_many(rows: np.ndarray, cols: np.ndarray, cfg: EntropyConfig = DEFAULT, nodes: int = 2048) -> np.ndarray:
    """``matrix_entropy_closed_form`` for many shapes at once (one array expression)."""
    n = np.minimum(rows, cols).astype(float)[:, None]
    m = np.maximum(rows, cols).astype(float)[:, None]
    y, t = n / m, cfg.c * m
    theta = (np.arange(nodes) + 0.5) * (math.pi / nodes)
    x = 1 + y - 2 * np.sqrt(y) * np.cos(theta)
    f = np.log1p(t * x)
    bulk = n[:, 0] * np.mean(2 * np.sin(theta) ** 2 / x * f, axis=1)  # (1/π)∫…dθ = mean over nodes
    a, b = (1 - np.sqrt(y[:, 0])) ** 2, (1 + np.sqrt(y[:, 0])) ** 2
    return bulk + (np.log1p(t[:, 0] * a) + np.log1p(t[:, 0] * b)) / 4 - np.mean(f, axis=1) / 2


# ---- the shipped table ---------------------------------------------------------------------------
def default_table_path() -> Path:
    return asset("entropy", "table.json")


@dataclass(frozen=True)
class EntropyTable:
    """Exact H(W) per (rows ≤ cols) shape, valid for one ``init`` and c = std²/ε²."""

    init: str
    c: float
    values: dict[tuple[int, int], float]
    meta: dict[str, Any]

    def matches(self, cfg: EntropyConfig) -> bool:
        return cfg.init == self.init and math.isclose(cfg.c, self.c, rel_tol=1e-12)

    def get(self, rows: int, cols: int) -> float | None:
        return self.values.get((min(rows, cols), max(rows, cols)))

    def save(self, path: str | Path) -> None:
        entries = [[n, m, round(h, 6)] for (n, m), h in sorted(self.values.items())]
        write_json(path, {"format": TABLE_FORMAT, "init": self.init, "c": self.c, **self.meta, "entries": entries})

    @classmethod
    def load(cls, path: str | Path) -> EntropyTable:
        data = read_json(path, "entropy table")
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise MerinoError(f"{path}: not an entropy table (format must be {TABLE_FORMAT!r})")
        values = {(int(n), int(m)): float(h) for n, m, h in data["entries"]}
        meta = {k: v for k, v in data.items() if k not in ("format", "init", "c", "entries")}
        return cls(init=data["init"], c=float(data["c"]), values=values, meta=meta)


@functools.lru_cache(maxsize=8)
def _load_table(path: str) -> EntropyTable | None:
    return EntropyTable.load(path) if Path(path).is_file() else None


@functools.lru_cache(maxsize=1)
def shipped_table() -> EntropyTable | None:
    """The package's table (None when missing, e.g. while it is being regenerated)."""
    return _load_table(str(default_table_path()))


def build_table(
    shapes: Iterable[tuple[int, int]],
    cfg: EntropyConfig = DEFAULT,
    rel_se: float = 4e-5,
    seed: int = 0,
    progress: bool = True,
) -> EntropyTable:
    """Exact (Monte-Carlo) values for ``shapes``; one-time cost (minutes for Table 7's space)."""
    from tqdm.auto import tqdm

    shapes = sorted({(min(r, c), max(r, c)) for r, c in shapes})
    values, worst = {}, 0.0
    for n, m in tqdm(shapes, desc="entropy table", unit="shape", disable=not progress):
        h, se = matrix_entropy_exact(n, m, cfg, rel_se=rel_se, max_samples=50000, seed=seed)
        values[(n, m)], worst = h, max(worst, se / h)
    meta = {
        "init_std": cfg.init_std,
        "eps": cfg.eps,
        "seed": seed,
        "target_rel_se": rel_se,
        "max_rel_se": worst,
        "regenerate": "python -m merino_pl.search.entropy build-table --out src/merino_pl/assets/entropy/table.json",
    }
    return EntropyTable(init=cfg.init, c=cfg.c, values=values, meta=meta)


# ---- the fast path and the Eq. 15 objective ------------------------------------------------------
@functools.lru_cache(maxsize=65536)
def matrix_entropy(rows: int, cols: int, cfg: EntropyConfig = DEFAULT) -> float:
    """Fast H(W): the config's (or the shipped) table when it holds this shape, else the closed form."""
    table = _load_table(cfg.table) if cfg.table else shipped_table()
    if table is not None and table.matches(cfg):
        value = table.get(rows, cols)
        if value is not None:
            return value
    return matrix_entropy_closed_form(rows, cols, cfg)


def effectiveness(num_layers: Any, width: Any, beta: float) -> Any:
    """1 − γ with γ = β·L / log2(width) (Eq. 9–11; log2 reproduces the paper's Table 1), for
    one block or, elementwise, for arrays of blocks."""
    log2 = np.log2 if isinstance(width, np.ndarray) else math.log2
    return 1.0 - beta * num_layers / log2(width)


def _block_terms(
    embed_dim: Any, ffn_dim: Any, num_layers: Any, h_mhsa: Any, h_ffn: Any, beta: float
) -> tuple[Any, Any]:
    """Eq. 15's (MHSA, FFN) terms of a block, L·(1 − γ)·H, from its matrices' entropy sums
    (scalars for one block, arrays for many); α not applied."""
    return (
        num_layers * effectiveness(num_layers, embed_dim, beta) * h_mhsa,
        num_layers * effectiveness(num_layers, ffn_dim, beta) * h_ffn,
    )


def block_entropy(embed_dim: int, ffn_dim: int, num_layers: int, cfg: EntropyConfig = DEFAULT) -> tuple[float, float]:
    """(MHSA, FFN) terms of one block: L·(1 − γ)·H over its layer's matrices, α not applied."""
    h_mhsa = 4 * matrix_entropy(embed_dim, embed_dim, cfg)
    h_ffn = 2 * matrix_entropy(embed_dim, ffn_dim, cfg)
    return _block_terms(embed_dim, ffn_dim, num_layers, h_mhsa, h_ffn, cfg.beta)


def matrix_entropies(rows: np.ndarray, cols: np.ndarray, cfg: EntropyConfig = DEFAULT) -> np.ndarray:
    """``matrix_entropy`` for arrays of shapes: table values where held, closed form elsewhere."""
    table = _load_table(cfg.table) if cfg.table else shipped_table()
    shapes = sorted(set(zip(np.minimum(rows, cols).tolist(), np.maximum(rows, cols).tolist())))
    held = {s: table.get(*s) for s in shapes} if table is not None and table.matches(cfg) else {}
    missing = [s for s in shapes if held.get(s) is None]
    if missing:
        n, m = np.array(missing).T
        held.update(zip(missing, closed_form_many(n, m, cfg).tolist()))
    return np.array([held[(min(r, c), max(r, c))] for r, c in zip(rows.tolist(), cols.tolist())])


def block_entropies(
    embed_dim: np.ndarray, ffn_dim: np.ndarray, num_layers: np.ndarray, cfg: EntropyConfig = DEFAULT
) -> tuple[np.ndarray, np.ndarray]:
    """``block_entropy`` for arrays of blocks (the search's per-code score table)."""
    h_mhsa = 4 * matrix_entropies(embed_dim, embed_dim, cfg)
    h_ffn = 2 * matrix_entropies(embed_dim, ffn_dim, cfg)
    return _block_terms(embed_dim, ffn_dim, num_layers, h_mhsa, h_ffn, cfg.beta)


def arch_entropy(arch: MerinoConfig, cfg: EntropyConfig = DEFAULT) -> dict[str, float]:
    """Eq. 15 for an architecture: MHSA and FFN sums and total = α1·MHSA + α2·FFN."""
    terms = [block_entropy(b.embed_dim, b.ffn, b.num_layers, cfg) for b in arch.blocks]
    mhsa, ffn = sum(t[0] for t in terms), sum(t[1] for t in terms)
    return {"mhsa": mhsa, "ffn": ffn, "total": cfg.alpha_mhsa * mhsa + cfg.alpha_ffn * ffn}


def recipe_entropy(arch: MerinoConfig) -> dict[str, float]:
    """The entropy ``merino-pl info`` reports: Eq. 15 under the default search config."""
    return arch_entropy(arch, DEFAULT)


# ---- `python -m merino_pl.search.entropy build-table` --------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the shipped table (or build one for another space / config)."""
    from merino_pl.core.space import load_space

    p = argparse.ArgumentParser(prog="python -m merino_pl.search.entropy")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-table", help="exact entropy of every matrix shape of a space")
    b.add_argument("--space", default=None, help="search space YAML (default: the shipped search/space.yaml)")
    b.add_argument("--init-std", type=float, default=DEFAULT.init_std)
    b.add_argument("--eps", type=float, default=DEFAULT.eps)
    b.add_argument("--rel-se", type=float, default=4e-5, help="target relative standard error per shape")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--all-shapes", action="store_true", help="also the rectangular shapes (the closed form is ~exact there)"
    )
    b.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        cfg = EntropyConfig.from_dict({"init_std": args.init_std, "eps": args.eps})
        shapes = [(n, m) for n, m in load_space(args.space).matrix_shapes() if args.all_shapes or n == m]
    except MerinoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = build_table(shapes, cfg, rel_se=args.rel_se, seed=args.seed)
    table.save(args.out)
    print(f"wrote {args.out}: {len(table.values)} shapes, max relative SE {table.meta['max_rel_se']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
