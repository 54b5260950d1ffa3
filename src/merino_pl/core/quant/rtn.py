"""The integer grid both methods share, and the round-to-nearest (RTN) baseline.

A weight row segment ``w`` (one output channel × one group of ``group_size`` input columns) is
stored as codes ``q = clamp(round(w / s) + z, 0, 2^bits - 1)`` and read back as ``s · (q - z)``:
``s`` per (group, output channel) in fp16, ``z`` an integer. Symmetric grids put ``z`` in the
middle (``2^(bits-1)``), as auto-gptq / GPTQModel do, so the ``zero - 1`` of the GPTQ v1 file
format never wraps around.

RTN quantizes every group of the float weight independently; GPTQ (``gptq.py``) uses the same
grid but picks codes column by column, compensating each rounding error with the Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """One linear's quantized weight in the original column order (what ``format.py`` packs).

    ``codes``: (out, in) integer codes in [0, 2^bits); ``scales``: (groups, out), fp16 values
    kept in fp32; ``zeros``: (groups, out) integers; ``g_idx``: (in,) group of every input column.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The (out, in) float32 weight the packed tensors stand for."""
        s = self.scales[self.g_idx].t()  # (groups, out) -> (in, out) -> (out, in)
        z = self.zeros[self.g_idx].t()
        return s * (self.codes.float() - z.float())


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale (fp16-representable, as stored) and integer zero of each row of ``w``.

    ``w``: (rows, columns) -> scales (rows,), zeros (rows,).
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)  # the grid always holds 0 exactly
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * xmax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale.clamp(min=1e-12))
        # GPTQ v1 files store zero - 1 in `bits` bits: a zero of 0 would wrap to 2^bits - 1 in
        # every v1 reader. Such rows (all weights >= 0) use zero 1 and a range stretched to fit.
        low = zero < 1
        scale = torch.where(low, xmax / (maxq - 1), scale)
        zero = zero.clamp(min=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
    scale = scale.half().float()  # exactly what the fp16 `scales` tensor will hold
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` (rows, ...) on the grid (``scale``, ``zero`` broadcast per row)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def num_groups(columns: int, group_size: int) -> int:
    """Groups per row: ceil(columns / group_size), the last one shorter when it does not divide
    (as auto-gptq / GPTQModel do: MeRino-64M's FFN widths 960 and 1344 are not multiples of 128)."""
    return 1 if group_size == -1 else -(-columns // group_size)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest: each (output channel, group) on its own min-max grid; no calibration."""
    w = weight.detach().float()
    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    codes = torch.empty(rows, cols)
    scales, zeros = torch.empty(num_groups(cols, group_size), rows), torch.empty(num_groups(cols, group_size), rows)
    for g, start in enumerate(range(0, cols, gs)):
        part = w[:, start : start + gs]
        scales[g], zeros[g] = grid_params(part, bits, sym)
        codes[:, start : start + gs] = quantize_codes(part, scales[g][:, None], zeros[g][:, None], bits)
    g_idx = torch.arange(cols) // gs
    return QuantizedWeight(
        codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx.to(torch.int32), bits, group_size
    )
