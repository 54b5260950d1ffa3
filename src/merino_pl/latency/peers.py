"""Peer models of the paper's Tables 2 and 3, built from their published configs.

No download: each peer is its transformers class instantiated from the hyper-parameters of its
published ``config.json`` (``assets/peers.yaml``), with random weights. Latency does not depend on
the weight values, so a peer timed here is the peer the paper timed, at the same shapes.
``PAPER`` is the paper's own figures (Jetson Nano latency, FLOPs, average zero-shot accuracy),
read from the one file that holds them (``merino_pl.core.paper``), for the ratios and the
Figure-1 style chart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merino_pl.core.assets import asset
from merino_pl.core.paper import PaperPoint, paper_points

if TYPE_CHECKING:  # torch only where a peer is built: `latency plot` reads PAPER without it
    import torch


def _peer_configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (transformers config class, hyper-parameters of the published config.json), from
    the package's ``assets/peers.yaml`` (data, with each peer's source repository)."""

    from merino_pl.core.io import read_yaml

    data = read_yaml(asset("peers.yaml"), "peer configs")
    return {name: (peer["class"], peer["config"]) for name, peer in data.items()}


PEER_CONFIGS = _peer_configs()

PAPER: dict[str, PaperPoint] = paper_points()  # the paper's own figures, by peer / recipe name (core/paper.py)


def peer_config(name: str, **overrides: Any) -> Any:
    """The transformers config of a peer (``overrides`` shrink it for tests)."""
    import transformers

    cls_name, params = PEER_CONFIGS[name]
    return getattr(transformers, cls_name)(**{**params, **overrides})


def build_peer(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The peer's transformers model with random weights (SDPA attention, eval mode)."""
    import torch
    import transformers

    config = peer_config(name, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


# ---- the authors' latency protocol --------------------------------------------------------------
# Which models the authors' latency_test times WITH their LM head (inference_test.py): Pythia is
# built as GPTNeoXForCausalLM, GPT-2 and Cerebras-GPT ("cerebras-gpt" matches 'gpt') as
# GPT2LMHeadModel, both returning vocabulary logits; every "opt-*" config, MeRino's own included
# (config_params_*_ms.json are MeRino architectures run through their OPT code), as OPTModel:
# the decoder, whose output is the final hidden state before the tied head.
PAPER_TIMES_HEAD: dict[str, bool] = {
    "pythia-70m": True,
    "pythia-160m": True,
    "gpt2": True,
    "cerebras-111m": True,
    "opt-125m": False,
    "opt-350m": False,
}
MERINO_PAPER_TIMES_HEAD = False


def paper_forward(name: str, model: Any) -> tuple[Any, bool]:
    """``(fn(ids) -> tensor, includes_head)``: what the authors time for this model.

    MeRino: its decoder (embeddings, blocks, projections, final norm), no tied head. OPT: the
    transformers ``OPTModel`` (``model.model``), no head. The others: the whole causal LM, with
    every position's logits.
    """
    import torch

    if hasattr(model, "arch"):  # a MeRino model
        decoder = model.model

        def merino(ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
            return decoder(ids, pos)

        return merino, MERINO_PAPER_TIMES_HEAD
    if name not in PAPER_TIMES_HEAD:
        raise KeyError(f"{name}: the authors' protocol names no rule for it (known: {', '.join(PAPER_TIMES_HEAD)})")
    if PAPER_TIMES_HEAD[name]:
        return (lambda ids: model(input_ids=ids, use_cache=False).logits), True
    return (lambda ids: model.model(input_ids=ids, use_cache=False).last_hidden_state), False
