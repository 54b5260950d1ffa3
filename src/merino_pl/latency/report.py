"""The latency report's schema and Markdown: ``LatencyReport`` (``latency.json``) and ``latency.md``.

A report holds, for one model on one device: the device, the protocol, one row per model /
precision / path (prefill and per-token decode: mean / median / p90 and their spread), the
generation rows, the paper protocol's rows, the speed-ups, the output checks and the warnings.
``merino-pl latency`` measures it (``api.latency``, rows from ``measure.ReportBuilder``);
``merino-pl latency plot`` and the pipeline's summary read it back with ``LatencyReport.read``.

No torch here: reading and rendering a report is cheap (``python -X importtime`` shows it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from merino_pl.core.report import FileReport, check_version, from_fields

FORMAT = "merino-latency-report/1"
FORMAT_VERSION = 1  # bump with FORMAT when a key changes meaning or goes away (files without it are version 1)
JSON_NAME, MARKDOWN_NAME = "latency.json", "latency.md"
# spread beyond which a row's timings (and every ratio using them) are flagged as untrustworthy
CV_LIMIT, P90_LIMIT = 0.15, 1.5


def spread(stats: dict[str, float]) -> tuple[float, float]:
    """(CV, p90 / median) of a row's timing statistics (computed for files that predate the keys)."""
    cv = stats.get("cv", stats["std"] / stats["mean"] if stats["mean"] else 0.0)
    tail = stats.get("p90_over_median", stats["p90"] / stats["median"] if stats["median"] else 1.0)
    return cv, tail


@dataclass(kw_only=True)
class LatencyReport(FileReport):
    """One latency report: the keys of ``latency.json`` (the rows, checks and ratios are plain
    JSON objects, described in docs/latency.md)."""

    json_name: ClassVar[str] = JSON_NAME
    markdown_name: ClassVar[str] = MARKDOWN_NAME
    what: ClassVar[str] = "latency report"

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    model: dict[str, Any]  # name, kind, path, weights_sha256, size on disk, params, FLOPs, architecture
    device: dict[str, Any]  # device.describe_device
    torch: str
    transformers: str
    onnxruntime: str | None
    executorch: str | None = None  # the ExecuTorch version, with --runtime executorch (its rows: runtime "executorch")
    precisions: list[str]
    protocol: dict[str, Any]  # options.Options.protocol
    rows: list[dict[str, Any]]  # the full protocol: one per model / precision / path
    generation: list[dict[str, Any]]
    paper_protocol: dict[str, Any] | None  # rows and speedups under the authors' protocol
    speedups: list[dict[str, Any]]
    fast_path: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str = "latency report") -> LatencyReport:
        """The report of a ``to_json`` object; another format, a newer version or a missing key
        is a ``MerinoError``."""
        check_version(data, "latency report", source, FORMAT_VERSION, FORMAT)
        return from_fields(cls, data, "latency report", source, optional=("format_version", "created", "executorch"))

    def markdown(self) -> str:
        return render_markdown(self)


# ---- Markdown ---------------------------------------------------------------------------------
def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _stats(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} / {s['median']:.2f} / {s['p90']:.2f}"


def _spread(s: dict[str, float]) -> str:
    cv = s.get("cv", s["std"] / s["mean"] if s["mean"] else 0.0)
    flag = " ⚠" if cv > CV_LIMIT or s["p90"] > P90_LIMIT * s["median"] else ""
    return f"{100 * cv:.0f}{flag}"


def _x(r: dict[str, float], key: str) -> str:
    median = r.get(f"{key}_median")
    return f"{r[key]:.2f}" + (f" / {median:.2f}" if median is not None else "")


def _path(row: dict[str, Any]) -> str:
    """The path, and an ExecuTorch row's program kind (its int4 is 8da4w, not the GPTQ format)."""
    return row["path"] + (f" ({row['scheme']})" if row.get("scheme") else "")


def _gpu(gpu: dict[str, Any] | None) -> str:
    return f"{gpu['name']} CUDA {gpu['cuda_runtime']} driver {gpu['driver']}" if gpu else "–"


def render_markdown(report: LatencyReport | dict[str, Any]) -> str:
    """The report (or its JSON object, as ``latency.json`` holds it) as Markdown: device,
    protocol, the rows, speed-ups, checks."""
    r = report.to_json() if isinstance(report, LatencyReport) else report
    sections = (_header, _rows, _generation, _paper, _speedups, _fast_path, _checks, _notes)
    return "\n".join(line for section in sections for line in section(r)) + "\n"


def _header(r: dict[str, Any]) -> list[str]:
    d, p, m = r["device"], r["protocol"], r["model"]
    return [
        f"# Latency: {m['name']} on {d['summary']}",
        "",
        f"- model: `{m['path']}` ({m['kind']}), {m['params'] / 1e6:.1f} M parameters, "
        f"{m['flops_g']:.0f} GFLOPs (paper convention), "
        f"on disk: {_mb(m['size_on_disk_bytes'])} MiB",
        f"- device: {d['device']}; CPU {d['cpu']} ({d['cpu_count']} cores, {d['torch_threads']} torch threads); "
        f"GPU {_gpu(d['gpu'])}; "
        f"Jetson {('L4T ' + d['jetson']['l4t']) if d['jetson'] else '–'}",
        f"- torch {r['torch']}, transformers {r['transformers']}"
        + (f", onnxruntime {r['onnxruntime']}" if r.get("onnxruntime") else "")
        + (f", executorch {r['executorch']}" if r.get("executorch") else ""),
        f"- protocol: batch {p['batch']}, sequence {p['seq_len']}, {p['warmup']} warm-up + {p['runs']} runs; "
        f"{p['decode']}; {p['timing']}",
        f"- protocols: {', '.join(p.get('protocols', ['full']))}"
        + (f"; paper = {p['paper']}" if p.get("paper") else ""),
    ]


def _rows(r: dict[str, Any]) -> list[str]:
    if not r["rows"]:
        return []
    lines = [
        "",
        "## Full protocol (every model with its head; fast = last-position logits, as generation runs)",
        "",
        "| model | precision | path | params (M) | weights file (MiB) | resident weights (MiB) | "
        "prefill ms mean / median / p90 | CV % | "
        "decode ms/token mean / median / p90 | CV % | peak mem (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        resident = _mb(row.get("weights_in_memory_bytes"))
        if row.get("workspace_bytes"):
            resident += f" (+{_mb(row['workspace_bytes'])} scratch)"
        lines.append(
            f"| {row['model']} | {row['precision']} | {_path(row)} | {row['params'] / 1e6:.1f} | "
            f"{_mb(row['weights_bytes'])} | {resident} | "
            f"{_stats(row['prefill_ms'])} | {_spread(row['prefill_ms'])} | {_stats(row['decode_ms_per_token'])} | "
            f"{_spread(row['decode_ms_per_token'])} | {_mb(row['peak_memory_bytes'])} |"
        )
    return lines + [
        "",
        f"Peak memory: {r['rows'][0]['peak_memory_method']}. Resident weights: measured, the bytes of the distinct "
        "storages behind the torch module's parameters and buffers "
        "(scratch: a packed model's dequantization workspace).",
    ]


def _generation(r: dict[str, Any]) -> list[str]:
    if not r.get("generation"):
        return []
    return [
        "",
        f"## Generation ({r['protocol'].get('generation')})",
        "",
        "| precision | runtime | tokens/s | seconds (mean) |",
        "|---|---|---:|---:|",
    ] + [
        f"| {g['precision']} | {g['runtime']}{' (' + g['scheme'] + ')' if g.get('scheme') else ''} | "
        f"{g['tokens_per_s']:.2f} | {g['seconds_mean']:.2f} |"
        for g in r["generation"]
    ]


def _paper(r: dict[str, Any]) -> list[str]:
    pp = r.get("paper_protocol")
    if not pp:
        return []
    lines = [
        "",
        "## Paper protocol (the authors' latency_test: 1 thread, zero ids, timeit(16).mean)",
        "",
        "| model | precision | LM head timed | output | mean ms |",
        "|---|---|---|---|---:|",
    ]
    lines += [
        f"| {x['model']} | {x['precision']} | {'yes' if x['includes_lm_head'] else 'no'} | "
        f"{tuple(x['output_shape'])} | {x['mean_ms']:.2f} |"
        for x in pp["rows"]
    ]
    if pp["speedups"]:
        lines += ["", "| precision | peer | speed-up × (peer / ours) | paper (Jetson Nano) × |", "|---|---|---:|---:|"]
        lines += [
            f"| {x['precision']} | {x['peer']} | {x['speedup']:.2f} | "
            + (f"{x['paper_jetson_nano']:.1f} |" if x["paper_jetson_nano"] else "– |")
            for x in pp["speedups"]
        ]
    return lines


def _speedups(r: dict[str, Any]) -> list[str]:
    if not r["speedups"]:
        return []
    lines = [
        "",
        "## Speed-up of " + r["model"]["name"] + " (peer / ours, of the means (paper) / of the medians; plain = "
        "full forward as the paper times, fast vs last-logits = generation's prefill for both)",
        "",
        "| precision | peer | paths | prefill × mean / median | decode × mean / median | paper (Jetson Nano) × |",
        "|---|---|---|---:|---:|---:|",
    ]
    for s in r["speedups"]:
        paper = f"{s['paper_jetson_nano']:.1f}" if s["paper_jetson_nano"] else "–"
        lines.append(
            f"| {s['precision']} | {s['peer']} | {s['paths']} | {_x(s, 'prefill')} | {_x(s, 'decode')} | {paper} |"
        )
    return lines


def _fast_path(r: dict[str, Any]) -> list[str]:
    if not r["fast_path"]:
        return []
    return [
        "",
        "## Fast path (plain / this path, of the means / of the medians)",
        "",
        "| precision | path | prefill × | decode × |",
        "|---|---|---:|---:|",
    ] + [f"| {g['precision']} | {g['path']} | {_x(g, 'prefill')} | {_x(g, 'decode')} |" for g in r["fast_path"]]


def _checks(r: dict[str, Any]) -> list[str]:
    if not r["checks"]:
        return []
    return ["", "## Output checks", ""] + [
        f"- {c['compared']} ({c['precision']}): max |logit diff| {c['max_abs_logit_diff']:.2e}"
        + (f", relative logit error {c['rel_logit_err']:.2e}" if "rel_logit_err" in c else "")
        + f" (tolerance {c['tolerance']} on {c.get('tolerance_on', 'max_abs_logit_diff')}): "
        + ("ok" if c["match"] else "MISMATCH")
        for c in r["checks"]
    ]


def _notes(r: dict[str, Any]) -> list[str]:
    if not (r["skipped"] or r["warnings"]):
        return []
    return (
        ["", "## Not measured / warnings", ""]
        + [f"- skipped {s['row']}: {s['reason']}" for s in r["skipped"]]
        + [f"- {w}" for w in r["warnings"]]
    )


def write_report(out_dir: str | Path, report: LatencyReport) -> str:
    """``out_dir/latency.json`` and ``out_dir/latency.md`` (atomically); returns the Markdown."""
    return report.write(out_dir)
