"""Files shipped inside the package, for offline runs (the demo corpus lives with the tokenizer)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def asset(*parts: str) -> Path:
    """A file shipped under ``merino_pl/assets/`` (the package's data, wherever it is installed)."""
    return Path(str(resources.files("merino_pl").joinpath("assets", *parts)))


def embedded_wikitext2() -> Path:
    """The WikiText-2 raw test split shipped with the package (CC BY-SA 3.0)."""
    return asset("wikitext-2-raw", "wiki.test.raw")
