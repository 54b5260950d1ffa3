"""torch's int4 "tinygemm" kernel for ``QuantLinear`` on CUDA (``aten._weight_int4pack_mm``).

The kernel multiplies bf16 activations by 4-bit weights packed in its own tiled layout, with one
(scale, zero) pair per (group, output): ``w = (q − 8) · scale + zero``. A GPTQ group's
``w = s · (q − z)`` is that with ``scale = s`` and ``zero = (8 − z) · s``, so a GPTQ file converts
exactly (up to bf16 rounding of the scales and activations). Built once per layer, on its first
CUDA call, from the resident packed tensors; the layout holds the same 4 bits per weight.

Where it applies: 4-bit layers whose group size is 32, 64, 128 or 256 and divides the input width
(a shorter last group, as MeRino-64M's 960-wide FFN has at group 128, does not fit the kernel's
tiles), outputs a multiple of 16. Act-order layers permute the activations first, as the
dequantizing path does. Every other layer, and every CPU, keeps the dequantizing path: on the
CPUs measured here the CPU variant of this kernel (``_weight_int4pack_mm_for_cpu``) is 6-60x
slower than dequantize + fp32 GEMM (docs/quantize.md).

No GPU was lent while this was written, so its CUDA half is guarded rather than trusted: the first
call compares the kernel with the dequantizing path on a random input and, if they disagree,
warns once and keeps the dequantizing path for that layer. The conversion itself (scales, zeros,
group order, act-order) is tested on CPU through the CPU variant of the same kernel, which takes
the same scales-and-zeros tensor (``tests/test_qlinear.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZES = (32, 64, 128, 256)
CHECK_REL_ERR = 2e-2  # bf16 activations and scales against the fp32 dequantizing path


@dataclass
class Int4Kernel:
    packed: torch.Tensor  # the kernel's tiled layout of the (out, in) codes, columns grouped
    scales_and_zeros: torch.Tensor  # (groups, out, 2) bf16: scale, zero with w = (q - 8)·scale + zero
    group_size: int


def applies(bits: int, in_features: int, out_features: int, group_size: int) -> bool:
    """Whether the kernel's shape rules admit this layer."""
    return (
        bits == 4
        and group_size in GROUP_SIZES
        and in_features % group_size == 0  # no shorter last group (and so a multiple of 32)
        and out_features % 16 == 0  # the CPU variant's rule; CUDA's (8) is looser
    )


def inner_k_tiles(in_features: int) -> int:
    return 8 if in_features % 128 == 0 else 4 if in_features % 64 == 0 else 2


def build(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Int4Kernel:
    """The kernel's tensors from ``codes`` (out, in) uint8 in grouped column order, ``scales`` and
    ``zeros`` (groups, out) as GPTQ defines them (``w = s · (q − z)``), on ``codes``' device."""
    N, K = codes.shape
    s = scales.float()
    zero = (8 - zeros.float()) * s  # (q - 8)·s + (8 - z)·s = s·(q - z)
    dtype = torch.bfloat16 if codes.is_cuda else torch.float32
    sz = torch.stack((s, zero), dim=-1).to(dtype).contiguous()  # (groups, out, 2)
    tiles = inner_k_tiles(K)
    if codes.is_cuda:  # (out, in / 2) uint8, two codes per byte, the even column in the high nibble
        c = codes.to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(((c[:, ::2] << 4) | c[:, 1::2]).contiguous(), tiles)
    else:  # the CPU variant takes the codes as (out, in) int32
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), tiles)
    return Int4Kernel(packed, sz, group_size)


def matmul(x: torch.Tensor, kernel: Int4Kernel) -> torch.Tensor:
    """``x`` (..., in), columns in grouped order, times the layer's weight: (..., out) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(
            x2.to(torch.bfloat16), kernel.packed, kernel.group_size, kernel.scales_and_zeros
        )
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.float(), kernel.packed, kernel.group_size, kernel.scales_and_zeros
        )
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def build_checked(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, weight: torch.Tensor, name: str
) -> Int4Kernel | None:
    """``build`` then ``checked``; a kernel this torch or GPU lacks (tinygemm needs an sm80+ GPU
    for bf16) is the same warning and None."""
    try:
        return checked(build(codes, scales, zeros, group_size), weight, name)
    except (RuntimeError, NotImplementedError) as e:
        warnings.warn(
            f"{name}: torch's int4 kernel is not available here ({str(e).splitlines()[0]}); "
            "this layer keeps the dequantizing path",
            stacklevel=3,
        )
        return None


def checked(kernel: Int4Kernel, weight: torch.Tensor, name: str) -> Int4Kernel | None:
    """``kernel`` if it reproduces ``F.linear`` with the dequantized ``weight`` (out, in) on a
    random input within ``CHECK_REL_ERR``; otherwise a warning and None (the caller keeps the
    dequantizing path)."""
    g = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(4, weight.shape[1], generator=g, device=weight.device)
    want = F.linear(x, weight.float())
    got = matmul(x, kernel).float()
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    if err <= CHECK_REL_ERR:
        return kernel
    warnings.warn(
        f"{name}: torch's int4 kernel disagrees with the dequantized weight (relative error {err:.3g}); "
        "this layer keeps the dequantizing path",
        stacklevel=3,
    )
    return None
