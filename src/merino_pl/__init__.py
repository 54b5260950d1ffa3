"""merino-pl: design, pretrain, evaluate, quantize and time MeRino language models.

The public names below are imported on first use (PEP 562), so ``import merino_pl`` and
``merino-pl --help`` / ``merino-pl info`` load neither torch nor transformers.

Importing ``merino_pl.core.hf`` (directly, through ``merino_pl.MerinoForCausalLM``, or through any
stage that loads a model) registers the ``merino`` model type with ``transformers``, after which
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load a saved MeRino model. When
``transformers`` is already imported, ``import merino_pl`` registers it at once, so a script that
imports ``transformers`` first (the usual import order) needs nothing more than
``import merino_pl``.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "BlockConfig": "merino_pl.core.config",
    "MerinoConfig": "merino_pl.core.config",
    "Recipe": "merino_pl.core.config",
    "load_recipe": "merino_pl.core.config",
    "MerinoError": "merino_pl.core.errors",
    "MerinoDecoder": "merino_pl.core.model",
    "MerinoForCausalLM": "merino_pl.core.hf",
    "MerinoHFConfig": "merino_pl.core.hf",
    "MerinoModel": "merino_pl.core.hf",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the lazy exports, named for type checkers
    from merino_pl.core.config import BlockConfig, MerinoConfig, Recipe, load_recipe  # noqa: F401
    from merino_pl.core.errors import MerinoError  # noqa: F401
    from merino_pl.core.hf import MerinoForCausalLM, MerinoHFConfig, MerinoModel  # noqa: F401
    from merino_pl.core.model import MerinoDecoder  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'merino_pl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if "transformers" in sys.modules:  # the caller uses transformers anyway: register the model type now
    importlib.import_module("merino_pl.core.hf")
