"""``merino-pl pipeline --config PIPELINE.yaml [--out-dir DIR] [--force STAGE] [--dry-run] [--keep-unknown]``.

Flags -> ``PipelineSettings`` (the YAML and the run's flags) -> ``run_pipeline``
(``pipeline/api.py``: checking, locking and running the stages; the package's other modules
hold the config, the stages, the state and the summary).
"""

from __future__ import annotations

import argparse

from merino_pl.pipeline.api import PipelineSettings, run_pipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline YAML (e.g. recipes/pipeline/cpu-demo.yaml)")
    p.add_argument("--out-dir", default=None, help="override the config's out_dir")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="re-run this stage (and so everything after it whose inputs change); 'all' re-runs every stage",
    )
    p.add_argument("--dry-run", action="store_true", help="list the stages and whether each would run, run nothing")
    p.add_argument(
        "--keep-unknown",
        action="store_true",
        help="run even though the output folder holds files this pipeline did not write (outside the stage "
        "folders); they are never touched",
    )


def run(args: argparse.Namespace) -> int:
    settings = PipelineSettings.load(
        args.config, args.out_dir, force=tuple(args.force), dry_run=args.dry_run, keep_unknown=args.keep_unknown
    )
    return run_pipeline(settings)
