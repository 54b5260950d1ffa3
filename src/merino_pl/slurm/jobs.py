"""The slurm stage: ``submit(SubmitSettings(config, recipe))`` pretrains on a SLURM cluster
(8 x H100 per node); ``status`` and ``logs`` read back the jobs it recorded. ``merino-pl slurm
submit|status|logs`` (``slurm/cli.py``) parses the flags and calls these.

``submit`` checks every argument, renders the sbatch script (see ``render.py``), writes it into
``<run_dir>/slurm/job-NNN.sbatch`` (a new number each time: an earlier script is never
replaced) and hands it to ``sbatch``; ``dry_run`` only prints it. ``status`` and ``logs``
read the job ids ``submit`` recorded in ``<run_dir>/slurm/jobs.json``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.config import load_recipe
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_json, read_yaml, write_json
from merino_pl.slurm.render import RESERVED_FIT_ARGS, JobSpec, render

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")  # SLURM's --time forms


@dataclass
class SubmitSettings:
    """One ``submit``, as ``merino-pl slurm submit``'s flags give it (same names and defaults)."""

    config: str  # training config YAML (LightningCLI)
    recipe: str  # recipe YAML path or built-in name
    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU job
    tasks_per_node: int | None = None  # CPU jobs only (default 1)
    cpus_per_task: int | None = None  # default 8 on GPU jobs, 1 on CPU jobs
    time: str = "24:00:00"  # SLURM syntax
    partition: str | None = None
    account: str | None = None
    job_name: str = "merino-fit"
    signal_seconds: int = 90  # SIGUSR1 this long before the limit: checkpoint + requeue
    run_dir: str | None = None  # default: trainer.default_root_dir of config, else runs/<recipe name>
    python: str | None = None  # run `PYTHON -m merino_pl.cli fit` instead of `merino-pl fit`
    setup: list[str] = field(default_factory=list)  # shell lines run before srun
    dry_run: bool = False
    fit_args: list[str] = field(default_factory=list)  # extra `merino-pl fit` arguments


# -- submit -------------------------------------------------------------------------------
def time_limit_seconds(value: str) -> int | None:
    """Seconds in a SLURM ``--time`` value, or None when it is not one of SLURM's forms."""
    m = _TIME.match(value.strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = a, b or 0, c or 0
        return ((days * 24 + h) * 60 + mi) * 60 + s
    if b is None:  # MM
        return a * 60
    if c is None:  # MM:SS
        return a * 60 + b
    return (a * 60 + b) * 60 + c  # HH:MM:SS


def default_run_dir(config: dict[str, Any], recipe: str) -> str:
    """``trainer.default_root_dir`` of the training config, else ``runs/<recipe name>``."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    return str(trainer.get("default_root_dir") or f"runs/{Path(recipe).stem}")


def _check_files(args: SubmitSettings, problems: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if not Path(args.config).is_file():
        problems.append(f"--config {args.config}: no such file")
    else:
        try:
            loaded = read_yaml(args.config, "training config")
            config = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, (dict, type(None))):
                problems.append(f"--config {args.config}: expected a YAML mapping (trainer:, model:, data:)")
        except MerinoError as e:  # unreadable or malformed: one line, never a traceback
            problems.append(f"--config: {e}")
    try:
        load_recipe(args.recipe)
    except MerinoError as e:
        problems.append(f"--recipe: {e}")
    return config


def _check_numbers(args: SubmitSettings, problems: list[str]) -> None:
    for flag, value, low in (
        ("--nodes", args.nodes, 1),
        ("--gpus-per-node", args.gpus_per_node, 0),
        ("--tasks-per-node", args.tasks_per_node, 1),
        ("--cpus-per-task", args.cpus_per_task, 1),
        ("--signal-seconds", args.signal_seconds, 1),
    ):
        if value is not None and value < low:
            problems.append(f"{flag} {value}: must be >= {low}")
    if args.tasks_per_node is not None and args.gpus_per_node > 0 and args.tasks_per_node != args.gpus_per_node:
        problems.append("--tasks-per-node is for CPU jobs (--gpus-per-node 0); GPU jobs run one task per GPU")
    limit = time_limit_seconds(args.time)
    if limit is None:
        problems.append(f"--time {args.time!r}: expected MM, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    elif limit <= args.signal_seconds:
        problems.append(f"--time {args.time}: must be longer than --signal-seconds {args.signal_seconds}")
    if args.job_name in ("bash", "interactive"):
        problems.append(f"--job-name {args.job_name}: Lightning ignores SLURM for jobs named bash/interactive")


def _check_fit_args(fit_args: list[str], problems: list[str]) -> None:
    for arg in fit_args:
        name = arg.split("=", 1)[0]
        if name in RESERVED_FIT_ARGS:
            problems.append(
                f"{name} after `--`: the script sets it (use --config/--recipe/--run-dir/"
                "--nodes/--gpus-per-node instead)"
            )


def build_spec(args: SubmitSettings) -> JobSpec:
    """Check every submit argument (all problems in one MerinoError) and return the job."""
    problems: list[str] = []
    config = _check_files(args, problems)
    _check_numbers(args, problems)
    _check_fit_args(args.fit_args, problems)
    run_dir = args.run_dir or default_run_dir(config, args.recipe)
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        problems.append(f"--run-dir {run_dir}: exists and is not a directory")
    if not args.dry_run and shutil.which("sbatch") is None:
        problems.append("sbatch not found on PATH (not a SLURM login node?): use --dry-run to print the script")
    if problems:
        raise MerinoError("; ".join(problems))
    cpus = args.cpus_per_task or (8 if args.gpus_per_node else 1)
    return JobSpec(
        config=args.config,
        recipe=args.recipe,
        run_dir=run_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=cpus,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        python=args.python,
        setup=tuple(args.setup),
        fit_args=tuple(args.fit_args),
    )


def write_new_script(directory: Path, text: str) -> Path:
    """Write ``text`` to the first free ``job-NNN.sbatch`` in ``directory``, atomically.

    The complete file is linked into place (``os.link`` fails if the name exists), so a
    concurrent submit or an earlier script is never overwritten and no reader sees half a file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in directory.glob("job-*.sbatch") if (m := re.match(r"job-(\d+)\.sbatch$", p.name))]
    number = max(taken, default=0) + 1
    fd, tmp = tempfile.mkstemp(prefix=".job.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        while True:
            target = directory / f"job-{number:03d}.sbatch"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)


def submit(args: SubmitSettings) -> str | None:
    """The stage's entry function: check every argument (all problems in one ``MerinoError``),
    render the script, write it as the run's next ``job-NNN.sbatch`` and hand it to ``sbatch``.
    Returns the job id; ``dry_run`` prints the script instead, writes nothing and returns None."""
    spec = build_spec(args)
    script = render(spec)
    if args.dry_run:
        sys.stdout.write(script)
        return None
    path = write_new_script(Path(spec.log_dir), script)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        path.unlink()  # never submitted: keep job-NNN numbers for scripts that ran
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise MerinoError(f"sbatch rejected the script: {last}")
    job_id = proc.stdout.strip().split(";")[0]
    _record_job(Path(spec.log_dir), job_id, path, spec)
    print(f"wrote {path}")
    print(
        f"submitted job {job_id}; log {spec.log_dir}/{job_id}.out; follow with: merino-pl slurm status {spec.run_dir}"
    )
    return job_id


def _record_job(log_dir: Path, job_id: str, script: Path, spec: JobSpec) -> None:
    jobs = read_jobs(log_dir.parent)
    jobs.append(
        {
            "job_id": job_id,
            "script": str(script),
            "submitted": dt.datetime.now().isoformat(timespec="seconds"),
            "nodes": spec.nodes,
            "tasks_per_node": spec.ntasks_per_node,
            "command": spec.command_line(),
        }
    )
    write_json(log_dir / "jobs.json", jobs)


def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    """The jobs ``submit`` recorded for ``run_dir`` (oldest first; [] when none)."""
    path = Path(run_dir) / "slurm" / "jobs.json"
    return read_json(path, "job list") if path.exists() else []


# -- status / logs ------------------------------------------------------------------------
def job_fields(job_id: str) -> dict[str, str] | None:
    """``scontrol show job`` as a dict (JobState, RunTime, Restarts ...); None if unknown."""
    if shutil.which("scontrol") is None:
        raise MerinoError("scontrol not found on PATH: run `slurm status` on a SLURM login node")
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def _selected_jobs(run_dir: str, job_id: str | None) -> list[dict[str, Any]]:
    jobs = read_jobs(run_dir)
    if not jobs:
        raise MerinoError(
            f"{run_dir}: no jobs recorded (no {run_dir}/slurm/jobs.json); "
            "was it submitted with `merino-pl slurm submit`?"
        )
    if job_id is not None:
        jobs = [j for j in jobs if j["job_id"] == job_id]
        if not jobs:
            known = ", ".join(j["job_id"] for j in read_jobs(run_dir))
            raise MerinoError(f"--job {job_id}: not a job of {run_dir} (jobs: {known})")
    return jobs


def status(run_dir: str, job: str | None = None) -> None:
    """Print the state of the jobs ``submit`` recorded for ``run_dir`` (or of one ``job``)."""
    rows = [("job", "state", "run time", "limit", "restarts", "nodes", "submitted")]
    for entry in _selected_jobs(run_dir, job):
        f = job_fields(entry["job_id"]) or {}
        rows.append(
            (
                entry["job_id"],
                f.get("JobState", "unknown (finished and purged?)"),
                f.get("RunTime", "-"),
                f.get("TimeLimit", "-"),
                f.get("Restarts", "-"),
                f.get("NodeList", "-"),
                entry["submitted"],
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def logs(run_dir: str, job: str | None = None, lines: int = 40) -> None:
    """Print the last ``lines`` lines of a job's log (default: the newest job of ``run_dir``)."""
    if lines < 1:
        raise MerinoError(f"--lines {lines}: must be >= 1")
    found = _selected_jobs(run_dir, job)[-1]
    path = Path(run_dir) / "slurm" / f"{found['job_id']}.out"
    if not path.exists():
        raise MerinoError(f"{path}: no log yet (job {found['job_id']} has not started; see `merino-pl slurm status`)")
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    print("\n".join(text[-lines:]))
