"""The reports of one run, each read once per summary through its stage's own schema
(``EvalReport.read``, ``LatencyReport.read``) and shared by the summary's tables and pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merino_pl.core.errors import MerinoError
from merino_pl.eval.report import EvalReport
from merino_pl.pipeline.layout import RunLayout

if TYPE_CHECKING:
    from merino_pl.latency.report import LatencyReport


@dataclass
class ModelReports:
    """What this run measured of one model (None: that report is missing or not one)."""

    label: str  # fp32 / int8 / int4
    model_dir: Path
    eval: EvalReport | None
    latency: LatencyReport | None

    def latency_row(self) -> dict[str, Any] | None:
        """Our model's row at this precision on the plain path (the paper's protocol)."""
        return model_latency_row(self.latency, self.label)

    def prefill_ms(self) -> float | None:
        """Our model's prefill mean at this precision (the paper's protocol), None if not timed."""
        row = self.latency_row()
        return row["prefill_ms"]["mean"] if row else None


def load_reports(layout: RunLayout) -> list[ModelReports]:
    """One ``ModelReports`` per model of the run, in the layout's order."""
    return [
        ModelReports(label, path, read_eval(layout.eval_json(label)), read_latency(layout.latency_json(label)))
        for label, path in layout.models.items()
    ]


def read_eval(path: Path) -> EvalReport | None:
    """An eval report (``merino-pl eval``'s ``eval.json``), None when missing or not one."""
    try:
        return EvalReport.read(path)
    except MerinoError:
        return None


def read_latency(path: Path) -> LatencyReport | None:
    """A latency report (``merino-pl latency``'s ``latency.json``), None when missing or not one."""
    from merino_pl.latency.report import LatencyReport  # imported once a summary is written

    try:
        return LatencyReport.read(path)
    except MerinoError:
        return None


def model_latency_row(report: LatencyReport | None, precision: str) -> dict[str, Any] | None:
    """A latency report's row of our model at ``precision`` on the plain path (the paper's
    protocol), None when it has none."""
    for row in report.rows if report else []:
        if row.get("role") == "model" and row.get("precision") == precision and row.get("path") == "plain":
            return row
    return None
