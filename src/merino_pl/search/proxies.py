"""The shipped proxies, registered as a plugin's would be (``merino_pl.search.registry``).

Each is oriented so that higher predicts lower loss, and is given twice: as the search's
per-block-code table and, for the proxy study, as the score of one architecture.

* ``entropy``: Eq. 15 (MeRino), α1·MHSA + α2·FFN under the search's entropy config;
* ``params``: decoder parameters, the embeddings left out (LTS, Archai);
* ``naive``: paper Fig. 5's uniform scaling, a rule with a search of its own (no score);
* ``flops``: forward FLOPs in the paper's convention;
* ``layer_applications``: Σ_j L_j, the depth as trained.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from merino_pl.core.config import MerinoConfig
from merino_pl.core.costs import count_flops, count_params, embedding_params
from merino_pl.search.budget import CostTables, Genes, cost_tables
from merino_pl.search.entropy import EntropyConfig, arch_entropy, block_entropies
from merino_pl.search.evolution import naive_scaling
from merino_pl.search.registry import register_proxy


def _entropy_arch(arch: MerinoConfig, cfg: EntropyConfig) -> float:
    return arch_entropy(arch, cfg)["total"]


@register_proxy("entropy", arch=_entropy_arch, help="Eq. 15 entropy (MeRino)")
def entropy(plan: Any, genes: Genes) -> np.ndarray:
    mhsa, ffn = block_entropies(genes.embed_dim, genes.ffn_dim, genes.num_layers, plan.entropy)
    return plan.entropy.alpha_mhsa * mhsa + plan.entropy.alpha_ffn * ffn


def _decoder_params(arch: MerinoConfig, cfg: EntropyConfig) -> float:
    return float(count_params(arch) - embedding_params(arch))


@register_proxy("params", arch=_decoder_params, help="decoder parameters (LTS)")
def params(plan: Any, genes: Genes) -> CostTables:
    # the parameter budget's tables without their constant: the token / position embeddings
    return replace(cost_tables("params", plan.space, genes), const=0.0)


@register_proxy("naive", search=naive_scaling, help="uniform scaling (paper Fig. 5's baseline)")
def naive(plan: Any, genes: Genes) -> np.ndarray:
    return np.zeros(len(genes.embed_idx))  # unused: naive scaling ranks by the budget it uses


@register_proxy("flops", arch=lambda arch, cfg: float(count_flops(arch)), help="forward FLOPs")
def flops(plan: Any, genes: Genes) -> CostTables:
    return cost_tables("flops", plan.space, genes)


@register_proxy(
    "layer_applications", arch=lambda arch, cfg: float(arch.num_layer_applications), help="Σ L_j (depth as trained)"
)
def layer_applications(plan: Any, genes: Genes) -> np.ndarray:
    return genes.num_layers.astype(float)
