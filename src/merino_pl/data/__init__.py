"""Data: stream or pre-tokenize text, pack into LM windows, shard across ranks and workers,
resume exactly. ``PileDataModule`` is what training uses; ``merino-pl prepare`` writes shards."""

from merino_pl.data.datamodule import PileDataModule

__all__ = ["PileDataModule"]
