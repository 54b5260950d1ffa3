"""GPTQ / RTN quantization: packing, the solver, shared blocks, the format, reload, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, quantize_argv, tiny_arch
from merino_pl.cli import main as cli
from merino_pl.core.checkpoint import export_pretrained, load_model
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.io import atomic_dir
from merino_pl.core.quant.format import QuantSpec, write_quantized
from merino_pl.core.quant.packing import dequantize, pack, pack_rows, unpack_rows
from merino_pl.core.quant.qlinear import QuantLinear
from merino_pl.core.quant.rtn import rtn_quantize
from merino_pl.quantize.gptq import HessianAccumulator, gptq_quantize
from merino_pl.quantize.passes import quantize_model

LINEARS_PER_LAYER = 6


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    """A tiny model with the real vocabulary (so the shipped tokenizer's ids fit), exported."""
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=50304))
    return export_pretrained(model, tmp_path_factory.mktemp("float") / "tiny")


def _ids(n: int, T: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50304, (n, T), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_roundtrip_covers_every_code(bits):
    codes = torch.randint(0, 2**bits, (256, 24), dtype=torch.int32)
    codes[: 2**bits, 0] = torch.arange(2**bits)  # incl. the top code, whose high bit is int32's sign
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (256 * bits // 32, 24)
    assert torch.equal(unpack_rows(words, bits), codes)


def test_v1_layout_matches_the_reference_bit_order():
    """Row r·8 + i of the (in, out) codes sits in bits 4i..4i+3 of qweight[r] (auto-gptq's order)."""
    codes = torch.zeros(8, 1, dtype=torch.int32)
    codes[1, 0], codes[7, 0] = 3, 15
    assert int(pack_rows(codes, 4)[0, 0]) == (3 << 4) - (1 << 32) + (15 << 28)  # as a signed int32


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_packed_tensors_dequantize_to_the_solver_weight(sym, desc_act):
    torch.manual_seed(0)
    W, X = torch.randn(48, 128), torch.randn(4096, 128) * torch.linspace(0.1, 3, 128)
    q = gptq_quantize(W, 2 * X.t() @ X / len(X), 4, 32, sym, desc_act).weight
    p = pack(q)
    assert p["qzeros"].dtype == torch.int32 and p["scales"].dtype == torch.float16 and p["g_idx"].dtype == torch.int32
    assert torch.equal(dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4), q.dequantize())
    assert torch.bincount(q.g_idx.long()).tolist() == [32] * 4  # every group has group_size columns
    if sym:
        assert torch.equal(q.zeros, torch.full_like(q.zeros, 8))
    if not desc_act:
        assert torch.equal(q.g_idx, torch.arange(128, dtype=torch.int32) // 32)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_ragged_last_group_as_auto_gptq_writes_it(method):
    """96 inputs in groups of 64: two groups, the last of 32 columns (MeRino-64M: 960 in g128)."""
    torch.manual_seed(0)
    W, X = torch.randn(16, 96), torch.randn(512, 96)
    q = gptq_quantize(W, 2 * X.t() @ X / 512, 4, 64).weight if method == "gptq" else rtn_quantize(W, 4, 64, True)
    assert q.scales.shape == (2, 16) and torch.bincount(q.g_idx.long()).tolist() == [64, 32]
    p = pack(q)
    lin = QuantLinear(96, 16, 4, 64, bias=False)
    lin.load_state_dict(p, strict=False)
    assert torch.equal(lin.weight_float(), q.dequantize()) and _rel(q.dequantize(), W) < 0.15


def test_gptq_beats_rtn_on_its_objective():
    """GPTQ's output error ||WX - ŴX|| on correlated inputs is well below round-to-nearest's."""
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    X = torch.randn(2048, 32) @ torch.randn(32, 256) + 0.1 * torch.randn(2048, 256)  # low-rank + noise
    acc = HessianAccumulator(256)
    for chunk in X.split(500):
        acc.add(chunk)
    assert acc.samples == 2048
    err = {}
    for name, Wq in (
        ("gptq", gptq_quantize(W, acc.hessian(), 4, 128).weight.dequantize()),
        ("rtn", rtn_quantize(W, 4, 128, True).dequantize()),
    ):
        err[name] = float(((W - Wq) @ X.t()).norm())
    assert err["gptq"] < 0.7 * err["rtn"]


@pytest.mark.parametrize("bits,limit", [(8, 0.01), (4, 0.2)])
def test_quantize_write_reload_logits(float_dir, tmp_path, bits, limit):
    model = load_model(float_dir).model
    ids = _ids(2)
    with torch.no_grad():
        ref = model(ids).logits
        spec = QuantSpec(bits=bits, group_size=32)
        quantized, reports = quantize_model(model, spec, _ids(8, 64, seed=2), batch_size=4, progress=False)
        mem = model(ids).logits
        with atomic_dir(tmp_path / "q") as tmp:
            write_quantized(tmp, model, quantized, spec, None, "float32")
        loaded = load_model(tmp_path / "q")
        out = loaded.model(ids).logits
    assert loaded.kind == "gptq"
    assert _rel(out, ref) < limit  # INT8: < 1 % relative logit error vs the float model
    torch.testing.assert_close(out, mem, rtol=0, atol=1e-5)  # reload == the in-memory quantized model
    # Hessian rows per linear = nsamples · seq_len · L_j: every application of the shared layer counts
    L = [b.num_layers for b in tiny_arch().blocks]
    assert len(reports) == LINEARS_PER_LAYER * len(L)
    for r in reports:
        assert (
            r.hessian_samples == 8 * 64 * L[int(r.name.split(".")[2])]
            and r.applications == L[int(r.name.split(".")[2])]
        )


def test_gptq_beats_rtn_at_int4_on_the_model(float_dir):
    """On the calibration distribution, GPTQ's logits are much closer to float than RTN's."""
    calib, err = _ids(8, 64, seed=3), {}
    with torch.no_grad():
        ref = load_model(float_dir).model(calib[:2]).logits
        for method in ("gptq", "rtn"):
            model = load_model(float_dir).model
            quantize_model(model, QuantSpec(bits=4, group_size=32, method=method), calib, 4, progress=False)
            err[method] = _rel(model(calib[:2]).logits, ref)
    assert err["gptq"] < 0.6 * err["rtn"]


def test_format_files_keys_and_one_copy_per_shared_block(float_dir, tmp_path):
    code = cli(quantize_argv(float_dir, tmp_path / "q", bits=4, group_size=32, nsamples=4, seq_len=32, holdout=2))
    assert code == 0
    q = tmp_path / "q"
    for f in (
        "config.json",
        "quantize_config.json",
        "model.safetensors",
        "tokenizer.json",
        "quantize_report.json",
        "quantize_report.md",
    ):
        assert (q / f).is_file(), f
    qcfg = json.loads((q / "quantize_config.json").read_text())
    assert {k: qcfg[k] for k in ("bits", "group_size", "desc_act", "sym", "quant_method", "checkpoint_format")} == {
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": True,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    assert json.loads((q / "config.json").read_text())["quantization_config"]["bits"] == 4
    state = load_file(q / "model.safetensors")
    arch = tiny_arch()
    qweights = sorted(k for k in state if k.endswith(".qweight"))
    assert len(qweights) == LINEARS_PER_LAYER * arch.num_blocks  # one set per block, not per application
    for j, b in enumerate(arch.blocks):
        p = f"model.blocks.{j}.layer.ffn.down"
        assert state[f"{p}.qweight"].shape == (b.ffn // 8, b.embed_dim) and state[f"{p}.qweight"].dtype == torch.int32
        assert (
            state[f"{p}.qzeros"].shape == (b.ffn // 32, b.embed_dim // 8) and state[f"{p}.qzeros"].dtype == torch.int32
        )
        assert state[f"{p}.scales"].shape == (b.ffn // 32, b.embed_dim) and state[f"{p}.scales"].dtype == torch.float16
        assert state[f"{p}.g_idx"].shape == (b.ffn,) and f"{p}.weight" not in state and f"{p}.bias" in state
    assert state["model.embed_tokens.weight"].dtype == torch.float16  # embedding / tied head: not quantized, fp16
    model = load_model(q).model
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    assert len({t.data_ptr() for _, t in tensors}) == len(tensors) == len(state)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == LINEARS_PER_LAYER * arch.num_blocks
    report = json.loads((q / "quantize_report.json").read_text())
    assert report["reload_max_abs_logit_diff"] < 1e-5 and report["calibration"]["tokens"] == 4 * 32


@pytest.mark.parametrize("bits,desc_act", [(4, False), (4, True), (8, False)])
def test_packed_model_holds_no_float_weight_copy(float_dir, tmp_path, bits, desc_act):
    """A loaded GPTQ model keeps only the packed tensors, before, during and after a forward; the
    block-streamed and per-call paths give the reference dequantization's logits."""
    from merino_pl.core.quant.qlinear import float_weight_bytes
    from merino_pl.latency.timing import weight_bytes_in_memory

    model = load_model(float_dir).model
    spec = QuantSpec(bits=bits, group_size=32, desc_act=desc_act, method="rtn" if not desc_act else "gptq")
    quantized, _ = quantize_model(model, spec, _ids(2, 32, seed=2), progress=False)
    with atomic_dir(tmp_path / "q") as tmp:
        write_quantized(tmp, model, quantized, spec, None, "float32")
    packed = load_model(tmp_path / "q").model
    qlins = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert qlins and float_weight_bytes(packed) == 0
    for m in qlins:  # the file's four tensors (+ bias), nothing else
        assert {n for n, _ in m.named_buffers()} == {"qweight", "qzeros", "scales", "g_idx"}
        assert m.qweight.dtype == torch.int32 and m.qweight.numel() == m.in_features * m.out_features * bits // 32
    seen = []
    hook = packed.model.blocks[0].layer.ffn.register_forward_hook(lambda *_: seen.append(float_weight_bytes(packed)))
    with torch.no_grad():
        ids = _ids(1)
        out = packed(ids).logits
        assert seen and seen[0] > 0  # inside a block: that block's weights, transiently
        assert float_weight_bytes(packed) == 0  # and gone when the forward returns
        hook.remove()
        ref = model(ids).logits  # the in-memory model holding the dequantized float weights
        for m in qlins:
            torch.testing.assert_close(m.weight_float(), quantized[_name(packed, m)].dequantize(), rtol=0, atol=0)
            x = torch.randn(3, m.in_features)
            torch.testing.assert_close(
                m(x), x @ m.weight_float().t() + (0 if m.bias is None else m.bias), rtol=1e-5, atol=1e-5
            )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    floats = sum(p.numel() * 4 for p in model.parameters())
    linears = sum(m.in_features * m.out_features for m in qlins)
    assert weight_bytes_in_memory(packed) < floats - linears * 4 * (1 - bits / 32 - 0.05)  # measured: packed bytes


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_int8_embedding_round_trips(float_dir, tmp_path):
    from merino_pl.core.quant.qembedding import QuantEmbedding, quantize_rows

    table = torch.randn(300, 64) * torch.rand(300, 1)
    table[5] = 0  # an all-zero row
    codes, scales = quantize_rows(table)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and int(codes.abs().max()) <= 127
    back = codes.float() * scales.float()[:, None]
    assert float(((back - table).abs() / scales.float()[:, None]).max()) <= 0.5 + 1e-3 and torch.equal(
        back[5], table[5]
    )
    assert (
        cli(
            quantize_argv(
                float_dir,
                tmp_path / "e",
                method="rtn",
                bits=4,
                group_size=32,
                embedding="int8",
                holdout=2,
                seq_len=32,
                float_dtype="float32",
            )
        )
        == 0
    )
    q = tmp_path / "e"
    state = load_file(q / "model.safetensors")
    assert "model.embed_tokens.weight" not in state
    assert (
        state["model.embed_tokens.qweight"].dtype == torch.int8
        and state["model.embed_tokens.scales"].dtype == torch.float16
    )
    assert json.loads((q / "quantize_config.json").read_text())["meta"]["embedding"] == "int8"
    report = json.loads((q / "quantize_report.json").read_text())
    assert report["heldout_linears_only"] and report["heldout"]["tokens"] == report["heldout_linears_only"]["tokens"]
    assert report["reload_max_abs_logit_diff"] < 1e-4
    assert "int8 embedding" in (q / "quantize_report.md").read_text()
    model = load_model(q).model
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and torch.equal(emb.qweight, state["model.embed_tokens.qweight"])
    assert {k: v for k, v in model.state_dict().items() if "embed_tokens" in k}.keys() == {
        "model.embed_tokens.qweight",
        "model.embed_tokens.scales",
    }
    ref = load_model(float_dir).model.model.embed_tokens.weight
    ids = _ids(1, 16)
    with torch.no_grad():
        h = torch.randn(1, 4, emb.embedding_dim)
        torch.testing.assert_close(emb(ids), emb.weight[ids])  # the lookup reads the same rows
        torch.testing.assert_close(model.model.logits(h), h @ emb.weight.t(), rtol=1e-5, atol=1e-5)  # the tied head too
        assert _rel(emb.weight, ref) < 0.01


def test_rtn_desc_act_asym_and_preset(float_dir, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("bits: 8\ngroup_size: -1\nmethod: rtn\nholdout: 1\nseq_len: 32\nfloat_dtype: float32\n")
    assert cli(["quantize", str(float_dir), "--config", str(preset), "--no-sym", "--out", str(tmp_path / "r")]) == 0
    cfg = json.loads((tmp_path / "r" / "quantize_config.json").read_text())
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["meta"]["method"]) == (8, -1, False, "rtn")
    assert load_file(tmp_path / "r" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.float32
    assert (
        cli(
            quantize_argv(
                float_dir,
                tmp_path / "d",
                float_dtype="float32",
                desc_act=True,
                group_size=32,
                nsamples=2,
                seq_len=32,
                holdout=1,
            )
        )
        == 0
    )
    ref, model = load_model(float_dir).model, load_model(tmp_path / "d").model
    with torch.no_grad():
        assert _rel(model(_ids(1)).logits, ref(_ids(1)).logits) < 0.2  # random-init model, 2 windows


@pytest.mark.parametrize("preset", sorted((REPO / "quantize").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_presets_parse(preset, capsys):
    """Every preset is valid (bad keys / values would stop here before any model is loaded)."""
    import argparse

    from merino_pl.quantize.cli import add_arguments, settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["x", "--config", str(preset)])  # every option the CLI has, unset
    assert settings(args).problems() == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bits", "3"], "--bits 3 is not supported (valid: 4, 8)"),
        (["--bits", "3", "--nsamples", "0"], "--nsamples 0: must be positive"),  # every problem at once
        (["--group-size", "0"], "--group-size 0: must be positive or -1"),
        (["--calib", "EMPTY"], "is empty"),
        (["--calib", "/nonexistent/x.txt"], "no such file"),
        (["--method", "awq"], "--method 'awq'"),
    ],
)
def test_bad_input_is_one_line_exit_2(float_dir, tmp_path, capsys, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = [a.replace("EMPTY", str(empty)) for a in argv]
    base = ["--nsamples", "2", "--seq-len", "32", "--group-size", "32", "--out", str(tmp_path / "o")]
    assert cli(["quantize", str(float_dir), *base, *argv]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (earlier lines: transformers' loading bar)
    assert err.startswith("merino-pl quantize: error:") and message in err
    if argv[:2] == ["--bits", "3"]:
        assert "--bits 3" in err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_exit_2(tmp_path, capsys):
    assert cli(quantize_argv(tmp_path / "nope.ckpt", tmp_path / "o", nsamples=2, seq_len=32)) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantized_model_runs_on_gpu(float_dir, tmp_path):
    assert cli(quantize_argv(float_dir, tmp_path / "q", bits=4, group_size=32, nsamples=2, seq_len=32, holdout=1)) == 0
    model, ids = load_model(tmp_path / "q").model, _ids(1)
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.to("cuda")(ids.cuda()).logits.cpu()
        half = model.half()(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    assert _rel(half, cpu) < 0.01


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (REPO / "recipes").glob("merino-*.yaml")))
def test_default_options_fit_every_shipped_recipe(recipe):
    """`quantize CKPT --bits 4` with the defaults (group 128) is valid for every shipped recipe."""
    from merino_pl.core.config import load_recipe
    from merino_pl.core.quant.format import QuantSpec
    from merino_pl.quantize.api import CalibrationSettings, group_note, validate_for_model

    arch = load_recipe(REPO / "recipes" / f"{recipe}.yaml").architecture
    assert validate_for_model(QuantSpec(bits=4), CalibrationSettings(), arch) == []  # the defaults
    for bits in (4, 8):
        assert validate_for_model(QuantSpec(bits=bits), CalibrationSettings(), arch) == []
    if min(b.embed_dim for b in arch.blocks) < 128:
        assert "one group per row" in group_note(128, arch)


def test_group_wider_than_a_layer_is_one_group_per_row(tmp_path, capsys):
    """merino-tiny's 64-wide blocks under the default group 128: one group of 64 per row, the
    global group_size kept (what auto-gptq / GPTQModel size as ceil(64 / 128) = 1 group), the
    directory loads back, and the report says which layers."""
    out = tmp_path / "q"
    assert cli(quantize_argv("merino-tiny", out, bits=4, nsamples=2, seq_len=32, holdout=1, batch_size=2)) == 0
    assert "one group per row" in capsys.readouterr().out
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == 128
    report = json.loads((out / "quantize_report.json").read_text())
    rows = {r["name"]: r for r in report["layers"]}
    assert (
        rows["model.blocks.0.layer.attn.q_proj"]["groups"] == 1
        and rows["model.blocks.0.layer.attn.q_proj"]["group_columns"] == 64
    )
    assert (
        rows["model.blocks.2.layer.attn.q_proj"]["groups"] == 1 and rows["model.blocks.2.layer.ffn.down"]["groups"] == 2
    )
    assert "one group per row" in report["group_note"] and "64" in report["group_note"]
    assert "one group per row" in (out / "quantize_report.md").read_text()
    loaded = load_model(out)
    assert loaded.kind == "gptq"
    lin = loaded.model.model.blocks[0].layer.attn.q_proj
    assert lin.scales.shape == (1, 64) and lin.g_idx.eq(0).all()
    with torch.no_grad():
        assert torch.isfinite(loaded.model(torch.arange(8)[None]).logits).all()


# ---- issue 28: the second run, a lying quantize_config.json, the model's own tokenizer ----------
def _rtn_dir(src: Path, out: Path, **flags) -> Path:
    defaults = {"method": "rtn", "bits": 4, "group_size": 32, "seq_len": 32, "holdout": 1}
    argv = quantize_argv(src, out, **{**defaults, **flags})
    assert cli(argv) == 0
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_on_the_same_out_is_one_line_naming_the_first(float_dir, tmp_path, capsys):
    """Two `quantize` runs to one new --out: the one that comes second stops before reading the
    model, naming the running one, and writes nothing (the first one's --out stays its own)."""
    import subprocess
    import sys

    out = tmp_path / "q"
    holder = (  # the first run, at the point where it holds --out (core.lock, as quantize takes it)
        "import sys, time\nfrom merino_pl.core.lock import folder_lock\n"
        f"with folder_lock({str(out)!r}, 'merino-pl quantize first'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n"
    )
    first = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "held\n"
        assert cli(quantize_argv(float_dir, out, method="rtn", bits=8, group_size=32, seq_len=32, holdout=1)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{out} is in use by pid {first.pid}" in err and "merino-pl quantize first" in err
        assert not out.exists()
    finally:
        first.kill()
        first.wait()
    _rtn_dir(float_dir, out, bits=8)  # the owner gone, the folder is free again


@pytest.mark.parametrize(
    "claims,named",
    [
        ({"bits": 8}, "bits: 8, group_size: 32 do not match model.safetensors"),
        ({"group_size": 64}, "bits: 4, group_size: 64 do not match model.safetensors"),
        ({"bits": 3}, "bits: 3, group_size: 32 (bits 4 or 8"),
    ],
    ids=["bits-8", "group-64", "bits-3"],
)
def test_a_quantize_config_claiming_other_bits_or_group_names_the_file_and_values(
    float_dir, tmp_path, capsys, claims, named
):
    q = _rtn_dir(float_dir, tmp_path / "q")
    config = q / "quantize_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **claims}, indent=2))
    before = _snapshot(q)
    capsys.readouterr()
    assert cli(quantize_argv(q, tmp_path / "again", method="rtn", seq_len=32, holdout=1)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{config}: {named}" in err
    if "bits" in claims and claims["bits"] != 3:
        assert "holds 4-bit codes" in err  # what the file really holds, beside what the config claims
    assert _snapshot(q) == before and not (tmp_path / "again").exists()


def test_an_exported_directory_calibrates_with_and_keeps_its_own_tokenizer(tmp_path):
    """A model trained with another tokenizer (the demo's 2048-id BPE): quantizing its exported
    directory tokenizes the calibration text with that directory's tokenizer.json (NeoX ids would
    not even fit the 2048-row embedding) and ships it; the source directory is left as it was."""
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=2048))
    src = export_pretrained(model, tmp_path / "demo", "shakespeare-bpe-2048")
    before = _snapshot(src)
    out = _rtn_dir(src, tmp_path / "q", bits=8)
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["calibration"]["holdout_windows"] == 1 and report["heldout"]["tokens"] == 31
    vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab()
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab() == vocab and len(vocab) <= 2048
    assert _snapshot(src) == before


def test_default_calibration_window_is_the_trained_context(tmp_path):
    """No --seq-len: 512-token windows, or the trained context when shorter (a model trained at 64
    with 128 positions calibrates on 64-token windows); a --seq-len past its positions is refused."""
    from test_eval_context import _ckpt

    ckpt = _ckpt(tmp_path, 64)
    out = tmp_path / "q"
    args = ["quantize", str(ckpt), "--bits", "4", "--nsamples", "2", "--holdout", "1", "--out", str(out)]
    assert cli(args) == 0
    assert json.loads((out / "quantize_report.json").read_text())["calibration"]["seq_len"] == 64
    assert cli([*args[:-2], "--seq-len", "256", "--out", str(tmp_path / "q2")]) == 2
    assert not (tmp_path / "q2").exists()
