"""``merino-pl prepare SOURCE --out DIR``: the flags of :func:`merino_pl.data.prepare.prepare`.

Example::

    merino-pl prepare ../shared/data/corpus/tinyshakespeare.txt --out runs/shards/shakespeare
    merino-pl prepare EleutherAI/the_pile_deduplicated --out /data/pile-neox --workers 32
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from merino_pl.data.prepare import DEFAULT_SHARD_TOKENS, PrepareSettings, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="hub dataset name, local txt/jsonl/parquet file, glob or directory, or 'embedded'"
    )
    parser.add_argument("--out", required=True, help="output directory (re-running continues an interrupted run)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json path / folder / hub name (default: shipped GPT-NeoX-20B)"
    )
    parser.add_argument("--text-field", default="text", help="column holding the text (jsonl / parquet)")
    parser.add_argument(
        "--sample-by", default="paragraph", choices=("line", "paragraph", "document"), help=".txt: what one document is"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file (default 2^27)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.01, help="fraction of documents held out (by text hash) for validation"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)"
    )
    parser.add_argument("--docs-per-batch", type=int, default=256, help="documents sent to a worker at once")
    parser.add_argument(
        "--max-shards", type=int, default=None, help="stop after this many train shards (a later run continues)"
    )


def settings(args: argparse.Namespace) -> PrepareSettings:
    """The parsed flags as the stage's typed settings."""
    return PrepareSettings(**{f.name: getattr(args, f.name) for f in fields(PrepareSettings)})


def run(args: argparse.Namespace) -> int:
    prepare(settings(args))
    return 0
