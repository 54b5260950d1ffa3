"""ONNX export with KV-cache inputs/outputs, for onnxruntime and TensorRT on a Jetson.

Graph signature (one graph serves prefill and decode; every dimension named is dynamic), with
the input / output names optimum and onnxruntime-genai use for decoder-only models:

    inputs   input_ids                   int64 (batch, seq)
             attention_mask              int64 (batch, past + seq)   1 = real token, 0 = padding
             position_ids                int64 (batch, seq)          absolute positions of these tokens
             past_key_values.{i}.key     float (batch, heads_i, past, 64)   i = 0 .. Σ L_j - 1
             past_key_values.{i}.value   float (batch, heads_i, past, 64)
    outputs  logits                      float (batch, seq, vocab)
             present.{i}.key / present.{i}.value  (batch, heads_i, past + seq, 64)

Prefill passes ``past = 0`` tensors; each decode step feeds the presents back as pasts. There is
one KV entry per layer *application* (a block applied L_j times keeps L_j entries), and
``heads_i`` follows that application's block width. Cache slot j is visible to the query in slot
``past + t`` iff j <= past + t and ``attention_mask[j] == 1`` (left padding works as in PyTorch).

A GPTQ model (``QuantLinear``, optionally the int8 ``QuantEmbedding``) exports its quantized
layers as onnxruntime's ``MatMulNBits`` (``onnx_nbits.py``): the graph stays packed.

``transformers``' ``DynamicCache`` is not a tensor, so the exporter gets a thin wrapper that
takes and returns flat tensors; the model inside is the very ``MerinoForCausalLM`` PyTorch runs.
The graph is run through ``export.session.DecoderSession`` (the names, the feeds, the cache).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_path
from merino_pl.export.session import FIXED_INPUTS, GRAPH_NAME, PAST, PRESENT, WEIGHTS_KEY

OPSET = 18


class _FlatCache:
    """Duck-types the one method the decoder calls on a cache: ``update(k, v, idx)``."""

    def __init__(self, past: list[torch.Tensor]) -> None:
        self.past = past  # [k0, v0, k1, v1, ...]
        self.present: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past[2 * idx], k], dim=2)  # (B, nh, past + T, hs)
        v = torch.cat([self.past[2 * idx + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class OnnxDecoder(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` over a MerinoForCausalLM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        P, T = past[0].shape[2], input_ids.shape[1]
        keys = torch.arange(P + T, device=input_ids.device)
        queries = P + torch.arange(T, device=input_ids.device)
        mask = (keys[None, :] <= queries[:, None])[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        mask = mask | ~mask.any(-1, keepdim=True)  # a padding query sees everything (its output is unused): no NaN
        cache = _FlatCache(list(past))
        hidden = self.model.model(input_ids, position_ids, mask, cache)
        return (self.model.model.logits(hidden), *cache.present)


def cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(heads, head_dim) of each layer application, in cache order."""
    arch = model.arch
    return [(b.embed_dim // arch.head_dim, arch.head_dim) for b in arch.blocks for _ in range(b.num_layers)]


def io_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """optimum's names: ``past_key_values.{i}.key`` / ``.value`` in, ``present.{i}.key`` / ``.value`` out."""
    n = len(cache_shapes(model))
    past = [f"{PAST}{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"{PRESENT}{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    return [*FIXED_INPUTS, *past], ["logits", *present]


def float_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def example_inputs(model: nn.Module, batch: int, seq: int, past: int) -> tuple[torch.Tensor, ...]:
    """Random ids, an all-ones mask, positions after ``past`` cached tokens, and a random cache of that length."""
    dtype = float_dtype(model)
    ids = torch.randint(0, model.arch.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.randn(batch, h, past, d, dtype=dtype) for h, d in cache_shapes(model) for _ in range(2)]
    return (ids, mask, pos, *cache)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    opset: int = OPSET,
    accuracy_level: int | None = None,
    weights_sha256: str | None = None,
) -> Path:
    """Write ``model`` (a MerinoForCausalLM) as ONNX with KV-cache inputs; atomic, one file.
    ``accuracy_level``: the quantized layers' MatMulNBits compute type (``onnx_nbits``);
    ``weights_sha256``: the SHA-256 of the directory's weights file the graph was made from, kept in
    the graph's metadata (``WEIGHTS_KEY``) so a graph handed over with another model is refused."""
    if not hasattr(model, "arch"):
        raise MerinoError(f"ONNX export supports MeRino models only, got {type(model).__name__}")
    from merino_pl.core.quant.onnx_nbits import ACCURACY_LEVEL, prepare

    path = Path(path)
    model = model.eval()
    prepare(
        model, ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    )  # quantized layers -> MatMulNBits (a float model has none)
    wrapper = OnnxDecoder(model)
    in_names, out_names = io_names(model)
    # dim sizes of 0 / 1 would be specialised by the exporter: trace with 2 / 3 / 4
    args = example_inputs(model, batch=2, seq=3, past=4)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    total = torch.export.Dim("total")  # past + seq (the exporter relates it to the cache itself)
    # structure follows forward(input_ids, attention_mask, position_ids, *past): the varargs are one tuple
    dyn = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past} for _ in in_names[3:]),
    )
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" x4: noise for an LM
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            _export(wrapper, args, dyn, in_names, out_names, opset, tmp, weights_sha256)
    finally:
        onnx_log.setLevel(level)
    return path


def export_quantized_onnx(loaded: Any, out: str | Path) -> Path:
    """``merino-pl export GPTQ_DIR --onnx --out OUT``: the quantized directory's files, plus
    ``GRAPH_NAME`` (model.onnx) with its quantized layers as MatMulNBits; ``out`` replaced atomically."""
    import shutil

    from merino_pl.core.checkpoint import WEIGHTS_NAME
    from merino_pl.core.io import atomic_dir, sha256_file

    src, out = Path(loaded.path), Path(out)
    with atomic_dir(out) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".onnx":
                shutil.copy2(f, tmp / f.name)
        export_onnx(loaded.model, tmp / GRAPH_NAME, weights_sha256=sha256_file(tmp / WEIGHTS_NAME))
    return out


def _export(
    wrapper: nn.Module,
    args: tuple,
    dyn: tuple,
    in_names: list[str],
    out_names: list[str],
    opset: int,
    tmp: Path,
    weights_sha256: str | None = None,
) -> None:
    try:
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dyn,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    except Exception as e:  # the exporter's own report is long; keep its first line
        raise MerinoError(f"ONNX export failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    if weights_sha256:
        program.model.metadata_props[WEIGHTS_KEY] = weights_sha256
    program.save(str(tmp), external_data=False)
