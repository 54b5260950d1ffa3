"""The GPTQ solver (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1), written here from the paper.

For a linear layer with weight W (out × in) and calibration inputs X (in × n), GPTQ minimises
‖WX − ŴX‖² one input column at a time: it quantizes column i, then spreads that column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian
H⁻¹ of H = 2XXᵀ/n. The inverse's upper Cholesky factor gives every needed row at once, and
updates are applied lazily in blocks of columns (the paper's "lazy batch" trick). ``desc_act``
(act-order) visits columns by decreasing Hessian diagonal; groups are then contiguous in that
order and ``g_idx`` maps every original column to its group.

Why written by hand: the maintained engines either pin older transformers/torch than this
project (auto-gptq, llmcompressor) or miss the Hessian of all but the first application of a
shared layer (GPTQModel 7.6.0); see docs/quantize.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merino_pl.core.quant.rtn import QuantizedWeight, grid_params, num_groups, quantize_codes


class HessianAccumulator:
    """Running H = 2/n · Σ x xᵀ over every row x fed to a linear (all applications, all samples)."""

    PANELS = 4  # H is symmetric: only its upper triangle is computed, as 4 row panels (5/8 of the flops)

    def __init__(self, columns: int) -> None:
        self.sum = torch.zeros(columns, columns, dtype=torch.float64)  # upper triangle filled
        self.samples = 0
        self._edges = [columns * i // self.PANELS for i in range(self.PANELS + 1)]

    def add(self, x: torch.Tensor) -> None:
        """``x``: (..., in) inputs of one forward call of the linear."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        for a, b in zip(self._edges[:-1], self._edges[1:]):
            # float32 GEMM (fast), summed into float64 so millions of rows lose nothing
            self.sum[a:b, a:] += (x[:, a:b].t() @ x[:, a:]).to(self.sum.device)
        self.samples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.samples == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        upper = self.sum.triu()
        return (2.0 * (upper + upper.triu(1).t()) / self.samples).float()


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # the paper's objective Σ (w − q)² / [H⁻¹]ᵢᵢ² / 2 over all weights


@dataclass
class InverseHessian:
    """What GPTQ needs of one input Hessian: the column order, the dead columns and the upper
    Cholesky factor of the dampened inverse. The same for every linear reading that input (q/k/v)."""

    perm: torch.Tensor  # the order columns are quantized in (act-order: decreasing diag(H))
    dead: torch.Tensor  # (in,) bool: inputs that never fire
    factor: torch.Tensor  # (in, in) upper Cholesky factor of (H + λI)⁻¹, in ``perm`` order


def inverse_hessian(hessian: torch.Tensor, damp: float = 0.01, desc_act: bool = False) -> InverseHessian:
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: any value works, keep the weight 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(H.shape[0])
    return InverseHessian(perm, dead, _inverse_cholesky(H[perm][:, perm], damp))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    inverse: InverseHessian | None = None,
) -> GPTQResult:
    """Quantize one (out, in) ``weight`` given its input Hessian (in, in). Pure function.

    ``inverse``: ``inverse_hessian(hessian, damp, desc_act)`` when several linears share the
    input (then ``hessian`` may be None): computed once instead of once per linear.
    """
    inv_h = inverse if inverse is not None else inverse_hessian(hessian, damp, desc_act)
    perm, Hinv = inv_h.perm, inv_h.factor
    W = weight.detach().float().clone()
    rows, cols = W.shape
    W[:, inv_h.dead] = 0
    W = W[:, perm]

    gs = cols if group_size == -1 else group_size
    # lazy-update blocks hold whole groups, so a group's grid is always fitted on columns that
    # already carry every earlier column's error compensation
    block = max(block_size // gs, 1) * gs if group_size != -1 else block_size
    Wt = W.t().contiguous()  # (in, out): column i of W is the contiguous row i here (2-3x faster on CPU)
    codes = torch.zeros_like(Wt)
    scales = torch.zeros(num_groups(cols, group_size), rows)
    zeros = torch.zeros_like(scales)
    loss = 0.0
    if group_size == -1:  # one grid per output channel, fitted on the whole row up front
        scales[0], zeros[0] = grid_params(W, bits, sym)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = Wt[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            g = (i1 + i) // gs
            if group_size != -1 and (i1 + i) % gs == 0:
                scales[g], zeros[g] = grid_params(W1[i : i + gs].t(), bits, sym)
            s, z = scales[g], zeros[g]
            w = W1[i]
            q = quantize_codes(w, s, z, bits)
            codes[i1 + i] = q
            Err1[i] = err = (w - s * (q - z)) / Hinv1[i, i]
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)  # compensate the columns still to do
        loss += float(Err1.pow(2).sum()) / 2  # the paper's Σ (w - q)² / [H⁻¹]ᵢᵢ² / 2
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1  # the lazy batch update of everything after the block

    inv = torch.argsort(perm)
    g_idx = (torch.arange(cols) // gs)[inv]  # group of each ORIGINAL column
    q = QuantizedWeight(
        codes.t()[:, inv].to(torch.int32).contiguous(),
        scales,
        zeros.to(torch.int32),
        g_idx.to(torch.int32),
        bits,
        group_size,
    )
    return GPTQResult(q, loss)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = ``damp`` · mean diag(H), raising λ if needed."""
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        Hd = H + lam * torch.eye(H.shape[0])
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            # H⁻¹ = L⁻ᵀ L⁻¹ from a triangular solve: torch.cholesky_inverse took 0.2-6 s for a
            # 1344² matrix on this CPU, the solve + GEMM 0.25 s
            Linv = torch.linalg.solve_triangular(L, torch.eye(H.shape[0]), upper=False)
            Lh, info = torch.linalg.cholesky_ex(Linv.mT @ Linv)
            if info == 0:
                # row-major: the solver reads rows of U; cholesky's column-major factor made each
                # rank-1 update read a strided vector (40x slower)
                return Lh.mT.contiguous()
    raise RuntimeError("Hessian is not positive definite even with 10^5 x the dampening")
