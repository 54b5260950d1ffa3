"""Zero-cost proxies of an architecture, each oriented so that HIGHER predicts LOWER loss.

Analytic (from the recipe alone): every proxy of the search's registry that scores an
architecture (``merino_pl.search.registry``: the shipped ones and any plugin's), so a proxy
registered for the search is studied too:
* ``entropy:NAME``: Eq. 15 under one entropy config (the ``entropy`` proxy, once per config);
* ``decoder_params``: parameters without the token / position embeddings (LTS, Archai: the
  search's ``params`` proxy, under the name the study's reports have always used);
* ``flops``: forward FLOPs in the paper's convention;
* ``layer_applications``: Σ L_j (depth as trained);
* a plugin's proxy under its own name (its ``arch`` under the default entropy config).

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
from merino_pl.core.model import lm_loss
from merino_pl.search.api import EntropyConfig, proxies

DATA = ("ntk_cond", "dss")
COLUMNS = {"params": "decoder_params"}  # registry name -> the study's name, where they differ


def analytic_proxies(arch: MerinoConfig, entropy: dict[str, EntropyConfig]) -> dict[str, float]:
    """Every registered proxy that scores an architecture, of one architecture (the entropy
    once per named config; the others under the default one)."""
    out: dict[str, float] = {}
    for name, proxy in proxies().items():
        if proxy.arch is None:  # a rule (naive scaling), not a score
            continue
        if name == "entropy":
            out.update({f"entropy:{label}": float(proxy.arch(arch, cfg)) for label, cfg in entropy.items()})
        else:
            out[COLUMNS.get(name, name)] = float(proxy.arch(arch, EntropyConfig()))
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
