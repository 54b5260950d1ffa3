"""``merino-pl info RECIPE``: per-block table and totals (parameters, FLOPs, KV cache); the
figures come from ``info/api.py``."""

from __future__ import annotations

import argparse
import dataclasses
import json

from merino_pl.core.config import load_recipe
from merino_pl.core.costs import PAPER_SEQ_LEN
from merino_pl.core.errors import MerinoError
from merino_pl.info.api import format_table, summarize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML path or built-in name (merino-52m, merino-61m, merino-64m, merino-tiny)")
    p.add_argument(
        "--vocab-size", type=int, default=None, help="override the recipe's vocab size (e.g. 50272, the paper's)"
    )
    p.add_argument("--seq-len", type=int, default=PAPER_SEQ_LEN, help="tokens for the FLOPs count (paper: 1024)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    if args.vocab_size is not None:
        if args.vocab_size <= 0:
            raise MerinoError(f"--vocab-size must be positive, got {args.vocab_size}")
        recipe = dataclasses.replace(
            recipe, architecture=dataclasses.replace(recipe.architecture, vocab_size=args.vocab_size)
        )
    if args.seq_len <= 0:
        raise MerinoError(f"--seq-len must be positive, got {args.seq_len}")
    s = summarize(recipe, args.seq_len)
    print(json.dumps(s, indent=2) if args.json else format_table(s))
    return 0
