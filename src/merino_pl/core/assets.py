"""Files shipped inside the package, for offline runs (the demo corpus lives with the tokenizer)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def embedded_wikitext2() -> Path:
    """The WikiText-2 raw test split shipped with the package (CC BY-SA 3.0)."""
    return Path(str(resources.files("merino_pl").joinpath("assets", "wikitext-2-raw", "wiki.test.raw")))
