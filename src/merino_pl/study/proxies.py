"""Zero-cost proxies of an architecture, each oriented so that HIGHER predicts LOWER loss.

Analytic (from the recipe alone):
* ``entropy:NAME``: Eq. 15 under one entropy config (``merino_pl.search.entropy``);
* ``decoder_params``: parameters without the token / position embeddings (LTS, Archai);
* ``flops``: forward FLOPs in the paper's convention;
* ``layer_applications``: Σ L_j (depth as trained).

Data-dependent, at initialisation, on a few real training batches (the Fig. 3 baselines):
* ``ntk_cond``: −κ, κ = λ_max / λ_min of the empirical NTK Gram matrix ``G = J Jᵀ`` (TE-NAS,
  Chen et al. 2021). TE-NAS differentiates the summed logits of each image; a language model's
  logits are shift-invariant under the softmax, so ``J`` here holds the gradient of each
  sequence's mean next-token loss (one row per sequence). Lower κ = better conditioned, so the
  proxy is −κ.
* ``dss``: the DSS indicator of TF-TAS (Zhou et al. 2022): synaptic diversity of the attention
  weights, Σ ‖W‖_* · ‖∂L/∂W‖_* over Q, K, V, O, plus synaptic saliency of the FFN weights,
  Σ |W ⊙ ∂L/∂W| over both FFN linears; gradients of the loss of the same batches.

None of the libraries we use computes these for a causal LM (TE-NAS and TF-TAS ship research
code for image classifiers), so both are written here, following the papers' definitions.
"""

from __future__ import annotations

import torch

from merino_pl.core.config import MerinoConfig
from merino_pl.core.costs import count_flops, count_params, embedding_params
from merino_pl.core.model import lm_loss
from merino_pl.search.api import EntropyConfig, arch_entropy

ANALYTIC = ("decoder_params", "flops", "layer_applications")
DATA = ("ntk_cond", "dss")


def analytic_proxies(arch: MerinoConfig, entropy: dict[str, EntropyConfig]) -> dict[str, float]:
    """Every analytic proxy of one architecture (entropy once per named config)."""
    out = {f"entropy:{name}": arch_entropy(arch, cfg)["total"] for name, cfg in entropy.items()}
    out["decoder_params"] = float(count_params(arch) - embedding_params(arch))
    out["flops"] = float(count_flops(arch))
    out["layer_applications"] = float(arch.num_layer_applications)
    return out


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return lm_loss(model(batch[:, :-1], use_cache=False).logits, batch[:, 1:])


def ntk_condition(model: torch.nn.Module, sequences: torch.Tensor) -> float:
    """κ of the Gram matrix of per-sequence loss gradients (``sequences``: (n, T + 1))."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for seq in sequences:
        grads = torch.autograd.grad(_loss(model, seq[None]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows).double()  # (n, P)
    eig = torch.linalg.eigvalsh(jac @ jac.T)
    return float(eig[-1] / eig[0].clamp_min(1e-30))


def dss_score(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """TF-TAS DSS: attention nuclear-norm diversity + FFN saliency, gradients over ``batches``."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        (_loss(model, batch) / len(batches)).backward()
    total = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module.weight.grad is None:
                continue
            w, g = module.weight, module.weight.grad
            if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                total += float(torch.linalg.matrix_norm(w, "nuc") * torch.linalg.matrix_norm(g, "nuc"))
            elif name.endswith(("ffn.up", "ffn.down")):
                total += float((w * g).abs().sum())
    model.zero_grad(set_to_none=True)
    return total


def data_proxies(model: torch.nn.Module, batches: list[torch.Tensor], ntk_sequences: int = 16) -> dict[str, float]:
    """``ntk_cond`` (as −κ) and ``dss`` of a freshly initialised model on real batches."""
    model.train()
    sequences = torch.cat(batches)[:ntk_sequences]
    return {"ntk_cond": -ntk_condition(model, sequences), "dss": dss_score(model, batches)}
