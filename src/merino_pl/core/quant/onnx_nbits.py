"""Quantized layers as onnxruntime's block-quantized operators, for ``onnx_export``.

* every GPTQ ``QuantLinear`` becomes one ``com.microsoft.MatMulNBits`` (4 or 8 bit) reading its
  codes, fp32 scales and packed zero points;
* the int8 token table (``QuantEmbedding``) is ONE uint8 initializer shared by the lookup (a
  ``Gather`` of rows, then ``(q - 128) · scale``: the block-quantized gather written out in
  standard ops) and the tied head (an 8-bit ``MatMulNBits`` whose blocks all carry the row's scale).

MatMulNBits layout (onnxruntime ``contrib_defs``; ``N`` outputs, ``K`` inputs, block ``b``):
``B`` uint8 (N, ceil(K / b), b · bits / 8), codes of row n in input order, two 4-bit codes per
byte with the first in the low nibble; ``scales`` (N · ceil(K / b)); ``zero_points`` uint8 packed
the same way per row; the dequantized weight is ``(q − zero) · scale``, the GPTQ convention.
The block must be a power of two >= 16: a GPTQ group is written as group / b blocks that share
its scale and zero, so every group size that has such a divisor (128, -1 over widths such as
960 = 15 · 64) exports exactly. Act-order files (``g_idx`` not ascending) are exported with their
rows sorted by group and a ``Gather`` that permutes the activations the same way (exllama's
trick), which keeps the fast kernel.

``prepare`` attaches these tensors as non-persistent buffers before the export; the forward
methods of ``QuantLinear`` / ``QuantEmbedding`` call the functions below only while
``torch.onnx.is_in_onnx_export()``, so nothing here runs on the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import nn

from merino_pl.core.errors import MerinoError

# MatMulNBits compute type. 4: activations quantized to int8 per block inside the kernel, the
# fast path (1024 x 4096 GEMV, one thread: 4-bit 0.08 ms, 8-bit 0.09 ms; fp32 MatMul 1.5 ms);
# 0: fp32 arithmetic, equal to the torch path to ~1e-7, but 8-bit then dequantizes B on every
# call (18 ms for the same GEMV, 200 ms for a 50 k x 768 head): exact, not fast.
ACCURACY_LEVEL = 4


def block_for(rows_per_group: int) -> int:
    """Largest power of two >= 16 (at most 256) dividing a group's rows."""
    for b in (256, 128, 64, 32, 16):
        if rows_per_group % b == 0:
            return b
    raise MerinoError(
        f"a GPTQ group of {rows_per_group} rows has no power-of-two block >= 16 dividing it: "
        "MatMulNBits cannot hold it (quantize with --group-size 128, 64 or 32)"
    )


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2m) uint8 codes < 16 -> (..., m) bytes, the first of each pair in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def nbits_tensors(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, rows_per_group: int, bits: int
) -> dict[str, torch.Tensor]:
    """MatMulNBits ``B`` / ``scales`` / ``zero_points`` from (K, N) uint8 codes whose groups are
    contiguous runs of ``rows_per_group`` rows, (groups, N) float scales and integer zeros."""
    K, N = codes.shape
    b = block_for(rows_per_group)
    k_blocks = -(-K // b)
    block_group = (torch.arange(k_blocks) * b) // rows_per_group  # the group each block lies in
    padded = torch.zeros(k_blocks * b, N, dtype=torch.uint8)
    padded[:K] = codes
    w = padded.t().contiguous().view(N, k_blocks, b)  # (N, blocks, b): row n's codes in input order
    z = zeros.t()[:, block_group].to(torch.uint8)  # (N, blocks)
    if bits == 4:
        w = _pack_nibbles(w)
        if k_blocks % 2:
            z = torch.cat([z, torch.zeros(N, 1, dtype=torch.uint8)], dim=1)
        z = _pack_nibbles(z)
    return {
        "B": w.contiguous(),
        "scales": scales.float().t()[:, block_group].reshape(-1).contiguous(),
        "zero_points": z.reshape(-1).contiguous(),
        "block_size": torch.tensor(b),
        "K": torch.tensor(K),
    }


def prepare(model: nn.Module, accuracy_level: int = ACCURACY_LEVEL) -> int:
    """Attach the ONNX tensors to every quantized module of ``model``; returns how many."""
    from merino_pl.core.quant.qembedding import QuantEmbedding
    from merino_pl.core.quant.qlinear import QuantLinear

    done = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            perm, size = m._row_order()
            codes = m.codes()
            if perm is not None:
                codes = codes.index_select(0, perm)
            t = nbits_tensors(codes, m.scales, m.zeros_float().round().to(torch.int64), size, m.bits)
            m._onnx = {"block_size": int(t.pop("block_size")), "K": int(t.pop("K")), "accuracy_level": accuracy_level}
            for name, v in t.items():
                m.register_buffer(f"onnx_{name}", v, persistent=False)
            if perm is not None:
                m.register_buffer("onnx_perm", perm.to(torch.int64), persistent=False)
            done += 1
        elif isinstance(m, QuantEmbedding):
            V, d = m.qweight.shape
            codes = (m.qweight.to(torch.int16) + 128).to(torch.uint8).t()  # (d, V): K = d inputs, N = V rows
            t = nbits_tensors(codes, m.scales.float()[None], torch.full((1, V), 128), d, 8)
            m._onnx = {"block_size": int(t.pop("block_size")), "K": int(t.pop("K")), "accuracy_level": accuracy_level}
            for name, v in t.items():
                m.register_buffer(f"onnx_{name}", v, persistent=False)
            m.register_buffer("onnx_row_scales", m.scales.float(), persistent=False)
            done += 1
    return done


def _nbits(x: torch.Tensor, m: nn.Module, N: int, bits: int) -> torch.Tensor:
    attrs = {
        "K": m._onnx["K"],
        "N": N,
        "bits": bits,
        "block_size": m._onnx["block_size"],
        "accuracy_level": m._onnx["accuracy_level"],
    }
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulNBits",
        [x, m.onnx_B, m.onnx_scales, m.onnx_zero_points],
        attrs,
        dtype=x.dtype,
        shape=[*x.shape[:-1], N],
        version=1,
    )


def matmul_nbits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``QuantLinear.forward`` in the graph: (permute,) MatMulNBits, (+ bias)."""
    if not hasattr(m, "onnx_B"):
        raise MerinoError("a QuantLinear reached the ONNX exporter without latency.onnx_nbits.prepare(model)")
    if hasattr(m, "onnx_perm"):
        x = x.index_select(-1, m.onnx_perm)
    y = _nbits(x, m, m.out_features, m.bits)
    return y if m.bias is None else y + m.bias


def head_nbits(m: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The tied head over the int8 table: one 8-bit MatMulNBits."""
    return _nbits(hidden, m, m.num_embeddings, 8)


def gather_rows(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The embedding lookup over the same uint8 bytes: rows, minus 128, times the row scale."""
    rows = m.onnx_B.index_select(0, ids.reshape(-1)).reshape(*ids.shape, m.embedding_dim)  # (..., d) uint8
    return (rows.to(torch.float32) - 128.0) * m.onnx_row_scales[ids][..., None]
