"""The pictures of a pipeline run, drawn by its summary step into ``OUT/plots/`` (``core.plotting``:
headless, written atomically).

* ``training-loss.png``: the fit's training loss per logged step (and its validation loss), from
  the CSVLogger's ``metrics.csv`` under ``OUT/fit`` (a resumed run writes one per version; for a
  step logged twice the later version wins).
* ``perplexity-vs-latency.png``: word perplexity vs prefill latency of this run's model at each
  precision (its eval and latency reports, paired by precision), beside the paper's Table 3
  (Jetson Nano). Drawn when no zero-shot accuracy of ours is known (offline the tasks' data is
  out of reach); with one, the plot stage's ``accuracy-vs-latency.png`` carries our points.
* ``precisions.png``: size on disk, perplexity and prefill latency per precision (fp32 / int8 / int4).

Only the reports' files are read (stages meet through files: docs/architecture.md), once per
summary (``reports.load_reports``, each through its stage's own schema); the bubble chart is
``latency plot``'s renderer.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merino_pl.core.paper import paper_baselines
from merino_pl.core.plotting import pyplot, save_figure
from merino_pl.pipeline.layout import RunLayout
from merino_pl.pipeline.reports import ModelReports

if TYPE_CHECKING:
    from merino_pl.latency.report import LatencyReport

PRECISION_COLORS = {"fp32": "tab:blue", "int8": "tab:orange", "int4": "tab:red"}
PPL_DATASETS = ("wikitext2", "ptb")  # the paper's Table 3, in its order
DPI = 130
CROSS_DOMAIN = "; WikiText-2 is cross-domain for this model: its in-domain figures are in the table below"


@dataclass
class PrecisionRow:
    """One precision of this run's model, as its reports give it (None: not measured)."""

    label: str  # fp32 / int8 / int4
    model: str | None = None
    size_mb: float | None = None  # weight files on disk (*.safetensors)
    perplexity: float | None = None  # word perplexity on ``dataset``
    dataset: str | None = None
    latency_ms: float | None = None  # prefill mean, plain path (the paper's protocol)
    flops_g: float | None = None
    nats_per_char: float | None = None  # held-out, in-domain (the summary's ``plots/heldout.json``)


def heldout_nats_per_char(cache: Path) -> dict[str, float]:
    """Precision label -> held-out in-domain nats / character, from the summary's held-out cache
    (``merino_pl.eval.intrinsic.demo_section`` writes it; empty when this run did not train)."""
    import json

    try:
        figures = json.loads(cache.read_text(encoding="utf-8"))["figures"]
        return {label: float(f["indomain"]["nats_per_char"]) for label, f in figures.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def precision_rows(reports: list[ModelReports], heldout: dict[str, float] | None = None) -> list[PrecisionRow]:
    """One row per model of the run (``heldout``: label -> in-domain nats / character)."""
    rows = []
    for m in reports:
        row = PrecisionRow(m.label, nats_per_char=(heldout or {}).get(m.label))
        weights = list(m.model_dir.glob("*.safetensors")) if m.model_dir.is_dir() else []
        row.size_mb = sum(p.stat().st_size for p in weights) / 1e6 if weights else None
        ev = m.eval
        row.model = ev.model.name if ev else None
        ppl = ev.perplexity if ev else {}
        row.dataset = next((k for k in (*PPL_DATASETS, *ppl) if (ppl.get(k) or {}).get("word_perplexity")), None)
        row.perplexity = ppl[row.dataset]["word_perplexity"] if row.dataset else None
        lat = m.latency_row()
        if lat:
            row.latency_ms, row.flops_g = lat["prefill_ms"]["mean"], lat.get("flops_g")
            row.model = row.model or lat.get("model")
        rows.append(row)
    return rows


def accuracy_known(reports: list[ModelReports]) -> bool:
    """Whether any eval report of this run has a finished zero-shot task."""
    return any(m.eval and m.eval.ok_tasks() for m in reports)


# ---- training loss -------------------------------------------------------------------------------
def loss_history(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """({step: train loss}, {step: validation loss}) from every ``metrics.csv`` under ``run_dir``."""

    def version(path: Path) -> int:
        m = re.search(r"version_(\d+)", str(path))
        return int(m.group(1)) if m else -1

    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for path in sorted(run_dir.rglob("metrics.csv"), key=version):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                if row.get("train/loss"):
                    train[step] = float(row["train/loss"])
                if row.get("val/loss"):
                    val[step] = float(row["val/loss"])
    return dict(sorted(train.items())), dict(sorted(val.items()))


def draw_loss_curve(train: dict[int, float], val: dict[int, float], title: str, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps, losses = list(train), list(train.values())
    smooth = len(losses) >= 20
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if smooth else 1.0, lw=1, label="train loss (logged steps)")
    if smooth:  # an exponential moving average, so the trend reads through the batch-to-batch noise
        ema, acc = [], losses[0]
        for x in losses:
            acc = 0.9 * acc + 0.1 * x
            ema.append(acc)
        ax.plot(steps, ema, color="tab:blue", lw=2, label="train loss (EMA 0.9)")
    if val:
        ax.plot(list(val), list(val.values()), "o-", color="tab:red", ms=5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out, dpi=DPI)


# ---- perplexity vs latency ------------------------------------------------------------------------
def _number(text: Any) -> float | None:
    m = re.match(r"\s*([0-9.]+)", str(text))
    return float(m.group(1)) if m else None


def paper_perplexity_points(dataset: str) -> list[dict[str, Any]]:
    """The paper's Table 3: Jetson Nano latency, FLOPs and word perplexity on ``dataset``."""
    rows = paper_baselines()["table3"]["rows"]
    return [
        {
            "model": r["model"].lower(),
            "label": r["model"],
            "latency_ms": _number(r["latency"]),
            "flops_g": _number(r["flops"]),
            "perplexity": float(r[dataset]),
        }
        for r in rows
        if dataset in r
    ]


def draw_perplexity_vs_latency(
    rows: list[PrecisionRow], report: LatencyReport | None, out: Path, cross_domain: bool = False
) -> bool:
    """Our precisions (and the peers timed here by the float model's latency ``report``, with the
    paper's perplexity) beside the paper's points; False when no precision has both a perplexity
    and a latency. ``cross_domain``: the model was trained on other text (its held-out in-domain
    figures exist), so its points say so."""
    from merino_pl.latency.plot import draw

    ours = [r for r in rows if r.perplexity is not None and r.latency_ms is not None]
    if not ours:
        return False
    dataset = ours[0].dataset
    points = [
        {
            "model": r.model or "ours",
            "legend": f"{r.model} {r.label} (this run{', cross-domain' if cross_domain else ''})",
            "latency_ms": r.latency_ms,
            "perplexity": r.perplexity,
            "flops_g": r.flops_g,
            "color": PRECISION_COLORS.get(r.label),
        }
        for r in ours
        if r.dataset == dataset
    ]
    paper = paper_perplexity_points(dataset) if dataset in PPL_DATASETS else []
    by_name = {p["model"]: p for p in paper}
    device = report.device.get("summary", "this machine") if report else "this machine"
    for r in report.rows if report else []:  # peers timed on this device: the paper's perplexity
        if r.get("role") != "model" and r.get("path") == "plain" and r.get("model") in by_name:
            points.append(
                {
                    "model": r["model"],
                    "label": f"{r['model']} (paper ppl)",
                    "latency_ms": r["prefill_ms"]["mean"],
                    "perplexity": by_name[r["model"]]["perplexity"],
                    "flops_g": r.get("flops_g"),
                }
            )
    panels = [(f"measured on {device}", points)]
    if paper:
        panels.append(("paper (Jetson Nano, Table 3)", paper))
    draw(
        panels,
        out,
        y="perplexity",
        ylabel=f"{dataset} word perplexity (log; lower is better)",
        title="Perplexity vs latency (bubble diameter ∝ FLOPs)",
        log_y=True,
    )
    return True


# ---- per precision --------------------------------------------------------------------------------
def draw_precision_bars(rows: list[PrecisionRow], out: Path) -> None:
    plt = pyplot()
    dataset = next((r.dataset for r in rows if r.dataset), "held-out")
    quality = (f"{dataset} word perplexity", "perplexity", "{:.1f}")
    if any(r.nats_per_char is not None for r in rows):  # in-domain, tokenizer-independent: the honest figure
        quality = ("held-out nats / character (in-domain)", "nats_per_char", "{:.3f}")
    panels = [("size on disk (MB)", "size_mb", "{:.1f}"), quality, ("prefill latency (ms)", "latency_ms", "{:.2f}")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    labels = [r.label for r in rows]
    for ax, (title, key, fmt) in zip(axes, panels):
        values = [getattr(r, key) for r in rows]
        bars = ax.bar(labels, [v or 0 for v in values], color=[PRECISION_COLORS.get(lb, "tab:gray") for lb in labels])
        for bar, v in zip(bars, values):
            ax.annotate(
                fmt.format(v) if v is not None else "n/a",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
        ax.grid(alpha=0.3, axis="y")
    model = next((r.model for r in rows if r.model), "the model")
    fig.suptitle(f"{model} per precision")
    save_figure(fig, out, dpi=DPI)


# ---- the summary's section --------------------------------------------------------------------------
def summary_plots(layout: RunLayout, reports: list[ModelReports]) -> tuple[list[str], list[Path]]:
    """Draw the run's pictures into ``layout.plots``; the summary.md lines that show them (each
    missing picture says why) and the files they show or link."""
    out, plots = layout.out, layout.plots
    lines: list[str] = ["## Plots", ""]
    shown: list[Path] = []

    def show(path: Path, caption: str) -> None:
        rel = path.relative_to(out)
        lines.extend([f"{caption}", "", f"![{rel}]({rel})", ""])
        shown.append(path)

    train, val = loss_history(layout.fit_dir)
    if train:
        draw_loss_curve(
            train,
            val,
            f"training loss ({len(train)} logged steps, last {train[max(train)]:.3f})",
            plots / "training-loss.png",
        )
        show(plots / "training-loss.png", "**Training loss** (from the fit's CSV log):")
    elif not layout.trains:
        lines += ["**Training loss**: not here (this run started from a trained checkpoint).", ""]
    else:
        lines += ["**Training loss**: no `metrics.csv` under `fit/` (the fit config has no CSVLogger).", ""]
    heldout = heldout_nats_per_char(plots / "heldout.json")
    rows = precision_rows(reports, heldout)
    acc_png = layout.accuracy_png
    ppl_png = plots / "perplexity-vs-latency.png"
    fp32_latency = next((m.latency for m in reports if m.label == "fp32"), None)
    if accuracy_known(reports) and acc_png.exists():
        ppl_png.unlink(missing_ok=True)
        show(acc_png, "**Accuracy vs latency** (paper Figure 1 layout):")
    elif draw_perplexity_vs_latency(rows, fp32_latency, ppl_png, cross_domain=bool(heldout)):
        note = ""
        if acc_png.exists():  # drawn by the plot stage without a point of ours: a link, not a picture
            note = f"; the [accuracy-vs-latency chart]({acc_png.relative_to(out)}) has no point of this run's model"
            shown.append(acc_png)
        show(
            ppl_png,
            f"**Perplexity vs latency** (no zero-shot accuracy in this run's eval reports: offline, "
            f"the tasks' data is out of reach{note}{CROSS_DOMAIN if heldout else ''}):",
        )
    else:
        lines += ["**Perplexity / accuracy vs latency**: no precision has both an eval and a latency report.", ""]
    if len(rows) > 1 or any(r.perplexity or r.latency_ms for r in rows):
        draw_precision_bars(rows, plots / "precisions.png")
        what = "held-out nats / character" if heldout else "perplexity"
        show(plots / "precisions.png", f"**Per precision**: weight files, {what}, prefill latency:")
    return lines, shown
