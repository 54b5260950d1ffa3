"""merino-pl: design, pretrain, evaluate, quantize and time MeRino language models.

Importing the package registers the ``merino`` model type with ``transformers`` so that
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load a saved MeRino model without
``trust_remote_code``.
"""

from __future__ import annotations

from merino_pl.config import BlockConfig, MerinoConfig, Recipe, load_recipe
from merino_pl.errors import MerinoError
from merino_pl.model import MerinoDecoder, MerinoForCausalLM, MerinoHFConfig

__version__ = "0.1.0"

__all__ = [
    "BlockConfig",
    "MerinoConfig",
    "MerinoDecoder",
    "MerinoError",
    "MerinoForCausalLM",
    "MerinoHFConfig",
    "Recipe",
    "load_recipe",
]


def _register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MerinoHFConfig.model_type, MerinoHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(MerinoHFConfig, MerinoForCausalLM, exist_ok=True)


_register_with_transformers()
