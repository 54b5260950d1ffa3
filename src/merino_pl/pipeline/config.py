"""The pipeline's settings: ``PipelineSettings.load(path)`` reads and checks a pipeline YAML, every
problem in one line before anything runs (docs/pipeline.md shows the format), and holds the run's
flags (``--force``, ``--dry-run``, ``--keep-unknown``) beside it: the one object the entry takes."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_yaml

SECTIONS = ("name", "out_dir", "recipe", "search", "checkpoint", "fit", "eval", "quantize", "latency")
STAGE_KEYS = {
    "search": {"config", "budget", "args"},
    "fit": {"config", "args"},
    "eval": {"tasks", "ppl", "args"},
    "quantize": {"bits", "method", "args"},
    "latency": {"precision", "peers", "args"},
}
STARTS = ("recipe", "search", "checkpoint")  # where the model comes from: exactly one


@dataclass
class PipelineSettings:
    name: str
    out_dir: Path
    recipe: str | None = None  # a recipe to train instead of a search
    search: dict[str, Any] | None = None
    checkpoint: Path | None = None  # a trained model instead of search + fit: a .ckpt or an exported directory
    fit: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    quantize: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    source: Path = Path(".")
    force: tuple[str, ...] = ()  # stages to re-run ("all": every one)
    dry_run: bool = False  # list the stages and whether each would run, run nothing
    keep_unknown: bool = False  # run beside files the pipeline did not write (never touching them)

    @classmethod
    def load(
        cls,
        path: str | Path,
        out_dir: str | None = None,
        force: tuple[str, ...] = (),
        dry_run: bool = False,
        keep_unknown: bool = False,
    ) -> PipelineSettings:
        path = Path(path)
        data = read_yaml(path, "pipeline config")
        if not isinstance(data, dict):
            raise MerinoError(f"{path}: a pipeline config must be a mapping, got {type(data).__name__}")
        problems = [f"unknown key {k!r} (valid: {', '.join(SECTIONS)})" for k in data if k not in SECTIONS]
        problems += _section_problems(data) + _start_problems(data)
        if problems:
            raise MerinoError(f"{path}: " + "; ".join(problems))
        out = Path(out_dir or data.get("out_dir") or f"runs/pipeline/{data.get('name') or path.stem}")
        return cls(
            name=str(data.get("name") or path.stem),
            out_dir=out,
            recipe=data.get("recipe"),
            search=data.get("search"),
            checkpoint=Path(data["checkpoint"]) if data.get("checkpoint") else None,
            fit=data.get("fit") or {},
            eval=data.get("eval"),
            quantize=data.get("quantize"),
            latency=data.get("latency"),
            source=path,
            force=tuple(force),
            dry_run=dry_run,
            keep_unknown=keep_unknown,
        )


def _section_problems(data: dict[str, Any]) -> list[str]:
    """Each stage section: a mapping of its known keys, ``args`` a list, ``quantize.bits`` integers."""
    problems = []
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
    return problems


def _start_problems(data: dict[str, Any]) -> list[str]:
    """Exactly one start (a recipe or a search to train, or a trained checkpoint); ``fit.config``
    when training, no ``fit`` section when not."""
    given = [k for k in STARTS if data.get(k)]
    if len(given) != 1:
        return [
            "give exactly one of 'recipe' (a recipe to train), 'search' (search for one) or 'checkpoint' "
            f"(a trained .ckpt or exported model directory: no search, no fit); got {', '.join(given) or 'none'}"
        ]
    if given == ["checkpoint"]:
        problems = checkpoint_problems(Path(str(data["checkpoint"])))
        if data.get("fit"):
            problems.append(f"'fit' is not used when starting from a checkpoint ({data['checkpoint']}): remove it")
        return problems
    if not isinstance(data.get("fit"), dict) or not data["fit"].get("config"):
        return ["fit.config (a `merino-pl fit` config YAML) is required"]
    return []


def checkpoint_problems(path: Path) -> list[str]:
    """A ``checkpoint:`` start is a Lightning ``.ckpt`` (a torch zip file) or a float model
    directory (``config.json`` + safetensors weights); read no weights here, the stages load it."""
    from merino_pl.core.checkpoint import WEIGHTS_NAME

    where = f"checkpoint {path}"
    if not path.exists():
        return [f"{where}: not found"]
    if path.is_file():
        if path.suffix != ".ckpt" or not zipfile.is_zipfile(path):
            return [f"{where}: expected a `merino-pl fit` .ckpt (a torch zip file) or an exported model directory"]
        return []
    if (path / "quantize_config.json").exists():
        return [f"{where}: a quantized (GPTQ) directory; start from the float model it was quantized from"]
    missing = [n for n in ("config.json", WEIGHTS_NAME) if not (path / n).is_file()]
    return [f"{where}: not an exported model directory (no {', '.join(missing)})"] if missing else []
