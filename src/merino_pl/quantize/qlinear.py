"""``QuantLinear``: the module a GPTQ directory loads into, in place of ``nn.Linear``.

It holds the packed v1 tensors as buffers (so ``state_dict`` is exactly the file's keys) and
dequantizes them **once per device and dtype**, caching the float weight outside the state dict.
Choice: the cache makes a quantized model exactly as fast as the float one on any device (a plain
``F.linear``) with the same numerics every forward, at the float model's RAM cost while it runs;
the files and the transfers stay packed. Integer kernels (exllama / marlin on CUDA, torch's
``_weight_int4pack_mm`` on CPU) are what the latency stage would add for speed-ups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        self._cache: torch.Tensor | None = None

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight on the buffers' device, cached."""
        c = self._cache
        if c is None or c.device != self.qweight.device or c.dtype != dtype:
            w = dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
            self._cache = c = w.to(dtype)
        return c

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # new tensors: drop the stale cache
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_float(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"
