"""The GPTQ v1 tensor layout (auto-gptq / GPTQModel ``checkpoint_format: "gptq"``, what
transformers' GPTQ integration and the exllama / marlin kernels read).

For a linear with ``in`` inputs and ``out`` outputs, ``k = 32 // bits`` codes per int32:

* ``qweight``  int32 (in // k, out): input rows ``r·k … r·k + k − 1`` of the (in, out) code matrix
  in one word, the first in the lowest bits;
* ``qzeros``   int32 (groups, out // k): the zero points **minus one** (the v1 convention),
  packed the same way along the output dimension;
* ``scales``   fp16  (groups, out);
* ``g_idx``    int32 (in,): the group of each input column (not monotonic with act-order).

Dequantized weight (out, in): ``W[o, i] = scales[g_idx[i], o] · (code[i, o] − (zero[g_idx[i], o]))``.
"""

from __future__ import annotations

import torch

from merino_pl.core.quant.rtn import QuantizedWeight


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) integer codes in [0, 2^bits) -> (n // k, m) int32, k consecutive rows per word."""
    k = 32 // bits
    n, m = codes.shape
    c = codes.to(torch.int64).view(n // k, k, m)
    shifts = (torch.arange(k, dtype=torch.int64) * bits).view(1, k, 1)
    words = (c << shifts).sum(dim=1)  # disjoint bit ranges: the sum is an OR
    return _to_int32(words)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: (n // k, m) int32 -> (n, m) int32 codes."""
    k = 32 // bits
    shifts = (torch.arange(k, dtype=torch.int32, device=words.device) * bits).view(1, k, 1)
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)  # arithmetic shift, then mask
    return codes.reshape(-1, words.shape[-1])


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one linear."""
    return {
        "qweight": pack_rows(q.codes.t(), q.bits),  # (in, out) packed along `in`
        "qzeros": pack_rows((q.zeros - 1).t(), q.bits).t().contiguous(),  # packed along `out`
        "scales": q.scales.to(torch.float16),
        "g_idx": q.g_idx.to(torch.int32),
    }


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """(groups, out // k) int32 -> (groups, out) zero points (the stored value + 1)."""
    return unpack_rows(qzeros.t(), bits).t() + 1


def dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """The (out, in) weight in the dtype of ``scales``' float32 upcast (exact for fp16 scales)."""
    codes = unpack_rows(qweight, bits)  # (in, out)
    zeros = unpack_zeros(qzeros, bits)  # (groups, out)
    g = g_idx.long()
    w = scales.float()[g] * (codes - zeros[g]).float()  # (in, out)
    return w.t()
