"""``QuantLinear``: the module a GPTQ directory loads into, in place of ``nn.Linear``.

It holds ONLY the packed v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) as buffers,
so ``state_dict`` is exactly the file's keys and a loaded INT4 model keeps ~1/8 of the fp32
weight bytes resident. The float weight exists only while it is used:

* per call (``forward`` dequantizes, multiplies, drops it), or
* per block (``stream_blocks``): a shared block's linears are dequantized once when the block
  starts and dropped when it ends, so a layer applied ``L_j`` times pays one dequantization,
  and at most one block's float weights are alive at any moment.

Why not torch's integer kernels: on the CPUs measured (AVX2, no VNNI; docs/quantize.md)
``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` are 2-60x slower than dequantize +
fp32 GEMM. The deployment fast path is onnxruntime's ``MatMulNBits`` (``latency.onnx_export``),
which reads these same tensors.

The unpacking works on bytes: a little-endian int32 word of 4-bit codes is 4 bytes of two codes
each, so ``& 15`` and ``>> 4`` on a ``uint8`` view give every code at one byte per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from merino_pl.quantize.packing import dequantize
from merino_pl.quantize.rtn import num_groups


class QuantLinear(nn.Module):
    """A GPTQ-packed linear layer (``bits`` 4 or 8, ``group_size`` or -1 = per output channel)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        k = 32 // bits
        groups = num_groups(in_features, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("qweight", torch.zeros(in_features // k, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // k, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._order: tuple[torch.Tensor | None, int] | None = None  # (row permutation or None, rows per group)
        self._transient: torch.Tensor | None = None  # set by stream_blocks while the block runs

    # ---- layout -------------------------------------------------------------------------------
    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # new tensors: new layout
        self._order, self._transient = None, None
        super()._load_from_state_dict(*args, **kwargs)

    def _row_order(self) -> tuple[torch.Tensor | None, int]:
        """(permutation putting every group's rows together, or None when they already are; the
        rows per group). Act-order files (``desc_act``) have scattered groups; GPTQ still gives
        each group ``group_size`` rows (the last one fewer), so sorting rows by group suffices."""
        if self._order is None:
            g = self.g_idx.long()
            size = self.in_features if self.group_size == -1 else min(self.group_size, self.in_features)
            counts = torch.bincount(g, minlength=self.scales.shape[0])
            if len(counts) != self.scales.shape[0] or bool((counts[:-1] != size).any()) or int(counts[-1]) > size:
                raise ValueError(f"g_idx of a {self.in_features}-input layer does not hold groups of {size} rows")
            trivial = bool(torch.equal(g, torch.arange(self.in_features, device=g.device) // size))
            self._order = (None if trivial else torch.argsort(g, stable=True), size)
        return self._order

    def codes(self) -> torch.Tensor:
        """(in, out) uint8 integer codes in original row order (one byte each)."""
        rows, out = self.qweight.shape
        b = self.qweight.contiguous().view(torch.uint8).view(rows, out, 4).transpose(1, 2).contiguous()  # (rows, byte, out)
        if self.bits == 8:
            return b.view(rows * 4, out)
        return torch.stack((b & 15, b >> 4), dim=2).view(rows * 8, out)  # byte j: rows 2j (low), 2j+1 (high)

    def zeros_float(self) -> torch.Tensor:
        """(groups, out) zero points as floats (the stored ``zero - 1``, plus one)."""
        g, cols = self.qzeros.shape
        b = self.qzeros.contiguous().view(torch.uint8).view(g, cols * 4)
        z = b if self.bits == 8 else torch.stack((b & 15, b >> 4), dim=-1).view(g, cols * 8)
        return z.float() + 1

    # ---- dequantization -----------------------------------------------------------------------
    def dequantized_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (in, out) weight, rows grouped (in ``_row_order``): what ``forward`` multiplies by."""
        perm, size = self._row_order()
        codes = self.codes()
        if perm is not None:
            codes = codes.index_select(0, perm.to(codes.device))
        s = self.scales.float()
        zs = self.zeros_float() * s
        w = codes.to(torch.float32)
        full = (self.in_features // size) * size
        if full:  # whole groups in one broadcast: (groups, size, out)
            body = w[:full].view(full // size, size, -1)
            body.mul_(s[: full // size, None]).sub_(zs[: full // size, None])
        if full < self.in_features:  # the shorter last group
            w[full:].mul_(s[-1]).sub_(zs[-1])
        return w if dtype == torch.float32 else w.to(dtype)

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in original column order (a fresh tensor, never kept)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from merino_pl.latency.onnx_nbits import matmul_nbits  # the graph node, not a computation

            return matmul_nbits(self, x)
        w = self._transient
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantized_t(x.dtype)
        perm, _ = self._row_order()
        if perm is not None:
            x = x.index_select(-1, perm.to(x.device))
        y = x @ w  # (..., in) @ (in, out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def stream_blocks(model: nn.Module) -> int:
    """Dequantize each shared block's ``QuantLinear`` s once per block call (not once per
    application) and drop them when the block returns; returns how many blocks were hooked.
    Idempotent. Outputs are bit-identical to the per-call path."""
    from merino_pl.model import SharedBlock

    hooked = 0
    for block in (m for m in model.modules() if isinstance(m, SharedBlock)):
        qlins = [m for m in block.modules() if isinstance(m, QuantLinear)]
        if not qlins or getattr(block, "_merino_streamed", False):
            hooked += bool(qlins)
            continue

        def start(_mod: nn.Module, args: tuple, qlins: list[QuantLinear] = qlins) -> None:
            if torch.onnx.is_in_onnx_export():
                return
            dtype = args[0].dtype
            for q in qlins:
                q._transient = q.dequantized_t(dtype)

        def stop(_mod: nn.Module, _args: tuple, _out: Any, qlins: list[QuantLinear] = qlins) -> None:
            for q in qlins:
                q._transient = None

        block.register_forward_pre_hook(start)
        block.register_forward_hook(stop, always_call=True)
        block._merino_streamed = True
        hooked += 1
    return hooked


def float_weight_bytes(model: nn.Module) -> int:
    """Bytes of floating-point tensors held by ``QuantLinear`` modules besides their fp16 scales
    and biases: 0 for a packed model (a test keeps it so)."""
    total = 0
    for m in (m for m in model.modules() if isinstance(m, QuantLinear)):
        for name, t in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]:
            if t.is_floating_point() and name not in ("scales", "bias"):
                total += t.numel() * t.element_size()
        if m._transient is not None:
            total += m._transient.numel() * m._transient.element_size()
    return total
