"""Where a pipeline run keeps everything: ``RunLayout.of(cfg)``, built once per run and shared by
the stage list (``stages.build_stages``), the summary and its plots, so each path is spelled here
only.

```
OUT/
  pipeline-state.json     the stages' keys and statuses, and every file the pipeline wrote (state.py)
  summary.md              the run's summary (summary.py)
  logs/<stage>.log        each stage's output
  search/recipe.yaml      (a `search:` start)
  fit/checkpoints/last.ckpt
  model/                  the exported float model (fp32)
  quantized/int<B>/       one GPTQ directory per bit width
  eval/<label>/eval.json      one per model label (fp32, int8, int4)
  latency/<label>/latency.json
  plots/                  the plot stage's chart and the summary's pictures
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merino_pl.pipeline.config import PipelineSettings

STATE_NAME = "pipeline-state.json"


@dataclass(frozen=True)
class RunLayout:
    """The folders and report paths of one run. ``models``: precision label -> model directory,
    the float model first (``fp32``), then each quantized one, in the config's order."""

    out: Path
    models: dict[str, Path]
    trains: bool  # fit runs here (a recipe or a search start); False when starting from a checkpoint
    exports: bool  # export runs here (False when the start is already an exported directory)
    evaluates: bool
    times: bool  # latency runs

    @classmethod
    def of(cls, cfg: PipelineSettings) -> RunLayout:
        out = cfg.out_dir
        start = cfg.checkpoint
        exports = start is None or start.is_file()
        models = {"fp32": out / "model" if exports else start}
        q = cfg.quantize
        for bits in [int(b) for b in (q.get("bits") or [8, 4])] if q is not None else []:
            models[f"int{bits}"] = out / "quantized" / f"int{bits}"
        return cls(out, models, start is None, exports, cfg.eval is not None, cfg.latency is not None)

    # ---- stage folders
    @property
    def search_dir(self) -> Path:
        return self.out / "search"

    @property
    def recipe(self) -> Path:
        return self.search_dir / "recipe.yaml"

    @property
    def fit_dir(self) -> Path:
        return self.out / "fit"

    @property
    def last_ckpt(self) -> Path:
        return self.fit_dir / "checkpoints" / "last.ckpt"

    @property
    def model_dir(self) -> Path:
        return self.models["fp32"]

    @property
    def plots(self) -> Path:
        return self.out / "plots"

    @property
    def accuracy_png(self) -> Path:
        return self.plots / "accuracy-vs-latency.png"

    # ---- reports and the run's own files
    def quantized(self) -> dict[str, Path]:
        """The quantized models: label -> directory."""
        return {label: path for label, path in self.models.items() if label != "fp32"}

    def eval_dir(self, label: str) -> Path:
        return self.out / "eval" / label

    def eval_json(self, label: str) -> Path:
        return self.eval_dir(label) / "eval.json"

    def latency_dir(self, label: str) -> Path:
        return self.out / "latency" / label

    def latency_json(self, label: str) -> Path:
        return self.latency_dir(label) / "latency.json"

    def log(self, stage: str) -> Path:
        return self.out / "logs" / f"{stage}.log"

    @property
    def state(self) -> Path:
        return self.out / STATE_NAME

    @property
    def summary(self) -> Path:
        return self.out / "summary.md"
