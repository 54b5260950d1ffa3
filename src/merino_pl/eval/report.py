"""The eval report: one schema (``EvalReport``: JSON, everything) and its renderers, Markdown in
the layout of the paper's Tables 2–3.

Our row sits under the paper's baseline rows; columns we did not evaluate show ``—``, skipped
tasks are listed with their reason, and every perplexity carries its protocol, because
figures under different protocols are not comparable. ``table2_lines`` / ``table3_lines`` render
several of our reports under the paper's rows: the pipeline's summary (one row per precision)
reads each ``eval.json`` with ``EvalReport.read`` and calls them rather than keeping a copy.
``paper_baselines`` is the paper's rows they lay out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from merino_pl.core.errors import MerinoError
from merino_pl.core.report import FileReport, check_version
from merino_pl.eval.tasks import paper_baselines, paper_tasks

FORMAT = "merino-eval/1"
FORMAT_VERSION = 1


@dataclass
class EvalModel:
    """The model an eval report measured."""

    name: str
    path: str
    kind: str  # lightning-ckpt, hf-dir, gptq, recipe (fresh initialisation)
    weights_sha256: str | None  # None: a fresh initialisation from the recipe
    params_m: float
    gflops: float
    context: int  # max_position_embeddings
    architecture: dict[str, Any]
    trained_context: int | None = None  # the seq_len it was trained at (None: not recorded)
    window: int | None = None  # tokens of context it was scored with (lm-eval max_length, perplexity window)


@dataclass
class EvalReport(FileReport):
    """What ``merino-pl eval`` writes to ``eval.json`` (and ``eval.md``). ``tasks`` maps an lm-eval task to its
    result (``status`` ok / skipped, ``value``, ``metric``, ``stderr``, ``version``, ``metrics``
    or ``reason``); ``perplexity`` maps a corpus to its result (``status``, word / token
    perplexity, bits per byte, ``protocol``, sizes; or ``reason``)."""

    model: EvalModel
    tasks: dict[str, dict[str, Any]]
    perplexity: dict[str, dict[str, Any]]
    backend: str = "merino"
    lm_eval_version: str = ""
    limit: int | None = None
    arguments: dict[str, Any] = field(default_factory=dict)  # the EvalSettings it ran with
    created: str = ""  # ISO 8601, UTC
    format_version: int = FORMAT_VERSION

    json_name: ClassVar[str] = "eval.json"
    markdown_name: ClassVar[str] = "eval.md"
    what: ClassVar[str] = "eval report"

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``eval.json`` (the keys of ``merino-eval/1`` plus ``format_version``)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "created": self.created,
            "arguments": self.arguments,
            "model": dataclasses.asdict(self.model),
            "backend": self.backend,
            "lm_eval_version": self.lm_eval_version,
            "limit": self.limit,
            "tasks": self.tasks,
            "perplexity": self.perplexity,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "eval report") -> EvalReport:
        """The report in ``data`` (a parsed ``eval.json``); a ``MerinoError`` naming ``source``
        and what is wrong when it is not one this version reads."""
        version = check_version(data, "eval report", source, FORMAT_VERSION, FORMAT)
        fields = dataclasses.fields(EvalModel)
        names = [f.name for f in fields]
        required = [f.name for f in fields if f.default is dataclasses.MISSING]  # later fields: older reports lack them
        model = data.get("model")
        missing = [k for k in ("model", "tasks", "perplexity") if not isinstance(data.get(k), dict)]
        missing += [f"model.{k}" for k in required if isinstance(model, dict) and k not in model]
        if missing:
            raise MerinoError(f"{source}: eval report without {', '.join(missing)}")
        return cls(
            model=EvalModel(**{k: model[k] for k in names if k in model}),
            tasks=data["tasks"],
            perplexity=data["perplexity"],
            backend=data.get("backend", "merino"),
            lm_eval_version=data.get("lm_eval_version", ""),
            limit=data.get("limit"),
            arguments=data.get("arguments") or {},
            created=data.get("created", ""),
            format_version=version,
        )

    def markdown(self) -> str:
        return markdown(self)

    def ok_tasks(self) -> dict[str, dict[str, Any]]:
        """The tasks that finished (skipped ones left out)."""
        return {name: t for name, t in self.tasks.items() if t.get("status") == "ok"}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _ours(report: EvalReport, label: str) -> str:
    """Our row's name: the model's, and the label (the pipeline's precision) when there is one."""
    return f"**{report.model.name}{' ' + label if label else ''} (ours)**"


def table2_lines(reports: Sequence[tuple[str, EvalReport]]) -> list[str]:
    """Zero-shot accuracy table: the paper's rows, then one row per ``(label, report)`` of ours
    (paper tasks only, in its order)."""
    base = paper_baselines()["table2"]
    lines = [
        "| model | params | " + " | ".join(base["columns"]) + " | Avg. |",
        "|---|---|" + "---|" * (len(base["columns"]) + 1),
    ]
    for row in base["rows"]:
        cells = [_fmt(s) for s in row["scores"]] + [_fmt(row["avg"])]
        lines.append(f"| {row['model']} (paper) | {row['params']} | " + " | ".join(cells) + " |")
    for label, report in reports:
        by_column = {t.column: report.tasks.get(t.task, {}) for t in paper_tasks()}
        ours = [by_column[c].get("value") if by_column[c].get("status") == "ok" else None for c in base["columns"]]
        avg = sum(ours) / len(ours) if all(v is not None for v in ours) else None
        lines.append(
            f"| {_ours(report, label)} | {report.model.params_m:.1f} M | "
            + " | ".join(_fmt(v) for v in ours)
            + f" | {_fmt(avg)} |"
        )
    return lines


def table3_lines(reports: Sequence[tuple[str, EvalReport, float | None]], latency_header: str = "latency") -> list[str]:
    """Perplexity table: the paper's rows, then one row per ``(label, report, latency_ms)`` of
    ours (word perplexity, the paper's unit, with its window; no latency measured: ``—``)."""
    lines = [f"| model | FLOPs | {latency_header} | WikiText-2 | PTB |", "|---|---|---|---|---|"]
    for row in paper_baselines()["table3"]["rows"]:
        lines.append(
            f"| {row['model']} (paper) | {row['flops']} | {row['latency']} | {row['wikitext2']} | {row['ptb']} |"
        )
    for label, report, latency_ms in reports:
        ppl = report.perplexity
        cells = [_ppl_cell(ppl.get(k, {})) for k in ("wikitext2", "ptb")]
        lines.append(
            f"| {_ours(report, label)} | {report.model.gflops:.3g} G | {_fmt(latency_ms, 2)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _ppl_cell(result: dict[str, Any]) -> str:
    """Word perplexity with the window it was scored at (figures at other windows do not compare)."""
    value = _fmt(result.get("word_perplexity"), 2)
    window = (result.get("protocol") or {}).get("window")
    return f"{value} (window {window})" if window and result.get("word_perplexity") is not None else value


def table2(report: EvalReport) -> str:
    """Zero-shot accuracy table: the paper's rows, then ours (paper tasks only, in its order)."""
    return "\n".join(table2_lines([("", report)]))


def table3(report: EvalReport) -> str:
    """Perplexity table: the paper's rows, then ours (word perplexity, the paper's unit)."""
    return "\n".join(table3_lines([("", report, None)]))


def _other_tasks(report: EvalReport) -> list[str]:
    paper = {t.task for t in paper_tasks()}
    rows = []
    for name, t in report.tasks.items():
        if t["status"] == "ok" and name not in paper:
            extra = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in t["metrics"].items())
            rows.append(
                f"| {name} | {t['metric']} | {_fmt(t['value'], 4)} | {_fmt(t.get('stderr'), 4)} | "
                f"v{t['version']} | {extra} |"
            )
    return rows


def _ppl_rows(report: EvalReport) -> list[str]:
    rows = []
    for name, p in report.perplexity.items():
        if p.get("status") == "skipped":
            continue
        pr = p["protocol"]
        rows.append(
            f"| {name} | {_fmt(p['word_perplexity'], 2)} | {_fmt(p['token_perplexity'], 2)} | "
            f"{_fmt(p['bits_per_byte'], 4)} | {pr['mode']} | {pr['window']} | {pr['stride']} | "
            f"{p['documents']} docs, {p['tokens']} tokens, {p['words']} words | {pr['source']} |"
        )
    return rows


def markdown(report: EvalReport) -> str:
    m = report.model
    out = [
        f"# Evaluation of {m.name}",
        "",
        f"- model: `{m.path}` ({m.kind}), {m.params_m:.2f} M parameters",
        f"- context: scored with {m.window or m.context} tokens; trained at "
        f"{m.trained_context if m.trained_context else 'not recorded'}; max_position_embeddings {m.context}",
        f"- weights SHA-256: `{m.weights_sha256 or 'none (fresh initialisation from the recipe)'}`",
        f"- backend: {report.backend}, lm-eval {report.lm_eval_version}, limit {report.limit}",
        "",
        "## Zero-shot accuracy (paper Table 2 layout)",
        "",
        table2(report),
        "",
        "## Perplexity (paper Table 3 layout; word perplexity)",
        "",
        table3(report),
        "",
        "Protocols (the paper does not state its own; compare like with like):",
        "",
        "| data | word ppl | token ppl | bits/byte | mode | window | stride | size | source |",
        "|---|---|---|---|---|---|---|---|---|",
        *_ppl_rows(report),
    ]
    other = _other_tasks(report)
    if other:
        out += [
            "",
            "## Other tasks",
            "",
            "| task | metric | value | stderr | version | all metrics |",
            "|---|---|---|---|---|---|",
            *other,
        ]
    skipped = {
        **{k: v for k, v in report.tasks.items() if v["status"] == "skipped"},
        **{k: v for k, v in report.perplexity.items() if v.get("status") == "skipped"},
    }
    if skipped:
        out += ["", "## Skipped", ""] + [f"- `{k}`: {v['reason']}" for k, v in skipped.items()]
    return "\n".join(out) + "\n"


def plot(report: EvalReport, path: Path) -> Path | None:
    """Accuracy per paper task: ours against the paper's MeRino rows (None if no task ran)."""
    columns = [t for t in paper_tasks() if report.tasks.get(t.task, {}).get("status") == "ok"]
    if not columns:
        return None
    from merino_pl.core.plotting import pyplot, save_figure

    plt = pyplot()
    base = paper_baselines()["table2"]
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(columns))
    for row in (r for r in base["rows"] if r["model"].startswith("MeRino")):
        scores = dict(zip(base["columns"], row["scores"]))
        ax.plot(xs, [scores[c.column] for c in columns], "o--", alpha=0.6, label=f"{row['model']} (paper)")
    ax.plot(
        xs,
        [report.tasks[c.task]["value"] for c in columns],
        "s-",
        color="black",
        label=f"{report.model.name} (ours)",
    )
    ax.set_xticks(list(xs), [c.column for c in columns], rotation=30)
    ax.set_ylabel("zero-shot accuracy")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
    return path


def write(report: EvalReport, out: str | Path) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` (``FileReport.write``) and (when tasks ran)
    ``accuracy.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.write(out)
    paths = {"json": out / EvalReport.json_name, "markdown": out / EvalReport.markdown_name}
    png = plot(report, out / "accuracy.png")
    if png:
        paths["plot"] = png
    return paths
