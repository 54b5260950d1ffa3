"""Analytic cost model: parameters, FLOPs (the paper's convention) and KV-cache size.

Pure arithmetic over a ``MerinoConfig`` (no torch), so the search can call it millions of times.
A test checks ``count_params`` against the real model's ``numel``.

FLOPs convention (it reproduces the paper's 60 / 110 / 160 G budgets):
``2 × multiply-accumulates of one forward pass over a 1024-token sequence``, counting every
layer *application*, the QKᵀ and AV products over the full T×T score matrix, and the in / between
/ out projections, but neither the token embedding nor the tied LM head (reported separately).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from merino_pl.core.config import BlockConfig, MerinoConfig, Recipe

PAPER_SEQ_LEN = 1024


def norm_params(norm: str, dim: int) -> int:
    """LayerNorm: weight + bias; RMSNorm: weight only."""
    return dim if norm == "rmsnorm" else 2 * dim


def embedding_params(cfg: MerinoConfig) -> int:
    """Token + position embeddings (the tied LM head adds nothing)."""
    return (cfg.vocab_size + cfg.max_position_embeddings) * cfg.d_model


def layer_params(embed_dim: int, ffn: int, bias: bool = True, norm: str = "layernorm") -> int:
    """One pre-norm decoder layer: Q, K, V, O, FFN in/out, two norms."""
    e, f = embed_dim, ffn
    attn = 4 * e * e + (4 * e if bias else 0)
    mlp = 2 * e * f + ((f + e) if bias else 0)
    return attn + mlp + 2 * norm_params(norm, e)


def projection_dims(cfg: MerinoConfig) -> list[tuple[int, int]]:
    """(in, out) of every projection: d → E_1, E_j → E_{j+1} where widths change, E_N → d."""
    widths = [b.embed_dim for b in cfg.blocks]
    dims = [(cfg.d_model, widths[0]), *zip(widths[:-1], widths[1:]), (widths[-1], cfg.d_model)]
    return [(i, o) for i, o in dims if i != o]


@dataclass(frozen=True)
class BlockCost:
    embed_dim: int
    ffn: int
    num_layers: int
    heads: int
    params: int
    flops: int  # all L_j applications, paper convention


def layer_flops(embed_dim: int, ffn: int, seq_len: int = PAPER_SEQ_LEN) -> int:
    """2 × MACs of one layer application over ``seq_len`` tokens (linears + QKᵀ + AV)."""
    linear_macs = seq_len * (4 * embed_dim * embed_dim + 2 * embed_dim * ffn)
    attn_macs = 2 * seq_len * seq_len * embed_dim
    return 2 * (linear_macs + attn_macs)


def block_cost(b: BlockConfig, cfg: MerinoConfig, seq_len: int = PAPER_SEQ_LEN) -> BlockCost:
    return BlockCost(
        embed_dim=b.embed_dim,
        ffn=b.ffn,
        num_layers=b.num_layers,
        heads=b.embed_dim // cfg.head_dim,
        params=layer_params(b.embed_dim, b.ffn, cfg.bias, cfg.norm),
        flops=b.num_layers * layer_flops(b.embed_dim, b.ffn, seq_len),
    )


def count_params(cfg: MerinoConfig) -> int:
    """All trainable parameters (the tied LM head counted once, as the embedding)."""
    blocks = sum(layer_params(b.embed_dim, b.ffn, cfg.bias, cfg.norm) for b in cfg.blocks)
    proj = sum(i * o for i, o in projection_dims(cfg))
    return embedding_params(cfg) + blocks + proj + norm_params(cfg.norm, cfg.blocks[-1].embed_dim)


def count_flops(cfg: MerinoConfig, seq_len: int = PAPER_SEQ_LEN, include_lm_head: bool = False) -> int:
    """Forward FLOPs over ``seq_len`` tokens in the paper's convention (see module docstring)."""
    flops = sum(b.num_layers * layer_flops(b.embed_dim, b.ffn, seq_len) for b in cfg.blocks)
    flops += 2 * seq_len * sum(i * o for i, o in projection_dims(cfg))
    if include_lm_head:
        flops += lm_head_flops(cfg, seq_len)
    return flops


def lm_head_flops(cfg: MerinoConfig, seq_len: int = PAPER_SEQ_LEN) -> int:
    return 2 * seq_len * cfg.d_model * cfg.vocab_size


def kv_cache_bytes(cfg: MerinoConfig, tokens: int | None = None, bytes_per_value: int = 2) -> int:
    """K and V of every layer application for ``tokens`` positions (default: the max context).

    Weights are shared inside a block but activations are not: each of the L_j applications
    keeps its own keys and values.
    """
    tokens = cfg.max_position_embeddings if tokens is None else tokens
    return sum(2 * b.num_layers * b.embed_dim * tokens * bytes_per_value for b in cfg.blocks)


def recipe_summary(
    recipe: Recipe, seq_len: int = PAPER_SEQ_LEN, entropy: dict[str, float] | None = None
) -> dict[str, Any]:
    """Everything ``merino-pl info`` reports, as a JSON-able dict (training logs it too).
    ``entropy``: the recipe's entropy (a search quantity, so its callers pass it in)."""
    arch = recipe.architecture
    blocks = [dataclasses.asdict(block_cost(b, arch, seq_len)) for b in arch.blocks]
    params = count_params(arch)
    out: dict[str, Any] = {
        "name": recipe.name,
        "vocab_size": arch.vocab_size,
        "d_model": arch.d_model,
        "max_position_embeddings": arch.max_position_embeddings,
        "blocks": blocks,
        "params": params,
        "params_non_embedding": params - embedding_params(arch),
        "flops_seq_len": seq_len,
        "flops": count_flops(arch, seq_len),
        "flops_with_lm_head": count_flops(arch, seq_len, include_lm_head=True),
        "kv_cache_tokens": arch.max_position_embeddings,
        "kv_cache_bytes_fp16": kv_cache_bytes(arch, bytes_per_value=2),
        "kv_cache_bytes_fp32": kv_cache_bytes(arch, bytes_per_value=4),
        "provenance": recipe.provenance,
    }
    if entropy is not None:
        out["entropy"] = entropy
    return out
