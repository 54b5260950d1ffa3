"""Measure a device latency table over a search space (``merino-pl latency profile``).

Times, on the device at hand and with the report's protocol, every piece the search's estimate
adds up (``merino_pl.core.latency_table``: fixed + Σ projections + Σ_j L_j · layer(E_j, F_j)):

* ``layers``: ONE application of a decoder layer for every (E, F) of the space, over a
  ``batch × seq_len`` prefill (no KV cache), with the model's own ``DecoderLayer``;
* ``projections``: every ``in → out`` linear a searched architecture can hold;
* ``fixed``: token + position embeddings, a final norm of width ``d_model`` and the tied LM head
  over all ``seq_len`` positions (what the paper's prefill computes).

``runtime="onnxruntime"`` times each piece as the ONNX graph ``latency kit`` ships for it, through
an onnxruntime session on this CPU (the table then describes the deployed runtime, and a kit's
results on this machine should match it); ``"torch"`` times the modules themselves.

The paper's full space is 512 layer shapes and 152 projections; at 16 runs that is minutes on a
laptop CPU and longer on a Jetson, hence ``--runs`` and the progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from merino_pl.core.config import BlockConfig, MerinoConfig
from merino_pl.core.errors import MerinoError
from merino_pl.core.latency_table import LatencyTable
from merino_pl.core.model import DecoderLayer, make_norm
from merino_pl.core.quant.format import FLOAT_DTYPES
from merino_pl.core.space import SearchSpace
from merino_pl.latency.device import describe_device
from merino_pl.latency.timing import Stats, synchronizer, time_calls


def _mean_ms(fn: Callable[[], Any], device: str, runs: int, warmup: int) -> float:
    with torch.inference_mode():
        return Stats.from_samples(time_calls(fn, runs, warmup, synchronizer(device))).mean


def _layer_config(space: SearchSpace, embed_dim: int, ffn_dim: int) -> MerinoConfig:
    """A one-block architecture with the space's fixed parts (norm, activation, bias, ...)."""
    return space.config([BlockConfig(embed_dim=embed_dim, ffn_dim=ffn_dim, num_layers=1)])


class _Layer(nn.Module):
    """One application of the model's own decoder layer over a prefill (no KV cache)."""

    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, None, None, 0)


class _Projection(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _Fixed(nn.Module):
    """Token + position embeddings, the final norm (at d_model: it costs the same order at E_N,
    a few µs) and the tied LM head over all positions."""

    def __init__(self, cfg: MerinoConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.norm = make_norm(cfg, cfg.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        h = self.norm(self.tokens(ids) + self.positions(pos))
        return F.linear(h, self.tokens.weight)  # (B, T, V): the tied LM head


Piece = tuple[dict[str, Any], nn.Module, torch.Tensor]


def pieces(
    space: SearchSpace, batch: int, seq: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Iterator[Piece]:
    """(table entry without its time, module, input) of every piece of ``space``: the layer
    shapes, the projections, then the fixed part. ``latency profile`` times them with torch;
    ``latency kit`` exports them for the device (``export_piece``)."""
    opts: dict[str, Any] = dict(device=device, dtype=dtype)
    for e, f in space.layer_shapes():
        layer = DecoderLayer(_layer_config(space, e, f), e, f)
        yield (
            {"role": "layer", "embed_dim": e, "ffn_dim": f},
            _Layer(layer).to(**opts).eval(),
            torch.randn(batch, seq, e, **opts),
        )
    for i, o in space.projection_shapes():
        weight = torch.randn(o, i) * i**-0.5
        yield (
            {"role": "projection", "in": i, "out": o},
            _Projection(weight).to(**opts),
            torch.randn(batch, seq, i, **opts),
        )
    cfg = _layer_config(space, space.embed_dims[0], space.ffn_dim(space.embed_dims[0], space.ffn_choices[0]))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    yield {"role": "fixed", "d_model": cfg.d_model, "vocab_size": cfg.vocab_size}, _Fixed(cfg).to(**opts).eval(), ids


def export_piece(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``module(example)`` as an ONNX graph with static shapes (the kit's protocol is fixed)."""
    import logging
    import warnings

    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # "torchvision is not installed": noise for an LM
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=["x"], output_names=["y"], opset_version=18, verbose=False
            )
        program.save(str(path), external_data=False)
    finally:
        log.setLevel(level)


def _ort_timer(workdir: Path, threads: int | None) -> Callable[[nn.Module, torch.Tensor, int, int], float]:
    """Mean ms of a piece run as its exported ONNX graph in an onnxruntime CPU session (the session
    options of the kit's runner: ``threads`` intra-op threads, onnxruntime's default optimizations)."""
    import onnxruntime as ort

    def time_piece(module: nn.Module, x: torch.Tensor, runs: int, warmup: int) -> float:
        path = workdir / "piece.onnx"
        export_piece(module, x, path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.cpu().numpy()}
        return Stats.from_samples(time_calls(lambda: sess.run(None, feed), runs, warmup, synchronizer("cpu"))).mean

    return time_piece


def profile_space(
    space: SearchSpace,
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = 1,
    seq: int = 128,
    runs: int = 16,
    warmup: int = 2,
    progress: bool = True,
    runtime: str = "torch",
    threads: int | None = None,
) -> LatencyTable:
    """Measure every layer shape, projection and the fixed part of ``space`` on ``device``, with
    torch or (``runtime="onnxruntime"``, CPU) as the kit's ONNX graphs through onnxruntime."""
    import tempfile

    max_pos = int(space.architecture.get("max_position_embeddings", 2048))
    if seq > max_pos:
        raise MerinoError(f"--seq {seq} exceeds the space's max_position_embeddings {max_pos}")
    total = len(space.layer_shapes()) + len(space.projection_shapes()) + 1
    bar = tqdm(total=total, desc="profile", unit="shape", disable=not progress, dynamic_ncols=True)
    layers, projs, fixed = [], [], {}
    workdir = tempfile.TemporaryDirectory(prefix="merino-profile-")
    ort_ms = _ort_timer(Path(workdir.name), threads) if runtime == "onnxruntime" else None
    for entry, module, x in pieces(space, batch, seq, device, FLOAT_DTYPES[precision]):
        role = entry.pop("role")
        if ort_ms is not None:
            entry["ms"] = ort_ms(module, x, runs, warmup)
        else:
            entry["ms"] = _mean_ms(lambda module=module, x=x: module(x), device, runs, warmup)
        {"layer": layers, "projection": projs}.get(role, []).append(entry)
        if role == "fixed":
            fixed = entry
        bar.set_postfix_str(role)
        bar.update(1)
    bar.close()
    workdir.cleanup()
    described = describe_device(device)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        described = {**described, "runtime": f"onnxruntime {ort.__version__}"}
    return LatencyTable(
        fixed=fixed,
        layers=layers,
        projections=projs,
        device=described,
        torch=torch.__version__,
        precision=precision,
        batch=batch,
        seq_len=seq,
    )
