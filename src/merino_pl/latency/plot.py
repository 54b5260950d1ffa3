"""Accuracy vs latency bubble chart in the style of the paper's Figure 1 (``merino-pl latency plot``).

x = prefill latency (mean, ms), y = average zero-shot accuracy, bubble diameter ∝ FLOPs (the
paper's convention). Latency comes from latency reports (every model and peer row at the chosen
precision, plain path); accuracy from eval reports, matched by model name, or else from the
paper's Table 2 for the models it lists. ``--paper`` adds the paper's own Jetson Nano points as a
second panel: latencies from different devices are never drawn on one axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merino_pl.core import paper
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_json, write_json
from merino_pl.core.plotting import pyplot, save_figure
from merino_pl.latency.report import LatencyReport


def eval_accuracy(path: str) -> tuple[str, float | None]:
    """(model name, average accuracy) of a ``merino-pl eval`` report (``eval.json``: one score
    per task under ``tasks``); ``None`` when no task finished. The average is over the tasks that
    ran (``status: ok``): the paper's Avg. when the report covers its twelve tasks (offline,
    every task may be skipped: no accuracy then). Only the two fields it needs are read, so a
    report of any ``merino-eval`` version serves."""
    report = read_json(path, "eval report")
    model = report.get("model") if isinstance(report, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    tasks = report.get("tasks") if isinstance(report, dict) else None
    if not isinstance(name, str) or not isinstance(tasks, dict):
        raise MerinoError(f"{path}: not a merino-pl eval report (needs model.name and tasks)")
    scores = [
        t["value"]
        for t in tasks.values()
        if isinstance(t, dict) and t.get("status") == "ok" and isinstance(t.get("value"), (int, float))
    ]
    return name, (sum(scores) / len(scores) if scores else None)


def measured_points(
    latency: list[str], evals: list[str], precision: str
) -> tuple[list[dict[str, Any]], str | None, list[str]]:
    """Points of this device, its description, and the rows left out (no accuracy known)."""
    acc = {name: value for name, value in (eval_accuracy(p) for p in evals) if value is not None}
    published = paper.paper_points()
    points, device, missing = [], None, []
    for path in latency:
        report = LatencyReport.read(path)  # another file, or a newer format: one line naming it
        device = device or report.device["summary"]
        for row in _timed_rows(report, precision):
            name = row["model"]
            accuracy, source = (
                (acc[name], "eval report")
                if name in acc
                else ((published[name].avg_acc, "paper Table 2") if name in published else (None, None))
            )
            if accuracy is None:
                missing.append(name)
                continue
            points.append(
                {
                    "model": name,
                    "latency_ms": row["prefill_ms"]["mean"],
                    "accuracy": accuracy,
                    "flops_g": row.get("flops_g"),
                    "accuracy_from": source,
                }
            )
    return points, device, missing


def _timed_rows(report: LatencyReport, precision: str) -> list[dict[str, Any]]:
    """Each model's plain-path row at ``precision`` (the full forward, as the paper times it); a
    model with none, as in a device kit's report (``latency import``), its onnxruntime row."""
    rows = [r for r in report.rows if r["precision"] == precision]
    plain = {r["model"] for r in rows if r["path"] == "plain"}
    return [r for r in rows if r["path"] == "plain" or (r["path"] == "onnxruntime" and r["model"] not in plain)]


def paper_points() -> list[dict[str, Any]]:
    return [
        {
            "model": n,
            "latency_ms": p.jetson_ms,
            "accuracy": p.avg_acc,
            "flops_g": p.flops_g,
            "accuracy_from": "paper Table 2",
        }
        for n, p in paper.paper_points().items()
    ]


def _family(name: str) -> str:
    return name.split("-")[0]


def _plain_log_ticks(ax: Any) -> None:
    """Tick labels 20, 30, 40 (not 2×10¹) on a log axis; minor ticks labelled within one decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if hi / max(lo, 1e-12) < 10 else NullFormatter())


def draw(
    panels: list[tuple[str, list[dict[str, Any]]]],
    out: Path,
    y: str = "accuracy",
    ylabel: str = "average zero-shot accuracy",
    title: str = "Accuracy vs latency (bubble diameter ∝ FLOPs)",
    log_y: bool = False,
) -> None:
    """One bubble panel per (title, points): x = ``latency_ms``, y = ``point[y]``; diameter ∝
    FLOPs as in the paper. A point is annotated with its ``label`` (default: ``model``), or named
    in the panel's legend when it has a ``legend``; ``color`` overrides its family's colour. The
    pipeline's perplexity-vs-latency chart uses it with ``y="perplexity"`` and a log axis."""
    plt = pyplot()
    colors = {
        "merino": "tab:red",
        "pythia": "tab:green",
        "opt": "tab:blue",
        "gpt2": "tab:orange",
        "cerebras": "tab:purple",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    biggest = max((p["flops_g"] or 0) for _, pts in panels for p in pts) or 1.0
    labels: list[tuple[Any, float]] = []  # (annotation, bubble diameter) in drawing order
    for ax, (panel_title, pts) in zip(axes[0], panels):
        for p in pts:
            diameter = 8 + 52 * (p["flops_g"] or 0) / biggest  # points; marker area = diameter²
            ax.scatter(
                p["latency_ms"],
                p[y],
                s=diameter**2,
                alpha=0.45,
                label=p.get("legend"),
                color=p.get("color") or colors.get(_family(p["model"]), "tab:gray"),
                edgecolors="black",
                linewidths=0.6,
            )
            if not p.get("legend"):  # points close together (one model's precisions) go in a legend instead
                labels.append(
                    (
                        ax.annotate(
                            p.get("label", p["model"]),
                            (p["latency_ms"], p[y]),
                            textcoords="offset points",
                            xytext=(0, diameter / 2 + 2),
                            ha="center",
                            va="bottom",
                            fontsize=8,
                        ),
                        diameter,
                    )
                )
        if any(p.get("legend") for p in pts):
            ax.legend(fontsize=8, loc="best")
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("latency, prefill batch 1 (ms)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        ax.margins(0.18)
        ax.grid(alpha=0.3, which="both" if log_y else "major")
    fig.suptitle(title)
    fig.tight_layout()  # the labels are placed on the final layout
    _declutter(fig, labels)
    save_figure(fig, out, dpi=130)


def _declutter(fig: Any, labels: list[tuple[Any, float]]) -> None:
    """Move each label (above its bubble by default) below, right or left of it when it would
    overlap a label already placed; the first free place wins, else it stays above."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for ann, d in labels:
        r = d / 2 + 2
        for offset, ha, va in (
            ((0, r), "center", "bottom"),
            ((0, -r), "center", "top"),
            ((r + 1, 0), "left", "center"),
            ((-r - 1, 0), "right", "center"),
            ((0, r), "center", "bottom"),
        ):
            ann.xyann = offset
            ann.set_horizontalalignment(ha)
            ann.set_verticalalignment(va)
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def plot(latency: list[str], evals: list[str], paper: bool, precision: str, out: str | Path) -> Path:
    """Collect the points, draw the chart, write PNG + points JSON (``merino-pl latency plot``)."""
    if not latency and not paper:
        raise MerinoError("nothing to plot: give --latency REPORT.json ... and/or --paper")
    points, device, missing = measured_points(latency, evals, precision)
    panels = []
    if latency:
        if not points and paper:
            print(
                f"note: no accuracy for {', '.join(missing)} (eval reports without a finished task): "
                "only the paper's panel is drawn"
            )
        elif not points:
            raise MerinoError(
                f"no {precision} plain-path row with a known accuracy in {', '.join(latency)} "
                f"(models without accuracy: {', '.join(missing) or 'none'})"
            )
        if points:
            panels.append((f"measured on {device} ({precision})", points))
    if paper:
        panels.append(("paper (Jetson Nano, Tables 2-3)", paper_points()))
    out = Path(out)
    draw(panels, out)
    write_json(
        out.with_suffix(".json"), {"panels": [{"title": t, "points": p} for t, p in panels], "no_accuracy": missing}
    )
    print(
        f"wrote {out} ({sum(len(p) for _, p in panels)} points)"
        + (f"; no accuracy for {', '.join(missing)}" if missing else "")
    )
    return out
