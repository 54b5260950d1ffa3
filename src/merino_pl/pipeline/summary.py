"""``OUT/summary.md``: the stages (ran / skipped, seconds, outputs), the run's pictures
(``plots``), the paper's Tables 2 and 3 with this run's rows (drawn by the eval report's own
renderer), and links to every report and plot. Each report is read once (``reports``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merino_pl.core.io import atomic_write_text
from merino_pl.pipeline.config import PipelineSettings
from merino_pl.pipeline.layout import RunLayout
from merino_pl.pipeline.plots import summary_plots
from merino_pl.pipeline.reports import ModelReports, load_reports
from merino_pl.pipeline.stages import Stage


def _fmt(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _tables(layout: RunLayout, reports: list[ModelReports]) -> list[str]:
    """Paper Tables 2 and 3 with this run's rows (one per precision) under the paper's, drawn
    by the eval report's own renderer."""
    from merino_pl.eval.report import table2_lines, table3_lines

    ours = [m for m in reports if m.eval] if layout.evaluates else []
    if not ours:
        return []
    t2 = table2_lines([(m.label, m.eval) for m in ours])
    t3 = table3_lines([(m.label, m.eval, m.prefill_ms()) for m in ours], latency_header="latency (ms)")
    lat_note = next(
        (
            f"{r.device['summary']}, batch {r.protocol['batch']}, "
            f"sequence {r.protocol['seq_len']}, mean of {r.protocol['runs']} prefill runs"
            for r in (m.latency for m in reports)
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


def _heldout(cfg: PipelineSettings, layout: RunLayout) -> list[str]:
    """Held-out nats / character and bits / byte per precision at the trained context, and what
    each model writes (``merino_pl.eval.intrinsic``), for a run that trained its models."""
    from merino_pl.core.errors import MerinoError
    from merino_pl.core.io import read_yaml
    from merino_pl.eval.intrinsic import demo_section

    models = {label: path for label, path in layout.models.items() if path.exists()}
    if not layout.trains or not models or not cfg.fit.get("config"):
        return []
    data = (read_yaml(Path(cfg.fit["config"]), "fit config") or {}).get("data") or {}
    try:
        return [*demo_section(models, data.get("init_args", data), layout.plots / "heldout.json"), ""]
    except MerinoError as e:  # e.g. a hub corpus offline: the rest of the summary still stands
        return ["## Held-out quality at the trained context", "", f"Not measured: {e}", ""]


def write_summary(cfg: PipelineSettings, layout: RunLayout, stages: list[Stage], seconds: dict[str, Any]) -> Path:
    """Write ``OUT/summary.md`` (``seconds``: stage name -> its recorded run time) and the
    pictures it shows; returns its path."""
    out = layout.out
    lines = [
        f"# Pipeline `{cfg.name}`",
        "",
        f"Config: `{cfg.source}`. Every path below is relative to this file.",
        "",
        "| stage | status | seconds | outputs |",
        "|---|---|---|---|",
    ]
    for s in stages:
        links = ", ".join(f"[{p.relative_to(out)}]({p.relative_to(out)})" for p in s.outputs)
        lines.append(f"| {s.name} | {s.status} | {_fmt(seconds.get(s.name), 1)} | {links} |")
    reports = load_reports(layout)
    heldout = _heldout(cfg, layout)  # first: the per-precision chart shows its in-domain figure
    plot_lines, shown = summary_plots(layout, reports)
    lines += ["", *plot_lines, *heldout, *_tables(layout, reports), "## Reports and plots", ""]
    for p in sorted(out.glob("*/**/*")):
        if p.suffix in (".md", ".png") and p.is_file() and "logs" not in p.parts and p not in shown:
            rel = p.relative_to(out)
            lines.append(f"- ![{rel}]({rel})" if p.suffix == ".png" else f"- [{rel}]({rel})")
    atomic_write_text(layout.summary, "\n".join(lines) + "\n")
    return layout.summary
