"""``merino-pl demo [--max-steps N] [--prompt TEXT]``: train the demo model on the embedded
corpus, then generate from it (flags -> ``DemoSettings`` -> ``demo``, see ``demo/api.py``)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from merino_pl.demo.api import DEFAULT_PROMPT, DemoSettings, demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="fit config (default: the packaged recipes/fit/cpu-demo.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    p.add_argument("--out", default="runs/demo", help="parent folder of this run's folder (checkpoints, logs)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)


def settings(args: argparse.Namespace) -> DemoSettings:
    """The parsed flags as the demo's typed settings."""
    return DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})


def run(args: argparse.Namespace) -> int:
    demo(settings(args))
    return 0
