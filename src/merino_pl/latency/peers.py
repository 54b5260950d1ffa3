"""Peer models of the paper's Tables 2 and 3, built from their published configs.

No download: each peer is its transformers class instantiated from the hyper-parameters of its
published ``config.json`` (written out below), with random weights. Latency does not depend on
the weight values, so a peer timed here is the peer the paper timed, at the same shapes.
``PAPER`` is the paper's own figures (Jetson Nano latency, FLOPs, average zero-shot accuracy),
read from the one file that holds them (``merino_pl.core.paper``), for the ratios and the
Figure-1 style chart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merino_pl.core.paper import PaperPoint, paper_points

if TYPE_CHECKING:  # torch only where a peer is built: `latency plot` reads PAPER without it
    import torch

# name -> (transformers config class, hyper-parameters of the published config.json)
PEER_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "pythia-70m": (
        "GPTNeoXConfig",
        dict(  # EleutherAI/pythia-70m
            vocab_size=50304,
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=2048,
            hidden_act="gelu",
            rotary_pct=0.25,
            rotary_emb_base=10000,
            max_position_embeddings=2048,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
    ),
    "pythia-160m": (
        "GPTNeoXConfig",
        dict(  # EleutherAI/pythia-160m (the paper's "Pythia-162M")
            vocab_size=50304,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            hidden_act="gelu",
            rotary_pct=0.25,
            rotary_emb_base=10000,
            max_position_embeddings=2048,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
    ),
    "opt-125m": (
        "OPTConfig",
        dict(  # facebook/opt-125m
            vocab_size=50272,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            ffn_dim=3072,
            word_embed_proj_dim=768,
            max_position_embeddings=2048,
            do_layer_norm_before=True,
            activation_function="relu",
        ),
    ),
    "opt-350m": (
        "OPTConfig",
        dict(  # facebook/opt-350m: post-LN, 512-wide embeddings projected
            vocab_size=50272,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            ffn_dim=4096,
            word_embed_proj_dim=512,
            max_position_embeddings=2048,
            do_layer_norm_before=False,
            activation_function="relu",
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(  # openai-community/gpt2 (124 M)
            vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, activation_function="gelu_new"
        ),
    ),
    "cerebras-111m": (
        "GPT2Config",
        dict(  # cerebras/Cerebras-GPT-111M
            vocab_size=50257,
            n_embd=768,
            n_layer=10,
            n_head=12,
            n_inner=3072,
            n_positions=2048,
            activation_function="gelu",
        ),
    ),
}


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
