"""Quantize every linear of every block of a ``MerinoForCausalLM``, shared weights included.

A block owns ONE ``DecoderLayer`` that runs ``L_j`` times. GPTQ's sequential recipe, made
shared-weight aware: the calibration set goes through the real model up to block 1; then for
each block, forward hooks on its layer's linears add the inputs of **all** ``L_j`` applications
to one Hessian per linear (``nsamples · seq_len · L_j`` rows), each linear is quantized once,
and the block's outputs with its now-quantized weights feed the next block. With
``true_sequential`` the layer's sub-groups (q/k/v → o → up → down) are quantized in order, each
seeing the inputs the already-quantized ones produce.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.quant.format import QuantSpec
from merino_pl.core.quant.rtn import QuantizedWeight, num_groups, rtn_quantize
from merino_pl.quantize.gptq import HessianAccumulator, gptq_quantize

# a decoder layer's linears, in the order their inputs are produced; one tuple = one input
SUBGROUPS: tuple[tuple[str, ...], ...] = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.o_proj",), ("ffn.up",), ("ffn.down",))


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    applications: int  # L_j: how many times the shared layer runs per forward
    hessian_samples: int  # rows accumulated into its Hessian (nsamples · seq_len · L_j); 0 for RTN
    loss: float | None  # GPTQ objective; None for RTN
    seconds: float


def quantized_linears(model: MerinoForCausalLM) -> dict[str, nn.Linear]:
    """Name -> linear for every linear inside every block (the projections and head excluded)."""
    out: dict[str, nn.Linear] = {}
    for j, block in enumerate(model.model.blocks):
        found = {n: m for n, m in block.layer.named_modules() if isinstance(m, nn.Linear)}
        expected = {n for g in SUBGROUPS for n in g}
        if set(found) != expected:  # a changed DecoderLayer must be taught here, not skipped
            raise RuntimeError(f"block {j}: linears {sorted(found)} != expected {sorted(expected)}")
        out.update({f"model.blocks.{j}.layer.{n}": found[n] for g in SUBGROUPS for n in g})
    return out


def quantize_model(
    model: MerinoForCausalLM, spec: QuantSpec, calib: torch.Tensor | None, batch_size: int = 8, progress: bool = True
) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    """Quantize ``model`` in place (its linears then hold the dequantized weights).

    ``calib``: (nsamples, seq_len) token ids (unused by RTN). Returns the quantized weights by
    module name (for packing) and one report row per linear.
    """
    model.eval()
    linears = quantized_linears(model)
    bar = tqdm(total=len(linears), desc=f"{spec.method} int{spec.bits}", unit="linear", disable=not progress)
    results: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    with torch.no_grad():
        if spec.method == "rtn":
            for name, lin in linears.items():
                t0 = time.perf_counter()
                results[name] = q = rtn_quantize(lin.weight, spec.bits, spec.group_size, spec.sym)
                lin.weight.copy_(q.dequantize())
                reports.append(LayerReport(name, lin.in_features, lin.out_features, _applications(model, name), 0, None, time.perf_counter() - t0))
                bar.update()
        else:
            xs = _block0_inputs(model, calib, batch_size)
            for j, block in enumerate(model.model.blocks):
                _quantize_block(model, j, xs, spec, results, reports, bar)
                xs = [block(x, None, None, 0) for x in xs]  # outputs of the quantized block
                if j < len(model.model.between_proj):
                    xs = [model.model.between_proj[j](x) for x in xs]
    bar.close()
    return results, reports


def _applications(model: MerinoForCausalLM, name: str) -> int:
    return model.model.blocks[int(name.split(".")[2])].num_layers


class _Captured(Exception):
    pass


def _block0_inputs(model: MerinoForCausalLM, calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The hidden states entering block 1, batch by batch, from the real model's own stem."""
    xs: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        xs.append(args[0].detach())
        raise _Captured  # nothing after block 1's input is needed yet

    handle = model.model.blocks[0].register_forward_pre_hook(grab)
    try:
        for ids in calib.split(batch_size):
            try:
                model(ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return xs


def _quantize_block(
    model: MerinoForCausalLM, j: int, xs: list[torch.Tensor], spec: QuantSpec,
    results: dict[str, QuantizedWeight], reports: list[LayerReport], bar: tqdm,
) -> None:
    """GPTQ over block ``j``'s one layer; every application's inputs count."""
    layer, L = model.model.blocks[j].layer, model.model.blocks[j].num_layers
    groups = SUBGROUPS if spec.true_sequential else (tuple(n for g in SUBGROUPS for n in g),)
    for group in groups:
        # linears sharing an input (q/k/v) share one Hessian: hook the first of each subgroup
        heads = [g[0] for g in SUBGROUPS if g[0] in group]
        accs = {n: HessianAccumulator(layer.get_submodule(n).in_features) for n in heads}
        last = heads[-1]  # the group's last input: once its L-th call is seen, the rest of the pass is not needed
        calls = [0]

        def collect(_m: nn.Module, args: tuple, _out: torch.Tensor, name: str, accs=accs, last=last, calls=calls) -> None:
            accs[name].add(args[0])
            if name == last:
                calls[0] += 1
                if calls[0] == L:
                    raise _Captured  # (the last application's remaining sub-layers would change nothing)

        hooks = [layer.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: collect(m, a, o, n)) for n in heads]
        try:
            for x in xs:
                calls[0] = 0
                try:
                    model.model.blocks[j](x, None, None, 0)  # runs the layer L times: L hook calls
                except _Captured:
                    pass
        finally:
            for h in hooks:
                h.remove()
        for sub in (g for g in SUBGROUPS if g[0] in group):
            H = accs[sub[0]].hessian()
            for n in sub:
                t0 = time.perf_counter()
                lin = layer.get_submodule(n)
                r = gptq_quantize(lin.weight, H, spec.bits, spec.group_size, spec.sym, spec.desc_act, spec.damp_percent, spec.block_size)
                lin.weight.copy_(r.weight.dequantize())
                name = f"model.blocks.{j}.layer.{n}"
                results[name] = r.weight
                reports.append(LayerReport(name, lin.in_features, lin.out_features, L, accs[sub[0]].samples, r.loss, time.perf_counter() - t0))
                bar.update()


def report_rows(reports: list[LayerReport], group_size: int) -> list[dict]:
    """One dict per linear, with its groups per row and the columns in each (``group_columns``
    is the layer's input width where the group does not fit: one group per row)."""
    return [{**asdict(r), "groups": num_groups(r.in_features, group_size),
             "group_columns": r.in_features if group_size == -1 else min(group_size, r.in_features)} for r in reports]
