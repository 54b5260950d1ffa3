"""The paper's published figures (MeRino, AAAI 2025, arXiv 2403.07921: Tables 2 and 3).

One file holds them: ``paper-baselines.yaml``, shipped in the package beside eval's task list
(``merino_pl/eval/paper/``; ``eval/`` at the repository root keeps the copy users read). Eval
lays its rows out beside ours (``paper_baselines``); latency and its chart take the per-model
figures (``paper_points``: params, FLOPs, Jetson Nano latency, average zero-shot accuracy) by
the names its peers and recipes go by (``PAPER_NAMES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_yaml

# our name (a latency peer, a shipped recipe) -> the model's name in the paper's tables
PAPER_NAMES: dict[str, str] = {
    "pythia-70m": "Pythia-70M",
    "pythia-160m": "Pythia-162M",  # EleutherAI/pythia-160m, which the paper calls 162M
    "cerebras-111m": "Cerebras-111M",
    "gpt2": "GPT-2-124M",
    "opt-125m": "OPT-125M",
    "opt-350m": "OPT-350M",
    "merino-52m": "MeRino-52M",
    "merino-61m": "MeRino-61M",
    "merino-64m": "MeRino-64M",
}


def baselines_file() -> Path:
    """The one file of the paper's figures."""
    return Path(str(resources.files("merino_pl").joinpath("eval", "paper", "paper-baselines.yaml")))


def paper_baselines() -> dict[str, Any]:
    """The paper's Table 2 and Table 3 rows as transcribed (``table2`` / ``table3``: columns, rows)."""
    return read_yaml(baselines_file(), "paper baselines")


@dataclass(frozen=True)
class PaperPoint:
    """One model in the paper: params (M), FLOPs (G, Table 3), Jetson Nano latency (ms, Table 3),
    average zero-shot accuracy (Table 2)."""

    params_m: float
    flops_g: float
    jetson_ms: float
    avg_acc: float


def _number(text: Any) -> float:
    """``"70 M"`` -> 70, ``"95 ms"`` -> 95 (a number stays as it is)."""
    value = float(str(text).split()[0])
    return int(value) if value.is_integer() else value


def paper_points() -> dict[str, PaperPoint]:
    """Our name -> the paper's figures, in the tables' order."""
    data = paper_baselines()
    try:
        table2 = {r["model"]: r for r in data["table2"]["rows"]}
        points = {}
        for row in data["table3"]["rows"]:
            name = next(ours for ours, theirs in PAPER_NAMES.items() if theirs == row["model"])
            acc = table2[row["model"]]
            points[name] = PaperPoint(
                _number(acc["params"]), _number(row["flops"]), _number(row["latency"]), acc["avg"]
            )
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise MerinoError(f"{baselines_file()}: not the paper's tables ({type(e).__name__}: {e})") from None
    return points
