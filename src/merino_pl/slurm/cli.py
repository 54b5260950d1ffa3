"""``merino-pl slurm submit|chain|prepare|status|logs``: the flags of the slurm stage.

``submit`` renders the sbatch script for ``merino-pl fit``, writes it beside the run's outputs
and submits it (``slurm/jobs.py``); ``chain`` adds export, quantize, eval and latency as
dependent jobs (``slurm/chain.py``); ``prepare`` tokenizes a source as an array job plus a
merge (``slurm/prepare.py``); ``status`` and ``logs`` read the jobs they recorded.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from merino_pl.slurm.chain import ChainSettings, chain
from merino_pl.slurm.jobs import SubmitSettings, logs, status, submit
from merino_pl.slurm.prepare import PrepareJobSettings, prepare_array


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{submit,chain,prepare,status,logs}")
    s = sub.add_parser(
        "submit",
        help="render the sbatch script for `merino-pl fit` and submit it",
        description="Render the sbatch script, write it beside the run's outputs, submit it. "
        "Arguments after `--` go to `merino-pl fit` unchanged.",
    )
    _fit_job_arguments(s)
    c = sub.add_parser(
        "chain",
        help="submit fit, then export -> quantize INT8/INT4 -> eval -> latency as dependent jobs",
        description="Submit the fit job (as `slurm submit`) and, each starting only when the jobs it reads "
        "from completed (afterok), export, quantize INT8 / INT4, eval and latency of the three models. "
        "Arguments after `--` go to `merino-pl fit` unchanged.",
    )
    c.add_argument(
        "--stages",
        default=None,
        metavar="YAML",
        help="per-stage resources and arguments: sections export/quantize/eval/latency with gpus, cpus, "
        "mem, time, partition, args (quantize: bits); e.g. slurm/chain-pile.yaml (default: built-in)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an earlier chain's model/ and quantized/")
    _fit_job_arguments(c)
    _prepare_arguments(
        sub.add_parser(
            "prepare",
            help="tokenize SOURCE as an array job of N tasks, then merge the parts (a dependent job)",
            description="Submit `merino-pl prepare SOURCE --out DIR --num-tasks N --task-index I` as an array job "
            "(I = 0..N-1) and `merino-pl prepare --merge DIR` after every task succeeded. --tokenizer ... "
            "--docs-per-batch go to `merino-pl prepare` as given (its defaults otherwise).",
        )
    )
    for name, help_ in (("status", "state of the jobs submitted for a run"), ("logs", "tail of a job's log")):
        q = sub.add_parser(name, help=help_, description=help_)
        q.add_argument("run_dir", help="the run directory given to (or chosen by) `slurm submit|chain|prepare`")
        q.add_argument("--job", default=None, help="job id or stage name (default: every job / the newest submission)")
        if name == "logs":
            q.add_argument("-n", "--lines", type=int, default=40, help="lines to print (default 40)")


def _fit_job_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--config", required=True, help="training config YAML (LightningCLI), e.g. recipes/fit/pile-8xh100.yaml"
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


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="what `merino-pl prepare` reads: hub dataset, local files, glob or directory")
    p.add_argument("--out", required=True, help="the shard set's directory (scripts and logs in OUT/slurm/)")
    p.add_argument("--tasks", type=int, required=True, help="array tasks = parts the source's files are split into")
    p.add_argument("--workers", type=int, default=8, help="tokenizer processes (= CPUs) per task (default 8)")
    p.add_argument("--time", default="12:00:00", help="time limit per task, SLURM syntax (default 12:00:00)")
    p.add_argument("--mem", default=None, help="memory per task, SLURM syntax, e.g. 32G (default: the cluster's)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--python", default=None, help="run `PYTHON -m merino_pl.cli prepare` instead of `merino-pl`")
    p.add_argument("--setup", action="append", default=[], metavar="LINE", help="shell line run first (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print both scripts; write and submit nothing")
    for flag, kind in PREPARE_FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help="passed to `merino-pl prepare` (see its --help)")


# `merino-pl prepare` options passed through to every task when given (the tasks must all agree
# on them, and argparse cannot take `-- ARGS` after a positional SOURCE).
PREPARE_FLAGS = {
    "--tokenizer": str,
    "--text-field": str,
    "--sample-by": str,
    "--shard-tokens": int,
    "--val-fraction": float,
    "--docs-per-batch": int,
}


def settings(args: argparse.Namespace) -> SubmitSettings | ChainSettings | PrepareJobSettings:
    """The parsed ``submit`` / ``chain`` / ``prepare`` flags as the stage's typed settings."""
    if args.action == "prepare":
        dest = {flag: flag[2:].replace("-", "_") for flag in PREPARE_FLAGS}
        given = [x for flag, d in dest.items() if getattr(args, d) is not None for x in (flag, str(getattr(args, d)))]
        kept = {f.name: getattr(args, f.name) for f in fields(PrepareJobSettings) if f.name != "prepare_args"}
        return PrepareJobSettings(**kept, prepare_args=given)
    kind = ChainSettings if args.action == "chain" else SubmitSettings
    return kind(**{f.name: getattr(args, f.name) for f in fields(kind)})


def run(args: argparse.Namespace) -> int:
    if args.action == "submit":
        submit(settings(args))
    elif args.action == "chain":
        chain(settings(args))
    elif args.action == "prepare":
        prepare_array(settings(args))
    elif args.action == "status":
        status(args.run_dir, args.job)
    else:
        logs(args.run_dir, args.job, args.lines)
    return 0
