"""The stage list of a config: ``build_stages(cfg)``, each a ``merino-pl`` command line with the
files it reads (its skip key hashes them) and what it must produce, in run order."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merino_pl.core.io import read_yaml, sha256_file
from merino_pl.pipeline.config import PipelineSettings
from merino_pl.pipeline.layout import RunLayout


@dataclass
class Stage:
    """One step: a ``merino-pl`` command line, the files it reads, and what it must produce."""

    name: str
    argv: list[str]
    inputs: list[Path]
    outputs: list[Path]
    workdir: Path  # cleaned (of the pipeline's own files) when the stage's key changes
    replaces: bool = False  # the command replaces ``workdir`` as one unit (``--overwrite``)
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
        name = f.relative_to(path) if f != path else f.name
        h.update(f"{name}:{file_digest(f)}".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read once per file version per run (the model directory is an input
    of half the stages, and the state records every file the stages wrote)."""
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


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


def build_stages(cfg: PipelineSettings, layout: RunLayout | None = None) -> list[Stage]:
    """The stage list of a config, in run order (each stage's inputs are earlier outputs)."""
    layout = layout or RunLayout.of(cfg)
    stages = _training_stages(cfg, layout)
    if layout.exports:
        ckpt = cfg.checkpoint or layout.last_ckpt
        model = layout.model_dir
        # --overwrite: the pipeline owns this folder (a stage killed after writing reruns over its own output)
        argv = ["export", str(ckpt), "--out", str(model), "--overwrite"]
        stages.append(Stage("export", argv, [ckpt], [model / "config.json"], model, replaces=True))
    q = cfg.quantize or {}
    for label, qdir in layout.quantized().items():
        argv = ["quantize", str(layout.model_dir), "--bits", label[len("int") :], "--out", str(qdir), "--overwrite"]
        if q.get("method"):
            argv += ["--method", str(q["method"])]
        stages.append(
            Stage(f"quantize-{label}", argv + _args(q), [layout.model_dir], [qdir / "quantize_config.json"], qdir, True)
        )
    if cfg.eval is not None:
        e = cfg.eval
        evaluate = ["--tasks", _csv(e.get("tasks", "paper")), "--ppl", _csv(e.get("ppl", "wikitext2,ptb"))]
        stages += _per_model("eval", layout, e, lambda label: evaluate, layout.eval_dir, layout.eval_json)
    if cfg.latency is not None:
        stages += _latency_stages(cfg.latency, layout)
    return stages


def _training_stages(cfg: PipelineSettings, layout: RunLayout) -> list[Stage]:
    """search (a ``search:`` start) and fit; none when starting from a checkpoint."""
    if not layout.trains:
        return []
    stages: list[Stage] = []
    if cfg.search is not None:
        s = cfg.search
        argv = ["search", "--out", str(layout.recipe), "--name", f"{cfg.name}-searched"]
        inputs: list[Path] = []
        if s.get("config"):
            argv += ["--config", str(s["config"])]
            inputs.append(Path(s["config"]))
        for b in s.get("budget") or []:
            argv += ["--budget", str(b)]
        stages.append(Stage("search", argv + _args(s), inputs, [layout.recipe], layout.search_dir))
        recipe_arg, recipe_inputs = str(layout.recipe), [layout.recipe]
    else:
        recipe_arg = str(cfg.recipe)
        recipe_inputs = [Path(recipe_arg)] if Path(recipe_arg).exists() else []
    fit_cfg = Path(cfg.fit["config"])
    run_dir = layout.fit_dir
    argv = ["fit", "--config", str(fit_cfg), "--model.recipe", recipe_arg, *_fit_overrides(fit_cfg, run_dir)]
    argv += [*_args(cfg.fit), "--ckpt_path", "last"]
    stages.append(Stage("fit", argv, [fit_cfg, *recipe_inputs], [layout.last_ckpt], run_dir))
    return stages


def _per_model(
    command: str,
    layout: RunLayout,
    section: dict[str, Any],
    options: Callable[[str], list[str]],
    folder: Callable[[str], Path],
    report: Callable[[str], Path],
) -> list[Stage]:
    """One ``merino-pl COMMAND MODEL --out FOLDER OPTIONS`` stage per model of the run, then the
    config section's own arguments; each stage's output is its ``report``."""
    stages = []
    for label, path in layout.models.items():
        d = folder(label)
        argv = [command, str(path), "--out", str(d), *options(label), *_args(section)]
        stages.append(Stage(f"{command}-{label}", argv, [path], [report(label)], d))
    return stages


def _latency_stages(lat: dict[str, Any], layout: RunLayout) -> list[Stage]:
    """latency of each model, then accuracy vs latency (paper Figure 1) of this run's models
    beside the paper's points."""

    def timing(label: str) -> list[str]:
        if label != "fp32":
            return ["--precision", label]
        peers = ["--peers", _csv(lat["peers"])] if lat.get("peers") else []
        return ["--precision", _csv(lat.get("precision", "fp32")), *peers]

    stages = _per_model("latency", layout, lat, timing, layout.latency_dir, layout.latency_json)
    reports = [layout.latency_json(label) for label in layout.models]
    evals = [layout.eval_json(label) for label in layout.models] if layout.evaluates else []
    png = layout.accuracy_png
    argv = ["latency", "plot", "--latency", *map(str, reports)]
    if evals:
        argv += ["--eval", *map(str, evals)]
    argv += ["--paper", "--out", str(png)]
    stages.append(Stage("plot", argv, reports + evals, [png], layout.plots))
    return stages
