"""The pipeline stage's entry: ``run_pipeline(PipelineSettings.load(path, ...))`` runs search → fit →
export → quantize → eval → latency (``merino-pl pipeline --config PIPELINE.yaml`` is
``pipeline/cli.py``, which turns its flags into these calls).

Every stage is the stage's own ``merino-pl`` command run as a subprocess (so a crash or a
Lightning/lm-eval global never leaks into the next stage), with its output streamed to the
terminal and to ``OUT/logs/<stage>.log``. Stages talk through files only (docs/architecture.md).

The package, by job: ``config`` (the YAML), ``layout`` (every path of a run), ``stages`` (the
command lines and their skip keys), ``state`` (``pipeline-state.json``: keys, statuses and the
files the pipeline owns), this module (checking, locking, running), ``summary`` + ``reports`` +
``plots`` (``OUT/summary.md`` and its pictures).

A stage is *skipped* when its outputs exist and its key is unchanged; the key hashes the
command line and the content of every input file (configs, the recipe, the upstream checkpoint
or quantized model). A stage whose key changed starts from a folder cleaned of the pipeline's own
files; a stage that failed (or was killed) with the same key keeps its folder, so ``fit`` resumes
from ``last``. One run at a time per output folder (``core.lock``), and never beside files the
pipeline did not write unless told (``keep_unknown``): it deletes only what it wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from merino_pl.core.errors import MerinoError
from merino_pl.core.lock import folder_lock
from merino_pl.pipeline.config import PipelineSettings
from merino_pl.pipeline.layout import RunLayout
from merino_pl.pipeline.stages import Stage, build_stages
from merino_pl.pipeline.state import RunState
from merino_pl.pipeline.summary import write_summary

__all__ = ["PipelineSettings", "RunLayout", "Stage", "build_stages", "run_pipeline", "stage_problems", "write_summary"]


# ---- checking --------------------------------------------------------------------------------
def stage_problems(stages: list[Stage]) -> list[str]:
    """Every stage's arguments checked by that stage's own ``validate_argv`` before the first
    one runs (a bad ``latency.precision`` must not wait for fit and export). Files earlier
    stages will write are ``pending``: their absence is not a problem."""
    import importlib

    from merino_pl.cli import STAGES

    pending = frozenset(str(p) for s in stages for p in (*s.outputs, s.workdir))
    problems = []
    for stage in stages:
        module = importlib.import_module(STAGES[stage.argv[0]][0].partition(":")[0])
        if hasattr(module, "validate_argv"):
            problems += [f"{stage.name}: {p}" for p in module.validate_argv(stage.argv[1:], pending)]
    return problems


def _check_folder(layout: RunLayout, stages: list[Stage], state: RunState, keep_unknown: bool) -> None:
    """Refuse (one line) an output folder holding files the pipeline did not write; with
    ``keep_unknown``, only those inside a folder a stage or the summary writes into."""
    interrupted = {
        s.name: [s.workdir, layout.log(s.name)]
        for s in stages
        if state.stages.get(s.name, {}).get("status") == "running"
    }
    unknown = state.unknown(interrupted)
    if not unknown:
        return
    rel = [str(p.relative_to(layout.out)) for p in unknown]
    named = ", ".join(rel[:3]) + (f" and {len(rel) - 3} more" if len(rel) > 3 else "")
    if not keep_unknown:
        raise MerinoError(
            f"{layout.out} holds {len(rel)} file(s) this pipeline did not write ({named}); it never deletes "
            "what it did not write: move them out, use another out_dir, or pass --keep-unknown to run beside them"
        )
    written = [s.workdir for s in stages] + [layout.plots, layout.out / "logs"]
    inside = [p for p in unknown if p == layout.summary or any(w == p or w in p.parents for w in written)]
    if inside:
        raise MerinoError(
            f"{inside[0]}: not written by this pipeline, and it sits where a stage writes; "
            "--keep-unknown keeps files only outside the stage folders: move it"
        )


# ---- running ---------------------------------------------------------------------------------
def _up_to_date(stage: Stage, state: RunState) -> bool:
    done = state.stages.get(stage.name, {})
    return done.get("key") == stage.key and done.get("status") == "done" and all(p.exists() for p in stage.outputs)


def _run_command(stage: Stage, log_path: Path, lock_fd: int) -> int:
    """Run one stage's command, streaming its output to the terminal and to its log file. The
    child holds the folder's lock too (``lock_fd``), so a stage left running by a killed
    pipeline keeps a second run out until it ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "merino_pl.cli", *stage.argv]
    with open(log_path, "ab") as log:
        log.write(f"\n$ merino-pl {' '.join(stage.argv)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, pass_fds=[lock_fd])
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read1(1 << 14):  # chunks, not lines: progress bars use \r
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        return proc.wait()


def _run_stage(stage: Stage, layout: RunLayout, state: RunState, forced: bool, lock_fd: int) -> int:
    """Clean the stage's folder when its inputs changed (or it is forced), run it, and record
    its status and every file it wrote; the exit code (1 when it wrote no output)."""
    if forced or state.stages.get(stage.name, {}).get("key") != stage.key:
        state.clean(stage.workdir)  # inputs changed (or forced): never resume an older run
    state.stages[stage.name] = {"key": stage.key, "status": "running", "argv": stage.argv, "started": time.time()}
    state.save()
    t0 = time.perf_counter()
    try:
        code = _run_command(stage, layout.log(stage.name), lock_fd)
    finally:
        stage.seconds = time.perf_counter() - t0
        state.record([*state.files_under(stage.workdir), layout.log(stage.name)])
        state.save()
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if code != 0 or missing:
        state.stages[stage.name].update(status="failed", exit_code=code, seconds=round(stage.seconds, 1))
        state.save()
        why = f"exit code {code}" if code else f"it did not write {', '.join(missing)}"
        print(
            f"pipeline: stage {stage.name!r} failed ({why}); log: {layout.log(stage.name)}; "
            f"fix it and rerun the same command to resume at {stage.name!r}",
            file=sys.stderr,
        )
        return code or 1
    stage.status = "done"
    state.stages[stage.name].update(status="done", seconds=round(stage.seconds, 1))
    state.save()
    return 0


def run_pipeline(settings: PipelineSettings) -> int:
    """Run (or skip) every stage in order; stop at the first failure with the stage named."""
    layout = RunLayout.of(settings)
    stages = build_stages(settings, layout)
    unknown = [f for f in settings.force if f not in {s.name for s in stages} and f != "all"]
    if unknown:
        raise MerinoError(f"--force {', '.join(unknown)}: no such stage (stages: {', '.join(s.name for s in stages)})")
    if layout.out.exists() and not layout.out.is_dir():  # once, not once per stage that writes under it
        raise MerinoError(f"out_dir {layout.out} exists and is not a directory")
    problems = stage_problems(stages)
    if problems:
        raise MerinoError(f"{settings.source}: " + "; ".join(problems))
    if settings.dry_run:  # reads only: no lock
        state = RunState.read(layout.out)
        _check_folder(layout, stages, state, settings.keep_unknown)
        return _dry_run(settings, stages, state, settings.force)
    with folder_lock(layout.out, "pipeline") as lock:
        state = RunState.read(layout.out)
        _check_folder(layout, stages, state, settings.keep_unknown)
        if lock.previous:
            print(f"pipeline: took over the lock of a run that is gone (pid {lock.previous.get('pid')})")
        return _run(settings, layout, stages, state, settings.force, lock.fd)


def _stale(stage: Stage, state: RunState, force: tuple[str, ...], changed: set[Path]) -> bool:
    """Whether the stage must run: forced, its key or outputs changed, or it reads a changed output."""
    forced = stage.name in force or "all" in force
    upstream = any(p == o or o in p.parents or p in o.parents for p in stage.inputs for o in changed)
    return forced or upstream or not _up_to_date(stage, state)


def _dry_run(cfg: PipelineSettings, stages: list[Stage], state: RunState, force: tuple[str, ...]) -> int:
    print(f"pipeline {cfg.name}: {len(stages)} stages -> {cfg.out_dir}")
    changed: set[Path] = set()  # outputs of stages that would run (their readers would too)
    for i, stage in enumerate(stages, 1):
        stage.compute_key()
        head = f"[{i}/{len(stages)}] {stage.name:<14}"
        if _stale(stage, state, force, changed):
            stage.status = "would run"
            print(f"{head} would run: merino-pl {' '.join(stage.argv)}")
            changed.update(stage.outputs)
        else:
            stage.status = "skipped"
            print(f"{head} up to date (inputs unchanged), skipped")
    return 0


def _run(
    cfg: PipelineSettings, layout: RunLayout, stages: list[Stage], state: RunState, force: tuple[str, ...], lock_fd: int
) -> int:
    print(f"pipeline {cfg.name}: {len(stages)} stages -> {cfg.out_dir}")
    t_start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        stage.compute_key()  # after the earlier stages ran: their outputs are this one's inputs
        head = f"[{i}/{len(stages)}] {stage.name:<14}"
        if not _stale(stage, state, force, set()):
            stage.status = "skipped"
            print(f"{head} up to date (inputs unchanged), skipped")
            continue
        print(f"{head} running: merino-pl {' '.join(stage.argv)}", flush=True)
        forced = stage.name in force or "all" in force
        code = _run_stage(stage, layout, state, forced, lock_fd)
        if code:
            return code
        print(f"{head} done in {stage.seconds:.1f} s")
    seconds = {name: entry.get("seconds") for name, entry in state.stages.items()}
    summary = write_summary(cfg, layout, stages, seconds)
    state.record([summary, *state.files_under(layout.plots)])
    state.save()
    print(f"pipeline {cfg.name}: finished in {time.perf_counter() - t_start:.1f} s; summary: {summary}")
    return 0
