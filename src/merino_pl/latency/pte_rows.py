"""The ExecuTorch rows of a latency report (``--runtime executorch``).

For a float model, ``fp32`` is timed as the fp32 program and ``int4`` as ExecuTorch's own 4-bit
scheme, 8da4w (8-bit dynamic activations, 4-bit weights in groups of 32: ``export.executorch``),
both written by the export stage's ``export_pte`` into ``--out`` (``model-fp32.pte``,
``model-8da4w.pte``) and run by its ``PteRunner`` (``runners.ExecuTorchRunner``), with the
report's protocol and inputs. The program's KV cache is sized to what is timed: the prompt plus
the decode steps or the generated tokens, whichever is longer (a deployed program is exported
with the context it needs; every decode step attends over all of its slots, written or not).

Checks: the fp32 program against torch's logits (prefill and the last decode step, as the
onnxruntime row); the 8da4w program against the same 8da4w computed by torchao in eager torch
(what the program must compute; XNNPACK rounds its own way, so a relative bound).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from merino_pl.latency.options import PTE_KINDS

if TYPE_CHECKING:
    from merino_pl.latency.measure import ReportBuilder

PTE_NAME = "model-{kind}.pte"  # the ExecuTorch rows' programs, in --out
# relative logit error of the 8da4w program vs torchao's eager 8da4w (XNNPACK's own rounding of
# the dynamic int8 activations): 1.8 % measured on a random tiny model (vocabulary 50 304); bound 3 %
REL_TOLERANCE_8DA4W = 0.03


def kv_slots(builder: ReportBuilder) -> int:
    """The program's KV-cache slots: the prompt plus the longer of decode steps and generation."""
    o = builder.opts
    return o.seq + max(o.decode_tokens, o.generate_tokens)


def skip_reason(builder: ReportBuilder, precision: str) -> str | None:
    """Why ``precision`` gets no ExecuTorch row (None: it gets one)."""
    if precision not in PTE_KINDS:
        return "ExecuTorch rows are fp32 (fp32 program) and int4 (8da4w program)"
    if builder.loaded.kind == "gptq":
        return "ExecuTorch quantizes a float model itself (8da4w): time the float model with --precision int4"
    return None


def executorch_row(builder: ReportBuilder, precision: str, ref: tuple[torch.Tensor, torch.Tensor]) -> dict | None:
    """The ExecuTorch row of ``precision`` (its check and generation row too), or None (skipped)."""
    from merino_pl.export.executorch import export_pte
    from merino_pl.latency.measure import _compare, _reference_logits, _row
    from merino_pl.latency.runners import ExecuTorchRunner

    b, o, name = builder, builder.opts, builder.loaded.recipe.name
    if (why := skip_reason(b, precision)) is not None:
        b.skipped.append({"row": f"executorch {precision}", "reason": why})
        return None
    kind, slots, model = PTE_KINDS[precision], kv_slots(b), b.loaded.model
    path = export_pte(copy.deepcopy(model).float().cpu(), b.out_dir / PTE_NAME.format(kind=kind), kind, slots)
    runner = ExecuTorchRunner(path, model.config.vocab_size, o.seq, o.decode_tokens, o.seed)
    got = _reference_logits(runner)
    if kind == "fp32":
        b.checks.append(_compare(ref, got, "fp32", "executorch vs PyTorch"))
    else:
        what = "executorch 8da4w vs torchao's eager 8da4w (XNNPACK's own int8-activation rounding)"
        b.checks.append(_compare(eager_8da4w(b, slots), got, precision, what, REL_TOLERANCE_8DA4W))
    row = _row(name, "model", precision, "executorch", model, b._measure(runner), b.tmp, path.stat().st_size)
    row |= {
        "runtime": "executorch",
        "scheme": kind,
        "pte_file": path.name,
        "kv_cache_slots": slots,
        "weights_in_memory_bytes": None,  # held by ExecuTorch, not torch
        "workspace_bytes": None,
    }
    b._generate(runner, precision, "executorch")
    if o.generate_tokens:
        b.generation[-1]["scheme"] = kind
    return row


def eager_8da4w(builder: ReportBuilder, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of the prefill and of the last decode step of torchao's 8da4w model in
    eager torch (the module the program is lowered from), on the runners' inputs."""
    from merino_pl.export.executorch import PteDecoder, quantize_8da4w
    from merino_pl.latency.runners import random_ids

    o = builder.opts
    model = copy.deepcopy(builder.loaded.model).float().cpu()
    eager: Any = PteDecoder(model.eval(), slots, untie=True).eval()
    quantize_8da4w(eager)
    ids, next_ids = random_ids(model.config.vocab_size, 1, o.seq, o.decode_tokens, o.seed)
    with torch.no_grad():
        prefill = eager(ids, torch.arange(o.seq))[:, -1].float()
        for i in range(o.decode_tokens):
            decode = eager(next_ids[:, i : i + 1], torch.tensor([o.seq + i]))
    return prefill, decode[:, -1].float()
