"""One quantization run end to end: quantize, check against the float model, write, reload."""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from merino_pl.core.checkpoint import LoadedModel
from merino_pl.core.io import atomic_dir, write_json
from merino_pl.core.model import MerinoForCausalLM
from merino_pl.core.quant.format import (
    FLOAT_DTYPES,
    WEIGHTS_NAME,
    QuantSpec,
    load_quantized,
    quantize_config,
    round_unquantized,
    write_quantized,
)
from merino_pl.core.quant.qembedding import QuantEmbedding, attach
from merino_pl.quantize.runner import quantize_model, report_rows


@torch.no_grad()
def compare_logits(reference: MerinoForCausalLM, model: MerinoForCausalLM, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity of both models on ``ids`` (n, T), the logits' relative error and top-1 agreement."""
    nll_ref = nll = sq_diff = sq_ref = agree = 0.0
    count = 0
    for x in ids.split(1):  # one window at a time: (1, T, V) logits are large
        a = reference(x, use_cache=False).logits[0, :-1].float()
        b = model(x, use_cache=False).logits[0, :-1].float()
        y = x[0, 1:]
        nll_ref += float(F.cross_entropy(a, y, reduction="sum"))
        nll += float(F.cross_entropy(b, y, reduction="sum"))
        sq_diff += float((a - b).pow(2).sum())
        sq_ref += float(a.pow(2).sum())
        agree += float((a.argmax(-1) == b.argmax(-1)).sum())
        count += y.numel()
    if not count:
        return {}
    ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll / count)
    return {
        "tokens": count, "float_ppl": ppl_ref, "quant_ppl": ppl, "ppl_delta_pct": 100 * (ppl / ppl_ref - 1),
        "logits_rel_err_pct": 100 * math.sqrt(sq_diff / sq_ref), "top1_agreement_pct": 100 * agree / count,
    }


def float_sizes(model: MerinoForCausalLM) -> dict[str, int]:
    """Bytes of the float model's tensors in FP32 / FP16 (taken before the embedding is quantized)."""
    numel = sum(t.numel() for t in model.state_dict().values())
    embed = model.model.embed_tokens.weight.numel() + model.model.embed_positions.weight.numel()
    return {"fp32_bytes": numel * 4, "fp16_bytes": numel * 2, "embedding_fp32_bytes": embed * 4}


def sizes(float_bytes: dict[str, int], quantized_file: Path, bits: int) -> dict[str, Any]:
    """The float sizes and the written quantized file's."""
    return {**float_bytes, f"int{bits}_file_bytes": quantized_file.stat().st_size,
            "note": "FP32/FP16: tensor bytes of the float model; INT: the model.safetensors written"}


def quantize_checkpoint(
    loaded: LoadedModel, spec: QuantSpec, calib: torch.Tensor, held: torch.Tensor, out: Path,
    args: argparse.Namespace, tokenize_seconds: float = 0.0, group_note: str | None = None,
) -> dict[str, Any]:
    """Quantize ``loaded.model`` (in place), write ``out`` atomically with its report, return the report."""
    model = loaded.model.eval()
    reference = copy.deepcopy(model) if held.numel() else None
    t0 = time.perf_counter()
    quantized, layers = quantize_model(model, spec, calib if spec.method == "gptq" else None, args.batch_size)
    quant_seconds = time.perf_counter() - t0
    round_unquantized(model, quantized, FLOAT_DTYPES[args.float_dtype])
    heldout = compare_logits(reference, model, held) if reference is not None else {}
    heldout_linears, float_bytes = None, float_sizes(model)
    if spec.embedding == "int8":  # after GPTQ, so the linears are the fp16 variant's exactly
        attach(model.model, QuantEmbedding.from_float(model.model.embed_tokens))
        heldout_linears, heldout = heldout, (compare_logits(reference, model, held) if reference is not None else {})
    with atomic_dir(out) as tmp:
        write_quantized(tmp, model, quantized, spec, args.tokenizer, args.float_dtype)
        reloaded, _ = load_quantized(tmp)
        probe = (held[:1] if held.numel() else torch.arange(16)[None]) % model.config.vocab_size
        with torch.no_grad():
            reload_diff = float((reloaded(probe).logits - model(probe).logits).abs().max())
        report = {
            "checkpoint": loaded.path, "kind": loaded.kind, "recipe": loaded.recipe.name,
            "weights_sha256": loaded.weights_sha256, "out": str(out),
            "quantize_config": quantize_config(spec), "unquantized_dtype": args.float_dtype,
            "calibration": {
                "source": args.calib, "text_field": args.calib_text_field, "nsamples": int(calib.shape[0]),
                "seq_len": args.seq_len, "tokens": int(calib.numel()), "holdout_windows": int(held.shape[0]), "seed": args.seed,
            },
            "seconds": {"tokenize": tokenize_seconds, "quantize": quant_seconds},
            "sizes": sizes(float_bytes, tmp / WEIGHTS_NAME, spec.bits),
            "heldout": heldout,  # every quantized tensor (linears, and the embedding with --embedding int8)
            "heldout_linears_only": heldout_linears,  # --embedding int8: the same linears with the float embedding
            "reload_max_abs_logit_diff": reload_diff,
            "group_note": group_note,
            "layers": report_rows(layers, spec.group_size),
        }
        report["summary_line"] = _summary(report)
        write_json(tmp / "quantize_report.json", report)
        (tmp / "quantize_report.md").write_text(render_markdown(report))
    return report


def _summary(r: dict[str, Any]) -> str:
    s, h, q = r["sizes"], r["heldout"], r["quantize_config"]
    size = next(v for k, v in s.items() if k.endswith("_file_bytes"))
    line = f"{r['quantize_config']['meta']['method']} int{q['bits']}: {size / 1e6:.1f} MB (fp32 {s['fp32_bytes'] / 1e6:.1f} MB) in {r['seconds']['quantize']:.1f} s"
    if h:
        line += f"; held-out ppl {h['float_ppl']:.3f} -> {h['quant_ppl']:.3f} ({h['ppl_delta_pct']:+.2f} %), logits rel err {h['logits_rel_err_pct']:.2f} %"
        if r.get("heldout_linears_only"):
            line += f" (with the float embedding: {r['heldout_linears_only']['ppl_delta_pct']:+.2f} %)"
    return line + f" -> {r['out']}"


def render_markdown(r: dict[str, Any]) -> str:
    q, c, s, h = r["quantize_config"], r["calibration"], r["sizes"], r["heldout"]
    lines = [
        f"# Quantization report: {r['recipe']} ({q['meta']['method']} int{q['bits']})", "",
        f"- checkpoint: `{r['checkpoint']}` ({r['kind']})",
        f"- bits {q['bits']}, group size {q['group_size']}, sym {q['sym']}, desc_act {q['desc_act']}, embedding {q['meta'].get('embedding', 'fp16')}, "
        f"true_sequential {q['true_sequential']}, damp {q['damp_percent']}",
        *([f"- {r['group_note'].removeprefix('note: ')}"] if r.get("group_note") else []),
        f"- calibration: {c['nsamples']} x {c['seq_len']} tokens from `{c['source']}` (seed {c['seed']}); "
        f"quantization {r['seconds']['quantize']:.1f} s",
        f"- reload check: max |logit difference| reloaded vs in-memory = {r['reload_max_abs_logit_diff']:.2e}", "",
        "| size | bytes | MB |", "|---|---:|---:|",
        *[f"| {k} | {v} | {v / 1e6:.2f} |" for k, v in s.items() if k.endswith("bytes")], "",
    ]
    lin = r.get("heldout_linears_only")
    if h and lin:
        lines += [f"Held-out ({h['tokens']} tokens), float perplexity {h['float_ppl']:.3f}:", "",
                  "| quantized | perplexity | delta % | logits rel. err % | top-1 agreement % |", "|---|---:|---:|---:|---:|"]
        for what, x in (("linears (float embedding)", lin), ("linears + int8 embedding / head", h)):
            lines.append(f"| {what} | {x['quant_ppl']:.3f} | {x['ppl_delta_pct']:+.2f} | {x['logits_rel_err_pct']:.3f} | {x['top1_agreement_pct']:.2f} |")
        lines.append("")
    elif h:
        lines += [
            f"Held-out ({h['tokens']} tokens): perplexity {h['float_ppl']:.3f} -> {h['quant_ppl']:.3f} "
            f"({h['ppl_delta_pct']:+.2f} %), logits relative error {h['logits_rel_err_pct']:.3f} %, "
            f"top-1 agreement {h['top1_agreement_pct']:.2f} %", "",
        ]
    lines += ["| layer | in | out | groups x columns | L_j | Hessian rows | loss | s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["layers"]:
        loss = "" if row["loss"] is None else f"{row['loss']:.4g}"
        lines.append(f"| {row['name']} | {row['in_features']} | {row['out_features']} | {row['groups']} x {row['group_columns']} | {row['applications']} | "
                     f"{row['hessian_samples']} | {loss} | {row['seconds']:.2f} |")
    return "\n".join(lines) + "\n"
