"""``QuantLinear``: the module a GPTQ directory loads into, in place of ``nn.Linear``.

It holds ONLY the packed v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) as buffers,
so ``state_dict`` is exactly the file's keys and a loaded INT4 model keeps ~1/8 of the fp32
weight bytes resident. The float weight exists only while it is used:

* per call (``forward`` dequantizes, multiplies, drops it), or
* per block (``stream_blocks``): a shared block's linears are dequantized once when the block
  starts, into a ``Workspace`` every block reuses, and dropped when it ends: a layer applied
  ``L_j`` times pays one dequantization, and the scratch is one block's size, not the model's.

Why not torch's integer kernels: on both CPUs measured (AVX2 without VNNI, and this AVX-512 VNNI
one; docs/quantize.md) ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` are 6-60x slower
than dequantize + fp32 GEMM. The deployment fast path is onnxruntime's ``MatMulNBits``
(``export.onnx``), which reads these same tensors.

The unpacking is written by hand (no torch op reads GPTQ's layout): ``qweight`` is held with
each output row's int32 words contiguous (repacked once at load, ``_load_from_state_dict``), so
the little-endian bytes of a row are its codes in input order: nothing more for 8 bits, one
int16 spread for 4 bits; symmetric codes are recentred in bytes and scaled in one float pass;
the float weight is (out, in), as ``nn.Linear``'s, and ``F.linear`` adds the bias inside the
GEMM (``bench/qlinear.py`` measures each step against fp32 ``nn.Linear``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from merino_pl.core.quant import tinygemm
from merino_pl.core.quant.packing import dequantize
from merino_pl.core.quant.rtn import num_groups


class QuantLinear(nn.Module):
    """A GPTQ-packed linear layer (``bits`` 4 or 8, ``group_size`` or -1 = per output channel)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        k = 32 // bits
        groups = num_groups(in_features, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        # GPTQ's (in // k, out) words, held transposed ((out, in // k) storage, the (in // k, out)
        # shape and keys of the format): see ``_load_from_state_dict``
        self.register_buffer("qweight", torch.zeros(out_features, in_features // k, dtype=torch.int32).t())
        self.register_buffer("qzeros", torch.zeros(groups, out_features // k, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._order: tuple[torch.Tensor | None, int] | None = None  # (row permutation or None, rows per group)
        self._symmetric: bool | None = None  # every zero point is 2^(bits-1) (GPTQ's sym=True)
        self._int4: tuple[torch.device, tinygemm.Int4Kernel | None] | None = None  # CUDA int4 kernel, per device
        self._transient: torch.Tensor | None = None  # set by stream_blocks while the block runs

    # ---- layout -------------------------------------------------------------------------------
    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Loads the file's tensors, then repacks ``qweight`` to the resident layout.

        Resident ``qweight`` is GPTQ's (in // k, out) int32 tensor stored transposed: each output
        row's words are contiguous, so its bytes are that row's codes in input order with no
        transpose per dequantization (the copy that took a third of it). GPTQ kernels repack at
        load in the same way (ExLlama, Marlin); the bytes are the same, the keys, shapes and
        values unchanged, and ``state_dict`` gives the file's contiguous layout back.
        """
        self._order, self._transient, self._symmetric, self._int4 = None, None, None, None  # new tensors
        super()._load_from_state_dict(*args, **kwargs)
        if not self.qweight.t().is_contiguous():  # ``assign=True`` put the file's layout in place
            self.qweight = self.qweight.t().contiguous().t()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = destination[prefix + "qweight"].contiguous()  # the file's layout

    def _is_symmetric(self) -> bool:
        """Every zero point is the grid's middle 2^(bits-1) (GPTQ ``sym=True``, the default)."""
        if self._symmetric is None:
            self._symmetric = bool((self.zeros_float() == 2 ** (self.bits - 1)).all())
        return self._symmetric

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
        """(in, out) uint8 integer codes in original row order (one byte each; a fresh tensor)."""
        return self._codes_nk(None).clone().t()

    def scratch_bytes(self) -> int:
        """Bytes of uint8 scratch ``dequantized`` uses: the 4-bit spread (two int16 halves) or the
        8-bit recentred codes, the act-order gather (and the words, if not held transposed)."""
        n = self.in_features * self.out_features
        perm, _ = self._row_order()
        return _align(n * self.bits // 8) + 2 * _align(n) + (n if perm is not None else 0)

    def _codes_nk(self, scratch: torch.Tensor | None) -> torch.Tensor:
        """(out, in) uint8 codes in original column order: for 8 bits a view of ``qweight`` itself
        (read-only!), for 4 bits built in ``scratch`` (``scratch_bytes``) after its words part.

        The resident words are (out, in // k) (``_load_from_state_dict``), so the little-endian
        bytes of each row ARE its codes in input order: 8-bit needs nothing more; 4-bit spreads
        every byte ``hl`` into the int16 ``0h0l``, i.e. the two bytes ``l, h``
        (``(v | v << 4) & 0x0F0F``), all contiguous, vectorised passes.
        """
        rows, N = self.qweight.shape
        if scratch is None:
            scratch = torch.empty(self.scratch_bytes(), dtype=torch.uint8, device=self.qweight.device)
        words = self.qweight.t()
        if not words.is_contiguous():  # a GPTQ-layout tensor assigned directly: transpose it here
            words = _take(scratch, 0, rows * N * 4, torch.int32).view(N, rows).copy_(words)
        b = words.view(torch.uint8).view(N, rows * 4)
        if self.bits == 8:
            return b
        at = _align(rows * N * 4)
        v = _take(scratch, at, rows * N * 8, torch.int16).view(N, rows * 4).copy_(b)
        t = _take(scratch, at + _align(rows * N * 8), rows * N * 8, torch.int16).view(N, rows * 4)
        v.bitwise_or_(torch.bitwise_left_shift(v, 4, out=t)).bitwise_and_(0x0F0F)
        return v.view(torch.uint8).view(N, rows * 8)

    def zeros_float(self) -> torch.Tensor:
        """(groups, out) zero points as floats (the stored ``zero - 1``, plus one)."""
        g, cols = self.qzeros.shape
        b = self.qzeros.contiguous().view(torch.uint8).view(g, cols * 4)
        z = b if self.bits == 8 else torch.stack((b & 15, b >> 4), dim=-1).view(g, cols * 8)
        return z.float() + 1

    # ---- dequantization -----------------------------------------------------------------------
    def dequantized(
        self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The (out, in) weight, columns grouped (in ``_row_order``): what ``forward`` multiplies by.

        ``out`` (in · out float32, e.g. a ``Workspace`` slice) and ``scratch`` (``scratch_bytes``
        uint8) are written instead of fresh tensors: a fresh multi-MB tensor costs its page
        faults on every call, more than the conversion itself on this CPU. Three passes over the
        float weight: the uint8 -> float copy, ``· s``, ``− z · s`` (one ``addcmul`` broadcasting
        along the contiguous dimension is not vectorised by torch: 6x slower than the two).
        """
        perm, size = self._row_order()
        K, N = self.in_features, self.out_features
        if scratch is None:
            scratch = torch.empty(self.scratch_bytes(), dtype=torch.uint8, device=self.qweight.device)
        codes = self._codes_nk(scratch)
        s = self.scales.float().t()  # (out, groups)
        symmetric = self._is_symmetric()
        if symmetric:  # q - z in bytes (mod 256, read as int8): one byte pass instead of a float one
            mid = 2 ** (self.bits - 1)
            if self.bits == 8:  # the codes are the resident bytes: recentre into the scratch
                codes = torch.sub(codes, mid, out=scratch[_align(K * N) : _align(K * N) + K * N].view(N, K))
            else:  # the codes are the scratch's own spread
                codes.sub_(mid)
            codes = codes.view(torch.int8)
        if perm is not None:  # act-order: columns gathered by group (one byte each), then converted
            gathered = scratch[scratch.numel() - K * N :].view(N, K).view(codes.dtype)
            codes = torch.index_select(codes, 1, perm.to(codes.device), out=gathered)
        w = torch.empty(N, K, device=codes.device) if out is None else out[: K * N].view(N, K)
        w.copy_(codes)
        full = (K // size) * size
        if symmetric:  # w = (q - z) · s: exact, as s · q − z · s is (fp16 s times a byte)
            if full:
                w[:, :full].view(N, full // size, size).mul_(s[:, : full // size, None])
            if full < K:
                w[:, full:].mul_(s[:, -1:])
            return w if dtype == torch.float32 else w.to(dtype)
        zs = self.zeros_float().t() * s
        if full:  # whole groups in one broadcast: (out, groups, size)
            body = w[:, :full].view(N, full // size, size)
            body.mul_(s[:, : full // size, None]).sub_(zs[:, : full // size, None])
        if full < K:  # the shorter last group
            w[:, full:].mul_(s[:, -1:]).sub_(zs[:, -1:])
        return w if dtype == torch.float32 else w.to(dtype)

    def int4_kernel(self) -> tinygemm.Int4Kernel | None:
        """torch's int4 kernel tensors for this layer on its current device (``tinygemm``), built
        and checked once per device; None where the kernel does not apply or disagreed. Called by
        ``forward`` on CUDA only (on CPU the dequantizing path measured faster)."""
        device = self.qweight.device
        if self._int4 is None or self._int4[0] != device:
            kernel = None
            if tinygemm.applies(self.bits, self.in_features, self.out_features, self.group_size):
                perm, _ = self._row_order()
                codes = self._codes_nk(None)
                if perm is not None:  # grouped column order, as the activations are permuted
                    codes = codes.index_select(1, perm.to(device))
                kernel = tinygemm.build_checked(
                    codes, self.scales, self.zeros_float(), self.group_size, self.dequantized(), repr(self)
                )
            if kernel is not None:  # buffers (not in state_dict): resident bytes count them, .to() moves them
                self.register_buffer("int4_packed", kernel.packed, persistent=False)
                self.register_buffer("int4_scales_zeros", kernel.scales_and_zeros, persistent=False)
            self._int4 = (device, kernel)
        return self._int4[1]

    def _kernel_for(self, x: torch.Tensor) -> tinygemm.Int4Kernel | None:
        """The int4 kernel for inputs ``x``: on CUDA where it applies, never on CPU."""
        return self.int4_kernel() if x.is_cuda else None

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in original column order (a fresh tensor, never kept)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from merino_pl.core.quant.onnx_nbits import matmul_nbits  # the graph node, not a computation

            return matmul_nbits(self, x)
        kernel = self._kernel_for(x)
        if kernel is not None:
            perm, _ = self._row_order()
            xg = x if perm is None else x.index_select(-1, perm.to(x.device))
            y = tinygemm.matmul(xg, kernel)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        w = self._transient
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantized(x.dtype)
        perm, _ = self._row_order()
        if perm is not None:
            x = x.index_select(-1, perm.to(x.device))
        return F.linear(x, w, self.bias)  # the bias inside the GEMM, as nn.Linear's

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class Workspace:
    """One reusable float32 buffer for the dequantized weights of the block that is running (and
    the int8 head's row chunk), plus a uint8 one for the unpacking (``QuantLinear.scratch_bytes``).
    Scratch, like activations: it holds no weight between blocks, and its size is the largest
    block's, not the model's."""

    def __init__(self, floats: int, bytes_: int, device: torch.device | str = "cpu") -> None:
        self.floats = torch.empty(floats, device=device)
        self.bytes = torch.empty(bytes_, dtype=torch.uint8, device=device)

    def ensure(self, device: torch.device) -> None:
        if self.floats.device != device:  # the model moved: move the scratch with it
            self.floats = torch.empty(self.floats.numel(), device=device)
            self.bytes = torch.empty(self.bytes.numel(), dtype=torch.uint8, device=device)

    @property
    def nbytes(self) -> int:
        return self.floats.numel() * 4 + self.bytes.numel()


def _align(n: int) -> int:
    return -(-n // 64) * 64  # views as int16 / int32 need aligned offsets


def _take(scratch: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    return scratch[offset : offset + nbytes].view(dtype)


def stream_blocks(model: nn.Module) -> Workspace | None:
    """Dequantize each shared block's ``QuantLinear`` s once per block call (not once per
    application), into one ``Workspace`` reused by every block, and drop them when the block
    returns. Idempotent; returns the workspace (None without quantized blocks). Outputs are
    bit-identical to the per-call path."""
    from merino_pl.core.model import SharedBlock

    blocks = [
        (b, [m for m in b.modules() if isinstance(m, QuantLinear)])
        for b in model.modules()
        if isinstance(b, SharedBlock)
    ]
    blocks = [(b, q) for b, q in blocks if q]
    if not blocks:
        return None
    if getattr(model, "_merino_workspace", None) is not None:
        return model._merino_workspace
    floats = max(sum(q.in_features * q.out_features for q in qlins) for _, qlins in blocks)
    ws = Workspace(floats, max(q.scratch_bytes() for _, qlins in blocks for q in qlins), blocks[0][1][0].qweight.device)
    for block, qlins in blocks:
        # state on the block, hooks at module level: a deepcopy of the model gets its own
        block._merino_stream = (qlins, ws)
        block.register_forward_pre_hook(_start)
        block.register_forward_hook(_stop, always_call=True)
    model._merino_workspace = ws
    return ws


def _start(block: nn.Module, args: tuple) -> None:
    if torch.onnx.is_in_onnx_export():
        return
    qlins, ws = block._merino_stream
    x = args[0]
    ws.ensure(x.device)
    offset = 0
    for q in qlins:
        n = q.in_features * q.out_features
        if q._kernel_for(x) is None:  # the int4 kernel needs no float weight
            q._transient = q.dequantized(
                x.dtype, out=ws.floats[offset : offset + n], scratch=ws.bytes[: q.scratch_bytes()]
            )
        offset += n


def _stop(block: nn.Module, _args: tuple, _out: Any) -> None:
    for q in block._merino_stream[0]:
        q._transient = None


def float_weight_bytes(model: nn.Module) -> int:
    """Bytes of floating-point tensors held by ``QuantLinear`` modules besides their fp16 scales
    and biases: 0 for a packed model (a test keeps it so)."""
    total = 0
    for m in (m for m in model.modules() if isinstance(m, QuantLinear)):
        for name, t in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]:
            if t.is_floating_point() and name not in ("scales", "bias", "int4_scales_zeros"):
                total += t.numel() * t.element_size()
        if m._transient is not None:
            total += m._transient.numel() * m._transient.element_size()
    return total
