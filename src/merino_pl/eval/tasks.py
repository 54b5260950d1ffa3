"""lm-eval task lists: the paper's twelve, validation of names, and running them with skips.

A task whose data cannot be fetched (offline, a missing local file) is reported as skipped
with the reason; the other tasks still run. Unknown names are a ``MerinoError`` listing the
paper's tasks, the ``--include-path`` tasks and the closest lm-eval names.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from merino_pl.core import paper as core_paper
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    column: str  # the paper's column header (or the task name)
    task: str  # lm-eval task name
    metric: str | None  # headline metric; None = the task's first


def _paper_file(name: str) -> Path:
    return Path(str(resources.files("merino_pl.eval").joinpath("paper", name)))


def load_task_list(path: str | Path) -> tuple[list[TaskSpec], int | None]:
    """A task-list YAML (like ``eval/paper-tasks.yaml``): its tasks and ``num_fewshot``."""
    try:
        data = read_yaml(path, "task list")
        specs = [TaskSpec(t.get("column", t["task"]), t["task"], t.get("metric")) for t in data["tasks"]]
    except (MerinoError, KeyError, TypeError, AttributeError) as e:
        raise MerinoError(f"{path}: not a task list (need `tasks: [{{task: NAME, metric: acc}}, ...]`): {e}") from None
    return specs, data.get("num_fewshot")


def paper_tasks() -> list[TaskSpec]:
    """The twelve zero-shot tasks of the paper's Table 2."""
    return load_task_list(_paper_file("paper-tasks.yaml"))[0]


def paper_baselines() -> dict[str, Any]:
    """The paper's Table 2 and Table 3 rows (Pythia, Cerebras, GPT-2, OPT, MeRino): the one file (core/paper.py)."""
    return core_paper.paper_baselines()


def resolve_tasks(spec: str) -> tuple[list[TaskSpec], int | None]:
    """``paper`` | a task-list YAML | ``t1,t2`` | ``none`` -> task specs (and num_fewshot)."""
    if spec in ("", "none"):
        return [], None
    if spec == "paper":
        return load_task_list(_paper_file("paper-tasks.yaml"))
    if spec.endswith((".yaml", ".yml")):
        return load_task_list(spec)
    return [TaskSpec(n, n, None) for n in (s.strip() for s in spec.split(",")) if n], None


@lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], defaults: bool, metadata_json: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=list(include_paths) or None, include_defaults=defaults, metadata=json.loads(metadata_json) or None
    )


def task_manager(names: list[str], include_paths: list[str], metadata: dict[str, Any] | None = None):
    """A TaskManager that knows every name, or a ``MerinoError`` naming the unknown ones.

    Indexing lm-eval's ~10 000 built-in tasks takes ~10 s; when every name is found in the
    ``--include-path`` folders alone, the built-ins are not indexed at all.
    """
    meta = json.dumps(metadata or {}, sort_keys=True)
    paths = tuple(str(Path(p).resolve()) for p in include_paths)
    if paths:
        local = _task_manager(paths, False, meta)
        missing = [n for n in names if n not in local.all_tasks]
        files = [f for root in paths for f in sorted(Path(root).rglob("*.y*ml"))]
        broken = [problem for f in files if (problem := _broken_task_yaml(f, list(names), bool(missing)))]
        if broken:  # lm-eval skips a YAML it cannot read ("unknown task") or fails late on one it can
            raise MerinoError("bad local task YAML: " + "; ".join(broken))
        if not missing:
            return local
    manager = _task_manager(paths, True, meta)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise MerinoError(_unknown_message(unknown, manager, paths, meta))
    return manager


def _unknown_message(unknown: list[str], manager: Any, paths: tuple[str, ...], meta: str) -> str:
    close = sorted({m for n in unknown for m in difflib.get_close_matches(n, manager.all_tasks, n=3)})
    local = sorted(_task_manager(paths, False, meta).all_tasks) if paths else []
    parts = [f"unknown task(s) {', '.join(map(repr, unknown))}"]
    if close:
        parts.append(f"closest: {', '.join(close)}")
    parts.append(f"paper tasks: {', '.join(t.task for t in paper_tasks())}")
    if local:
        parts.append(f"--include-path tasks: {', '.join(local)}")
    parts.append("`lm_eval ls tasks` lists all")
    return "; ".join(parts)


class _TaskYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads lm-eval's ``!function`` tags as plain strings: a task file
    is checked without importing (running) the code it names."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: str(getattr(node, "value", "")))


def _broken_task_yaml(path: Path, names: list[str], unnamed: bool) -> str | None:
    """What is wrong with a local task YAML that declares one of ``names`` (or, with ``unnamed``:
    some task is still not found, whose ``task:`` name cannot be read); None when nothing is."""
    text = path.read_text(encoding="utf-8", errors="replace")
    declared = re.search(r"^task:\s*['\"]?([\w.\-]+)['\"]?\s*(#.*)?$", text, re.M)
    if (declared.group(1) not in names) if declared is not None else not unnamed:
        return None
    try:
        config = yaml.load(text, Loader=_TaskYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        return f"{path}: not a readable task YAML ({' '.join(str(e).split())[:200]})"
    if not isinstance(config, dict):
        return f"{path}: not a task YAML (a {type(config).__name__}, not a mapping)"
    task = config.get("task")
    if declared is None and task is None:
        return None if config.get("group") or config.get("include") else f"{path}: no `task:` name"
    if not isinstance(task, str) or not task:
        return f"{path}: `task:` must be a task name, got {task!r}"
    if task in names and "dataset_path" not in config and "include" not in config:
        return f"{path}: task {task!r} has no dataset_path (nor an include giving one)"
    return None


def build_tasks(names: list[str], manager: Any) -> tuple[list[Any], dict[str, str]]:
    """Task objects (data loaded) for the names that load, and ``{name: reason}`` for the rest."""
    from lm_eval.tasks import get_task_dict

    built: list[Any] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            task_dict = get_task_dict([name], manager)
        except Exception as e:  # datasets / hub errors have no common base class
            skipped[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("task %s skipped: %s", name, skipped[name])
            continue
        built.append(name if any(isinstance(v, dict) for v in task_dict.values()) else next(iter(task_dict.values())))
    return built, skipped


def run_tasks(
    lm: Any,
    specs: list[TaskSpec],
    manager: Any,
    *,
    limit: int | None = None,
    num_fewshot: int | None = 0,
    bootstrap_iters: int = 1000,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``lm`` (an lm-eval ``LM``) on ``specs``; one entry per task, ``status`` ok/skipped."""
    from lm_eval import simple_evaluate

    built, skipped = build_tasks([s.task for s in specs], manager)
    out: dict[str, dict[str, Any]] = {name: {"status": "skipped", "reason": reason} for name, reason in skipped.items()}
    if built:
        res = simple_evaluate(
            model=lm,
            tasks=built,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
        for spec in specs:
            if spec.task in res["results"]:
                out[spec.task] = _task_entry(spec, res, num_fewshot)
    return {s.task: out[s.task] for s in specs if s.task in out}


def _task_entry(spec: TaskSpec, res: dict[str, Any], num_fewshot: int | None) -> dict[str, Any]:
    raw = res["results"][spec.task]
    metrics = {k.split(",")[0]: v for k, v in raw.items() if "," in k and "_stderr" not in k}
    stderr = {k.split(",")[0].replace("_stderr", ""): v for k, v in raw.items() if "_stderr" in k}
    metric = spec.metric or next(iter(metrics))
    if metric not in metrics:
        raise MerinoError(f"task {spec.task}: no metric {metric!r} (it reports {', '.join(metrics)})")
    samples = res.get("n-samples", {}).get(spec.task, {})
    return {
        "status": "ok",
        "column": spec.column,
        "metric": metric,
        "value": metrics[metric],
        "stderr": stderr.get(metric) if isinstance(stderr.get(metric), float) else None,
        "metrics": metrics,
        "version": res.get("versions", {}).get(spec.task),
        "num_fewshot": num_fewshot,
        "samples": samples.get("effective"),
        "samples_total": samples.get("original"),
    }
