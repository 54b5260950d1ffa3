"""GPTQ's speed-ups change no number: the runner's shortened passes against the textbook passes,
the shared inverse Hessian, the one-thread solver, the time split; calibration windows through
the data stage's tokenizer are those of the plain tokenize-and-pack recipe."""

from __future__ import annotations

import copy

import torch
from torch import nn

from conftest import tiny_arch
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.quant.format import QuantSpec
from merino_pl.core.tokenizer import EOS_TOKEN, load_tokenizer
from merino_pl.data.sources import open_stream, resolve_source
from merino_pl.quantize.calibration import POOL, calibration_tokens
from merino_pl.quantize.gptq import HessianAccumulator, gptq_quantize, inverse_hessian
from merino_pl.quantize.passes import SUBGROUPS, Split, quantize_model


def _textbook(model: MerinoForCausalLM, spec: QuantSpec, calib: torch.Tensor, batch: int) -> dict:
    """GPTQ's shared-weight recipe without shortcuts: every pass runs every batch through the
    whole block (all L applications), hooks add every input of the group's linears."""
    m = model.model
    xs = [m.in_proj(m.embed_tokens(ids) + m.embed_positions(torch.arange(ids.shape[1]))) for ids in calib.split(batch)]
    out = {}
    for j, block in enumerate(m.blocks):
        groups = [[g] for g in SUBGROUPS] if spec.true_sequential else [list(SUBGROUPS)]
        for group in groups:
            accs = {g[0]: HessianAccumulator(block.layer.get_submodule(g[0]).in_features) for g in group}
            hooks = [
                block.layer.get_submodule(n).register_forward_hook(lambda _m, a, _o, acc=accs[n]: acc.add(a[0]))
                for n in accs
            ]
            for x in xs:
                block(x, None, None, 0)
            for h in hooks:
                h.remove()
            for g in group:
                for n in g:
                    lin: nn.Linear = block.layer.get_submodule(n)
                    r = gptq_quantize(
                        lin.weight,
                        accs[g[0]].hessian(),
                        spec.bits,
                        spec.group_size,
                        spec.sym,
                        spec.desc_act,
                        spec.damp_percent,
                        spec.block_size,
                    )
                    lin.weight.copy_(r.weight.dequantize())
                    out[f"model.blocks.{j}.layer.{n}"] = r.weight
        xs = [block(x, None, None, 0) for x in xs]
        xs = [m.between_proj[j](x) for x in xs] if j < len(m.between_proj) else xs
    return out


def test_runner_equals_the_textbook_passes_bitwise():
    """Stopped passes, application 1 restarted from the kept inputs (true-sequential), the
    shared inverse Hessian: the same codes, scales and weights as the plain recipe (one thread:
    CPU matmuls are then deterministic)."""
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch()).eval()
    assert any(b.num_layers == 1 for b in model.model.blocks) and any(b.num_layers == 3 for b in model.model.blocks)
    calib = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
    for spec in (
        QuantSpec(bits=4, group_size=32, true_sequential=True),
        QuantSpec(bits=4, group_size=32),  # the default: one pass per block
        QuantSpec(bits=8, group_size=-1, desc_act=True, true_sequential=True),
    ):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():
            want = _textbook(a, spec, calib, 4)
        got, _ = quantize_model(b, spec, calib, 4, progress=False)
        assert set(got) == set(want)
        for name, q in want.items():
            assert torch.equal(got[name].codes, q.codes) and torch.equal(got[name].scales, q.scales), (spec, name)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_split_and_threads():
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch()).eval()
    split, threads = Split(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calib = torch.randint(0, 512, (2, 8))
        quantize_model(model, QuantSpec(bits=4, group_size=32), calib, 2, progress=False, split=split)
        assert torch.get_num_threads() == 2  # the one-thread solver gives the caller's threads back
    finally:
        torch.set_num_threads(threads)
    parts = vars(split)
    assert set(parts) == {"stem", "forwards", "hessian", "solver", "outputs"} and all(v > 0 for v in parts.values())
    assert split.line().startswith("stem ") and "outputs" in split.line()


def test_shared_inverse_hessian_is_the_per_linear_one():
    torch.manual_seed(0)
    X = torch.randn(512, 64) @ torch.randn(64, 64)
    X[:, 5] = 0  # a dead input
    acc = HessianAccumulator(64)
    for chunk in X.split(100):
        acc.add(chunk)
    H, W = acc.hessian(), torch.randn(32, 64)
    for desc_act in (False, True):
        inv = inverse_hessian(H, 0.01, desc_act)
        a = gptq_quantize(W, H, 4, 16, desc_act=desc_act)
        b = gptq_quantize(W, None, 4, 16, inverse=inv)
        assert torch.equal(a.weight.codes, b.weight.codes) and torch.equal(a.weight.g_idx, b.weight.g_idx)
        assert a.loss == b.loss and bool((b.weight.dequantize()[:, 5] == 0).all())


def test_calibration_windows_are_the_plain_tokenize_and_pack_ones():
    """Through the data stage's DocumentTokenizer: each document's ids then EOS, packed, windows
    drawn by the seed; the same windows as tokenizing the documents here directly."""
    nsamples, seq_len, holdout, seed = 6, 64, 3, 4
    calib, held = calibration_tokens("embedded", nsamples, seq_len, holdout, seed=seed, progress=False)
    tok = load_tokenizer(None)
    src = resolve_source("embedded")
    field = src.field("text")
    ids: list[int] = []
    for row in open_stream(src):
        if row[field] and row[field].strip():
            ids += tok.encode(row[field]).ids + [tok.token_to_id(EOS_TOKEN)]
        if len(ids) >= POOL * (nsamples + holdout) * seq_len + 10_000:
            break
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    # the pool is read in batches of 256 documents: the reference holds at least as many windows
    rows = [i for i in range(windows.shape[0]) if any(torch.equal(windows[i], c) for c in calib)]
    assert len(rows) == nsamples and all(any(torch.equal(w, h) for w in windows) for h in held)
    assert calib.dtype == torch.int64 and calib.shape == (nsamples, seq_len) and held.shape == (holdout, seq_len)
