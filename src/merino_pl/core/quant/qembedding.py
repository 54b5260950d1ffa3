"""Row-wise INT8 token embedding, which the tied LM head reads too (``--embedding int8``).

At MeRino's scale the ``vocab × d`` table is most of the model (MeRino-64M: 38.6 M of 64 M
parameters, 77 MB of a 97 MB INT4 file in fp16). Each row ``e`` is stored as int8 codes
``q = round(e / s)`` in [-127, 127] with one fp16 scale ``s = max|e| / 127`` per row:

* the embedding lookup reads ``q[ids] · s[ids]`` (only the rows used are dequantized);
* the tied head computes ``h · (q · s)ᵀ = (h · qᵀ) · s``: the per-row scale is a per-logit
  factor, applied after the GEMM; the codes are converted in cache-sized chunks of rows, so no
  full float copy of the table is ever built.

Files: ``model.embed_tokens.qweight`` (int8, vocab × d) and ``model.embed_tokens.scales``
(fp16, vocab) replace ``model.embed_tokens.weight``. This variant is merino-pl's own: the
standard GPTQ tools expect a float embedding (``--embedding fp16``, the default).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

# rows of the table converted to float at a time in the head (6 MB at d = 768, inside L3). One
# thread measured 256-row (L2-sized) chunks as fast, but at 2 threads on a busy CPU every parallel
# op can wait a time slice for the second thread, and 8x more chunks cost far more there
# (bench/qlinear.py, docs/quantize.md)
HEAD_ROWS = 2048


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (V, d), scales fp16 (V,)): symmetric, one scale per row; an all-zero row gets
    scale 1. The scale is rounded to fp16 BEFORE the codes are chosen, so codes · scale is
    exactly what the file's tensors give back."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return codes, scale.half()


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over a row-wise int8 table; ``lm_head`` is the tied head over the same bytes."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=torch.float16))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> QuantEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim).to(emb.weight.device)
        q.qweight, q.scales = quantize_rows(emb.weight)
        return q

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (V, d) table: a fresh float tensor for callers that need one (slow, large)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from merino_pl.core.quant.onnx_nbits import gather_rows

            return gather_rows(self, ids)
        rows = F.embedding(ids, self.qweight)  # (..., d) int8: only the rows looked up
        return rows.float() * self.scales[ids].float()[..., None]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ tableᵀ`` (..., V) without a float copy of the table.

        Row chunks of ``HEAD_ROWS`` are converted into one reused buffer that stays in cache;
        each chunk's GEMM writes its column slice of the logits in place (no ``cat``) and the
        per-row scales multiply that slice while it is still in cache.
        """
        if torch.onnx.is_in_onnx_export():
            from merino_pl.core.quant.onnx_nbits import head_nbits

            return head_nbits(self, hidden)
        V, d = self.qweight.shape
        h = hidden.reshape(-1, d)
        logits = torch.empty(h.shape[0], V, dtype=hidden.dtype, device=hidden.device)
        ws = getattr(self, "workspace", None)  # qlinear.Workspace shared with the blocks, if any
        if ws is not None and hidden.dtype == torch.float32 and ws.floats.numel() >= HEAD_ROWS * d:
            ws.ensure(hidden.device)
            buf = ws.floats
        else:
            buf = torch.empty(HEAD_ROWS * d, dtype=hidden.dtype, device=hidden.device)
        scales = self.scales.to(hidden.dtype)
        for start in range(0, V, HEAD_ROWS):
            chunk = self.qweight[start : start + HEAD_ROWS]
            rows = buf[: chunk.numel()].view(chunk.shape).copy_(chunk)
            out = logits[:, start : start + HEAD_ROWS]  # (T, rows) of the (T, V) logits, row stride V
            torch.mm(h, rows.t(), out=out).mul_(scales[start : start + HEAD_ROWS])
        return logits.view(*hidden.shape[:-1], V)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def attach(decoder: nn.Module, emb: QuantEmbedding) -> None:
    """Install ``emb`` as ``decoder.embed_tokens`` and route the tied head through it.

    A module converter applied from outside (``model.py`` keeps no quantization branch): the
    decoder's ``logits(hidden)`` reads ``embed_tokens.weight``, which would dequantize the whole
    table on every call, so this instance's ``logits`` is pointed at ``emb.lm_head``.
    """
    decoder.embed_tokens = emb
    decoder.logits = types.MethodType(lambda self, hidden: self.embed_tokens.lm_head(hidden), decoder)
