"""Data: stream or pre-tokenize text, pack into LM windows, shard across ranks and workers,
resume exactly. ``PileDataModule`` is what training uses; ``merino-pl prepare`` writes shards.

``PileDataModule`` is imported on first use (PEP 562): ``merino-pl prepare`` imports this
package and needs neither Lightning nor torch to parse its arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["PileDataModule"]

if TYPE_CHECKING:
    from merino_pl.data.datamodule import PileDataModule


def __getattr__(name: str) -> Any:
    if name == "PileDataModule":
        from merino_pl.data.datamodule import PileDataModule

        return PileDataModule
    raise AttributeError(f"module 'merino_pl.data' has no attribute {name!r}")
