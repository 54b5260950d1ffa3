"""The rows of a latency report: ``ReportBuilder`` measures them one after another (ours plain /
fast / onnxruntime per precision, the peers, the paper protocol), with the output checks between
paths; ``quantized_model`` is the int8 / int4 model of a float one (the quantize stage's RTN).

Two protocols (``--protocol full,paper``):

* ``full`` (default: what a user's generation costs): for every requested precision, our model on
  the plain path, on the fast path (``fast.py``; outputs checked against the plain path) and
  optionally through onnxruntime (float graphs, and GPTQ models packed as ``MatMulNBits``); each
  peer on the plain path; prefill, per-token decode, generation tokens/s and resident weights.
* ``paper``: the authors' own protocol (``timing.PAPER_PROTOCOL``): one thread, zero ids, mean
  of 16 with ``torch.utils.benchmark``, MeRino and OPT timed without their LM head, Pythia and
  GPT-2 with theirs (``peers.PAPER_TIMES_HEAD``). Their ratios are what the paper's Table 3 prints.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from merino_pl.core.checkpoint import LoadedModel
from merino_pl.core.costs import count_flops
from merino_pl.core.quant.format import FLOAT_DTYPES
from merino_pl.latency.fast import fuse_qkv
from merino_pl.latency.options import INT_BITS, PTE_KINDS, Options
from merino_pl.latency.peers import PAPER, paper_forward
from merino_pl.latency.runners import OrtRunner, TorchRunner
from merino_pl.latency.timing import (
    Measurement,
    Runner,
    generation,
    measure,
    paper_latency_ms,
    serialized_bytes,
    weight_bytes_in_memory,
)

# max |logit difference| fast vs plain (and onnxruntime vs PyTorch) that still counts as "equal"
# (int: onnxruntime's MatMulNBits vs the torch packed path, same weights, fp32 arithmetic)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 1e-3, "int4": 1e-3}
GRAPH_NAME = "model-{precision}.onnx"  # the onnxruntime rows' graphs, one per precision, in --out


def _row(
    name: str,
    role: str,
    precision: str,
    path: str,
    model: torch.nn.Module,
    m: Measurement,
    tmp: Path,
    weights_bytes: int | None = None,
) -> dict[str, Any]:
    arch = getattr(model, "arch", None)
    if name in PAPER and arch is None:
        flops = PAPER[name].flops_g  # a peer: the paper's Table 3 figure
    else:
        flops = count_flops(arch) / 1e9 if arch is not None else None
    workspace = getattr(model, "_merino_workspace", None)  # a packed model's dequantization scratch
    return {
        "model": name,
        "role": role,
        "precision": precision,
        "path": path,
        "runtime": path if path in ("onnxruntime", "executorch") else "torch",
        "params": sum(p.numel() for p in model.parameters()),
        "flops_g": flops,
        "weights_bytes": serialized_bytes(model, tmp) if weights_bytes is None else weights_bytes,
        # measured: bytes of the distinct storages behind the module's parameters and buffers
        "weights_in_memory_bytes": weight_bytes_in_memory(model),
        "workspace_bytes": workspace.nbytes if workspace is not None else 0,
        "prefill_ms": m.prefill.to_dict(),
        "decode_ms_per_token": m.decode.to_dict(),
        "peak_memory_bytes": m.peak_memory.bytes,
        "peak_memory_method": m.peak_memory.method,
    }


def _reference_logits(runner: Runner) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of a prefill and of the last decode step (for equality checks)."""
    prefill = torch.as_tensor(runner.prefill())[:, -1].float()
    runner.start_decode()
    decode = torch.as_tensor(runner.decode_run())[:, -1].float()
    runner.end_decode()
    return prefill, decode


# onnxruntime's MatMulNBits at accuracy_level 4 quantizes activations to int8 per block: its
# logits differ from the torch packed path by ~1.2 % (relative, MeRino-52M); this bounds it
REL_TOLERANCE_INT8_ACTIVATIONS = 0.03


def _compare(
    ref: tuple[torch.Tensor, torch.Tensor],
    got: tuple[torch.Tensor, torch.Tensor],
    precision: str,
    what: str,
    relative: float | None = None,
) -> dict[str, Any]:
    """Max |logit difference| against ``TOLERANCE``, or (``relative`` given) the relative logit
    error ||a − b|| / ||a|| against it; both figures are recorded."""
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    rel = max(float((a - b).norm() / a.norm()) for a, b in zip(ref, got))
    top1 = all(bool((a.argmax(-1) == b.argmax(-1)).all()) for a, b in zip(ref, got))
    tol = TOLERANCE[precision] if relative is None else relative
    return {
        "precision": precision,
        "compared": what,
        "max_abs_logit_diff": diff,
        "rel_logit_err": rel,
        "top1_equal": top1,
        "tolerance": tol,
        "tolerance_on": "max_abs_logit_diff" if relative is None else "rel_logit_err",
        "match": (diff if relative is None else rel) <= tol,
    }


class ReportBuilder:
    """Measures rows one after another and collects them with the checks and speed-ups."""

    def __init__(
        self, loaded: LoadedModel, opts: Options, out_dir: Path, peer_factory: Callable[[str], torch.nn.Module]
    ) -> None:
        self.loaded, self.opts, self.out_dir, self.peer_factory = loaded, opts, out_dir, peer_factory
        self.rows: list[dict[str, Any]] = []
        self.generation: list[dict[str, Any]] = []
        self.paper_rows: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.warnings: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="merino-latency-"))
        self.bar = tqdm(total=self._count_rows(), desc="latency", unit="row", dynamic_ncols=True)

    def _count_rows(self) -> int:
        o = self.opts
        floats = [p for p in o.precisions if p in FLOAT_DTYPES]
        ints = [p for p in o.precisions if p in INT_BITS]
        full = len(floats) * (1 + int(o.fast) + int(o.onnx) + len(o.peers) * (1 + int(o.fast))) + len(ints) * (
            1 + int(o.fast) + int(o.onnx)
        )
        if "executorch" in o.runtimes:
            full += sum(p in PTE_KINDS for p in o.precisions)
        paper = len(floats) * (1 + len(o.peers))
        return full * ("full" in o.protocols) + paper * ("paper" in o.protocols)

    def _measure(self, runner: Runner) -> Measurement:
        o = self.opts
        return measure(runner, o.device, o.runs, o.warmup, o.decode_tokens)

    def _runner(self, model: torch.nn.Module, last_logits_only: bool = False) -> TorchRunner:
        o = self.opts
        return TorchRunner(model, o.batch, o.seq, o.device, o.decode_tokens, last_logits_only, seed=o.seed)

    def _add(self, label: str, make_row: Callable[[], dict[str, Any] | None]) -> None:
        self.bar.set_postfix_str(label)
        row = make_row()
        if row is not None:
            self.rows.append(row)
        self.bar.update(1)

    def _generate(self, runner: Any, precision: str, runtime: str) -> None:
        o = self.opts
        if o.generate_tokens:
            self.bar.set_postfix_str(f"{self.loaded.recipe.name} {precision} {runtime} generation")
            g = generation(runner, o.device, o.generate_tokens, o.generate_runs)
            self.generation.append(
                {
                    "model": self.loaded.recipe.name,
                    "precision": precision,
                    "runtime": runtime,
                    "prompt_tokens": o.seq,
                    **g,
                }
            )

    def precision(self, precision: str) -> None:
        """All rows of one float precision: ours plain / fast / onnxruntime, then the peers."""
        o, name = self.opts, self.loaded.recipe.name
        dtype = FLOAT_DTYPES[precision]
        model = copy.deepcopy(self.loaded.model).to(device=o.device, dtype=dtype).eval()
        plain = self._runner(model)
        ref = _reference_logits(plain)
        self._add(
            f"{name} {precision} plain",
            lambda model=model: _row(name, "model", precision, "plain", model, self._measure(plain), self.tmp),
        )
        if o.fast:
            fuse_qkv(model)  # after the plain rows: it re-points the model's Q/K/V weights
            fast = self._runner(model, last_logits_only=True)
            self.checks.append(_compare(ref, _reference_logits(fast), precision, "fast path vs plain"))
            size = self.rows[-1]["weights_bytes"]  # the same weights: a file of the fused form is no different
            self._add(
                f"{name} {precision} fast",
                lambda model=model: _row(name, "model", precision, "fast", model, self._measure(fast), self.tmp, size),
            )
        self._generate(fast if o.fast else plain, precision, "torch")
        if o.onnx:
            self._add(
                f"{name} {precision} onnxruntime",
                lambda model=model: self._onnx(model, precision, ref, copy.deepcopy(self.loaded.model).to(dtype)),
            )
        self._executorch(precision, ref)
        del model
        for peer in o.peers:
            self._peer(peer, dtype, precision)

    def integer(self, precision: str) -> None:
        """Our model at int8 / int4 (``quantized_model``): plain, fast and onnxruntime
        (MatMulNBits); peers stay float."""
        o, name = self.opts, self.loaded.recipe.name
        model = (
            self.loaded.model
            if self.loaded.kind == "gptq"
            else quantized_model(self.loaded, precision, self.tmp, o.embedding)
        )
        model = model.to(o.device)
        plain = self._runner(model)
        ref = _reference_logits(plain)
        self._add(
            f"{name} {precision} plain",
            lambda model=model: _row(name, "model", precision, "plain", model, self._measure(plain), self.tmp),
        )
        fast = None
        if o.fast:  # fused QKV leaves quantized linears alone: only the last-logits prefill applies
            fast = self._runner(model, last_logits_only=True)
            self.checks.append(_compare(ref, _reference_logits(fast), "fp32", f"fast path vs plain ({precision})"))
            size = self.rows[-1]["weights_bytes"]
            self._add(
                f"{name} {precision} fast",
                lambda model=model: _row(name, "model", precision, "fast", model, self._measure(fast), self.tmp, size),
            )
        self._generate(fast or plain, precision, "torch")
        if o.onnx:
            self._add(
                f"{name} {precision} onnxruntime",
                lambda model=model: self._onnx(model, precision, ref, copy.deepcopy(model)),
            )
        self._executorch(precision, ref)
        if o.peers:
            self.skipped.append({"row": f"peers {precision}", "reason": "int rows are ours only (peers stay float)"})

    def _executorch(self, precision: str, ref: tuple[torch.Tensor, torch.Tensor]) -> None:
        """With ``--runtime executorch``: the ExecuTorch row of this precision (``pte_rows``)."""
        if "executorch" not in self.opts.runtimes:
            return
        from merino_pl.latency.pte_rows import executorch_row, skip_reason

        if precision not in PTE_KINDS:  # no row counted: only skipped
            self.skipped.append({"row": f"executorch {precision}", "reason": skip_reason(self, precision) or ""})
            return
        self._add(f"{self.loaded.recipe.name} {precision} executorch", lambda: executorch_row(self, precision, ref))

    def _peer(self, peer: str, dtype: torch.dtype, precision: str) -> None:
        """The peer's plain rows, and with ``fast`` its generation-time prefill (last-position
        logits, as ``generate`` runs every transformers model) to compare our fast path with."""
        model = self.peer_factory(peer).to(device=self.opts.device, dtype=dtype)
        self._add(
            f"{peer} {precision}",
            lambda model=model: _row(
                peer, "peer", precision, "plain", model, self._measure(self._runner(model)), self.tmp
            ),
        )
        if self.opts.fast:
            size = self.rows[-1]["weights_bytes"]
            last = self._runner(model, last_logits_only=True)
            self._add(
                f"{peer} {precision} last-logits",
                lambda model=model: _row(
                    peer, "peer", precision, "last-logits", model, self._measure(last), self.tmp, size
                ),
            )
        del model

    def _onnx(
        self, model: torch.nn.Module, precision: str, ref: tuple[torch.Tensor, torch.Tensor], cpu_copy: torch.nn.Module
    ) -> dict[str, Any] | None:
        """The onnxruntime row of ``model``, exported from ``cpu_copy`` (a copy: a GPTQ export
        attaches MatMulNBits tensors to the module it exports)."""
        from merino_pl.export.onnx import export_onnx

        o = self.opts
        if precision == "bf16" or (precision == "fp16" and not o.device.startswith("cuda")):
            self.skipped.append(
                {
                    "row": f"onnxruntime {precision}",
                    "reason": "onnxruntime is timed at fp32 on CPU and fp32/fp16 on CUDA, "
                    f"not {precision} on {o.device}",
                }
            )
            return None
        path = export_onnx(
            cpu_copy, self.out_dir / GRAPH_NAME.format(precision=precision), accuracy_level=o.onnx_accuracy_level
        )
        del cpu_copy
        vocab = self.loaded.model.config.vocab_size
        runner = OrtRunner(path, vocab, o.batch, o.seq, o.decode_tokens, o.device, seed=o.seed)
        approx = precision in INT_BITS and o.onnx_accuracy_level == 4
        what = "onnxruntime vs PyTorch" + (" (MatMulNBits accuracy_level 4: int8 activations)" if approx else "")
        self.checks.append(
            _compare(
                ref, _reference_logits(runner), precision, what, REL_TOLERANCE_INT8_ACTIVATIONS if approx else None
            )
        )
        row = _row(
            self.loaded.recipe.name,
            "model",
            precision,
            "onnxruntime",
            model,
            self._measure(runner),
            self.tmp,
            path.stat().st_size,
        )
        row["onnx_file"], row["weights_in_memory_bytes"], row["workspace_bytes"] = (
            path.name,
            None,
            None,
        )  # held by onnxruntime, not torch
        self._generate(runner, precision, "onnxruntime")
        return row

    def paper(self, precision: str) -> None:
        """The authors' protocol at one float precision: ours and every peer, each as they time it."""
        o, name = self.opts, self.loaded.recipe.name
        dtype = FLOAT_DTYPES[precision]
        ids = torch.zeros(1, o.seq, dtype=torch.long, device=o.device)  # zero ids, batch 1, as they do
        models = [(name, "model", lambda: copy.deepcopy(self.loaded.model))] + [
            (p, "peer", lambda p=p: self.peer_factory(p)) for p in o.peers
        ]
        for label, role, make in models:
            self.bar.set_postfix_str(f"{label} {precision} paper")
            model = make().to(device=o.device, dtype=dtype).eval()
            fn, head = paper_forward(label, model)
            with torch.inference_mode():
                shape = list(fn(ids).shape)
            ms = paper_latency_ms(fn, ids, o.paper_runs, threads=1)
            self.paper_rows.append(
                {
                    "model": label,
                    "role": role,
                    "precision": precision,
                    "includes_lm_head": head,
                    "output_shape": shape,
                    "threads": 1,
                    "runs": o.paper_runs,
                    "mean_ms": round(ms, 4),
                }
            )
            del model
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def quantized_model(loaded: LoadedModel, precision: str, tmp: Path, embedding: str = "fp16") -> torch.nn.Module:
    """The int8 / int4 model of a float one: the quantize stage's round-to-nearest (its public
    entry, ``quantize.api.quantize``) at its default group size (128: a width that is not a
    multiple, such as MeRino-64M's 960-wide FFN, ends in a shorter group, as GPTQ writes it;
    ``embedding`` int8: the row-wise int8 table too), written as a GPTQ directory and read back,
    so the rows time exactly what a GPTQ directory runs: packed weights, dequantized per block.
    (A GPTQ directory given to ``latency`` is timed as it is, not through here.)"""
    from merino_pl.core.quant.format import QuantSpec, load_quantized
    from merino_pl.quantize.api import CalibrationSettings, QuantizeSettings, quantize

    spec = QuantSpec(bits=INT_BITS[precision], method="rtn", embedding=embedding)
    out = tmp / f"rtn-{precision}"
    # RTN reads no calibration windows, and no held-out check is wanted: only the directory is timed
    settings = QuantizeSettings(loaded.path, spec, CalibrationSettings(holdout=0, seq_len=1), str(out))
    quantize(settings, loaded=loaded, verbose=False)
    quantized, _ = load_quantized(out)
    return quantized
