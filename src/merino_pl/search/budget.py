"""Budgets (``flops=60G``, ``params=60M``, ``latency=50ms``) and their cost models as tables.

Every cost here is additive over the architecture's parts, so the search evaluates it for a
whole population with a few array lookups instead of building configs::

    cost = const + Σ_j block_j[code_j] + Σ_j pair[E_j, E_j+1]

``block_j`` holds one block's cost per block code (E, F, L) at position j (the first block also
pays the d → E_1 projection, the last one E_N → d and the final norm); ``pair`` is the E_j → E_j+1
projection. The tables are built from the same functions ``merino-pl info`` uses
(``merino_pl.core.costs``) and from the device latency table; a test checks them against
``count_params`` / ``count_flops`` / ``LatencyTable.estimate_ms`` on random architectures.

The three kinds register through ``merino_pl.search.registry`` (``@register_budget``), as a
plugin's would: ``parse_budget`` and ``cost_tables`` look every name up there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from merino_pl.core.costs import PAPER_SEQ_LEN, embedding_params, layer_flops, layer_params, norm_params
from merino_pl.core.errors import MerinoError
from merino_pl.core.latency_table import LatencyTable
from merino_pl.core.space import SearchSpace
from merino_pl.search.registry import get_budget_kind, register_budget

_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TIME = {"": 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3}


@dataclass(frozen=True)
class Budget:
    """``cost ≤ limit`` (limit in FLOPs, parameters, or milliseconds)."""

    cost: str
    limit: float
    text: str  # as the user wrote it, for messages and provenance


def parse_budget(text: str) -> Budget:
    """``flops=60G`` / ``params=60M`` / ``latency=50ms`` (also ``<=`` instead of ``=``)."""
    m = re.fullmatch(r"\s*([A-Za-z_]+)\s*(<=|=)\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise MerinoError(f"budget {text!r} must look like NAME=VALUE, e.g. flops=60G, params=60M, latency=50ms")
    name, _, number, unit = m.groups()
    scale = get_budget_kind(name, text).units
    if unit not in scale:
        raise MerinoError(f"budget {text!r}: unit {unit!r} is not one of {', '.join(u for u in scale if u)}")
    try:
        value = float(number) * scale[unit]
    except ValueError:
        raise MerinoError(f"budget {text!r}: {number!r} is not a number") from None
    if not value > 0:
        raise MerinoError(f"budget {text!r} must be positive")
    return Budget(name, value, text.strip())


@dataclass(frozen=True)
class CostTables:
    """One additive cost over a space's block codes (see the module docstring)."""

    name: str
    const: float
    block: np.ndarray  # (num_blocks, num_codes)
    pair: np.ndarray  # (num_embed, num_embed): projection E_a → E_b

    def evaluate(self, codes: np.ndarray, embed_idx: np.ndarray) -> np.ndarray:
        """Costs of a population: ``codes`` and ``embed_idx`` are (P, num_blocks) integer arrays."""
        total = self.block[np.arange(codes.shape[1]), codes].sum(axis=1) + self.const
        return total + self.pair[embed_idx[:, :-1], embed_idx[:, 1:]].sum(axis=1)


def _tables(
    name: str,
    space: SearchSpace,
    genes: Genes,
    const: float,
    layer: Callable[[int, int, int], float],
    proj: Callable[[int, int], float],
    final: Callable[[int], float],
) -> CostTables:
    d = int(space.architecture.get("d_model", 768))
    e, f, L = genes.embed_dim, genes.ffn_dim, genes.num_layers
    per_code = np.array([layer(int(a), int(b), int(c)) for a, b, c in zip(e, f, L)])
    block = np.repeat(per_code[None, :], space.num_blocks, axis=0)
    block[0] += [proj(d, int(a)) for a in e]
    block[-1] += [proj(int(a), d) + final(int(a)) for a in e]
    dims = space.embed_dims
    # widths never decrease, so no architecture has E_a -> E_b with E_a > E_b, and a device latency
    # table holds only the projections one can have (space.projection_shapes): there the b -> a
    # entry stands in (the same for flops and params, which are symmetric)
    pair = np.array([[proj(a, b) if a <= b else proj(b, a) for b in dims] for a in dims])
    return CostTables(name, const, block, pair)


def cost_tables(name: str, space: SearchSpace, genes: Genes, latency: LatencyTable | None = None) -> CostTables:
    """Tables of the registered budget kind ``name`` (``latency`` needs a device latency table)."""
    return get_budget_kind(name).tables(space, genes, latency)


def _first_arch(space: SearchSpace):  # the fixed parts (d_model, vocabulary, bias, norm) of every architecture
    return space.config([space.block(space.embed_dims[0], space.ffn_choices[0], space.num_layers[0])])


@register_budget("flops", units=_SCALE, help="FLOPs (paper convention, 1024 tokens)")
def flops_tables(space: SearchSpace, genes: Genes, latency: LatencyTable | None = None) -> CostTables:
    seq = PAPER_SEQ_LEN
    return _tables(
        "flops",
        space,
        genes,
        0.0,
        lambda e, f, L: L * layer_flops(e, f, seq),
        lambda i, o: 2 * seq * i * o if i != o else 0,
        lambda e: 0,
    )


@register_budget("params", units=_SCALE, help="parameters")
def params_tables(space: SearchSpace, genes: Genes, latency: LatencyTable | None = None) -> CostTables:
    arch = _first_arch(space)
    return _tables(
        "params",
        space,
        genes,
        embedding_params(arch),
        lambda e, f, L: layer_params(e, f, arch.bias, arch.norm),
        lambda i, o: i * o if i != o else 0,
        lambda e: norm_params(arch.norm, e),
    )


@register_budget("latency", units=_TIME, help="ms from --latency-table")
def latency_tables(space: SearchSpace, genes: Genes, latency: LatencyTable | None = None) -> CostTables:
    if latency is None:
        raise MerinoError("a latency budget needs --latency-table FILE (written by `merino-pl latency profile`)")
    arch = _first_arch(space)
    latency.check_fixed(arch.d_model, arch.vocab_size)
    return _tables(
        "latency",
        space,
        genes,
        float(latency.fixed["ms"]),
        lambda e, f, L: L * latency.layer_ms(e, f),
        latency.projection_ms,
        lambda e: 0.0,
    )


@dataclass(frozen=True)
class Genes:
    """Every block code of a space: code = (embed index · nF + ffn index) · nL + layer index."""

    embed_idx: np.ndarray
    ffn_idx: np.ndarray
    layer_idx: np.ndarray
    embed_dim: np.ndarray
    ffn_dim: np.ndarray
    num_layers: np.ndarray

    @classmethod
    def of(cls, space: SearchSpace) -> Genes:
        ne, nf, nl = len(space.embed_dims), len(space.ffn_choices), len(space.num_layers)
        ei, fi, li = (a.ravel() for a in np.meshgrid(np.arange(ne), np.arange(nf), np.arange(nl), indexing="ij"))
        e = np.array(space.embed_dims)[ei]
        f = np.array([space.ffn_dim(int(a), space.ffn_choices[b]) for a, b in zip(e, fi)])
        return cls(ei, fi, li, e, f, np.array(space.num_layers)[li])

    @staticmethod
    def encode(space: SearchSpace, ei: np.ndarray, fi: np.ndarray, li: np.ndarray) -> np.ndarray:
        return (ei * len(space.ffn_choices) + fi) * len(space.num_layers) + li


def min_cost(tables: CostTables) -> tuple[float, list[int]]:
    """The cheapest architecture of the space for one cost (non-decreasing widths): DP over blocks.

    Returns its cost and block codes; proves a budget unmeetable before any search runs.
    """
    n_blocks, n_codes = tables.block.shape
    n_embed = tables.pair.shape[0]
    per_embed = tables.block.reshape(n_blocks, n_embed, n_codes // n_embed)
    best_code = per_embed.argmin(axis=2) + np.arange(n_embed) * (n_codes // n_embed)  # (blocks, embed)
    best = per_embed.min(axis=2)
    allowed = np.triu(np.ones((n_embed, n_embed), bool))  # a → b only when E_a ≤ E_b
    dp, back = best[0].copy(), []
    for j in range(1, n_blocks):
        trans = np.where(allowed, dp[:, None] + tables.pair, np.inf)  # (from, to)
        back.append(trans.argmin(axis=0))
        dp = trans.min(axis=0) + best[j]
    e = int(dp.argmin())
    path = [e]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    path.reverse()
    return float(dp.min() + tables.const), [int(best_code[j, e]) for j, e in enumerate(path)]
