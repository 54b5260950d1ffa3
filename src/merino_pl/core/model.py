"""The MeRino adaptive block-wise shared decoder, readable top to bottom.

    tokens ─► embed (V×d, tied) + positions (2048×d) ─► in-proj d→E_1
           ─► block 1: ONE layer applied L_1 times ─► proj E_1→E_2 ─► block 2 ... block N
           ─► final norm ─► out-proj E_N→d ─► logits = h · embedᵀ

Every block owns a single pre-LN transformer layer; ``forward`` runs it ``num_layers`` times, so
the weights are shared while each application keeps its own KV-cache entry.

Plain PyTorch, built from a ``MerinoConfig``. transformers' view of it (``MerinoForCausalLM``,
its config, generation, registration) is ``merino_pl.core.hf``; inference conversions such as
fused QKV swap modules from outside (``merino_pl.latency.fast``). Exported directories carry
these definitions in ``modeling_merino.py`` (``merino_pl.core.remote_code``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from merino_pl.core.config import ACTIVATIONS, MerinoConfig


class KVCache(Protocol):
    """What the decoder asks of a KV cache (transformers' ``DynamicCache`` is one)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, ...]:
        """Append one layer application's keys / values (B, nh, T, hs); return all of its so far."""


def make_norm(cfg: MerinoConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Causal multi-head self-attention, head dim 64, through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: MerinoConfig, dim: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = dim // cfg.head_dim, cfg.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.dropout = cfg.dropout

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values, (B, T, C) each (a converter may compute them in one GEMM)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, cache_idx: int
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, cache_idx)  # (B, nh, T_past + T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.o_proj(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: MerinoConfig, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=cfg.bias)
        self.act = getattr(nn, ACTIVATIONS[cfg.activation])()  # e.g. "relu" -> nn.ReLU()
        self.down = nn.Linear(hidden, dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))


class DecoderLayer(nn.Module):
    """Pre-LN: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: MerinoConfig, dim: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg, dim)
        self.attn = Attention(cfg, dim)
        self.ffn_norm = make_norm(cfg, dim)
        self.ffn = FeedForward(cfg, dim, hidden)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, cache_idx: int
    ) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), mask, cache, cache_idx))
        return x + self.ffn(self.ffn_norm(x))


class SharedBlock(nn.Module):
    """ONE decoder layer whose weights are applied ``num_layers`` times in a row."""

    def __init__(self, cfg: MerinoConfig, index: int) -> None:
        super().__init__()
        b = cfg.blocks[index]
        self.num_layers = b.num_layers
        self.layer = DecoderLayer(cfg, b.embed_dim, b.ffn)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, first_cache_idx: int
    ) -> torch.Tensor:
        for i in range(self.num_layers):  # the parameter sharing: same self.layer every time
            x = self.layer(x, mask, cache, first_cache_idx + i)
        return x


def _projection(d_in: int, d_out: int) -> nn.Module:
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)


def init_weights(module: nn.Module, std: float) -> None:
    """Standard GPT-style init: N(0, std) for matrices and embeddings, unit norms, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class MerinoDecoder(nn.Module):
    """The network: embeddings, the shared blocks and the projections between them, the final
    norm and the tied LM head (``logits``). ``init_weights`` is its initialisation."""

    def __init__(self, cfg: MerinoConfig, *base_args: Any) -> None:
        super().__init__(*base_args)  # base_args: for a subclass's other base (core.hf: the PreTrainedModel's config)
        self.cfg = cfg
        widths = [b.embed_dim for b in cfg.blocks]
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.in_proj = _projection(cfg.d_model, widths[0])
        self.blocks = nn.ModuleList(SharedBlock(cfg, j) for j in range(cfg.num_blocks))
        # between_proj[j] maps block j's width to block j+1's (identity where equal)
        self.between_proj = nn.ModuleList(_projection(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.final_norm = make_norm(cfg, widths[-1])
        self.out_proj = _projection(widths[-1], cfg.d_model)
        # first KV-cache slot of each block: block j's applications use slots [start_j, start_j + L_j)
        starts = [0]
        for b in cfg.blocks[:-1]:
            starts.append(starts[-1] + b.num_layers)
        self.cache_starts = starts

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, d) before the tied LM head.

        ``mask``: boolean (B, 1, T, T_past + T), True = attend; None = causal. ``cache``: one
        entry per layer application, extended in place.
        """
        x = self.drop(self.embed_tokens(input_ids) + self.embed_positions(position_ids))  # (B, T, d)
        x = self.in_proj(x)  # (B, T, E_1)
        for j, block in enumerate(self.blocks):
            x = block(x, mask, cache, self.cache_starts[j])
            if j < len(self.between_proj):
                x = self.between_proj[j](x)  # (B, T, E_j) -> (B, T, E_{j+1})
        return self.out_proj(self.final_norm(x))  # (B, T, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed_tokens.weight)  # tied LM head: (B, T, V)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in float32, the one loss of training, eval and ``labels=``.

    ``logits[..., t, :]`` scores ``targets[..., t]``, the token that follows position t (the
    caller shifts); targets of -100 are ignored. ``reduction``: ``"mean"`` over the scored
    tokens, ``"sum"``, or ``"none"``: the negative log-likelihood of each token (``targets``' shape).
    """
    nll = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100, reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll
