"""Render the sbatch script that pretrains a recipe with ``merino-pl fit`` under SLURM.

One script serves one node or many: SLURM starts one task per device (``--ntasks-per-node``
= GPUs per node) and Lightning's ``SLURMEnvironment`` reads ranks and the master address from
the ``SLURM_*`` variables, so no launcher (torchrun) sits between ``srun`` and ``fit``.

Pre-emption and time limits: ``--signal=SIGUSR1@S`` sends SIGUSR1 to every task S seconds
before the limit (no ``B:`` prefix: the Python processes need it, not the batch shell).
``fit``'s ``SlurmRequeue`` callback (Lightning's auto-requeue, made safe under DDP) then saves
``<run_dir>/hpc_ckpt_N.ckpt`` at the next step boundary and runs ``scontrol requeue``; the
requeued job starts this script again, which resumes from the newest
of that checkpoint and the periodic ``checkpoints/last.ckpt``. ``--ckpt_path last`` alone would
ignore the ``hpc_ckpt`` file and lose the steps since the last periodic save.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

# The arguments the script itself sets on `merino-pl fit`; giving them again would contradict
# the allocation (a devices / tasks mismatch) or the resume logic.
RESERVED_FIT_ARGS = (
    "--config",
    "--model.recipe",
    "--ckpt_path",
    "--trainer.default_root_dir",
    "--trainer.accelerator",
    "--trainer.devices",
    "--trainer.num_nodes",
)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Everything the script depends on; ``render(spec)`` is a pure function of it."""

    config: str
    recipe: str
    run_dir: str
    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU job (tests, debugging): tasks_per_node processes, gloo
    tasks_per_node: int | None = None  # default: one per GPU (1 on a CPU job)
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "merino-fit"
    signal_seconds: int = 90
    python: str | None = None  # None: `merino-pl` from PATH; else `<python> -m merino_pl.cli`
    setup: tuple[str, ...] = ()  # shell lines before srun (module load, venv activation)
    fit_args: tuple[str, ...] = ()  # extra `merino-pl fit` arguments, passed through

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def log_dir(self) -> str:
        return f"{self.run_dir.rstrip('/')}/slurm"

    def command_line(self) -> str:
        """The ``merino-pl slurm submit`` command that renders this script."""
        args = [
            "merino-pl",
            "slurm",
            "submit",
            "--config",
            self.config,
            "--recipe",
            self.recipe,
            "--nodes",
            str(self.nodes),
            "--gpus-per-node",
            str(self.gpus_per_node),
        ]
        defaults = JobSpec(self.config, self.recipe, self.run_dir)
        for field in (
            "tasks_per_node",
            "cpus_per_task",
            "time",
            "partition",
            "account",
            "job_name",
            "signal_seconds",
            "python",
        ):
            value = getattr(self, field)
            if value != getattr(defaults, field):  # only what differs from the defaults
                args += [f"--{field.replace('_', '-')}", str(value)]
        args += ["--run-dir", self.run_dir]
        for line in self.setup:
            args += ["--setup", line]
        if self.fit_args:
            args += ["--", *self.fit_args]
        return shlex.join(args)


def _sbatch_lines(spec: JobSpec) -> list[str]:
    lines = [
        f"--job-name={spec.job_name}",  # never `bash`/`interactive`: Lightning would not detect SLURM
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.ntasks_per_node}",
    ]
    if spec.gpus_per_node:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    lines += [f"--cpus-per-task={spec.cpus_per_task}", f"--time={spec.time}"]
    if spec.partition:
        lines.append(f"--partition={spec.partition}")
    if spec.account:
        lines.append(f"--account={spec.account}")
    lines += [
        f"--signal=SIGUSR1@{spec.signal_seconds}",
        "--requeue",
        "--open-mode=append",  # a requeued run appends to the same log instead of truncating it
        f"--output={_sbatch_quote(spec.log_dir + '/%j.out')}",
    ]
    return [f"#SBATCH {line}" for line in lines]


def _sbatch_quote(value: str) -> str:
    """A value for an ``#SBATCH`` line: sbatch splits those lines at blanks and starts a comment
    at ``#`` unless quoted, and strips shell-style quotes, so ``shlex.quote`` is what it reads."""
    return shlex.quote(value)


def _fit_command(spec: JobSpec) -> list[str]:
    q = shlex.quote
    launcher = "merino-pl" if spec.python is None else f"{q(spec.python)} -m merino_pl.cli"
    accelerator = "gpu" if spec.gpus_per_node else "cpu"
    parts = [
        f"srun --kill-on-bad-exit=1 {launcher} fit",
        f"--config {q(spec.config)}",
        f"--model.recipe {q(spec.recipe)}",
        '--trainer.default_root_dir "$RUN_DIR"',
        f"--trainer.accelerator {accelerator} --trainer.devices {spec.ntasks_per_node}"
        f" --trainer.num_nodes {spec.nodes}",
        '--ckpt_path "${CKPT:-last}"',
    ]
    if spec.fit_args:
        parts.append(shlex.join(spec.fit_args))
    return [parts[0] + " \\"] + [f"    {p} \\" for p in parts[1:-1]] + [f"    {parts[-1]}"]


def render(spec: JobSpec) -> str:
    """The complete sbatch script for ``spec`` (deterministic: same spec, same text)."""
    where = f"{spec.nodes} node{'s' if spec.nodes > 1 else ''} x " + (
        f"{spec.gpus_per_node} GPUs" if spec.gpus_per_node else f"{spec.ntasks_per_node} CPU tasks"
    )
    head = [
        "#!/bin/bash",
        f"# merino-pl: pretrain {Path(spec.recipe).stem} with {spec.config} on {where}.",
        f"# Rendered by: {spec.command_line()}",
        "# Paths are relative to the directory sbatch runs in. By hand, from there:",
        f"#   mkdir -p {shlex.quote(spec.log_dir)} && sbatch THIS_FILE",
        *_sbatch_lines(spec),
        "",
        "set -eo pipefail  # no -u: `module load` / activate scripts often read unset variables",
        f"RUN_DIR={shlex.quote(spec.run_dir)}",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "# SLURM 22.05-23.02 srun does not inherit --cpus-per-task from sbatch; this restores it.",
        'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"',
        *spec.setup,
        "",
        "# Resume from the newest checkpoint: the one Lightning saved on SIGUSR1 before requeueing",
        "# (hpc_ckpt_N.ckpt) or the periodic last.ckpt. With neither, `last` starts from scratch.",
        'CKPT=$(ls -t "$RUN_DIR"/hpc_ckpt_*.ckpt "$RUN_DIR"/checkpoints/last*.ckpt 2>/dev/null | head -n 1 || true)',
        'echo "merino-pl: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST,'
        ' resuming from ${CKPT:-scratch}"',
        "",
    ]
    return "\n".join(head + _fit_command(spec)) + "\n"


# -- one-task jobs: the chain's stages after fit, the prepare array and its merge ----------------
# Arguments rendered as a double-quoted shell variable instead of a quoted literal.
SHELL_VARIABLES = ("$SLURM_ARRAY_TASK_ID",)


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """A one-task job running ``merino-pl`` commands in order (``set -e``: the first failure ends
    it, so no dependent job starts); ``render_batch(job)`` is a pure function of it."""

    name: str  # SLURM job name, e.g. merino-quantize-int8
    log_dir: str  # the script's --output folder
    commands: tuple[tuple[str, ...], ...]  # each a `merino-pl` argv (without `merino-pl`)
    title: str  # the script's first comment line: what the job does
    rendered_by: str  # the command that renders it
    gpus: int = 0
    cpus: int = 1
    mem: str | None = None  # SLURM --mem (e.g. 64G); None: the cluster's default
    time: str = "1:00:00"
    partition: str | None = None
    account: str | None = None
    array: int | None = None  # N: an array job of tasks 0..N-1 (one log per task)
    python: str | None = None  # as JobSpec.python
    setup: tuple[str, ...] = ()
    after: str = ""  # by hand: the jobs it waits for, e.g. "PREPARE_JOB" (sbatch --dependency=afterok:...)

    @property
    def log_pattern(self) -> str:
        return f"{self.log_dir.rstrip('/')}/" + ("%A_%a.out" if self.array else "%j.out")


def _argv_text(argv: tuple[str, ...]) -> str:
    return " ".join(f'"{a}"' if a in SHELL_VARIABLES else shlex.quote(a) for a in argv)


def render_batch(job: BatchJob) -> str:
    """The complete sbatch script of ``job`` (deterministic: same job, same text)."""
    launcher = "merino-pl" if job.python is None else f"{shlex.quote(job.python)} -m merino_pl.cli"
    lines = [f"--job-name={_sbatch_quote(job.name)}", "--nodes=1", "--ntasks=1"]
    if job.array:
        lines.append(f"--array=0-{job.array - 1}")
    if job.gpus:
        lines.append(f"--gpus={job.gpus}")
    lines += [f"--cpus-per-task={job.cpus}", f"--time={job.time}"]
    lines += [f"--{k}={_sbatch_quote(v)}" for k, v in (("mem", job.mem), ("partition", job.partition)) if v]
    if job.account:
        lines.append(f"--account={_sbatch_quote(job.account)}")
    lines.append(f"--output={_sbatch_quote(job.log_pattern)}")
    head = [
        "#!/bin/bash",
        f"# merino-pl: {job.title}",
        f"# Rendered by: {job.rendered_by}",
        "# Paths are relative to the directory sbatch runs in. By hand, from there:",
        f"#   mkdir -p {shlex.quote(job.log_dir)} && sbatch "
        + (f"--dependency=afterok:{job.after} " if job.after else "")
        + "THIS_FILE",
        *(f"#SBATCH {line}" for line in lines),
        "",
        "set -eo pipefail  # the first failing command fails the job: jobs that depend on it never start",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        *job.setup,
        "",
    ]
    return "\n".join(head + [f"{launcher} {_argv_text(argv)}" for argv in job.commands]) + "\n"
