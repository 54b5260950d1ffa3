"""``merino-pl slurm chain``: fit as the GPU job, then export -> quantize INT8 / INT4 -> eval ->
latency as jobs that start only when the jobs they read from completed (``afterok``).

Every job's script is written as the run's next ``job-NNN.sbatch`` and every job recorded in
``<run_dir>/slurm/jobs.json`` with its stage and the jobs it waits for, so ``slurm status`` and
``slurm logs`` show the whole chain. The fit job is the one ``slurm submit`` renders (requeue,
resume); the others are one-task jobs (``render.BatchJob``) with the resources of their section
in the ``--stages`` YAML (defaults in ``STAGE_DEFAULTS``). Outputs, under the run directory:
``model/`` (export), ``quantized/int<b>/``, ``eval/<label>/``, ``latency/<label>/`` with labels
``fp32``, ``int8``, ``int4`` (the layout ``merino-pl pipeline`` writes).

Submission is all or nothing: fit is submitted held (``--hold``) and released once every
dependent job is queued; if sbatch rejects any script, the jobs already queued are cancelled.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_yaml
from merino_pl.slurm.jobs import (
    SubmitSettings,
    build_spec,
    fit_record,
    now,
    record_job,
    sbatch,
    time_limit_seconds,
    write_new_script,
)
from merino_pl.slurm.render import BatchJob, JobSpec, render, render_batch

# Per-stage defaults. GPUs: one for quantize and eval when fit runs on GPUs (none on a CPU
# chain); export and latency on CPU (latency measures `--device cpu` unless its args say cuda).
# mem None: the cluster's default (set it in the YAML: clusters differ too much to guess).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "export": {"gpus": 0, "cpus": 4, "mem": None, "time": "1:00:00", "partition": None, "args": []},
    "quantize": {"gpus": 1, "cpus": 8, "mem": None, "time": "4:00:00", "partition": None, "args": [], "bits": [8, 4]},
    "eval": {"gpus": 1, "cpus": 8, "mem": None, "time": "4:00:00", "partition": None, "args": []},
    "latency": {"gpus": 0, "cpus": 8, "mem": None, "time": "2:00:00", "partition": None, "args": []},
}


@dataclass
class ChainSettings(SubmitSettings):
    """``slurm submit``'s settings (the fit job) plus the chain's own."""

    stages: str | None = None  # YAML: export/quantize/eval/latency sections (resources, args, bits)
    overwrite: bool = False  # replace an earlier chain's model/ and quantized/ folders


@dataclass(frozen=True)
class ChainJob:
    stage: str  # fit, export, quantize-int8, ..., eval, latency
    after: tuple[str, ...]  # stages whose success it waits for
    text: str  # the sbatch script


def load_stages(path: str | None, gpu_chain: bool) -> dict[str, dict[str, Any]]:
    """The four stage sections: ``STAGE_DEFAULTS`` updated by ``path``'s sections (checked:
    every problem in one ``MerinoError``); on a CPU chain nothing asks for GPUs by default."""
    stages = {name: {**d, "gpus": d["gpus"] if gpu_chain else 0} for name, d in STAGE_DEFAULTS.items()}
    data = read_yaml(path, "stages config") if path else {}
    if not isinstance(data, dict):
        raise MerinoError(f"--stages {path}: expected a mapping of stages ({', '.join(STAGE_DEFAULTS)})")
    problems = [f"unknown stage {k!r} (stages: {', '.join(STAGE_DEFAULTS)})" for k in data if k not in stages]
    for name, section in data.items():
        if name in stages:
            problems += _section_problems(name, section, stages[name])
    if problems:
        raise MerinoError(f"--stages {path}: " + "; ".join(problems))
    return stages


def _section_problems(name: str, section: Any, into: dict[str, Any]) -> list[str]:
    if not isinstance(section, dict):
        return [f"{name}: expected a mapping ({', '.join(into)}), got {section!r}"]
    problems = [f"{name}.{k}: unknown key (keys: {', '.join(into)})" for k in section if k not in into]
    for key, value in section.items():
        if key not in into:
            continue
        if key in ("gpus", "cpus") and not (type(value) is int and value >= (key == "cpus")):
            problems.append(f"{name}.{key} {value!r}: expected an integer >= {int(key == 'cpus')}")
        elif key == "time" and time_limit_seconds(str(value)) is None:
            problems.append(f"{name}.time {value!r}: expected MM, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
        elif key == "args" and not isinstance(value, list):
            problems.append(f"{name}.args {value!r}: expected a list of command-line arguments")
        elif key == "bits" and not (isinstance(value, list) and value and all(v in (4, 8) for v in value)):
            problems.append(f"{name}.bits {value!r}: expected a list of 8 and / or 4")
        into[key] = value
    return problems


# Stages whose command takes `--wandb PROJECT` (core.tracking); the chain passes the training
# config's W&B project to them, so their reports join the training run's project and group.
WANDB_STAGES = ("eval", "quantize", "latency")


def wandb_project(config: Any) -> str | None:
    """The ``project`` of the training config's ``WandbLogger`` (one logger or a list), if any."""
    trainer = config.get("trainer") if isinstance(config, dict) else None
    loggers = trainer.get("logger") if isinstance(trainer, dict) else None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
            return str((logger.get("init_args") or {}).get("project") or "lightning_logs")  # WandbLogger's default
    return None


def stage_commands(
    run_dir: str, stages: dict[str, dict[str, Any]], wandb: str | None = None
) -> dict[str, list[tuple[str, ...]]]:
    """Each stage's ``merino-pl`` command lines (several for eval and latency: one per model)."""
    run = Path(run_dir)
    model = str(run / "model")
    args = {name: tuple(str(a) for a in s["args"]) for name, s in stages.items()}
    ckpt = str(run / "checkpoints" / "last.ckpt")
    commands: dict[str, list[tuple[str, ...]]] = {"export": [("export", ckpt, "--out", model, "--overwrite")]}
    models = {"fp32": model}
    for bits in stages["quantize"]["bits"]:
        qdir = models[f"int{bits}"] = str(run / "quantized" / f"int{bits}")
        commands[f"quantize-int{bits}"] = [("quantize", model, "--bits", str(bits), "--out", qdir, "--overwrite")]
    commands["eval"] = [("eval", path, "--out", str(run / "eval" / label)) for label, path in models.items()]
    commands["latency"] = [
        ("latency", path, "--precision", label, "--out", str(run / "latency" / label)) for label, path in models.items()
    ]
    for name in commands:
        if wandb and name.partition("-")[0] in WANDB_STAGES:
            commands[name] = [c + ("--wandb", wandb) for c in commands[name]]
    return {name: [c + args[name.partition("-")[0]] for c in cmds] for name, cmds in commands.items()}


def chain_jobs(
    spec: JobSpec, stages: dict[str, dict[str, Any]], rendered_by: str, wandb: str | None = None
) -> list[ChainJob]:
    """The chain's jobs in submission order, each with its script and the stages it waits for."""
    commands = stage_commands(spec.run_dir, stages, wandb)
    quantized = tuple(name for name in commands if name.startswith("quantize-"))
    after = {"export": ("fit",), **{q: ("export",) for q in quantized}}
    after |= {"eval": ("export", *quantized), "latency": ("export", *quantized)}
    jobs = [ChainJob("fit", (), render(spec))]
    for name, cmds in commands.items():
        s = stages[name.partition("-")[0]]
        job = BatchJob(
            name=f"merino-{name}",
            log_dir=spec.log_dir,
            commands=tuple(cmds),
            title=f"{name} of the run in {spec.run_dir} (chain: after {', '.join(after[name])})",
            rendered_by=rendered_by,
            gpus=s["gpus"],
            cpus=s["cpus"],
            mem=None if s["mem"] is None else str(s["mem"]),
            time=str(s["time"]),
            partition=s["partition"] or spec.partition,
            account=spec.account,
            python=spec.python,
            setup=spec.setup,
            after=":".join(f"{a.upper().replace('-', '_')}_JOB_ID" for a in after[name]),
        )
        jobs.append(ChainJob(name, after[name], render_batch(job)))
    return jobs


def _outputs_problems(run_dir: str, stages: dict[str, dict[str, Any]], overwrite: bool) -> list[str]:
    run = Path(run_dir)
    outs = [run / "model", *(run / "quantized" / f"int{b}" for b in stages["quantize"]["bits"])]
    taken = [str(p) for p in outs if p.is_dir() and any(p.iterdir())]
    if taken and not overwrite:
        return [f"{', '.join(taken)}: an earlier chain's outputs; --overwrite replaces them"]
    return []


def command_line(settings: ChainSettings, spec: JobSpec) -> str:
    """The ``merino-pl slurm chain`` command of ``settings`` (every script's header names it)."""
    head = shlex.split(spec.command_line())
    cut = head.index("--") if "--" in head else len(head)
    extra = (["--stages", settings.stages] if settings.stages else []) + (["--overwrite"] if settings.overwrite else [])
    return shlex.join(["merino-pl", "slurm", "chain", *head[3:cut], *extra, *head[cut:]])


def _fit_settings(settings: ChainSettings) -> SubmitSettings:
    fields = SubmitSettings.__dataclass_fields__
    return SubmitSettings(**{k: getattr(settings, k) for k in fields})


def chain(settings: ChainSettings) -> list[str] | None:
    """The chain's entry function: check every argument (one ``MerinoError``), write each job's
    script and submit them with their ``afterok`` dependencies; the job ids in stage order.
    ``dry_run`` prints every script (with the dependencies as comments) and submits nothing."""
    spec = build_spec(_fit_settings(settings))
    stages = load_stages(settings.stages, gpu_chain=spec.gpus_per_node > 0)
    problems = _outputs_problems(spec.run_dir, stages, settings.overwrite)
    if problems:
        raise MerinoError("; ".join(problems))
    project = wandb_project(read_yaml(settings.config, "training config"))
    jobs = chain_jobs(spec, stages, command_line(settings, spec), project)
    if settings.dry_run:
        for job in jobs:
            sys.stdout.write(
                f"# ---- {job.stage}" + (f" (afterok: {', '.join(job.after)})" if job.after else "") + "\n"
            )
            sys.stdout.write(job.text)
        return None
    ids = _submit_all(spec, jobs)
    for job in jobs:
        print(
            f"submitted {job.stage:<14} job {ids[job.stage]}" + (f"  after {', '.join(job.after)}" if job.after else "")
        )
    print(f"logs in {spec.log_dir}/; follow with: merino-pl slurm status {shlex.quote(spec.run_dir)}")
    return [ids[job.stage] for job in jobs]


def _submit_all(spec: JobSpec, jobs: list[ChainJob]) -> dict[str, str]:
    """Submit fit held, the rest with ``afterok`` on their inputs, then release fit; on any
    rejection cancel what was queued (all or nothing) and raise sbatch's message."""
    log_dir, run_dir = Path(spec.log_dir), Path(spec.run_dir)
    ids: dict[str, str] = {}
    try:
        for job in jobs:
            path = write_new_script(log_dir, job.text)
            waits = [ids[a] for a in job.after]
            options = ["--hold"] if job.stage == "fit" else []
            if waits:
                options += [f"--dependency=afterok:{':'.join(waits)}", "--kill-on-invalid-dep=yes"]
            ids[job.stage] = sbatch(path, options)
            chain_id = ids["fit"]
            entry = {"job_id": ids[job.stage], "stage": job.stage, "script": str(path), "submitted": now()}
            if job.stage == "fit":
                entry = fit_record(ids["fit"], path, spec)
            record_job(run_dir, {**entry, "chain": chain_id, "depends_on": waits})
    except BaseException:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True)
        raise
    proc = subprocess.run(["scontrol", "release", ids["fit"]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MerinoError(f"scontrol release {ids['fit']} failed: {proc.stderr.strip()}; release it by hand")
    return ids
