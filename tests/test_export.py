"""Self-contained exports: what `merino-pl export` and `merino-pl quantize` write loads with the
ecosystem's own tools in a fresh process where `merino_pl` cannot be imported.

Each consumer runs in a subprocess started with ``python -I -S`` and only site-packages on
``sys.path`` (no ``.pth`` files, so not the editable ``src`` of merino-pl); it first asserts that
``merino_pl`` is not importable. The GPTQ consumer runs in the separate environment `make test`
builds (``.venv/gptq``: torch, transformers, optimum 2.3.0, GPTQModel 7.6.0 and no merino-pl): it
skips where that environment is absent, except under ``MERINO_REQUIRE_GPTQ=1`` (``make test``, CI),
where its absence is a failure.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, quantize_argv, tiny_arch
from merino_pl.cli import main as cli
from merino_pl.core import config as config_module
from merino_pl.core import hf as hf_module
from merino_pl.core import model as model_module
from merino_pl.core.checkpoint import load_model
from merino_pl.core.config import BlockConfig, MerinoConfig, Recipe
from merino_pl.core.quant.qlinear import QuantLinear
from merino_pl.core.remote_code import AUTO_MAP, CONFIG_FILE, MODELING_FILE, sources

IDS = [[5, 17, 300, 42, 9, 1000, 7, 12], [50, 60, 70, 80, 90, 100, 110, 120]]
# absolute, not resolved: the venv's python is a symlink to the base interpreter
GPTQ_PYTHON = Path(os.environ.get("MERINO_GPTQ_PYTHON", REPO / ".venv" / "gptq" / "bin" / "python")).absolute()
REQUIRE_GPTQ = os.environ.get("MERINO_REQUIRE_GPTQ") == "1"


def run_isolated(
    code: str,
    tmp: Path,
    python: Path | str = sys.executable,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run ``code`` in ``python -I -S`` with only that interpreter's site-packages on ``sys.path``;
    the prelude fails the run if ``merino_pl`` is importable there."""
    site = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    prelude = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.append({site!r})
        assert importlib.util.find_spec("merino_pl") is None, "merino_pl is importable in the consumer"
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_MODULES_CACHE=str(tmp / "hf_modules"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        GPTQMODEL_CPU_WORKERS="2",
    )
    proc = subprocess.run(
        [str(python), "-I", "-S", "-c", prelude + textwrap.dedent(code)],
        cwd=tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """`merino-pl export` of a tiny recipe over the real GPT-NeoX vocabulary (context 128)."""
    d = tmp_path_factory.mktemp("export")
    arch = tiny_arch(vocab_size=50304)
    recipe = Recipe("tiny-export", arch, {"source": "test"}).save(d / "tiny.yaml")
    assert cli(["export", str(recipe), "--out", str(d / "model")]) == 0
    return d / "model"


def test_exported_dir_is_self_contained(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["MerinoForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)  # <|endoftext|>
    generation = json.loads((exported / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (0, 0, 0)
    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == 128
    assert {f: (exported / f).read_text() for f in (CONFIG_FILE, MODELING_FILE)} == sources()


def test_remote_code_is_the_package_source() -> None:
    """One model source: every definition in the written files is the package's, verbatim, and
    every definition of model.py and hf.py but the registration is in them."""
    package = {}
    for module in (config_module, model_module, hf_module):
        tree = ast.parse(inspect.getsource(module))
        package.update(
            {
                (module.__name__, _name(n)): ast.get_source_segment(inspect.getsource(module), n)
                for n in tree.body
                if _name(n)
            }
        )
    written: dict[tuple[str, str], str] = {}
    for file, text in sources().items():
        tree = ast.parse(text)
        assert not [
            n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and "merino_pl" in ast.unparse(n)
        ], f"{file} imports merino_pl"
        written.update({(file, _name(n)): ast.get_source_segment(text, n) for n in tree.body if _name(n)})
    modules = ("merino_pl.core.model", "merino_pl.core.hf", "merino_pl.core.config")
    for (file, name), segment in written.items():
        assert segment in {package.get((m, name)) for m in modules}, (file, name)
    model_defs = {name for module, name in package if module in modules[:2]}
    assert model_defs - {name for _, name in written} == {"_register_with_transformers"}


def _name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def test_automodel_tokenizer_pipeline_and_generate_without_merino_pl(exported: Path, tmp_path: Path, capfd) -> None:
    proc = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        d = {str(exported)!r}
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        ids = torch.tensor({IDS})
        with torch.no_grad():
            torch.save(model(ids).logits, "logits.pt")
            gen = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
        text = pipeline("text-generation", model=d, trust_remote_code=True)("Once upon a time", max_new_tokens=6,
                                                                              do_sample=False)[0]["generated_text"]
        print(json.dumps(dict(cls=type(model).__module__, gen=gen.tolist(), text=text, max_len=tok.model_max_length,
                              eos=[model.config.eos_token_id, model.generation_config.eos_token_id],
                              encoded=tok("Hello world")["input_ids"])))
    """,
        tmp_path,
    )
    assert "deprecat" not in proc.stderr.lower(), proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"].startswith("transformers_modules.") and got["max_len"] == 128 and got["eos"] == [0, 0]

    ours = load_model(exported).model
    ids = torch.tensor(IDS)
    capfd.readouterr()
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), ours(ids).logits)
        assert got["gen"] == ours.generate(ids[:, :5], max_new_tokens=8, do_sample=False).tolist()
    assert "deprecat" not in capfd.readouterr().err.lower()  # merino-pl's own forward / generate: no warning
    from merino_pl.core.tokenizer import load_tokenizer

    assert got["encoded"] == load_tokenizer().encode("Hello world").ids
    assert got["text"].startswith("Once upon a time") and len(got["text"]) > len("Once upon a time")


def test_autotokenizer_without_trust_remote_code(exported: Path, tmp_path: Path) -> None:
    """transformers reads config.json first and cannot (needn't) run its code: it falls back to
    tokenizer_config.json, which names a stock class."""
    proc = run_isolated(
        f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(exported)!r})
        print("\\nRESULT", tok.model_max_length, tok.eos_token_id)  # after transformers' unanswered prompt
    """,
        tmp_path,
    )
    assert proc.stdout.strip().splitlines()[-1] == "RESULT 128 0"


LOCAL_PPL = """task: ppl_local
dataset_path: json
dataset_kwargs: {data_files: {test: %s}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
metadata: {version: 1.0}
"""
ARC = [
    ("Which of these is a planet?", ["Mars", "the Moon", "a comet"], "A"),
    ("Water freezes at what temperature in Celsius?", ["100", "0", "50"], "B"),
]


@pytest.mark.slow
def test_stock_lm_eval_cli_gives_the_number_of_merino_pl_eval(exported: Path, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "texts.jsonl").write_text(
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in ("The quick brown fox jumps over the lazy dog. " * 6, "To be, or not to be, that is the question.")
        )
    )
    (tasks / "ppl_local.yaml").write_text(LOCAL_PPL % (tasks / "texts.jsonl"))
    (tasks / "arc.jsonl").write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": q, "answerKey": a, "choices": {"text": c, "label": list("ABC")}})
            + "\n"
            for i, (q, c, a) in enumerate(ARC)
        )
    )
    arc = (REPO / "eval" / "tasks" / "arc_easy_local.yaml").read_text()
    (tasks / "arc_easy_local.yaml").write_text(arc.replace("/data/eval/arc_easy_test.jsonl", str(tasks / "arc.jsonl")))

    run_isolated(
        f"""
        sys.argv = ["lm_eval", "--model", "hf", "--model_args", "pretrained={exported},trust_remote_code=True",
                    "--tasks", "ppl_local,arc_easy_local", "--include_path", {str(tasks)!r}, "--device", "cpu",
                    "--batch_size", "2", "--output_path", "stock"]
        from lm_eval.__main__ import cli_evaluate
        cli_evaluate()
    """,
        tmp_path,
    )
    stock = json.loads(next((tmp_path / "stock").rglob("results_*.json")).read_text())["results"]
    assert (
        cli(
            [
                "eval",
                str(exported),
                "--tasks",
                "ppl_local,arc_easy_local",
                "--include-path",
                str(tasks),
                "--ppl",
                "none",
                "--bootstrap-iters",
                "0",
                "--out",
                str(tmp_path / "ours"),
            ]
        )
        == 0
    )
    ours = json.loads((tmp_path / "ours" / "eval.json").read_text())["tasks"]
    stock_ppl = stock["ppl_local"]["word_perplexity,none"]
    assert ours["ppl_local"]["metrics"]["word_perplexity"] == pytest.approx(stock_ppl, rel=1e-5)
    assert ours["arc_easy_local"]["metrics"]["acc"] == stock["arc_easy_local"]["acc,none"]


def test_quantized_dir_is_self_contained_and_not_exported_again(exported: Path, tmp_path: Path, capsys) -> None:
    """A GPTQ directory carries what an export does; exporting it again (without --onnx) is
    refused: re-saving a GPTQ model as a float export would write packed tensors no reader expects."""
    assert cli(quantize_argv(exported, tmp_path / "int8", method="rtn", bits=8, nsamples=2, seq_len=32, holdout=2)) == 0
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["eos_token_id"] == 0
    assert config["quantization_config"]["block_name_to_quantize"] == "model.blocks"
    assert json.loads((tmp_path / "int8" / "tokenizer_config.json").read_text())["model_max_length"] == 128
    assert {f: (tmp_path / "int8" / f).read_text() for f in (CONFIG_FILE, MODELING_FILE)} == sources()
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "int8"), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "a GPTQ directory is already an export" in err and err.count("\n") == 1 and not (tmp_path / "again").exists()


@pytest.fixture(scope="module")
def gptq_python() -> Path:
    """The consumer environment with optimum + GPTQModel (``make test`` builds it)."""
    check = [str(GPTQ_PYTHON), "-c", "import optimum.gptq, gptqmodel, transformers"] if GPTQ_PYTHON.exists() else None
    if check and subprocess.run(check, capture_output=True).returncode == 0:
        return GPTQ_PYTHON
    reason = f"{GPTQ_PYTHON}: no environment with optimum + GPTQModel (make gptq-env builds it)"
    if REQUIRE_GPTQ:
        pytest.fail(reason + "; MERINO_REQUIRE_GPTQ=1 requires it")
    pytest.skip(reason)


@pytest.mark.slow
@pytest.mark.parametrize("group", [32, 128])
def test_int4_dir_loads_through_transformers_gptq_integration(tmp_path_factory, gptq_python: Path, group: int) -> None:
    """Group 32 divides every width: GPTQModel picks its int4 CPU kernel. Group 128 is wider than
    the 64-wide block, which that kernel refuses: the directory names the generic torch kernel."""
    d = tmp_path_factory.mktemp("gptq")
    # two blocks (64 wide, applied twice; 128 wide), over the real vocabulary
    arch = MerinoConfig(
        blocks=(
            BlockConfig(embed_dim=64, ffn_dim=128, num_layers=2),
            BlockConfig(embed_dim=128, ffn_dim=256, num_layers=1),
        ),
        vocab_size=50304,
        d_model=64,
        max_position_embeddings=128,
    )
    recipe = Recipe("tiny-gptq", arch).save(d / "tiny.yaml")
    assert cli(["export", str(recipe), "--out", str(d / "float")]) == 0
    assert cli(quantize_argv(d / "float", d / "int4", bits=4, group_size=group, nsamples=4, seq_len=32, holdout=2)) == 0
    qconfig = json.loads((d / "int4" / "config.json").read_text())["quantization_config"]
    assert qconfig["block_name_to_quantize"] == "model.blocks" and qconfig["bits"] == 4
    assert qconfig.get("backend") == (None if group == 32 else "torch")

    proc = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(d / "int4")!r}, trust_remote_code=True, device_map="cpu",
                                                     dtype=torch.float32).eval()
        q_proj = model.model.blocks[0].layer.attn.q_proj
        weights = {{n: m.dequantize_weight(num_itr=1).t().float()
                   for n, m in model.named_modules() if type(m) is type(q_proj)}}
        ids = torch.tensor({IDS})
        with torch.no_grad():
            logits = model(ids).logits  # through the kernel GPTQModel picked
            gen = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
        torch.save(dict(logits=logits, weights=weights), "out.pt")
        print(json.dumps(dict(cls=type(q_proj).__module__, model=type(model).__module__, gen=gen.shape[1])))
    """,
        d,
        python=gptq_python,
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"].startswith("gptqmodel.") and got["model"].startswith("transformers_modules.") and got["gen"] == 8
    assert got["cls"].endswith(".torch_aten_kernel" if group == 32 else ".torch")

    ours = load_model(d / "int4")
    assert ours.kind == "gptq"
    with torch.no_grad():
        ref = ours.model(torch.tensor(IDS)).logits
    theirs = torch.load(d / "out.pt")
    # the same int4 weights, decoded by GPTQModel (which rounds them to fp16) and by merino-pl
    assert sorted(theirs["weights"]) == sorted(n for n, m in ours.model.named_modules() if isinstance(m, QuantLinear))
    for name, w in theirs["weights"].items():
        mine = ours.model.get_submodule(name).weight_float(torch.float32)
        assert (w - mine).abs().max() <= 1e-3 * mine.abs().max(), name

    # logits: their kernel (at group 32 an int4 matmul in bfloat16) vs merino-pl's float32 dequantization
    logits = theirs["logits"].float()
    assert (logits - ref).norm() / ref.norm() < 2e-2 and (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_kill_9_during_the_onnx_step_leaves_the_old_complete_export(tmp_path: Path, capsys) -> None:
    """`export --onnx --out D --overwrite` builds weights, tokenizer, remote code and model.onnx
    aside and swaps them in as one unit: killed while the ONNX file is being written, D is the old
    export byte for byte with no temp file in it, and the re-run replaces it (and clears the leftover)."""
    import signal
    import time

    old = Recipe("old", tiny_arch(), {"source": "test"}).save(tmp_path / "old.yaml")
    new = Recipe("new", tiny_arch(vocab_size=640), {"source": "test"}).save(tmp_path / "new.yaml")
    out = tmp_path / "exported"
    assert cli(["export", str(old), "--out", str(out), "--onnx"]) == 0
    before = _hashes(out)
    argv = [sys.executable, "-m", "merino_pl.cli", "export", str(new), "--out", str(out), "--overwrite", "--onnx"]
    proc = subprocess.Popen(argv, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("**/.model.onnx.*.tmp")):  # the ONNX step has begun
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended before its ONNX step was seen"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _hashes(out) == before and not [f for f in out.iterdir() if f.name.startswith(".")]
    assert list(tmp_path.glob(".exported.*.tmp/model.safetensors"))  # the new weights were built aside
    assert cli(["export", str(new), "--out", str(out), "--overwrite", "--onnx"]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 640 and (out / "model.onnx").is_file()
    assert not list(tmp_path.glob(".exported.*")), "the killed run's temp directory is left beside the export"


def _bpe(path: Path, text: str, vocab: int = 300) -> Path:
    """A small byte-level BPE with GPT-NeoX's end-of-text token (a tokenizer that is not the default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    tok.save(str(path))
    return path


@pytest.mark.slow
def test_export_ships_the_tokenizer_the_checkpoint_was_trained_with(tmp_path: Path, capsys) -> None:
    """fit --data.tokenizer my.json records it; export ships that very file (never the shipped NeoX);
    a recorded tokenizer that has gone missing is one line, exit 2, nothing written."""
    import yaml

    from merino_pl.core.tokenizer import default_corpus_file

    custom = _bpe(tmp_path / "my tokenizer.json", default_corpus_file().read_text()[:60_000])
    arch = tiny_arch(vocab_size=320)
    recipe = Recipe("custom-tok", arch, {"source": "test"}).save(tmp_path / "r.yaml")
    data = {"source": "embedded", "tokenizer": str(custom), "seq_len": 32, "batch_size": 2, "num_workers": 0}
    config = {
        "seed_everything": 1,
        "model": {"recipe": str(recipe), "lr": 1e-3, "warmup_steps": 1},
        "data": {**data, "val_sequences": 0, "shuffle_windows": 16},
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "default_root_dir": str(tmp_path / "run"),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        },
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    assert cli(["fit", "--config", str(tmp_path / "fit.yaml")]) == 0
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    assert cli(["export", str(ckpt), "--out", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == custom.read_bytes()
    assert cli(["export", str(tmp_path / "model"), "--out", str(tmp_path / "again")]) == 0  # a directory: its own
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == custom.read_bytes()
    from merino_pl.core.checkpoint import load_model
    from merino_pl.core.tokenizer import load_tokenizer
    from merino_pl.eval.harness import tokenizer_source
    from merino_pl.generate.api import _tokenizer

    for source in (ckpt, tmp_path / "model"):  # eval and generate read the text with that tokenizer too
        loaded = load_model(source)
        assert Path(tokenizer_source(loaded)).read_bytes() == custom.read_bytes()
        vocab = loaded.recipe.architecture.vocab_size
        assert _tokenizer(source, vocab)[0].to_str() == load_tokenizer(str(custom)).to_str()

    custom.rename(tmp_path / "moved.json")
    capsys.readouterr()
    assert cli(["export", str(ckpt), "--out", str(tmp_path / "lost")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(custom) in err and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "lost").exists()
