"""Data: stream or pre-tokenize text, pack into LM windows, shard across ranks and workers,
resume exactly. ``PileDataModule`` is what training uses; ``merino-pl prepare`` writes shards.

``PileDataModule`` is imported on first use (PEP 562): ``merino-pl prepare`` imports this
package and needs neither Lightning nor torch to parse its arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# public name -> the module that defines it: what other stages may use of the data stage
_EXPORTS = {
    "PileDataModule": "merino_pl.data.datamodule",
    "DocumentTokenizer": "merino_pl.data.packing",  # text documents -> one EOS-separated token stream
    "is_heldout": "merino_pl.data.packing",  # the hash hold-out every split of a source agrees on
}
__all__ = ["DocumentTokenizer", "PileDataModule", "is_heldout"]

if TYPE_CHECKING:
    from merino_pl.data.datamodule import PileDataModule
    from merino_pl.data.packing import DocumentTokenizer, is_heldout


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'merino_pl.data' has no attribute {name!r}")
