"""One quantization run end to end: quantize, check against the float model, write, reload."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from merino_pl.core.checkpoint import LoadedModel
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.io import atomic_dir
from merino_pl.core.quant.format import (
    WEIGHTS_NAME,
    QuantSpec,
    load_quantized,
    quantize_config,
    round_unquantized,
    torch_dtype,
    write_quantized,
)
from merino_pl.core.quant.qembedding import QuantEmbedding, attach
from merino_pl.quantize.passes import Split, quantize_model, report_rows
from merino_pl.quantize.report import QuantizeReport

if TYPE_CHECKING:
    from merino_pl.quantize.api import CalibrationSettings


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
        "tokens": count,
        "float_ppl": ppl_ref,
        "quant_ppl": ppl,
        "ppl_delta_pct": 100 * (ppl / ppl_ref - 1),
        "logits_rel_err_pct": 100 * math.sqrt(sq_diff / sq_ref),
        "top1_agreement_pct": 100 * agree / count,
    }


def float_sizes(model: MerinoForCausalLM) -> dict[str, int]:
    """Bytes of the float model's tensors in FP32 / FP16 (taken before the embedding is quantized)."""
    numel = sum(t.numel() for t in model.state_dict().values())
    embed = model.model.embed_tokens.weight.numel() + model.model.embed_positions.weight.numel()
    return {"fp32_bytes": numel * 4, "fp16_bytes": numel * 2, "embedding_fp32_bytes": embed * 4}


def sizes(float_bytes: dict[str, int], quantized_file: Path, bits: int) -> dict[str, Any]:
    """The float sizes and the written quantized file's."""
    return {
        **float_bytes,
        f"int{bits}_file_bytes": quantized_file.stat().st_size,
        "note": "FP32/FP16: tensor bytes of the float model; INT: the model.safetensors written",
    }


def quantize_checkpoint(
    loaded: LoadedModel,
    spec: QuantSpec,
    calib: torch.Tensor,
    held: torch.Tensor,
    out: Path,
    settings: CalibrationSettings,
    float_dtype: str = "float16",
    tokenizer: str | None = None,
    tokenize_seconds: float = 0.0,
    group_note: str | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``loaded.model`` (in place) with the ``calib`` windows, check it on the ``held``
    ones, write ``out`` atomically with its report, return the report."""
    model = loaded.model.eval()
    reference = copy.deepcopy(model) if held.numel() else None
    t0 = time.perf_counter()
    split = Split()  # where quantize_model's time went
    quantized, layers = quantize_model(
        model, spec, calib if spec.method == "gptq" else None, settings.batch_size, progress, split
    )
    quant_seconds = time.perf_counter() - t0
    round_unquantized(model, quantized, torch_dtype(float_dtype))
    heldout = compare_logits(reference, model, held) if reference is not None else {}
    heldout_linears, float_bytes = None, float_sizes(model)
    if spec.embedding == "int8":  # after GPTQ, so the linears are the fp16 variant's exactly
        attach(model.model, QuantEmbedding.from_float(model.model.embed_tokens))
        heldout_linears, heldout = heldout, (compare_logits(reference, model, held) if reference is not None else {})
    with atomic_dir(out) as tmp:
        write_quantized(tmp, model, quantized, spec, tokenizer, float_dtype)
        reloaded, _ = load_quantized(tmp)
        probe = (held[:1] if held.numel() else torch.arange(16)[None]) % model.config.vocab_size
        with torch.no_grad():
            reload_diff = float((reloaded(probe).logits - model(probe).logits).abs().max())
        report = QuantizeReport(
            checkpoint=loaded.path,
            kind=loaded.kind,
            recipe=loaded.recipe.name,
            weights_sha256=loaded.weights_sha256,
            out=str(out),
            quantize_config=quantize_config(spec),
            unquantized_dtype=float_dtype,
            calibration={
                "source": settings.source,
                "text_field": settings.text_field,
                "nsamples": int(calib.shape[0]),
                "seq_len": settings.seq_len,
                "tokens": int(calib.numel()),
                "holdout_windows": int(held.shape[0]),
                "seed": settings.seed,
            },
            seconds={"tokenize": tokenize_seconds, "quantize": quant_seconds, **split.report_keys()},
            sizes=sizes(float_bytes, tmp / WEIGHTS_NAME, spec.bits),
            heldout=heldout,
            heldout_linears_only=heldout_linears,
            reload_max_abs_logit_diff=reload_diff,
            group_note=group_note,
            layers=report_rows(layers, spec.group_size),
        )
        report.write(tmp)
    return report
