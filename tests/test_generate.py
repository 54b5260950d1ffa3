"""``merino-pl generate``: KV-cache decoding on torch and onnxruntime gives the same tokens.

Real tiny models (conftest's ``tiny_arch`` over the shipped tokenizer's vocabulary): an fp32
export, an INT4 GPTQ directory of it (``merino-pl quantize``), a Lightning-style ``.ckpt``. The
ONNX graphs are the export stage's (``merino_pl.export.onnx``), written by ``generate`` itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import quantize_argv, tiny_arch
from merino_pl.cli import main as cli
from merino_pl.core.checkpoint import load_model
from merino_pl.core.config import Recipe
from merino_pl.core.tokenizer import find_eos, load_tokenizer
from merino_pl.generate.api import Chooser, GenerateSettings, OrtDecoder, TorchDecoder, generate

PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcode ✓"
NEW = 24
# INT4 graph at onnxruntime's fast accuracy level 4 (int8 activations inside MatMulNBits) vs the
# torch packed path, teacher-forced on torch's own tokens: next-token agreement >= 90 % and last-
# position logits within 3 % relative (the export tests' INT4 tolerance); at level 0 (fp32
# arithmetic) the greedy tokens are identical.
INT4_MIN_AGREEMENT = 0.9
INT4_REL_LOGITS = 0.03


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    """`merino-pl export` of a tiny recipe (fresh init, seed 0) over the GPT-NeoX vocabulary."""
    d = tmp_path_factory.mktemp("generate")
    recipe = Recipe("tiny-generate", tiny_arch(vocab_size=50304), {"source": "test"}).save(d / "tiny.yaml")
    assert cli(["export", str(recipe), "--out", str(d / "fp32")]) == 0
    return d / "fp32"


@pytest.fixture(scope="module")
def int4_dir(float_dir: Path) -> Path:
    """`merino-pl quantize --bits 4` of ``float_dir``, int8 embedding, fp32 scales."""
    calib = float_dir.parent / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = float_dir.parent / "int4"
    assert (
        cli(
            quantize_argv(
                float_dir,
                out,
                bits=4,
                group_size=32,
                nsamples=4,
                seq_len=32,
                holdout=0,
                embedding="int8",
                calib=calib,
                float_dtype="float32",
            )
        )
        == 0
    )
    return out


def _run(model: Path, **kw) -> tuple:
    pieces: list[str] = []
    result = generate(
        GenerateSettings(model=str(model), prompt=PROMPT, max_new_tokens=NEW, **kw), on_text=pieces.append
    )
    return result, "".join(pieces)


# ---- torch ---------------------------------------------------------------------------------------
def test_torch_greedy_is_transformers_generate_and_streams_the_text(float_dir: Path) -> None:
    result, streamed = _run(float_dir)
    assert result.stop == "max_new_tokens" and len(result.tokens) == NEW and result.runtime == "torch"
    assert streamed == result.text == load_tokenizer(str(float_dir)).decode(result.tokens)
    model = load_model(float_dir).model
    ids = torch.tensor([load_tokenizer(str(float_dir)).encode(PROMPT).ids])
    assert result.prompt_tokens == ids.shape[1]
    with torch.no_grad():  # the reference: transformers' own greedy loop over the HF wrapper
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert result.tokens == ref[0, ids.shape[1] :].tolist()
    assert result.prefill_ms > 0 and result.decode_tokens_per_s > 0


def test_sampling_is_seeded_and_top_k_1_is_greedy(float_dir: Path) -> None:
    greedy, _ = _run(float_dir)
    a, _ = _run(float_dir, temperature=1.5, seed=3)
    b, _ = _run(float_dir, temperature=1.5, seed=3)
    c, _ = _run(float_dir, temperature=1.5, seed=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens
    assert _run(float_dir, temperature=0.7, top_k=1, seed=5)[0].tokens == greedy.tokens
    assert a.sampling == "temperature 1.5, seed 3" and greedy.sampling == "greedy"


def test_chooser_keeps_to_the_tokenizer_vocabulary_and_top_k() -> None:
    logits = torch.zeros(10)
    logits[8], logits[2], logits[5] = 9.0, 3.0, 2.9  # 8: a padded row beyond an 8-token vocabulary
    assert Chooser(GenerateSettings("m"), vocab=8)(logits) == 2
    draws = {Chooser(GenerateSettings("m", temperature=5.0, top_k=2, seed=s), vocab=8)(logits) for s in range(40)}
    assert draws == {2, 5}


def test_context_end_stops_the_decode(float_dir: Path) -> None:
    result = generate(GenerateSettings(model=str(float_dir), prompt=PROMPT, max_new_tokens=500))
    assert result.stop == "context" and result.prompt_tokens + len(result.tokens) == 128  # tiny_arch's context


@pytest.fixture(scope="module")
def eos_ckpt(float_dir: Path) -> Path:
    """A Lightning-style ``.ckpt`` (the keys ``load_model`` reads) whose model always predicts end-of-text:
    the final LayerNorm outputs its bias, a one-hot that ``out_proj`` maps to the (lengthened)
    end-of-text row of the tied table, whose logit then dominates."""
    loaded = load_model(float_dir)
    model, eos = loaded.model, find_eos(load_tokenizer(None), None)
    with torch.no_grad():
        table, norm, proj = model.model.embed_tokens.weight, model.model.final_norm, model.model.out_proj
        table[eos] *= 10
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
        proj.weight.zero_()
        proj.weight[:, 0] = table[eos]
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = float_dir.parent / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"merino": {"recipe": loaded.recipe.to_dict()}, "state_dict": state}, path)
    return path


def test_end_of_text_stops_a_checkpoint_decode_and_is_not_printed(eos_ckpt: Path, capsys) -> None:
    assert cli(["generate", str(eos_ckpt), "--prompt", "Once", "--max-new-tokens", "9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once\n") and "<|endoftext|>" not in out
    assert re.search(r"^prompt 1 tokens, 1 new tokens \(stop: eos\), prefill [\d.]+ ms, decode - ", out, re.M), out


def test_cli_prints_the_text_then_one_line_of_figures(float_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "prompt.txt").write_text(PROMPT, encoding="utf-8")
    argv = ["generate", str(float_dir), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens", "5"]
    assert cli([*argv, "--threads", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "\n".join(lines[:-1]).startswith(PROMPT)
    assert re.fullmatch(
        r"prompt \d+ tokens, 5 new tokens \(stop: max_new_tokens\), prefill [\d.]+ ms, "
        r"decode [\d.]+ tokens/s \[torch, greedy\]",
        lines[-1],
    ), lines[-1]
    assert torch.get_num_threads() == 1  # --threads 2 held for the run only (conftest sets one thread)


# ---- onnxruntime ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_onnxruntime_greedy_equals_torch_fp32(float_dir: Path) -> None:
    """The default: a graph exported on the fly to a temporary file, removed after."""
    before = sorted(p.name for p in float_dir.iterdir())
    torch_result, _ = _run(float_dir)
    ort_result, streamed = _run(float_dir, runtime="onnxruntime")
    assert ort_result.onnx is None and ort_result.export_s > 0 and sorted(p.name for p in float_dir.iterdir()) == before
    assert ort_result.tokens == torch_result.tokens and streamed == torch_result.text


@pytest.mark.slow
def test_onnxruntime_int4_is_close_to_the_torch_packed_path(int4_dir: Path, tmp_path: Path) -> None:
    """Kept at --onnx-out (a new file), then found beside the weights; exact at accuracy level 0."""
    import onnx

    torch_result, _ = _run(int4_dir)
    graph = tmp_path / "level4.onnx"
    fast, _ = _run(int4_dir, runtime="onnxruntime", onnx_out=str(graph))
    assert graph.is_file() and fast.onnx == str(graph) and fast.export_s > 0 and len(fast.tokens) == NEW
    copy = tmp_path / "with-graph"
    shutil.copytree(int4_dir, copy)
    shutil.copy(graph, copy / "model.onnx")  # what `merino-pl export GPTQ_DIR --onnx` leaves in its directory
    again, _ = _run(copy, runtime="onnxruntime")
    assert again.onnx == str(copy / "model.onnx") and again.export_s is None and again.tokens == fast.tokens
    # teacher-forced on torch's tokens, so that one near-tie does not change every later position
    ids = load_tokenizer(str(int4_dir)).encode(PROMPT).ids
    ref, ort = TorchDecoder(load_model(int4_dir).model), OrtDecoder(graph, threads=None)
    a, b = [ref.prefill(ids)], [ort.prefill(ids)]
    for t in torch_result.tokens[:-1]:
        a.append(ref.step(t))
        b.append(ort.step(t))
    a, b = torch.stack(a), torch.stack(b)
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agreement >= INT4_MIN_AGREEMENT, agreement
    assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item() < INT4_REL_LOGITS
    # the same graph at accuracy level 0 (fp32 arithmetic): the level is only the MatMulNBits
    # nodes' attribute (tests/test_latency.py checks export_onnx(accuracy_level=0) writes it)
    level0 = onnx.load(str(graph))
    for node in (n for n in level0.graph.node if n.op_type == "MatMulNBits"):
        next(a for a in node.attribute if a.name == "accuracy_level").i = 0
    exact = str(tmp_path / "level0.onnx")
    onnx.save(level0, exact)
    assert _run(int4_dir, onnx=exact, runtime="onnxruntime")[0].tokens == torch_result.tokens
    sampled = [
        _run(int4_dir, temperature=0.9, top_k=50, seed=1, **kw)[0].tokens
        for kw in ({}, {"onnx": exact, "runtime": "onnxruntime"})
    ]
    assert sampled[0] == sampled[1]  # one chooser, one seeded generator for both runtimes


# ---- bad input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory) -> Path:
    """config.json and garbage weights: loading it would fail, so an error about a flag proves
    the flags were checked first."""
    d = tmp_path_factory.mktemp("corrupt")
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"not safetensors")
    return d


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--runtime", "foo"], "'foo'"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-new-tokens", "-3"], "got -3"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--temperature", "-0.5"], "--temperature must be >= 0 (0: greedy), got -0.5"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--onnx", "missing.onnx"], "--onnx missing.onnx: no such file"),
        (["--runtime", "torch", "--onnx", "missing.onnx"], "not torch"),
        (["--prompt-file", "missing.txt"], "--prompt-file missing.txt"),
    ],
)
def test_bad_flags_are_one_line_exit_2_before_loading(corrupt_dir: Path, argv: list[str], needle: str, capsys) -> None:
    assert cli(["generate", str(corrupt_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "safetensors" not in err, err


def test_bad_models_are_one_line_exit_2(tmp_path: Path, float_dir: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    (tmp_path / "model.bin").write_bytes(b"x")
    (tmp_path / "not.onnx").write_bytes(b"not a graph")
    (tmp_path / "taken.onnx").write_bytes(b"the user's")
    cases = [
        ([], "the following arguments are required: model"),
        ([str(tmp_path / "nope")], "no such file or directory"),
        ([str(tmp_path / "empty")], "no config.json"),
        ([str(tmp_path / "no-weights")], "no model.safetensors"),
        ([str(tmp_path / "model.bin")], "expected an exported or quantized model directory"),
        ([str(float_dir), "--onnx", str(tmp_path / "not.onnx")], "onnxruntime cannot load it"),
        ([str(float_dir), "--runtime", "onnxruntime", "--onnx-out", str(tmp_path / "taken.onnx")], "never overwrites"),
        ([str(float_dir), "--prompt", "x" * 2000], "context 128"),
    ]
    for argv, needle in cases:
        try:
            code = cli(["generate", *argv])
        except SystemExit as e:  # argparse's own usage errors (one line, exit 2: merino_pl.cli)
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (argv, err)
    assert (tmp_path / "taken.onnx").read_bytes() == b"the user's"


@pytest.mark.parametrize("argv", [["--help"], ["--runtime", "foo"], ["--max-new-tokens", "0"]])
def test_help_and_bad_flags_import_no_torch(corrupt_dir: Path, argv: list[str]) -> None:
    """What 'before loading anything heavy' means here: not even torch is imported."""
    code = (
        "import sys\nfrom merino_pl.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print(code, sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "generate", str(corrupt_dir), *argv], capture_output=True, text=True
    )
    assert proc.stdout.strip().splitlines()[-1] == ("0 []" if argv == ["--help"] else "2 []"), proc.stdout + proc.stderr
