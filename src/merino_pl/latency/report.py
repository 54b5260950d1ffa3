"""``merino-pl latency``: the latency report of one model (and its peers) on this device.

Two protocols (``--protocol full,paper``):

* ``full`` (default: what a user's generation costs): for every requested precision, our model on
  the plain path, on the fast path (``fast.py``; outputs checked against the plain path) and
  optionally through onnxruntime (float graphs, and GPTQ models packed as ``MatMulNBits``); each
  peer on the plain path; prefill, per-token decode, generation tokens/s and resident weights.
* ``paper``: the authors' own protocol (``harness.PAPER_PROTOCOL``): one thread, zero ids, mean
  of 16 with ``torch.utils.benchmark``, MeRino and OPT timed without their LM head, Pythia and
  GPT-2 with theirs (``peers.PAPER_TIMES_HEAD``). Their ratios are what the paper's Table 3 prints.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from merino_pl.core.checkpoint import LoadedModel, load_model
from merino_pl.core.costs import count_flops
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import check_out
from merino_pl.core.quant.format import FLOAT_DTYPES
from merino_pl.core.report import FileReport, check_version, from_fields
from merino_pl.latency import PRECISIONS
from merino_pl.latency import device as device_mod
from merino_pl.latency.fast import fuse_qkv
from merino_pl.latency.harness import (
    PAPER_PROTOCOL,
    PROTOCOL,
    Measurement,
    Runner,
    TorchRunner,
    generation,
    measure,
    paper_latency_ms,
    serialized_bytes,
    weight_bytes_in_memory,
)
from merino_pl.latency.peers import PAPER, PEER_CONFIGS, build_peer, paper_forward

FORMAT = "merino-latency-report/1"
FORMAT_VERSION = 1  # bump with FORMAT when a key changes meaning or goes away (files without it are version 1)
JSON_NAME, MARKDOWN_NAME = "latency.json", "latency.md"
INT_BITS = {"int8": 8, "int4": 4}
# spread beyond which a row's timings (and every ratio using them) are flagged as untrustworthy
CV_LIMIT, P90_LIMIT = 0.15, 1.5
# max |logit difference| fast vs plain (and onnxruntime vs PyTorch) that still counts as "equal"
# (int: onnxruntime's MatMulNBits vs the torch packed path, same weights, fp32 arithmetic)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 1e-3, "int4": 1e-3}
PROTOCOLS = ("full", "paper")
RUNTIMES = ("torch", "onnxruntime")
EMBEDDINGS = ("fp16", "int8")


@dataclass
class Options:
    """Everything a report depends on besides the model and the device."""

    device: str = "cpu"
    precisions: tuple[str, ...] = ("fp32",)
    batch: int = 1
    seq: int = 128
    runs: int = 16
    warmup: int = 4
    decode_tokens: int = 8
    peers: tuple[str, ...] = ()
    onnx: bool = False  # add the onnxruntime rows (--runtime onnxruntime)
    fast: bool = True
    seed: int = 0
    protocols: tuple[str, ...] = ("full",)
    runtimes: tuple[str, ...] = ("torch",)  # "onnxruntime" here and ``onnx`` both add the onnxruntime rows
    generate_tokens: int = 128  # new tokens of the generation rows (0: none)
    generate_runs: int = 2
    embedding: str = "fp16"  # int rows made from a float model: its tied table fp16 or int8 (quantize --embedding)
    paper_runs: int = 16
    onnx_accuracy_level: int = 4  # MatMulNBits compute type of int rows (latency.onnx_nbits): 4 fast, 0 exact
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every invalid value, each naming what is wrong (checked before any heavy work)."""
        p = []
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            p.append(f"--device {self.device!r} is not one of cpu, cuda")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            p.append(f"--device {self.device}: no CUDA device is available here (torch {torch.__version__})")
        bad = [x for x in self.precisions if x not in PRECISIONS]
        if bad or not self.precisions:
            p.append(f"--precision {','.join(bad) or '(empty)'} is not valid (choose from {','.join(PRECISIONS)})")
        for name in ("batch", "seq", "runs", "decode_tokens", "generate_runs", "paper_runs"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.generate_tokens < 0:
            p.append(f"--generate-tokens must be >= 0, got {self.generate_tokens}")
        bad = [x for x in self.protocols if x not in PROTOCOLS]
        if bad or not self.protocols:
            p.append(f"--protocol {','.join(bad) or '(empty)'} is not valid (choose from {','.join(PROTOCOLS)})")
        bad = [x for x in self.runtimes if x not in RUNTIMES]
        if bad or not self.runtimes:
            p.append(f"--runtime {','.join(bad) or '(empty)'} is not valid (choose from {','.join(RUNTIMES)})")
        if self.onnx_accuracy_level not in (0, 1, 2, 3, 4):
            p.append(f"--onnx-accuracy-level {self.onnx_accuracy_level} is not valid (0-4)")
        if self.embedding not in EMBEDDINGS:
            p.append(f"--embedding {self.embedding!r} is not valid (choose from {','.join(EMBEDDINGS)})")
        if self.warmup < 0:
            p.append(f"--warmup must be >= 0, got {self.warmup}")
        unknown = [x for x in self.peers if x not in PEER_CONFIGS]
        if unknown:
            p.append(f"unknown peer(s) {', '.join(unknown)} (valid: {', '.join(PEER_CONFIGS)})")
        return p

    def protocol(self) -> dict[str, Any]:
        return {
            "protocols": list(self.protocols),
            "paper": PAPER_PROTOCOL if "paper" in self.protocols else None,
            "generation": f"greedy, {self.generate_tokens} new tokens after the {self.seq}-token prompt, tokens/s "
            f"(prompt included), mean of {self.generate_runs}"
            if self.generate_tokens
            else None,
            "batch": self.batch,
            "seq_len": self.seq,
            "runs": self.runs,
            "warmup": self.warmup,
            "decode_tokens": self.decode_tokens,
            "statistic": "mean (paper), median, p90 of the runs",
            "timing": PROTOCOL,
            "inputs": f"random token ids (seed {self.seed})",
            "decode": f"{self.decode_tokens} one-token steps on a {self.seq}-token KV cache, per token",
        }


def size_on_disk(loaded: LoadedModel) -> int | None:
    """Bytes of the weight files the model was loaded from (None for a recipe: nothing on disk)."""
    path = Path(loaded.path)
    if loaded.kind == "recipe":
        return None
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    return path.stat().st_size


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
        "runtime": "onnxruntime" if path == "onnxruntime" else "torch",
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
        if o.peers:
            self.skipped.append({"row": f"peers {precision}", "reason": "int rows are ours only (peers stay float)"})

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
        from merino_pl.export.onnx import OnnxRunner, export_onnx

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
        path = export_onnx(cpu_copy, self.out_dir / f"model-{precision}.onnx", accuracy_level=o.onnx_accuracy_level)
        del cpu_copy
        runner = OnnxRunner(
            path, model, o.batch, o.seq, o.decode_tokens, o.device, seed=o.seed, max_new_tokens=o.generate_tokens
        )
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


# (our path, the peer path it is compared with): the paper's full forward, and generation's prefill
COMPARISONS = (("plain", "plain"), ("fast", "last-logits"))


def paper_ratio(peer: str, model: str) -> float | None:
    """The paper's Jetson Nano speed-up of ``model`` over ``peer`` (None when it lists either not)."""
    return PAPER[peer].jetson_ms / PAPER[model].jetson_ms if peer in PAPER and model in PAPER else None


def speedups(rows: list[dict[str, Any]], model_name: str) -> list[dict[str, Any]]:
    """Peer mean / our mean per precision, like with like (paper Table 3's comparison)."""
    ours = {(r["precision"], r["path"]): r for r in rows if r["role"] == "model"}
    out = []
    for mine, theirs in COMPARISONS:
        for peer in (r for r in rows if r["role"] == "peer" and r["path"] == theirs and (r["precision"], mine) in ours):
            me = ours[(peer["precision"], mine)]
            paper = paper_ratio(peer["model"], model_name)
            out.append(
                {
                    "precision": peer["precision"],
                    "model": model_name,
                    "peer": peer["model"],
                    "paths": f"{mine} vs {theirs}",
                    **_ratios(peer, me),
                    "paper_jetson_nano": paper,
                }
            )
    return out


def paper_speedups(rows: list[dict[str, Any]], model_name: str) -> list[dict[str, Any]]:
    """Peer mean / our mean under the authors' protocol, beside the paper's Jetson Nano ratio."""
    ours = {r["precision"]: r for r in rows if r["role"] == "model"}
    out = []
    for peer in (r for r in rows if r["role"] == "peer" and r["precision"] in ours):
        me = ours[peer["precision"]]
        paper = paper_ratio(peer["model"], model_name)
        out.append(
            {
                "precision": peer["precision"],
                "model": model_name,
                "peer": peer["model"],
                "speedup": peer["mean_ms"] / me["mean_ms"],
                "peer_includes_lm_head": peer["includes_lm_head"],
                "model_includes_lm_head": me["includes_lm_head"],
                "paper_jetson_nano": paper,
            }
        )
    return out


def fast_path_gains(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain mean / fast (and onnxruntime) mean of our model, per precision."""
    out = []
    for plain in (r for r in rows if r["role"] == "model" and r["path"] == "plain"):
        for other in (
            r for r in rows if r["role"] == "model" and r["path"] != "plain" and r["precision"] == plain["precision"]
        ):
            out.append({"precision": plain["precision"], "path": other["path"], **_ratios(plain, other)})
    return out


def _ratios(slow: dict[str, Any], fast: dict[str, Any]) -> dict[str, float]:
    """slow / fast for prefill and decode: of the means (``prefill``, ``decode``: the paper's
    statistic) and of the medians (``*_median``: what an outlier run cannot move)."""
    out = {}
    for key, stat in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
        out[key] = slow[stat]["mean"] / fast[stat]["mean"]
        out[f"{key}_median"] = slow[stat]["median"] / fast[stat]["median"]
    return out


def spread_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One warning per row whose runs spread too much for its ratios to be trusted."""
    out = []
    for row in rows:
        bad = []
        for what, stat in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
            st = row[stat]
            cv = st.get("cv", st["std"] / st["mean"] if st["mean"] else 0.0)
            tail = st.get("p90_over_median", st["p90"] / st["median"] if st["median"] else 1.0)
            if cv > CV_LIMIT or tail > P90_LIMIT:
                bad.append(f"{what} CV {100 * cv:.0f} %, p90/median {tail:.2f}")
        if bad:
            out.append(
                f"noisy timings, {row['model']} {row['precision']} {row['path']}: {'; '.join(bad)} "
                f"(limits CV {100 * CV_LIMIT:.0f} %, "
                f"p90/median {P90_LIMIT}): ratios using this row are not trustworthy (compare the median columns; "
                "rerun on a quiet machine or with more --runs)"
            )
    return out


def model_info(loaded: LoadedModel, seq: int) -> dict[str, Any]:
    arch = loaded.recipe.architecture
    return {
        "name": loaded.recipe.name,
        "kind": loaded.kind,
        "path": loaded.path,
        "weights_sha256": loaded.weights_sha256,
        "size_on_disk_bytes": size_on_disk(loaded),
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "flops_g": count_flops(arch) / 1e9,  # paper convention: 1024 tokens, no LM head
        "flops_prefill_g": count_flops(arch, seq_len=seq, include_lm_head=True) / 1e9,
        "architecture": arch.to_dict(),
    }


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


def gptq_bits(loaded: LoadedModel) -> int | None:
    """The bits of a GPTQ directory (``load_quantized`` put its quantize config on the model)."""
    return int(loaded.model.config.quantization_config["bits"]) if loaded.kind == "gptq" else None


def build_report(
    source: str | Path,
    opts: Options,
    out_dir: str | Path,
    peer_factory: Callable[[str], torch.nn.Module] = build_peer,
    tegra_release: Path = device_mod.TEGRA_RELEASE,
) -> LatencyReport:
    """Measure ``source`` (anything ``load_model`` accepts) and its peers; returns the report."""
    problems = opts.problems() + check_out(out_dir)
    if problems:
        raise MerinoError("; ".join(problems))
    loaded = load_model(source, seed=opts.seed)
    limit = loaded.recipe.architecture.max_position_embeddings
    if opts.seq + opts.decode_tokens > limit:
        problems.append(
            f"--seq {opts.seq} + --decode-tokens {opts.decode_tokens} exceeds {loaded.recipe.name}'s {limit} positions"
        )
    clipped = None
    if opts.generate_tokens and opts.seq + opts.generate_tokens > limit and opts.seq < limit:
        clipped = (
            f"generation: {limit - opts.seq} new tokens, not --generate-tokens {opts.generate_tokens} "
            f"({loaded.recipe.name} has {limit} positions)"
        )
        opts = dataclasses.replace(opts, generate_tokens=limit - opts.seq, notes=[*opts.notes, clipped])
    bits = gptq_bits(loaded)
    other = [p for p in opts.precisions if bits is not None and p != f"int{bits}"]
    if other:  # a GPTQ directory holds one precision: any other would be an empty row
        problems.append(
            f"--precision {','.join(other)}: {source} is a GPTQ int{bits} directory, "
            f"timed only at --precision int{bits} "
            "(time the float model for the other precisions)"
        )
    if problems:
        raise MerinoError("; ".join(problems))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = ReportBuilder(loaded, opts, out_dir, peer_factory)
    if not opts.device.startswith("cuda"):
        slow = [p for p in opts.precisions if p in ("fp16", "bf16")]
        if slow:
            builder.warnings.append(
                f"{','.join(slow)} on CPU: allowed, but CPUs without native half units emulate it "
                "(MACHINE-NOTES: bf16 ~11x slower than fp32 here); time it on the target GPU"
            )
    if any(p in INT_BITS for p in opts.precisions) and "full" in opts.protocols:
        builder.warnings.append(
            "int rows on torch: only the packed weights stay resident; each block's weights are dequantized "
            "into a reused workspace when the block runs (fp32 GEMMs: torch's CPU int kernels are slower here). "
            "The fast int path is onnxruntime's MatMulNBits (--runtime onnxruntime)"
        )
    if "paper" in opts.protocols:
        ints = [p for p in opts.precisions if p in INT_BITS]
        if ints:
            builder.skipped.append(
                {"row": f"paper protocol {','.join(ints)}", "reason": "the authors time float models only"}
            )
    try:
        if "full" in opts.protocols:
            for p in opts.precisions:
                if p in FLOAT_DTYPES:
                    builder.precision(p)
                else:
                    builder.integer(p)
        if "paper" in opts.protocols:
            for p in (p for p in opts.precisions if p in FLOAT_DTYPES):
                builder.paper(p)
    finally:
        builder.close()
    return assemble(loaded, opts, builder, tegra_release)


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
    precisions: list[str]
    protocol: dict[str, Any]  # Options.protocol
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
        return from_fields(cls, data, "latency report", source, optional=("format_version", "created"))

    def markdown(self) -> str:
        return render_markdown(self)


def assemble(loaded: LoadedModel, opts: Options, b: ReportBuilder, tegra_release: Path) -> LatencyReport:
    import transformers

    rows = b.rows
    paper = (
        {"rows": b.paper_rows, "speedups": paper_speedups(b.paper_rows, loaded.recipe.name)} if b.paper_rows else None
    )
    mismatches = [
        f"{c['compared']} ({c['precision']}): {c['tolerance_on']} {c[c['tolerance_on']]:.2e} > {c['tolerance']}"
        for c in b.checks
        if not c["match"]
    ]
    return LatencyReport(
        model=model_info(loaded, opts.seq),
        device=device_mod.describe_device(opts.device, tegra_release),
        torch=torch.__version__,
        transformers=transformers.__version__,
        onnxruntime=_onnxruntime_version() if opts.onnx else None,
        precisions=list(opts.precisions),
        protocol=opts.protocol(),
        rows=rows,
        generation=b.generation,
        paper_protocol=paper,
        speedups=speedups(rows, loaded.recipe.name),
        fast_path=fast_path_gains(rows),
        checks=b.checks,
        skipped=b.skipped,
        warnings=b.warnings + opts.notes + spread_warnings(rows) + mismatches,
    )


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


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


def _gpu(gpu: dict[str, Any] | None) -> str:
    return f"{gpu['name']} CUDA {gpu['cuda_runtime']} driver {gpu['driver']}" if gpu else "–"


def render_markdown(report: LatencyReport | dict[str, Any]) -> str:
    """The report (or its JSON object, as ``latency.json`` holds it) as Markdown: device,
    protocol, the rows, speed-ups, checks."""
    r = report.to_json() if isinstance(report, LatencyReport) else report
    d, p, m = r["device"], r["protocol"], r["model"]
    lines = [
        f"# Latency: {m['name']} on {d['summary']}",
        "",
        f"- model: `{m['path']}` ({m['kind']}), {m['params'] / 1e6:.1f} M parameters, "
        f"{m['flops_g']:.0f} GFLOPs (paper convention), "
        f"on disk: {_mb(m['size_on_disk_bytes'])} MiB",
        f"- device: {d['device']}; CPU {d['cpu']} ({d['cpu_count']} cores, {d['torch_threads']} torch threads); "
        f"GPU {_gpu(d['gpu'])}; "
        f"Jetson {('L4T ' + d['jetson']['l4t']) if d['jetson'] else '–'}",
        f"- torch {r['torch']}, transformers {r['transformers']}"
        + (f", onnxruntime {r['onnxruntime']}" if r.get("onnxruntime") else ""),
        f"- protocol: batch {p['batch']}, sequence {p['seq_len']}, {p['warmup']} warm-up + {p['runs']} runs; "
        f"{p['decode']}; {p['timing']}",
        f"- protocols: {', '.join(p.get('protocols', ['full']))}"
        + (f"; paper = {p['paper']}" if p.get("paper") else ""),
    ]
    if r["rows"]:
        lines += [
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
            f"| {row['model']} | {row['precision']} | {row['path']} | {row['params'] / 1e6:.1f} | "
            f"{_mb(row['weights_bytes'])} | {resident} | "
            f"{_stats(row['prefill_ms'])} | {_spread(row['prefill_ms'])} | {_stats(row['decode_ms_per_token'])} | "
            f"{_spread(row['decode_ms_per_token'])} | {_mb(row['peak_memory_bytes'])} |"
        )
    if r["rows"]:
        lines += [
            "",
            f"Peak memory: {r['rows'][0]['peak_memory_method']}. Resident weights: measured, the bytes of the distinct "
            "storages behind the torch module's parameters and buffers "
            "(scratch: a packed model's dequantization workspace).",
        ]
    if r.get("generation"):
        lines += [
            "",
            f"## Generation ({r['protocol'].get('generation')})",
            "",
            "| precision | runtime | tokens/s | seconds (mean) |",
            "|---|---|---:|---:|",
        ]
        lines += [
            f"| {g['precision']} | {g['runtime']} | {g['tokens_per_s']:.2f} | {g['seconds_mean']:.2f} |"
            for g in r["generation"]
        ]
    pp = r.get("paper_protocol")
    if pp:
        lines += [
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
            lines += [
                "",
                "| precision | peer | speed-up × (peer / ours) | paper (Jetson Nano) × |",
                "|---|---|---:|---:|",
            ]
            lines += [
                f"| {x['precision']} | {x['peer']} | {x['speedup']:.2f} | {x['paper_jetson_nano']:.1f} |"
                if x["paper_jetson_nano"]
                else f"| {x['precision']} | {x['peer']} | {x['speedup']:.2f} | – |"
                for x in pp["speedups"]
            ]
    if r["speedups"]:
        lines += [
            "",
            "## Speed-up of " + m["name"] + " (peer / ours, of the means (paper) / of the medians; plain = full "
            "forward as the paper times, fast vs last-logits = generation's prefill for both)",
            "",
            "| precision | peer | paths | prefill × mean / median | decode × mean / median | paper (Jetson Nano) × |",
            "|---|---|---|---:|---:|---:|",
        ]
        for s in r["speedups"]:
            paper = f"{s['paper_jetson_nano']:.1f}" if s["paper_jetson_nano"] else "–"
            lines.append(
                f"| {s['precision']} | {s['peer']} | {s['paths']} | {_x(s, 'prefill')} | {_x(s, 'decode')} | {paper} |"
            )
    if r["fast_path"]:
        lines += [
            "",
            "## Fast path (plain / this path, of the means / of the medians)",
            "",
            "| precision | path | prefill × | decode × |",
            "|---|---|---:|---:|",
        ]
        lines += [
            f"| {g['precision']} | {g['path']} | {_x(g, 'prefill')} | {_x(g, 'decode')} |" for g in r["fast_path"]
        ]
    if r["checks"]:
        lines += ["", "## Output checks", ""]
        lines += [
            f"- {c['compared']} ({c['precision']}): max |logit diff| {c['max_abs_logit_diff']:.2e}"
            + (f", relative logit error {c['rel_logit_err']:.2e}" if "rel_logit_err" in c else "")
            + f" (tolerance {c['tolerance']} on {c.get('tolerance_on', 'max_abs_logit_diff')}): "
            + ("ok" if c["match"] else "MISMATCH")
            for c in r["checks"]
        ]
    if r["skipped"] or r["warnings"]:
        lines += ["", "## Not measured / warnings", ""]
        lines += [f"- skipped {s['row']}: {s['reason']}" for s in r["skipped"]] + [f"- {w}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, report: LatencyReport) -> str:
    """``out_dir/latency.json`` and ``out_dir/latency.md`` (atomically); returns the Markdown."""
    return report.write(out_dir)
