"""``merino-pl prepare SOURCE --out DIR``: the flags of :func:`merino_pl.data.prepare.prepare`, and the
two checks of a written set, ``--merge DIR`` (parts of a distributed run -> one set) and ``--verify
DIR`` (SHA-256 of every shard).

Example::

    merino-pl prepare data/my-corpus.txt --out runs/shards/my-corpus
    merino-pl prepare EleutherAI/the_pile_deduplicated --out /data/pile-neox --workers 32
    merino-pl prepare EleutherAI/the_pile_deduplicated --out /data/pile-neox --num-tasks 64   # in a SLURM array
    merino-pl prepare --merge /data/pile-neox
    merino-pl prepare --verify /data/pile-neox
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from merino_pl.core.errors import MerinoError
from merino_pl.data.prepare import DEFAULT_SHARD_TOKENS, PrepareSettings, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="?", help="hub dataset name, local txt/jsonl/parquet file, glob or directory, or 'embedded'"
    )
    parser.add_argument("--out", help="output directory (re-running continues an interrupted run)")
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
    parser.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="split the source's files into this many parts, one per task (default: SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    parser.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="the part this task writes, into OUT/part-0000I (default: SLURM_ARRAY_TASK_ID, else 0)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", metavar="DIR", help="after all tasks: merge DIR/part-* into one shard set DIR")
    mode.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest (SHA-256)")


def settings(args: argparse.Namespace) -> PrepareSettings:
    """The parsed flags as the stage's typed settings."""
    return PrepareSettings(**{f.name: getattr(args, f.name) for f in fields(PrepareSettings)})


def run(args: argparse.Namespace) -> int:
    from merino_pl.data import shardset

    if args.merge or args.verify:
        if args.source or args.out:
            flag = "--merge" if args.merge else "--verify"
            raise MerinoError(f"{flag} DIR takes no SOURCE / --out (got {args.source or args.out!r})")
        if args.merge:
            m = shardset.merge(args.merge)
            print(
                f"prepare: merged {m['parts']} parts into {args.merge}/{shardset.MANIFEST}: "
                f"train {m['tokens']['train']:,} tokens in {len(m['splits']['train'])} shard(s), "
                f"val {m['tokens']['val']:,}"
            )
        else:
            r = shardset.verify_directory(args.verify)
            print(
                f"prepare: {r['directory']}: all {r['shards']} shard(s) match {shardset.MANIFEST} "
                f"(SHA-256, {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.1f} s)"
            )
        return 0
    missing = [what for what, value in (("SOURCE", args.source), ("--out DIR", args.out)) if not value]
    if missing:
        raise MerinoError(f"missing {' and '.join(missing)} (or pass --merge DIR / --verify DIR)")
    prepare(settings(args))
    return 0
