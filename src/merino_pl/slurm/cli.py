"""``merino-pl slurm submit|status|logs``: the flags of the slurm stage (``slurm/jobs.py``).

``submit`` renders the sbatch script for ``merino-pl fit``, writes it beside the run's outputs
and submits it; ``status`` and ``logs`` read the jobs it recorded.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from merino_pl.slurm.jobs import SubmitSettings, logs, status, submit


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{submit,status,logs}")
    s = sub.add_parser(
        "submit",
        help="render the sbatch script for `merino-pl fit` and submit it",
        description="Render the sbatch script, write it beside the run's outputs, submit it. "
        "Arguments after `--` go to `merino-pl fit` unchanged.",
    )
    s.add_argument(
        "--config", required=True, help="training config YAML (LightningCLI), e.g. recipes/train/pile-8xh100.yaml"
    )
    s.add_argument("--recipe", required=True, help="recipe YAML path or built-in name (--model.recipe)")
    s.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= tasks) per node; 0 = CPU job (default 8)")
    s.add_argument("--tasks-per-node", type=int, default=None, help="CPU jobs only: processes per node (default 1)")
    s.add_argument(
        "--cpus-per-task", type=int, default=None, help="CPU cores per task (default 8 on GPU jobs, 1 on CPU jobs)"
    )
    s.add_argument(
        "--time",
        default="24:00:00",
        help="time limit, SLURM syntax ([D-]HH:MM:SS, default 24:00:00); requeued jobs continue from their checkpoint",
    )
    s.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    s.add_argument("--account", default=None, help="SLURM account to charge")
    s.add_argument("--job-name", default="merino-fit", help="job name (default merino-fit)")
    s.add_argument(
        "--signal-seconds",
        type=int,
        default=90,
        help="send SIGUSR1 this many seconds before the limit: checkpoint + requeue (default 90)",
    )
    s.add_argument(
        "--run-dir",
        default=None,
        help="run directory (default: trainer.default_root_dir of --config, "
        "else runs/<recipe name>); the script and logs go to RUN_DIR/slurm/",
    )
    s.add_argument("--python", default=None, help="run `PYTHON -m merino_pl.cli fit` instead of `merino-pl fit`")
    s.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.add_argument("fit_args", nargs="*", metavar="-- FIT_ARGS", help="extra `merino-pl fit` arguments")
    for name, help_ in (("status", "state of the jobs submitted for a run"), ("logs", "tail of a job's log")):
        q = sub.add_parser(name, help=help_, description=help_)
        q.add_argument("run_dir", help="the run directory given to (or chosen by) `slurm submit`")
        q.add_argument("--job", default=None, help="job id (default: every job / the newest job)")
        if name == "logs":
            q.add_argument("-n", "--lines", type=int, default=40, help="lines to print (default 40)")


def settings(args: argparse.Namespace) -> SubmitSettings:
    """The parsed ``submit`` flags as the stage's typed settings."""
    return SubmitSettings(**{f.name: getattr(args, f.name) for f in fields(SubmitSettings)})


def run(args: argparse.Namespace) -> int:
    if args.action == "submit":
        submit(settings(args))
    elif args.action == "status":
        status(args.run_dir, args.job)
    else:
        logs(args.run_dir, args.job, args.lines)
    return 0
