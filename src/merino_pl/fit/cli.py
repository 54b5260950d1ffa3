"""``merino-pl fit`` (and ``validate`` / ``test``): LightningCLI's own command line, handed
unchanged to the fit stage's entry function :func:`merino_pl.fit.api.fit`.

    merino-pl fit --config recipes/fit/cpu-demo.yaml [--model.recipe R] [--trainer.max_steps N]
                  [--ckpt_path last]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from merino_pl.core.io import read_yaml
from merino_pl.fit.argv import config_files


def main(argv: Sequence[str] | None = None, subcommand: str = "fit") -> int:
    """Entry point of ``merino-pl fit`` (and ``validate`` / ``test``: the held-out loss of
    ``--ckpt_path``); jsonargparse errors become one line, exit code 2."""
    # sys.argv stays as it is: Lightning's DDP launcher re-runs it in the other processes
    argv = list(sys.argv[1:] if argv is None else argv)
    for path in config_files(argv):  # a missing or malformed --config: one line before Lightning is imported
        read_yaml(path, "fit --config file")
    from merino_pl.fit.api import fit

    fit(argv, subcommand)
    return 0


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """``fit.api.validate_argv``: how ``pipeline`` checks a fit command line through this module."""
    from merino_pl.fit.api import validate_argv as check

    return check(argv, pending)


def validate_main(argv: Sequence[str] | None = None) -> int:
    """``merino-pl validate``: the held-out (validation) loss of a checkpoint, same config as fit."""
    return main(argv, "validate")


def test_main(argv: Sequence[str] | None = None) -> int:
    """``merino-pl test``: the same held-out windows through Lightning's test loop."""
    return main(argv, "test")
