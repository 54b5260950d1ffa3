"""Quantize every linear of every block of a ``MerinoForCausalLM``, shared weights included.

A block owns ONE ``DecoderLayer`` that runs ``L_j`` times. GPTQ's sequential recipe, made
shared-weight aware: the calibration set goes through the real model up to block 1; then for
each block, forward hooks on its layer's linears add the inputs of **all** ``L_j`` applications
to one Hessian per linear (``nsamples · seq_len · L_j`` rows), each linear is quantized once,
and the block's outputs with its now-quantized weights feed the next block. With
``true_sequential`` the layer's sub-groups (q/k/v → o → up → down) are quantized in order, each
seeing the inputs the already-quantized ones produce.

Where the time goes (``Split``, shown on the bar when it closes): the passes through the blocks,
which grow with the calibration set; the solver does not. Three things shorten them without
changing a number: a pass stops once the group's last input has been seen ``L_j`` times; with
``true_sequential``, application 1 of a pass restarts at the sub-group quantized last (what
comes before it is unchanged and was kept by the previous pass, ``_first_application``); and
the solver runs on one thread (its column loop is thousands of tiny ops that a second thread
only slows down, 3x on a busy machine).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.quant.format import QuantSpec
from merino_pl.core.quant.rtn import QuantizedWeight, num_groups, rtn_quantize
from merino_pl.quantize.gptq import HessianAccumulator, gptq_quantize, inverse_hessian

# a decoder layer's linears, in the order their inputs are produced; one tuple = one input
SUBGROUPS: tuple[tuple[str, ...], ...] = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("attn.o_proj",),
    ("ffn.up",),
    ("ffn.down",),
)
OUTPUTS = len(SUBGROUPS)  # the pass after the last sub-group: the block's outputs
KEPT = ("attn.o_proj", "ffn.up", "ffn.down")  # true-sequential: application 1's inputs the next pass restarts from


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    applications: int  # L_j: how many times the shared layer runs per forward
    hessian_samples: int  # rows accumulated into its Hessian (nsamples · seq_len · L_j); 0 for RTN
    loss: float | None  # GPTQ objective; None for RTN
    seconds: float


@dataclass
class Split:
    """Seconds spent in each part of ``quantize_model``."""

    stem: float = 0.0  # the calibration windows through the embeddings, up to block 1
    forwards: float = 0.0  # passes through the blocks that collect the linears' inputs (Hessians excluded)
    hessian: float = 0.0  # X^T X of every collected input
    solver: float = 0.0  # GPTQ (or RTN) of every linear, its dequantized weight written back
    outputs: float = 0.0  # each quantized block's outputs: the next block's inputs

    def report_keys(self) -> dict[str, float]:
        """``quantize.<part>`` -> seconds: the quantize report's ``seconds`` entries."""
        return {f"quantize.{k}": v for k, v in asdict(self).items()}

    def line(self) -> str:
        """The parts that took time (RTN: only the solver), for the progress bar."""
        return ", ".join(f"{k} {v:.1f} s" for k, v in asdict(self).items() if v > 0)


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
    model: MerinoForCausalLM,
    spec: QuantSpec,
    calib: torch.Tensor | None,
    batch_size: int = 8,
    progress: bool = True,
    split: Split | None = None,
) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    """Quantize ``model`` in place (its linears then hold the dequantized weights).

    ``calib``: (nsamples, seq_len) token ids (unused by RTN). Returns the quantized weights by
    module name (for packing) and one report row per linear; ``split`` (if given) receives the
    seconds per part.
    """
    model.eval()
    split = split if split is not None else Split()
    linears = quantized_linears(model)
    bar = tqdm(total=len(linears), desc=f"{spec.method} int{spec.bits}", unit="linear", disable=not progress)
    results: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    with torch.inference_mode():
        if spec.method == "rtn":
            for name, lin in linears.items():
                t0 = time.perf_counter()
                results[name] = q = rtn_quantize(lin.weight, spec.bits, spec.group_size, spec.sym)
                lin.weight.copy_(q.dequantize())
                reports.append(
                    LayerReport(
                        name,
                        lin.in_features,
                        lin.out_features,
                        _applications(model, name),
                        0,
                        None,
                        time.perf_counter() - t0,
                    )
                )
                split.solver += reports[-1].seconds
                bar.update()
        else:
            t0 = time.perf_counter()
            xs = _block0_inputs(model, calib, batch_size)
            split.stem += time.perf_counter() - t0
            for j in range(len(model.model.blocks)):
                xs = _quantize_block(model, j, xs, spec, results, reports, bar, split)
    bar.set_postfix_str(split.line(), refresh=False)
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
    model: MerinoForCausalLM,
    j: int,
    xs: list[torch.Tensor],
    spec: QuantSpec,
    results: dict[str, QuantizedWeight],
    reports: list[LayerReport],
    bar: tqdm,
    split: Split,
) -> list[torch.Tensor]:
    """GPTQ over block ``j``'s one layer (every application's inputs count); returns the
    quantized block's outputs, projected to the next block's width."""
    layer, L = model.model.blocks[j].layer, model.model.blocks[j].num_layers
    # application 1 of every batch, as far as the previous pass computed it (true-sequential only)
    firsts: list[dict[str, torch.Tensor]] | None = [{} for _ in xs] if spec.true_sequential else None
    stages = [(g,) for g in range(len(SUBGROUPS))] if spec.true_sequential else [tuple(range(len(SUBGROUPS)))]
    for stage in stages:
        heads = [SUBGROUPS[g][0] for g in stage]  # linears sharing an input (q/k/v) share one Hessian
        accs = _collect(layer, L, xs, heads, stage[0], firsts, split)
        for g in stage:
            _solve(layer, j, L, SUBGROUPS[g], accs[SUBGROUPS[g][0]], spec, results, reports, bar, split)
    t0 = time.perf_counter()
    outs = []
    for k, x in enumerate(xs):
        x = _first_application(layer, x, firsts[k] if firsts else None, OUTPUTS)
        for i in range(1, L):
            x = layer(x, None, None, i)
        outs.append(model.model.between_proj[j](x) if j < len(model.model.between_proj) else x)
    split.outputs += time.perf_counter() - t0
    return outs


def _collect(
    layer: nn.Module,
    L: int,
    xs: list[torch.Tensor],
    heads: list[str],
    first_group: int,
    firsts: list[dict[str, torch.Tensor]] | None,
    split: Split,
) -> dict[str, HessianAccumulator]:
    """One pass of the calibration batches through the layer's ``L`` applications, adding the
    inputs of ``heads`` to their Hessians; stops once the last head has been called ``L`` times."""
    accs = {n: HessianAccumulator(layer.get_submodule(n).in_features) for n in heads}
    last, state = heads[-1], {"calls": 0, "first": None}
    t0, hessian0 = time.perf_counter(), split.hessian

    def collect(name: str, x: torch.Tensor) -> None:
        t = time.perf_counter()
        accs[name].add(x)
        split.hessian += time.perf_counter() - t
        if state["first"] is not None and state["calls"] == 0 and name in KEPT:
            state["first"][name] = x  # application 1's input: the next pass restarts here
        if name == last:
            state["calls"] += 1
            if state["calls"] == L:
                raise _Captured  # (the last application's remaining sub-layers would change nothing)

    hooks = [layer.get_submodule(n).register_forward_hook(lambda _m, a, _o, n=n: collect(n, a[0])) for n in heads]
    try:
        for k, x in enumerate(xs):
            state["calls"], state["first"] = 0, firsts[k] if firsts else None
            try:
                x = _first_application(layer, x, state["first"], first_group)
                for i in range(1, L):
                    x = layer(x, None, None, i)
            except _Captured:
                pass
    finally:
        for h in hooks:
            h.remove()
    split.forwards += time.perf_counter() - t0 - (split.hessian - hessian0)
    return accs


def _first_application(
    layer: nn.Module, x: torch.Tensor, kept: dict[str, torch.Tensor] | None, group: int
) -> torch.Tensor:
    """Application 1 of ``layer`` in the pass that collects sub-group ``group``'s input
    (``OUTPUTS``: the block's outputs), restarting from what the previous pass ``kept``.

    In true-sequential order only sub-group ``group - 1`` changed since the previous pass, so
    application 1 is recomputed from that sub-group's input on (that pass's hooks kept it, and
    this one keeps the residual stream): the same operations on the same tensors as
    ``layer(x, None, None, 0)``, so the same numbers (tests/test_gptq.py checks it bitwise).
    """
    if kept is None or group <= 1:  # the q/k/v and o passes: only the first norm could be skipped
        return layer(x, None, None, 0)
    ffn = layer.ffn
    if group == 2:  # o changed: from the attention's output y = the input of o
        kept["h"] = h = x + layer.resid_dropout(layer.attn.o_proj(kept.pop("attn.o_proj")))
        return h + ffn(layer.ffn_norm(h))
    if group == 3:  # up changed: from up's input
        return kept["h"] + ffn(kept.pop("ffn.up"))
    return kept.pop("h") + ffn.dropout(ffn.down(kept.pop("ffn.down")))  # down changed: from down's input


def _solve(
    layer: nn.Module,
    j: int,
    L: int,
    names: tuple[str, ...],
    acc: HessianAccumulator,
    spec: QuantSpec,
    results: dict[str, QuantizedWeight],
    reports: list[LayerReport],
    bar: tqdm,
    split: Split,
) -> None:
    """GPTQ of the linears ``names`` of block ``j``'s layer, which share the input of ``acc``
    (the first one's seconds include the inverse Hessian they share)."""
    t0 = time.perf_counter()
    with _one_thread():
        inverse = inverse_hessian(acc.hessian(), spec.damp_percent, spec.desc_act)
        for n in names:
            lin = layer.get_submodule(n)
            r = gptq_quantize(
                lin.weight, None, spec.bits, spec.group_size, spec.sym, block_size=spec.block_size, inverse=inverse
            )
            lin.weight.copy_(r.weight.dequantize())
            name = f"model.blocks.{j}.layer.{n}"
            results[name] = r.weight
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            reports.append(LayerReport(name, lin.in_features, lin.out_features, L, acc.samples, r.loss, seconds))
            split.solver += seconds
            bar.update()


@contextmanager
def _one_thread() -> Iterator[None]:
    """The solver's column loop is thousands of tiny ops per linear: a second thread only adds
    waiting (the solver measured 3x faster on one thread of this busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def report_rows(reports: list[LayerReport], group_size: int) -> list[dict]:
    """One dict per linear, with its groups per row and the columns in each (``group_columns``
    is the layer's input width where the group does not fit: one group per row)."""
    return [
        {
            **asdict(r),
            "groups": num_groups(r.in_features, group_size),
            "group_columns": r.in_features if group_size == -1 else min(group_size, r.in_features),
        }
        for r in reports
    ]
