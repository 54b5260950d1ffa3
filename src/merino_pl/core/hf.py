"""MeRino as a transformers model: its config, ``MerinoForCausalLM``, the KV-cache plumbing
``generate`` needs, and the registration of the ``merino`` model type.

The network is ``merino_pl.core.model``'s ``MerinoDecoder``; here it becomes transformers' base
model (``MerinoModel``, in ``LlamaModel``'s place) under ``MerinoForCausalLM``. Importing this
module registers the ``merino`` model type, after which ``AutoModelForCausalLM.from_pretrained(dir)``
and ``generate()`` work. The same class is what training, eval, quantization, latency and ONNX
export use. Exported directories carry these definitions as ``modeling_merino.py`` (and the
config as ``configuration_merino.py``, see ``merino_pl.core.remote_code``), so they also load
where merino-pl is not installed, with ``trust_remote_code=True``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from merino_pl.core.config import MerinoConfig
from merino_pl.core.model import MerinoDecoder, init_weights, lm_loss


class MerinoHFConfig(PretrainedConfig):
    """``PretrainedConfig`` carrying a ``MerinoConfig`` (as ``architecture``) and its recipe.

    The token ids are the tokenizer's, not the architecture's: ``None`` until an export records
    those of the tokenizer it ships (``merino_pl.core.checkpoint.export_pretrained``).
    ``trained_seq_len`` is the context the weights were trained at (``merino-pl fit``'s
    ``data.seq_len``): positions past it never received a gradient, so eval and latency default
    to it; ``None`` for a fresh initialisation or a directory written before it was recorded.
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
        trained_seq_len: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.trained_seq_len = trained_seq_len
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
        """``architecture`` parsed; parsed again only after ``architecture`` changed."""
        parsed_from, parsed = self.__dict__.get("_arch_parsed", (None, None))
        if parsed_from != self.architecture:
            parsed = MerinoConfig.from_dict(self.architecture)
            self._arch_parsed = (copy.deepcopy(self.architecture), parsed)
        return parsed

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_arch_parsed", None)  # a cache of `architecture`, not a setting
        return out

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
        init_weights(module, self.base_model.cfg.init_std)  # the decoder's parsed config


class MerinoModel(MerinoDecoder, MerinoPreTrainedModel):
    """The decoder as transformers' base model (``model.model``): tools that walk
    ``model.base_model`` (GPTQ loaders read its parallel plans) find a ``PreTrainedModel``."""

    def __init__(self, config: MerinoHFConfig) -> None:
        super().__init__(config.arch, config)  # MerinoDecoder(arch) over PreTrainedModel(config)
        self.post_init()


class MerinoForCausalLM(MerinoPreTrainedModel, GenerationMixin):
    """Causal LM over ``MerinoModel`` with a KV cache (``transformers.DynamicCache``)."""

    def __init__(self, config: MerinoHFConfig) -> None:
        super().__init__(config)
        self.model = MerinoModel(config)
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
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """``logits_to_keep=k`` computes only the last k positions' logits (k=1 when generating).

        The KV cache is ``cache`` (transformers >= 5 names it so; ``past_key_values``, the older
        name, is accepted too): a ``Cache`` to extend, or ``None`` for a new ``DynamicCache``
        when ``use_cache`` (default: not training). It is returned as the output's cache.
        ``return_dict=False`` (default: the config's) returns the output's tuple; attentions and
        hidden states are not returned, so asking for them is an error.
        """
        if output_attentions or output_hidden_states:
            raise ValueError(
                "MerinoForCausalLM returns no attentions or hidden states: "
                f"output_attentions={output_attentions}, output_hidden_states={output_hidden_states}"
            )
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
        # HF convention: labels are the inputs, shifted here
        loss = lm_loss(logits[:, :-1], labels[:, 1:]) if labels is not None else None
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

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
