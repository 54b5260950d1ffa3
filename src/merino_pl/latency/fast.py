"""The fast inference path: what makes a MeRino model fast at batch 1 without changing outputs.

Applied to a loaded model at inference time (never a second model definition):

* **last-position logits in prefill** (``logits_to_keep=1``): generation only samples from the
  last position, and the tied LM head (``seq × d × vocab``; 50 304 × 768 here) is a large share of
  a small model's prefill;
* **fused QKV**: one ``(3E × E)`` GEMM per layer application instead of three. The three weights
  are re-pointed at views into the stacked tensor, so the fused form costs no extra memory;
* **no redundant copies of shared weights**: the LM head reads the embedding itself, and a block's
  layer is one module however many times it runs; ``weight_bytes_in_memory`` checks both.

Not done (not measured either): a static KV cache. Pre-allocated slots need an explicit mask for
the empty ones on every decode step, where the dynamic cache lets one new token run SDPA with no
mask at all; ``DynamicCache``'s ``torch.cat`` copies at sequence 128 are small next to the GEMMs.
"""

from __future__ import annotations

import torch
from torch import nn

from merino_pl.core.model import Attention


def fuse_qkv(model: nn.Module) -> int:
    """Stack Q, K, V of every attention once; returns how many were fused (idempotent).

    Only plain ``nn.Linear`` projections are fused: a quantized linear keeps its own kernel.
    """
    fused = 0
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        if attn.fused_qkv is not None:
            fused += 1
            continue
        if not all(type(p) is nn.Linear for p in projs):
            continue
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projs])  # (3C, C)
            bias = torch.cat([p.bias for p in projs]) if projs[0].bias is not None else None
            C = attn.q_proj.weight.shape[0]
            for i, p in enumerate(projs):  # the old tensors are freed: one copy remains
                p.weight = nn.Parameter(weight[i * C : (i + 1) * C], requires_grad=False)
                if bias is not None:
                    p.bias = nn.Parameter(bias[i * C : (i + 1) * C], requires_grad=False)
        attn.fused_qkv = (weight, bias)
        fused += 1
    return fused

