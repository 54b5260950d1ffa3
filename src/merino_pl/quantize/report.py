"""The quantize report's one schema (``QuantizeReport``) and its renderer.

``quantize_report.json`` beside the GPTQ directory's weights is ``QuantizeReport.to_json()``;
``quantize_report.md`` is ``render_markdown``. Whoever shows a quantize report (the pipeline's
summary, a user's script) reads it with ``QuantizeReport.read`` and renders it here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from merino_pl.core.report import FileReport, check_version, from_fields

FORMAT_VERSION = 1  # bump when a key changes meaning or goes away (files without it are version 1)
JSON_NAME, MARKDOWN_NAME = "quantize_report.json", "quantize_report.md"


@dataclass
class QuantizeReport(FileReport):
    """What one quantization run did and measured (the keys of ``quantize_report.json``)."""

    json_name: ClassVar[str] = JSON_NAME
    markdown_name: ClassVar[str] = MARKDOWN_NAME
    what: ClassVar[str] = "quantize report"

    checkpoint: str  # the float model quantized
    kind: str  # how it was loaded: hf-dir | lightning-ckpt | recipe
    recipe: str
    weights_sha256: str | None
    out: str  # the GPTQ directory written
    quantize_config: dict[str, Any]  # quantize_config.json
    unquantized_dtype: str  # torch's name of the dtype the unquantized tensors are stored in
    calibration: dict[str, Any]  # source, text_field, nsamples, seq_len, tokens, holdout_windows, seed
    seconds: dict[str, float]  # tokenize, quantize
    sizes: dict[str, Any]  # fp32_bytes, fp16_bytes, embedding_fp32_bytes, int<bits>_file_bytes, note
    # every quantized tensor (linears, and the embedding with --embedding int8); {} without held-out windows
    heldout: dict[str, float]
    heldout_linears_only: dict[str, float] | None  # --embedding int8: the same linears with the float embedding
    reload_max_abs_logit_diff: float
    group_note: str | None
    layers: list[dict[str, Any]]  # one row per quantized linear
    format_version: int = FORMAT_VERSION

    @property
    def summary_line(self) -> str:
        """One line: method, bits, file size, time and the held-out perplexity change."""
        s, h, q = self.sizes, self.heldout, self.quantize_config
        size = next(v for k, v in s.items() if k.endswith("_file_bytes"))
        line = (
            f"{q['meta']['method']} int{q['bits']}: {size / 1e6:.1f} MB (fp32 {s['fp32_bytes'] / 1e6:.1f} MB) "
            f"in {self.seconds['quantize']:.1f} s"
        )
        if h:
            line += (
                f"; held-out ppl {h['float_ppl']:.3f} -> {h['quant_ppl']:.3f} ({h['ppl_delta_pct']:+.2f} %), "
                f"logits rel err {h['logits_rel_err_pct']:.2f} %"
            )
            if self.heldout_linears_only:
                line += f" (with the float embedding: {self.heldout_linears_only['ppl_delta_pct']:+.2f} %)"
        return line + f" -> {self.out}"

    def to_json(self) -> dict[str, Any]:
        """The JSON object (``summary_line`` included for readers that only print it)."""
        return {"format_version": self.format_version, **dataclasses.asdict(self), "summary_line": self.summary_line}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "quantize report") -> QuantizeReport:
        """The report of a ``to_json`` object; a missing key or a newer version is a ``MerinoError``."""
        check_version(data, "quantize report", source, FORMAT_VERSION)
        return from_fields(cls, data, "quantize report", source, optional=("format_version",))

    def markdown(self) -> str:
        return render_markdown(self)


def render_markdown(r: QuantizeReport) -> str:
    """The report as Markdown: settings, sizes, held-out check, one row per linear."""
    q, c, s, h = r.quantize_config, r.calibration, r.sizes, r.heldout
    lines = [
        f"# Quantization report: {r.recipe} ({q['meta']['method']} int{q['bits']})",
        "",
        f"- checkpoint: `{r.checkpoint}` ({r.kind})",
        f"- bits {q['bits']}, group size {q['group_size']}, sym {q['sym']}, desc_act {q['desc_act']}, "
        f"embedding {q['meta'].get('embedding', 'fp16')}, true_sequential {q['true_sequential']}, "
        f"damp {q['damp_percent']}",
        *([f"- {r.group_note.removeprefix('note: ')}"] if r.group_note else []),
        f"- calibration: {c['nsamples']} x {c['seq_len']} tokens from `{c['source']}` (seed {c['seed']}); "
        f"quantization {r.seconds['quantize']:.1f} s",
        f"- reload check: max |logit difference| reloaded vs in-memory = {r.reload_max_abs_logit_diff:.2e}",
        "",
        "| size | bytes | MB |",
        "|---|---:|---:|",
        *[f"| {k} | {v} | {v / 1e6:.2f} |" for k, v in s.items() if k.endswith("bytes")],
        "",
    ]
    lin = r.heldout_linears_only
    if h and lin:
        lines += [
            f"Held-out ({h['tokens']} tokens), float perplexity {h['float_ppl']:.3f}:",
            "",
            "| quantized | perplexity | delta % | logits rel. err % | top-1 agreement % |",
            "|---|---:|---:|---:|---:|",
        ]
        for what, x in (("linears (float embedding)", lin), ("linears + int8 embedding / head", h)):
            lines.append(
                f"| {what} | {x['quant_ppl']:.3f} | {x['ppl_delta_pct']:+.2f} | {x['logits_rel_err_pct']:.3f} | "
                f"{x['top1_agreement_pct']:.2f} |"
            )
        lines.append("")
    elif h:
        lines += [
            f"Held-out ({h['tokens']} tokens): perplexity {h['float_ppl']:.3f} -> {h['quant_ppl']:.3f} "
            f"({h['ppl_delta_pct']:+.2f} %), logits relative error {h['logits_rel_err_pct']:.3f} %, "
            f"top-1 agreement {h['top1_agreement_pct']:.2f} %",
            "",
        ]
    lines += [
        "| layer | in | out | groups x columns | L_j | Hessian rows | loss | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r.layers:
        loss = "" if row["loss"] is None else f"{row['loss']:.4g}"
        lines.append(
            f"| {row['name']} | {row['in_features']} | {row['out_features']} | "
            f"{row['groups']} x {row['group_columns']} | {row['applications']} | {row['hessian_samples']} | "
            f"{loss} | {row['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"
