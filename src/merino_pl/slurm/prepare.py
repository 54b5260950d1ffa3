"""``merino-pl slurm prepare SOURCE --out DIR --tasks N``: tokenize on many nodes.

An array job of N tasks, task I running ``merino-pl prepare SOURCE --out DIR --num-tasks N
--task-index $SLURM_ARRAY_TASK_ID`` (the I-th contiguous block of the source's files into
``DIR/part-0000I/``), and a merge job, ``merino-pl prepare --merge DIR``, that starts only when
every task succeeded (``afterok`` on the array). The merged set is the token stream a one-task
run writes; ``fit`` reads it as any other. Scripts, logs (``<array>_<task>.out``) and the job
record live in ``DIR/slurm/``, so ``merino-pl slurm status|logs DIR`` follow the run.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from merino_pl.core.errors import MerinoError
from merino_pl.slurm.jobs import now, record_job, sbatch, time_limit_seconds, write_new_script
from merino_pl.slurm.render import BatchJob, render_batch

# `slurm prepare` sets these on every task; the merge step is its own job.
RESERVED_PREPARE_ARGS = ("--out", "--num-tasks", "--task-index", "--workers", "--merge", "--verify")


@dataclass
class PrepareJobSettings:
    """One ``slurm prepare``, as its flags give it (same names and defaults)."""

    source: str  # what `merino-pl prepare` reads: hub name, files, glob, directory
    out: str  # the shard set's directory (parts in OUT/part-*, merged manifest in OUT)
    tasks: int  # array tasks = parts of the source
    workers: int = 8  # tokenizer processes per task (= its CPUs)
    time: str = "12:00:00"  # per task
    mem: str | None = None  # per task; None: the cluster's default
    partition: str | None = None
    account: str | None = None
    python: str | None = None  # run `PYTHON -m merino_pl.cli prepare` instead of `merino-pl prepare`
    setup: list[str] = field(default_factory=list)  # shell lines run first
    dry_run: bool = False
    prepare_args: list[str] = field(default_factory=list)  # `merino-pl prepare` options for every task


def _problems(settings: PrepareJobSettings) -> list[str]:
    problems = [
        f"{flag} {value}: must be >= 1"
        for flag, value in (("--tasks", settings.tasks), ("--workers", settings.workers))
        if value < 1
    ]
    if time_limit_seconds(settings.time) is None:
        problems.append(f"--time {settings.time!r}: expected MM, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    if not settings.source.strip():
        problems.append("SOURCE is empty")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {settings.out}: exists and is not a directory")
    elif (out / "manifest.json").is_file() and not any(out.glob("part-*")):
        problems.append(f"--out {settings.out}: holds a one-task shard set already; choose a directory of its own")
    for arg in settings.prepare_args:
        if arg.split("=", 1)[0] in RESERVED_PREPARE_ARGS:
            problems.append(f"{arg.split('=', 1)[0]} after `--`: `slurm prepare` sets it (use --out/--tasks/--workers)")
    if not settings.dry_run and shutil.which("sbatch") is None:
        problems.append("sbatch not found on PATH (not a SLURM login node?): use --dry-run to print the scripts")
    return problems


def command_line(settings: PrepareJobSettings) -> str:
    """The ``merino-pl slurm prepare`` command of ``settings`` (the scripts' headers name it)."""
    args = ["merino-pl", "slurm", "prepare", settings.source, "--out", settings.out, "--tasks", str(settings.tasks)]
    args += ["--workers", str(settings.workers), "--time", settings.time]
    for flag in ("mem", "partition", "account", "python"):
        if getattr(settings, flag) is not None:
            args += [f"--{flag}", str(getattr(settings, flag))]
    for line in settings.setup:
        args += ["--setup", line]
    return shlex.join(args + settings.prepare_args)


def prepare_jobs(settings: PrepareJobSettings) -> tuple[BatchJob, BatchJob]:
    """The array job and the merge job of ``settings`` (checked: one ``MerinoError``)."""
    problems = _problems(settings)
    if problems:
        raise MerinoError("; ".join(problems))
    n, out = settings.tasks, settings.out
    common = dict(
        log_dir=f"{out.rstrip('/')}/slurm",
        rendered_by=command_line(settings),
        time=settings.time,
        partition=settings.partition,
        account=settings.account,
        python=settings.python,
        setup=tuple(settings.setup),
    )
    task = ("prepare", settings.source, "--out", out, "--num-tasks", str(n), "--task-index", "$SLURM_ARRAY_TASK_ID")
    array = BatchJob(
        name="merino-prepare",
        commands=((*task, "--workers", str(settings.workers), *settings.prepare_args),),
        title=f"tokenize {settings.source} into {out}, part $SLURM_ARRAY_TASK_ID of {n}",
        cpus=settings.workers,
        mem=settings.mem,
        array=n,
        **common,
    )
    merge = BatchJob(
        name="merino-prepare-merge",
        commands=(("prepare", "--merge", out),),
        title=f"merge the {n} parts of {out} into one shard set (after every array task succeeded)",
        after="PREPARE_JOB_ID",
        **{**common, "time": "1:00:00"},
    )
    return array, merge


def prepare_array(settings: PrepareJobSettings) -> tuple[str, str] | None:
    """The entry function: submit the array job and its merge; (array id, merge id).
    ``dry_run`` prints both scripts and submits nothing."""
    array, merge = prepare_jobs(settings)
    if settings.dry_run:
        sys.stdout.write(f"# ---- prepare (array of {settings.tasks})\n{render_batch(array)}")
        sys.stdout.write(f"# ---- merge (afterok: prepare)\n{render_batch(merge)}")
        return None
    log_dir = Path(array.log_dir)
    array_script = write_new_script(log_dir, render_batch(array))
    array_id = sbatch(array_script)
    try:
        options = [f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes"]
        merge_script = write_new_script(log_dir, render_batch(merge))
        merge_id = sbatch(merge_script, options)
    except BaseException:
        subprocess.run(["scancel", array_id], capture_output=True)
        raise
    run_dir, common = log_dir.parent, {"chain": array_id, "submitted": now()}
    entry = {"job_id": array_id, "stage": "prepare", "array": settings.tasks, "script": str(array_script)}
    record_job(run_dir, {**entry, **common, "depends_on": []})
    entry = {"job_id": merge_id, "stage": "merge", "script": str(merge_script)}
    record_job(run_dir, {**entry, **common, "depends_on": [array_id]})
    print(f"submitted prepare job {array_id} (array of {settings.tasks}); merge job {merge_id} after it")
    print(f"logs in {log_dir}/; follow with: merino-pl slurm status {shlex.quote(str(run_dir))}")
    return array_id, merge_id
