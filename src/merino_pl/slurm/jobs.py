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
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
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


def default_run_dir(config: dict[str, Any], recipe: str, config_path: str = "config") -> str:
    """Where a run of ``recipe`` with this training config writes: the config's
    ``trainer.default_root_dir`` when ``recipe`` is the config's own ``model.recipe`` (or the
    config names none), else ``runs/<config name>-<recipe name>``, so that another recipe never
    resumes (or overwrites) the config's run; without a ``default_root_dir``, ``runs/<recipe name>``
    as ``fit`` itself does (the name: a recipe file's stem, or the built-in name)."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    root = trainer.get("default_root_dir")
    if not root:
        return f"runs/{_recipe_name(recipe)}"
    if model.get("recipe") is None or _same_recipe(str(model["recipe"]), recipe):
        return str(root)
    return f"runs/{Path(config_path).stem}-{_recipe_name(recipe)}"


def _recipe_name(recipe: str) -> str:
    """The file name of a recipe path, or the built-in name: what ``fit`` names its run directory after."""
    return Path(recipe).stem


def _same_recipe(a: str, b: str) -> bool:
    try:
        ra, rb = load_recipe(a), load_recipe(b)
    except MerinoError:
        return False
    return (ra.name, ra.architecture) == (rb.name, rb.architecture)


def _check_files(settings: SubmitSettings, problems: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for flag, value in (("--config", settings.config), ("--recipe", settings.recipe), ("--run-dir", settings.run_dir)):
        if value is not None and not value.strip():
            problems.append(f"{flag} {value!r}: empty")
    if not Path(settings.config).is_file():
        problems.append(f"--config {settings.config}: no such file")
    else:
        try:
            loaded = read_yaml(settings.config, "training config")
            config = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, (dict, type(None))):
                problems.append(f"--config {settings.config}: expected a YAML mapping (trainer:, model:, data:)")
        except MerinoError as e:  # unreadable or malformed: one line, never a traceback
            problems.append(f"--config: {e}")
    try:
        load_recipe(settings.recipe)
    except MerinoError as e:
        problems.append(f"--recipe: {e}")
    return config


def _check_numbers(settings: SubmitSettings, problems: list[str]) -> None:
    for flag, value, low in (
        ("--nodes", settings.nodes, 1),
        ("--gpus-per-node", settings.gpus_per_node, 0),
        ("--tasks-per-node", settings.tasks_per_node, 1),
        ("--cpus-per-task", settings.cpus_per_task, 1),
        ("--signal-seconds", settings.signal_seconds, 1),
    ):
        if value is not None and value < low:
            problems.append(f"{flag} {value}: must be >= {low}")
    tasks, gpus = settings.tasks_per_node, settings.gpus_per_node
    if tasks is not None and gpus > 0 and tasks != gpus:
        problems.append("--tasks-per-node is for CPU jobs (--gpus-per-node 0); GPU jobs run one task per GPU")
    limit = time_limit_seconds(settings.time)
    if limit is None:
        problems.append(f"--time {settings.time!r}: expected MM, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    elif limit <= settings.signal_seconds:
        problems.append(f"--time {settings.time}: must be longer than --signal-seconds {settings.signal_seconds}")
    if settings.job_name in ("bash", "interactive"):
        problems.append(f"--job-name {settings.job_name}: Lightning ignores SLURM for jobs named bash/interactive")


def _check_fit_args(fit_args: list[str], problems: list[str]) -> None:
    for arg in fit_args:
        name = arg.split("=", 1)[0]
        if name in RESERVED_FIT_ARGS:
            problems.append(
                f"{name} after `--`: the script sets it (use --config/--recipe/--run-dir/"
                "--nodes/--gpus-per-node instead)"
            )


def build_spec(settings: SubmitSettings) -> JobSpec:
    """Check every submit argument (all problems in one MerinoError) and return the job."""
    problems: list[str] = []
    config = _check_files(settings, problems)
    _check_numbers(settings, problems)
    _check_fit_args(settings.fit_args, problems)
    run_dir = settings.run_dir or default_run_dir(config, settings.recipe, settings.config)
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        problems.append(f"--run-dir {run_dir}: exists and is not a directory")
    if not settings.dry_run and shutil.which("sbatch") is None:
        problems.append("sbatch not found on PATH (not a SLURM login node?): use --dry-run to print the script")
    if problems:
        raise MerinoError("; ".join(problems))
    cpus = settings.cpus_per_task or (8 if settings.gpus_per_node else 1)
    return JobSpec(
        config=settings.config,
        recipe=settings.recipe,
        run_dir=run_dir,
        nodes=settings.nodes,
        gpus_per_node=settings.gpus_per_node,
        tasks_per_node=settings.tasks_per_node,
        cpus_per_task=cpus,
        time=settings.time,
        partition=settings.partition,
        account=settings.account,
        job_name=settings.job_name,
        signal_seconds=settings.signal_seconds,
        python=settings.python,
        setup=tuple(settings.setup),
        fit_args=tuple(settings.fit_args),
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


def submit(settings: SubmitSettings) -> str | None:
    """The stage's entry function: check every argument (all problems in one ``MerinoError``),
    render the script, write it as the run's next ``job-NNN.sbatch`` and hand it to ``sbatch``.
    Returns the job id; ``dry_run`` prints the script instead, writes nothing and returns None."""
    spec = build_spec(settings)
    script = render(spec)
    if settings.dry_run:
        sys.stdout.write(script)
        return None
    path = write_new_script(Path(spec.log_dir), script)
    job_id = sbatch(path)
    record_job(Path(spec.run_dir), fit_record(job_id, path, spec))
    print(f"wrote {path}")
    follow = f"merino-pl slurm status {shlex.quote(spec.run_dir)}"
    print(f"submitted job {job_id}; log {spec.log_dir}/{job_id}.out; follow with: {follow}")
    return job_id


def sbatch(script: Path, options: Sequence[str] = ()) -> str:
    """``sbatch --parsable [options] script``; the job id. A rejected script is removed again
    (its ``job-NNN`` number stays free for scripts that ran) and sbatch's message raised."""
    proc = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        script.unlink()
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise MerinoError(f"sbatch rejected {script.name}: {last}")
    return proc.stdout.strip().split(";")[0]


def fit_record(job_id: str, script: Path, spec: JobSpec, **extra: Any) -> dict[str, Any]:
    """The ``jobs.json`` entry of a submitted fit job."""
    return {
        "job_id": job_id,
        "stage": "fit",
        "script": str(script),
        "submitted": now(),
        "nodes": spec.nodes,
        "tasks_per_node": spec.ntasks_per_node,
        "command": spec.command_line(),
        **extra,
    }


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def record_job(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to ``run_dir/slurm/jobs.json`` (what ``status`` and ``logs`` read)."""
    jobs = read_jobs(run_dir)
    jobs.append(entry)
    write_json(run_dir / "slurm" / "jobs.json", jobs)


def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    """The jobs recorded for ``run_dir`` (oldest first; [] when none); a file that is not such a
    list is a one-line ``MerinoError`` naming it."""
    path = Path(run_dir) / "slurm" / "jobs.json"
    if not path.exists():
        return []
    jobs = read_json(path, "job list")
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and isinstance(j.get("job_id"), str) for j in jobs):
        raise MerinoError(f'{path}: not a job list of `merino-pl slurm` (a JSON list of {{"job_id": ...}} entries)')
    return jobs


# -- status / logs ------------------------------------------------------------------------
def job_fields(job_id: str) -> dict[str, str] | None:
    """``scontrol show job`` as a dict (JobState, RunTime, Restarts ...); None if unknown.
    An array job's fields are those of its first task still known."""
    if shutil.which("scontrol") is None:
        raise MerinoError("scontrol not found on PATH: run `slurm status` on a SLURM login node")
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return dict(kv.split("=", 1) for kv in proc.stdout.splitlines()[0].split() if "=" in kv)


def _selected_jobs(run_dir: str, job_id: str | None) -> list[dict[str, Any]]:
    """The jobs of ``run_dir``'s newest submission (a chain is one), or those ``job_id`` names
    (a job id or a stage name such as ``eval``)."""
    jobs = read_jobs(run_dir)
    if not jobs:
        raise MerinoError(
            f"{run_dir}: no jobs recorded (no {run_dir}/slurm/jobs.json); "
            "was it submitted with `merino-pl slurm submit|chain|prepare`?"
        )
    if job_id is None:
        newest = jobs[-1].get("chain", jobs[-1]["job_id"])
        return [j for j in jobs if j.get("chain", j["job_id"]) == newest]
    found = [j for j in jobs if job_id in (j["job_id"], j.get("stage"))]
    if not found:
        known = ", ".join(f"{j['job_id']} ({j.get('stage', 'fit')})" for j in jobs)
        raise MerinoError(f"--job {job_id}: not a job or stage of {run_dir} (jobs: {known})")
    return found


def status(run_dir: str, job: str | None = None) -> None:
    """Print the state of every job ``run_dir`` recorded (or those ``job`` names)."""
    rows = [("job", "stage", "after", "state", "run time", "limit", "restarts", "nodes", "submitted")]
    jobs = read_jobs(run_dir)
    if job is not None or not jobs:
        jobs = _selected_jobs(run_dir, job)
    for entry in jobs:
        f = job_fields(entry["job_id"]) or {}
        rows.append(
            (
                entry["job_id"],
                entry.get("stage", "fit"),
                ",".join(entry.get("depends_on", [])) or "-",
                f.get("JobState", "unknown (finished and purged?)"),
                f.get("RunTime", "-"),
                f.get("TimeLimit", "-"),
                f.get("Restarts", "-"),
                f.get("NodeList", "-"),
                entry["submitted"] if isinstance(entry.get("submitted"), str) else "-",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def job_logs(run_dir: str | Path, entry: dict[str, Any]) -> list[Path]:
    """The log files of a recorded job: ``<id>.out``, or one per task of an array job."""
    folder = Path(run_dir) / "slurm"
    if entry.get("array"):
        tasks = folder.glob(f"{entry['job_id']}_*.out")
        return sorted(tasks, key=lambda p: int(p.stem.rpartition("_")[2]) if p.stem.rpartition("_")[2].isdigit() else 0)
    path = folder / f"{entry['job_id']}.out"
    return [path] if path.exists() else []


def logs(run_dir: str, job: str | None = None, lines: int = 40) -> None:
    """Print the last ``lines`` lines of the logs of ``run_dir``'s newest submission (every job of
    a chain, under a ``==> stage job <==`` line each) or of the job / stage ``job`` names."""
    if lines < 1:
        raise MerinoError(f"--lines {lines}: must be >= 1")
    selected = _selected_jobs(run_dir, job)
    found = [(entry, path) for entry in selected for path in job_logs(run_dir, entry)]
    if not found:
        ids = ", ".join(j["job_id"] for j in selected)
        raise MerinoError(f"{run_dir}/slurm: no log yet (job {ids} has not started; see `merino-pl slurm status`)")
    for entry, path in found:
        if len(selected) > 1 or len(found) > 1:
            print(f"==> {entry.get('stage', 'fit')} job {entry['job_id']}: {path} <==")
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        print("\n".join(text[-lines:]))
