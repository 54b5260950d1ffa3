"""The MeRino adaptive block-wise shared decoder, readable top to bottom.

    tokens ─► embed (V×d, tied) + positions (2048×d) ─► in-proj d→E_1
           ─► block 1: ONE layer applied L_1 times ─► proj E_1→E_2 ─► block 2 ... block N
           ─► final norm ─► out-proj E_N→d ─► logits = h · embedᵀ

Every block owns a single pre-LN transformer layer; ``forward`` runs it ``num_layers`` times, so
the weights are shared while each application keeps its own KV-cache entry.

``MerinoForCausalLM`` (and the decoder under it) is a ``transformers.PreTrainedModel``: importing
this module registers the ``merino`` model type, after which ``AutoModelForCausalLM.from_pretrained(dir)``
and ``generate()`` work. The same class is what training, eval, quantization, latency and ONNX
export use. Exported directories carry this file as ``modeling_merino.py`` (and the config as
``configuration_merino.py``, see ``merino_pl.core.remote_code``), so they also load where merino-pl is
not installed, with ``trust_remote_code=True``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from merino_pl.core.config import MerinoConfig


def make_norm(cfg: MerinoConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


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
        # (weight (3C, C), bias) of Q, K, V stacked, set by merino_pl.latency.fast for inference;
        # q/k/v_proj's weights are then views into it, so nothing is stored twice
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None, cache_idx: int
    ) -> torch.Tensor:
        B, T, C = x.shape
        if self.fused_qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # one GEMM instead of three: same weights, same result
            q, k, v = F.linear(x, *self.fused_qkv).split(C, dim=-1)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, cache_idx)  # (B, nh, T_past + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v,
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
        self.act = ACTIVATIONS[cfg.activation]()
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None, cache_idx: int) -> torch.Tensor:
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
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None, first_cache_idx: int
    ) -> torch.Tensor:
        for i in range(self.num_layers):  # the parameter sharing: same self.layer every time
            x = self.layer(x, mask, cache, first_cache_idx + i)
        return x


def _projection(d_in: int, d_out: int) -> nn.Module:
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)


# ---- transformers integration -----------------------------------------------------------------
class MerinoHFConfig(PretrainedConfig):
    """``PretrainedConfig`` carrying a ``MerinoConfig`` (as ``architecture``) and its recipe.

    The token ids are the tokenizer's, not the architecture's: ``None`` until an export records
    those of the tokenizer it ships (``merino_pl.checkpoint.export_pretrained``).
    """

    model_type = "merino"

    def __init__(
        self,
        architecture: dict[str, Any] | None = None,
        recipe_name: str | None = None,
        provenance: dict[str, Any] | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.architecture = architecture or {"blocks": [{"embed_dim": 64, "ffn_ratio": 1, "num_layers": 1}]}
        self.recipe_name = recipe_name
        self.provenance = provenance or {}
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        arch = self.arch
        # the names generic tooling (generate, lm-eval, GPTQ engines) looks for
        kwargs.setdefault("tie_word_embeddings", True)
        self.vocab_size = arch.vocab_size
        self.hidden_size = arch.d_model
        self.max_position_embeddings = arch.max_position_embeddings
        self.num_hidden_layers = arch.num_layer_applications
        super().__init__(**kwargs)

    @property
    def arch(self) -> MerinoConfig:
        return MerinoConfig.from_dict(self.architecture)

    @classmethod
    def from_recipe(cls, recipe: Any) -> MerinoHFConfig:
        return cls(architecture=recipe.architecture.to_dict(), recipe_name=recipe.name, provenance=recipe.provenance)


class MerinoPreTrainedModel(PreTrainedModel):
    config_class = MerinoHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SharedBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Standard GPT-style init: N(0, init_std) for matrices and embeddings, zero biases."""
        std = self.base_model.cfg.init_std  # the decoder's parsed config: no re-parse per module
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class MerinoDecoder(MerinoPreTrainedModel):
    """The network itself, built from the ``MerinoConfig`` its config carries (``config.arch``).

    A ``PreTrainedModel`` (transformers' base-model convention, like ``LlamaModel``): tools that
    walk ``model.base_model`` (pipeline / tensor-parallel plans, GPTQ loaders) find what they expect.
    """

    def __init__(self, config: MerinoHFConfig) -> None:
        super().__init__(config)
        self.cfg = cfg = config.arch
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
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, d) before the tied LM head."""
        x = self.drop(self.embed_tokens(input_ids) + self.embed_positions(position_ids))  # (B, T, d)
        x = self.in_proj(x)  # (B, T, E_1)
        for j, block in enumerate(self.blocks):
            x = block(x, mask, cache, self.cache_starts[j])
            if j < len(self.between_proj):
                x = self.between_proj[j](x)  # (B, T, E_j) -> (B, T, E_{j+1})
        return self.out_proj(self.final_norm(x))  # (B, T, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed_tokens.weight)  # tied LM head: (B, T, V)


class MerinoForCausalLM(MerinoPreTrainedModel, GenerationMixin):
    """Causal LM over ``MerinoDecoder`` with a KV cache (``transformers.DynamicCache``)."""

    def __init__(self, config: MerinoHFConfig) -> None:
        super().__init__(config)
        self.model = MerinoDecoder(config)
        self.post_init()

    @classmethod
    def from_arch(cls, arch: MerinoConfig, **kwargs: Any) -> MerinoForCausalLM:
        return cls(MerinoHFConfig(architecture=arch.to_dict(), **kwargs))

    @classmethod
    def from_recipe(cls, recipe: Any) -> MerinoForCausalLM:
        return cls(MerinoHFConfig.from_recipe(recipe))

    @property
    def arch(self) -> MerinoConfig:
        return self.model.cfg

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``logits_to_keep=k`` computes only the last k positions' logits (k=1 when generating).

        The KV cache is ``cache`` (transformers >= 5 names it so; ``past_key_values``, the older
        name, is accepted too): a ``Cache`` to extend, or ``None`` for a new ``DynamicCache``
        when ``use_cache`` (default: not training). It is returned as the output's cache.
        """
        B, T = input_ids.shape
        cache = cache if cache is not None else past_key_values
        use_cache = (not self.training) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        elif not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: one host sync here, not one per helper
        if position_ids is None:
            position_ids = self._positions(attention_mask, past, T, input_ids.device)
        mask = _attention_mask(attention_mask, past, T, input_ids.device)
        hidden = self.model(input_ids, position_ids, mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.logits(hidden)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    @staticmethod
    def _positions(attention_mask: torch.Tensor | None, past: int, T: int, device: torch.device) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(past, past + T, device=device).unsqueeze(0)
        # left padding: a sequence's positions count its real tokens only
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[:, -T:]


# the output's cache field: ``cache`` since transformers 5 renamed it (reading or writing the old
# ``past_key_values`` there logs a deprecation warning), ``past_key_values`` before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _attention_mask(
    attention_mask: torch.Tensor | None, past: int, T: int, device: torch.device
) -> torch.Tensor | None:
    """A boolean (B, 1, T, past+T) mask, or None when SDPA's own causal mask is exact.

    None covers the common cases (a full prompt without padding, or one new token): SDPA's
    ``is_causal`` is then right and fastest. Otherwise the causal part is offset by ``past`` and
    padded positions (``attention_mask == 0``) are hidden.
    """
    padded = attention_mask is not None  # the caller turned an all-ones mask into None
    if not padded and (past == 0 or T == 1):
        return None
    S = past + T
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, S)
    mask = causal[None, None]  # (1, 1, T, S)
    if padded:
        keep = attention_mask[:, -S:].bool()[:, None, None, :]  # (B, 1, 1, S)
        mask = mask & keep
        # a query row with nothing to attend to (a pad token) would give NaN; let it attend
        # everywhere instead: its output is never used
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask


def _register_with_transformers() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``model_type: merino``. Done here,
    not in the package ``__init__``, so that commands which load no model never import torch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MerinoHFConfig.model_type, MerinoHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(MerinoHFConfig, MerinoForCausalLM, exist_ok=True)


_register_with_transformers()
