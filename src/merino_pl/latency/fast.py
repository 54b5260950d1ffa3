"""The fast inference path: what makes a MeRino model fast at batch 1 without changing outputs.

Applied to a loaded model at inference time (never a second model definition):

* **last-position logits in prefill** (``logits_to_keep=1``): generation only samples from the
  last position, and the tied LM head (``seq × d × vocab``; 50 304 × 768 here) is a large share of
  a small model's prefill;
* **fused QKV where it measures faster**: one ``(3E × E)`` GEMM per layer application instead
  of three. The three weights are re-pointed at views into the stacked tensor, so either form
  costs no extra memory and each call can take the faster one. ``bench/fast_path.py`` measures
  each part per phase and thread count; on this CPU (paired medians of interleaved calls,
  MeRino-52M / 64M, 1 and 2 threads) the fused GEMM was 1-6 % slower in prefill and 1-3 %
  faster per decode step, so on CPU a decode step (one new token) runs fused and a prefill runs
  the three GEMMs. On CUDA (not measured here: no GPU was lent) both run fused, the usual
  choice for GPU kernels, where one launch replaces three;
* **no redundant copies of shared weights**: the LM head reads the embedding itself, and a block's
  layer is one module however many times it runs; ``weight_bytes_in_memory`` checks both.

Not done (not measured either): a static KV cache. Pre-allocated slots need an explicit mask for
the empty ones on every decode step, where the dynamic cache lets one new token run SDPA with no
mask at all; ``DynamicCache``'s ``torch.cat`` copies at sequence 128 are small next to the GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from merino_pl.core.model import Attention


class FusedQKVAttention(Attention):
    """``Attention`` whose Q, K, V come from one ``(3C × C)`` GEMM: same weights, same result.

    Built from a loaded ``Attention`` (``fuse_qkv``), never trained: its q/k/v_proj are that
    module's own, their weights re-pointed at views into the stacked tensor (``fused_qkv``), so
    nothing is stored twice.
    """

    def __init__(self, attn: Attention, fuse_prefill: bool = False) -> None:
        nn.Module.__init__(self)  # not Attention.__init__: it would build (and draw random weights for) new linears
        self.n_head, self.head_dim, self.dropout = attn.n_head, attn.head_dim, attn.dropout
        self.training = attn.training
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        projs = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projs])  # (3C, C)
            bias = torch.cat([p.bias for p in projs]) if projs[0].bias is not None else None
            C = self.q_proj.weight.shape[0]
            for i, p in enumerate(projs):  # the old tensors are freed: one copy remains
                p.weight = nn.Parameter(weight[i * C : (i + 1) * C], requires_grad=False)
                if bias is not None:
                    p.bias = nn.Parameter(bias[i * C : (i + 1) * C], requires_grad=False)
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] = (weight, bias)
        self.fuse_prefill = fuse_prefill  # False: only decode steps (one token) take the fused GEMM

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.shape[-2] == 1 or self.fuse_prefill:
            return F.linear(x, *self.fused_qkv).split(x.shape[-1], dim=-1)  # (B, T, 3C) -> 3 x (B, T, C)
        return super().qkv(x)  # three GEMMs over views of the same weights


def fuse_qkv(model: nn.Module, fuse_prefill: bool | None = None) -> int:
    """Replace every ``Attention`` by its ``FusedQKVAttention``; returns how many are fused (idempotent).

    ``fuse_prefill``: whether prompts (more than one token) take the fused GEMM too; ``None``:
    as measured (module docstring): on CUDA yes, on CPU no (decode steps only). Only plain
    ``nn.Linear`` projections are fused: a quantized linear keeps its own kernel.
    """
    if fuse_prefill is None:
        param = next(model.parameters(), None)
        fuse_prefill = param is not None and param.device.type == "cuda"
    fused = 0
    for name, attn in list(model.named_modules()):
        if isinstance(attn, FusedQKVAttention):
            fused += 1
        elif isinstance(attn, Attention) and all(type(p) is nn.Linear for p in (attn.q_proj, attn.k_proj, attn.v_proj)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedQKVAttention(attn, fuse_prefill))
            fused += 1
    return fused
