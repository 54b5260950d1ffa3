"""``merino-pl eval CKPT_OR_DIR --tasks paper --ppl wikitext2,ptb --out DIR``.

Zero-shot lm-eval tasks through the ``merino`` backend (or lm-eval's stock ``hf`` backend with
``--backend hf``) and WikiText-2 / PTB perplexity, written as ``eval.json`` + ``eval.md`` (+
``accuracy.png``) in the layout of the paper's Tables 2–3. Offline, a task or corpus whose
data cannot be fetched is reported as skipped with the reason; the rest still run.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from merino_pl.core.errors import MerinoError, parse_problems
from merino_pl.core.tracking import add_wandb_argument
from merino_pl.eval.api import EvalSettings, evaluate, validate
from merino_pl.eval.perplexity import CORPORA, MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .ckpt from `merino-pl fit`, an exported directory, or a recipe (fresh init)")
    p.add_argument("--out", required=True, help="output directory for eval.json / eval.md / accuracy.png")
    p.add_argument(
        "--tasks",
        default="paper",
        help="`paper` (the 12 of Table 2), a task-list YAML, `t1,t2` lm-eval names, or `none` (default: paper)",
    )
    p.add_argument("--ppl", default="wikitext2,ptb", help=f"perplexity corpora: {', '.join(CORPORA)} or `none`")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of local lm-eval task YAMLs (repeatable), e.g. eval/tasks",
    )
    p.add_argument(
        "--data-files",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="local perplexity data instead of the hub: wikitext2=wiki.test.raw ptb=ptb.test.txt; "
        "wikitext2=embedded is the copy shipped with merino-pl",
    )
    p.add_argument(
        "--metadata",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="metadata passed to lm-eval tasks (e.g. data_file=... for eval/tasks/wikitext_local)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N examples per task / documents per corpus")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--backend",
        choices=("merino", "hf"),
        default="merino",
        help="lm-eval backend: our registered `merino` LM, or lm-eval's stock HFLM",
    )
    p.add_argument(
        "--ppl-mode",
        choices=MODES,
        default=None,
        help="document-level (lm-eval's rule; WikiText-2 default) or concatenated (PTB default)",
    )
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: the window)")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens of context for perplexity and lm-eval's max_length (default: the context the model was "
        "trained at, else its max_position_embeddings)",
    )
    p.add_argument(
        "--beyond-trained-context",
        action="store_true",
        help="allow a --window longer than the trained context (positions past it never received a gradient)",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="default: the task list's (paper: 0)")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval bootstrap for non-mean metrics' stderr")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    add_wandb_argument(p)


def settings(args: argparse.Namespace) -> EvalSettings:
    """The parsed flags as the stage's typed settings."""
    return EvalSettings(**{f.name: getattr(args, f.name) for f in fields(EvalSettings)})


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with these arguments that need no model, for ``pipeline`` before any stage runs
    (task names are checked against lm-eval's index only when eval itself runs: ~20 s)."""
    args, problems = parse_problems(add_arguments, argv, "eval")
    if args is None:
        return problems
    try:
        validate(settings(args), index_tasks=False, pending=pending)
    except MerinoError as e:
        return [str(e)]
    return []


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    evaluate(settings(args))
    return 0
