"""The pipeline stage's library: ``run_pipeline(PipelineConfig.load(path))`` runs search → fit →
export → quantize → eval → latency (``merino-pl pipeline --config PIPELINE.yaml`` is
``pipeline/cli.py``, which turns its flags into these calls).

Every stage is the stage's own ``merino-pl`` command run as a subprocess (so a crash or a
Lightning/lm-eval global never leaks into the next stage), with its output streamed to the
terminal and to ``OUT/logs/<stage>.log``. Stages talk through files only (STYLE §6).

A stage is *skipped* when its outputs exist and its key is unchanged; the key hashes the
command line and the content of every input file (configs, the recipe, the upstream checkpoint
or quantized model). A stage whose key changed starts from a clean output folder; a stage that
failed (or was killed) with the same key keeps its folder, so ``fit`` resumes from ``last``.
The state lives in ``OUT/pipeline-state.json``; ``OUT/summary.md`` links every report and plot
and shows the run's pictures (training loss, perplexity or accuracy vs latency, per-precision
bars: ``merino_pl.pipeline.plots``), drawn when it is written, and the paper's tables with this
run's rows, drawn by the eval report's own renderer from each ``eval.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_write_text, read_json, read_yaml, sha256_file, write_json
from merino_pl.pipeline.plots import model_latency_row, read_eval, read_latency, summary_plots

if TYPE_CHECKING:
    from merino_pl.latency.report import LatencyReport

SECTIONS = ("name", "out_dir", "recipe", "search", "fit", "eval", "quantize", "latency")
STAGE_KEYS = {
    "search": {"config", "budget", "args"},
    "fit": {"config", "args"},
    "eval": {"tasks", "ppl", "args"},
    "quantize": {"bits", "method", "args"},
    "latency": {"precision", "peers", "args"},
}


@dataclass
class Stage:
    """One step: a ``merino-pl`` command line, the files it reads, and what it must produce."""

    name: str
    argv: list[str]
    inputs: list[Path]
    outputs: list[Path]
    workdir: Path  # cleaned when the stage's key changes
    key: str = ""
    status: str = "pending"
    seconds: float = 0.0

    def compute_key(self) -> str:
        h = hashlib.sha256(json.dumps(self.argv).encode())
        for path in self.inputs:
            h.update(str(path).encode())
            h.update(_content_hash(path).encode())
        self.key = h.hexdigest()
        return self.key


def _content_hash(path: Path) -> str:
    """SHA-256 over a file, or over every file under a directory (relative names and digests)."""
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        name = f.relative_to(path) if f != path else f.name
        h.update(f"{name}:{_file_digest(str(f), st.st_size, st.st_mtime_ns)}".encode())
    return h.hexdigest()


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """One read per file version per run: the model directory is an input of half the stages."""
    return sha256_file(path)


# ---- the config ------------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    name: str
    out_dir: Path
    recipe: str | None = None  # a recipe instead of a search
    search: dict[str, Any] | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    quantize: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    source: Path = Path(".")

    @classmethod
    def load(cls, path: str | Path, out_dir: str | None = None) -> PipelineConfig:
        path = Path(path)
        data = read_yaml(path, "pipeline config")
        if not isinstance(data, dict):
            raise MerinoError(f"{path}: a pipeline config must be a mapping, got {type(data).__name__}")
        problems = [f"unknown key {k!r} (valid: {', '.join(SECTIONS)})" for k in data if k not in SECTIONS]
        for section, keys in STAGE_KEYS.items():
            value = data.get(section)
            if value is not None and not isinstance(value, dict):
                problems.append(f"{section} must be a mapping, got {value!r}")
            elif isinstance(value, dict):
                problems += [
                    f"unknown key {section}.{k!r} (valid: {', '.join(sorted(keys))})" for k in value if k not in keys
                ]
                if not isinstance(value.get("args", []), list):
                    problems.append(f"{section}.args must be a list of command-line arguments, got {value['args']!r}")
        bits = (data.get("quantize") or {}).get("bits") if isinstance(data.get("quantize"), dict) else None
        if bits is not None and (
            not isinstance(bits, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits)
        ):
            problems.append(f"quantize.bits must be a list of integers, got {bits!r}")
        if bool(data.get("recipe")) == bool(data.get("search")):
            problems.append("give exactly one of 'recipe' (a recipe to train) or 'search' (search for one)")
        if not isinstance(data.get("fit"), dict) or not data["fit"].get("config"):
            problems.append("fit.config (a `merino-pl fit` config YAML) is required")
        if problems:
            raise MerinoError(f"{path}: " + "; ".join(problems))
        out = Path(out_dir or data.get("out_dir") or f"runs/pipeline/{data.get('name') or path.stem}")
        return cls(
            name=str(data.get("name") or path.stem),
            out_dir=out,
            recipe=data.get("recipe"),
            search=data.get("search"),
            fit=data["fit"],
            eval=data.get("eval"),
            quantize=data.get("quantize"),
            latency=data.get("latency"),
            source=path,
        )


# ---- the stages ------------------------------------------------------------------------------
def _args(section: dict[str, Any] | None) -> list[str]:
    return [str(a) for a in (section or {}).get("args", [])]


def _csv(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _fit_overrides(config: Path, run_dir: Path) -> list[str]:
    """Send the run (checkpoints, and a logger's files when the config names a save_dir) under
    the pipeline's folder, so two pipelines never share (or resume) each other's run."""
    argv = ["--trainer.default_root_dir", str(run_dir)]
    data = read_yaml(config, "fit config")
    trainer = (data.get("trainer") if isinstance(data, dict) else None) or {}
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        argv += ["--trainer.logger.init_args.save_dir", str(run_dir)]
    return argv


def _per_model(
    command: str,
    models: dict[str, Path],
    out: Path,
    section: dict[str, Any],
    options: Callable[[str], list[str]],
    report: str,
) -> list[Stage]:
    """One ``merino-pl COMMAND MODEL --out OUT/COMMAND/LABEL OPTIONS`` stage per model (label ->
    path), then the config section's own arguments; each stage's output is its ``report``."""
    stages = []
    for label, path in models.items():
        d = out / command / label
        argv = [command, str(path), "--out", str(d), *options(label), *_args(section)]
        stages.append(Stage(f"{command}-{label}", argv, [path], [d / report], d))
    return stages


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    """The stage list of a config, in run order (each stage's inputs are earlier outputs)."""
    out = cfg.out_dir
    stages: list[Stage] = []
    if cfg.search is not None:
        s = cfg.search
        recipe = out / "search" / "recipe.yaml"
        argv = ["search", "--out", str(recipe), "--name", f"{cfg.name}-searched"]
        inputs: list[Path] = []
        if s.get("config"):
            argv += ["--config", str(s["config"])]
            inputs.append(Path(s["config"]))
        for b in s.get("budget") or []:
            argv += ["--budget", str(b)]
        stages.append(Stage("search", argv + _args(s), inputs, [recipe], out / "search"))
        recipe_arg, recipe_inputs = str(recipe), [recipe]
    else:
        recipe_arg = str(cfg.recipe)
        recipe_inputs = [Path(recipe_arg)] if Path(recipe_arg).exists() else []
    fit_cfg = Path(cfg.fit["config"])
    run_dir = out / "fit"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    argv = ["fit", "--config", str(fit_cfg), "--model.recipe", recipe_arg, *_fit_overrides(fit_cfg, run_dir)]
    stages.append(
        Stage("fit", argv + _args(cfg.fit) + ["--ckpt_path", "last"], [fit_cfg, *recipe_inputs], [ckpt], run_dir)
    )
    model = out / "model"
    # --overwrite: the pipeline owns these folders (a stage killed after writing reruns over its own output)
    stages.append(
        Stage(
            "export", ["export", str(ckpt), "--out", str(model), "--overwrite"], [ckpt], [model / "config.json"], model
        )
    )
    models = {"fp32": model}
    q = cfg.quantize
    for bits in [int(b) for b in (q.get("bits") or [8, 4])] if q is not None else []:
        qdir = out / "quantized" / f"int{bits}"
        argv = ["quantize", str(model), "--bits", str(bits), "--out", str(qdir), "--overwrite"]
        if q.get("method"):
            argv += ["--method", str(q["method"])]
        stages.append(Stage(f"quantize-int{bits}", argv + _args(q), [model], [qdir / "quantize_config.json"], qdir))
        models[f"int{bits}"] = qdir
    if cfg.eval is not None:
        e = cfg.eval
        evaluate = ["--tasks", _csv(e.get("tasks", "paper")), "--ppl", _csv(e.get("ppl", "wikitext2,ptb"))]
        stages += _per_model("eval", models, out, e, lambda label: evaluate, "eval.json")
    if cfg.latency is not None:
        lat = cfg.latency

        def timing(label: str) -> list[str]:
            if label != "fp32":
                return ["--precision", label]
            peers = ["--peers", _csv(lat["peers"])] if lat.get("peers") else []
            return ["--precision", _csv(lat.get("precision", "fp32")), *peers]

        stages += _per_model("latency", models, out, lat, timing, "latency.json")
        # accuracy vs latency (paper Figure 1) of this run's models beside the paper's points
        reports = [out / "latency" / label / "latency.json" for label in models]
        evals = [out / "eval" / label / "eval.json" for label in models] if cfg.eval is not None else []
        png = out / "plots" / "accuracy-vs-latency.png"
        argv = ["latency", "plot", "--latency", *map(str, reports), "--paper", "--out", str(png)]
        if evals:
            argv[argv.index("--paper") : argv.index("--paper")] = ["--eval", *map(str, evals)]
        stages.append(Stage("plot", argv, reports + evals, [png], out / "plots"))
    return stages


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


# ---- running ---------------------------------------------------------------------------------
def _up_to_date(stage: Stage, state: dict[str, Any]) -> bool:
    done = state.get(stage.name, {})
    return done.get("key") == stage.key and done.get("status") == "done" and all(p.exists() for p in stage.outputs)


def _run_command(stage: Stage, log_path: Path) -> int:
    """Run one stage's command, streaming its output to the terminal and to its log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "merino_pl.cli", *stage.argv]
    with open(log_path, "ab") as log:
        log.write(f"\n$ merino-pl {' '.join(stage.argv)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
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


def _read_state(path: Path) -> dict[str, Any]:
    """``OUT/pipeline-state.json``; {} when missing or unreadable: a state we cannot read only
    costs a re-run, never a wrong skip."""
    try:
        state = read_json(path, "pipeline state")
    except MerinoError:
        return {}
    return state if isinstance(state, dict) else {}


def run_pipeline(cfg: PipelineConfig, force: tuple[str, ...] = (), dry_run: bool = False) -> int:
    """Run (or skip) every stage in order; stop at the first failure with the stage named."""
    stages = build_stages(cfg)
    unknown = [f for f in force if f not in {s.name for s in stages} and f != "all"]
    if unknown:
        raise MerinoError(f"--force {', '.join(unknown)}: no such stage (stages: {', '.join(s.name for s in stages)})")
    problems = stage_problems(stages)
    if problems:
        raise MerinoError(f"{cfg.source}: " + "; ".join(problems))
    state_path = cfg.out_dir / "pipeline-state.json"
    state = _read_state(state_path)
    print(f"pipeline {cfg.name}: {len(stages)} stages -> {cfg.out_dir}")
    t_start = time.perf_counter()
    changed: set[Path] = set()  # dry run: outputs of stages that would run (their readers would too)
    for i, stage in enumerate(stages, 1):
        stage.compute_key()  # after the earlier stages ran: their outputs are this one's inputs
        forced = stage.name in force or "all" in force
        upstream_reruns = any(p == o or o in p.parents or p in o.parents for p in stage.inputs for o in changed)
        fresh = _up_to_date(stage, state) and not forced and not upstream_reruns
        head = f"[{i}/{len(stages)}] {stage.name:<14}"
        if fresh:
            stage.status = "skipped"
            print(f"{head} up to date (inputs unchanged), skipped")
            continue
        if dry_run:
            stage.status = "would run"
            print(f"{head} would run: merino-pl {' '.join(stage.argv)}")
            changed.update(stage.outputs)
            continue
        if (forced or state.get(stage.name, {}).get("key") != stage.key) and stage.workdir.exists():
            shutil.rmtree(stage.workdir)  # inputs changed (or forced): never resume an older run
        state[stage.name] = {"key": stage.key, "status": "running", "argv": stage.argv}
        write_json(state_path, state)
        print(f"{head} running: merino-pl {' '.join(stage.argv)}", flush=True)
        t0 = time.perf_counter()
        code = _run_command(stage, cfg.out_dir / "logs" / f"{stage.name}.log")
        stage.seconds = time.perf_counter() - t0
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if code != 0 or missing:
            state[stage.name].update(status="failed", exit_code=code, seconds=round(stage.seconds, 1))
            write_json(state_path, state)
            why = f"exit code {code}" if code else f"it did not write {', '.join(missing)}"
            print(
                f"pipeline: stage {stage.name!r} failed ({why}); log: {cfg.out_dir / 'logs' / (stage.name + '.log')}; "
                f"fix it and rerun the same command to resume at {stage.name!r}",
                file=sys.stderr,
            )
            return code or 1
        stage.status = "done"
        state[stage.name].update(status="done", seconds=round(stage.seconds, 1))
        write_json(state_path, state)
        print(f"{head} done in {stage.seconds:.1f} s")
    if dry_run:
        return 0
    summary = write_summary(cfg, stages, state)
    print(f"pipeline {cfg.name}: finished in {time.perf_counter() - t_start:.1f} s; summary: {summary}")
    return 0


# ---- the summary -----------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _our_latency_ms(report: LatencyReport | None, precision: str) -> float | None:
    """Our model's prefill mean (the paper's protocol) at ``precision``, plain path."""
    row = model_latency_row(report, precision)
    return row["prefill_ms"]["mean"] if row else None


def _tables(out: Path, labels: list[str]) -> list[str]:
    """Paper Tables 2 and 3 with this run's rows (one per precision) under the paper's, drawn
    by the eval report's own renderer."""
    from merino_pl.eval.report import table2_lines, table3_lines

    evals = {lb: read_eval(out / "eval" / lb / "eval.json") for lb in labels}
    lats = {lb: read_latency(out / "latency" / lb / "latency.json") for lb in labels}
    ours = [(lb, rep) for lb, rep in evals.items() if rep]
    if not ours:
        return []
    t2 = table2_lines(ours)
    t3 = table3_lines([(lb, rep, _our_latency_ms(lats[lb], lb)) for lb, rep in ours], latency_header="latency (ms)")
    lat_note = next(
        (
            f"{r.device['summary']}, batch {r.protocol['batch']}, "
            f"sequence {r.protocol['seq_len']}, mean of {r.protocol['runs']} prefill runs"
            for r in lats.values()
            if r
        ),
        "latency: not measured in this run",
    )
    return [
        "## Zero-shot accuracy (paper Table 2 layout)",
        "",
        *t2,
        "",
        "## Perplexity and latency (paper Table 3 layout; word perplexity)",
        "",
        *t3,
        "",
        f"Paper latency is on a Jetson Nano; ours: {lat_note}. Tasks whose data could not be "
        "fetched are blank (see each eval report's *Skipped* list).",
        "",
    ]


def _models(out: Path, stages: list[Stage]) -> dict[str, Path]:
    """Precision label -> model directory of this run (the exported float model, then each quantized one)."""
    models = {"fp32": out / "model"} if any(s.name == "export" for s in stages) else {}
    models.update({s.name[len("quantize-") :]: s.workdir for s in stages if s.name.startswith("quantize-")})
    return models


def write_summary(cfg: PipelineConfig, stages: list[Stage], state: dict[str, Any]) -> Path:
    """``OUT/summary.md``: stages, the run's pictures, the paper's tables with this run's rows,
    links to reports."""
    out = cfg.out_dir
    labels = [s.name[len("eval-") :] for s in stages if s.name.startswith("eval-")]
    lines = [
        f"# Pipeline `{cfg.name}`",
        "",
        f"Config: `{cfg.source}`. Every path below is relative to this file.",
        "",
        "| stage | status | seconds | outputs |",
        "|---|---|---|---|",
    ]
    for s in stages:
        seconds = state.get(s.name, {}).get("seconds")
        links = ", ".join(f"[{p.relative_to(out)}]({p.relative_to(out)})" for p in s.outputs)
        lines.append(f"| {s.name} | {s.status} | {_fmt(seconds, 1)} | {links} |")
    plot_lines, shown = summary_plots(out, _models(out, stages))
    lines += ["", *plot_lines, *_tables(out, labels), "## Reports and plots", ""]
    for p in sorted(out.glob("*/**/*")):
        if p.suffix in (".md", ".png") and p.is_file() and "logs" not in p.parts and p not in shown:
            rel = p.relative_to(out)
            lines.append(f"- ![{rel}]({rel})" if p.suffix == ".png" else f"- [{rel}]({rel})")
    path = out / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
