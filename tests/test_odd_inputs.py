"""Inputs the earlier bad-input hunts did not try (issue 28's gaps): a tokenizer larger than the
model's vocabulary, a study budget that admits too few designs, outputs that are files, symlinks
or read-only folders, checkpoints that are folders, empty or mistyped model files, Ctrl-C mid-run.
Each is one line naming the value, exit code 2 (130 for Ctrl-C), and nothing left behind that the
run created. Tiny models on CPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, tiny_arch
from merino_pl.cli import main as cli
from merino_pl.core.checkpoint import export_pretrained
from merino_pl.core.config import Recipe
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.tokenizer import default_tokenizer_file, load_tokenizer

NEOX_IDS = load_tokenizer(None).get_vocab_size(with_added_tokens=True)


def one_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert captured.out == "", captured.out
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory) -> Path:
    """An exported 512-row model that ships the GPT-NeoX tokenizer (50 k ids): not its tokenizer."""
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=512))
    return export_pretrained(model, tmp_path_factory.mktemp("vocab ü") / "small vocab", str(default_tokenizer_file()))


# ---- a tokenizer past the model's vocabulary ----------------------------------------------------
def test_generate_with_a_tokenizer_past_the_vocabulary_is_one_line(small_vocab_dir, capsys):
    assert cli(["generate", str(small_vocab_dir), "--prompt", "Hello there", "--max-new-tokens", "2"]) == 2
    one_line(capsys, str(small_vocab_dir), "vocab_size is 512", f"has {NEOX_IDS} ids")


def test_eval_with_a_tokenizer_past_the_vocabulary_is_one_line(small_vocab_dir, tmp_path, capsys):
    out = tmp_path / "eval out"
    argv = ["eval", str(small_vocab_dir), "--out", str(out), "--tasks", "none"]
    assert cli([*argv, "--ppl", "wikitext2", "--data-files", "wikitext2=embedded", "--limit", "1"]) == 2
    one_line(capsys, "vocab_size is 512", f"has {NEOX_IDS} ids")
    assert listing(tmp_path) == []


def test_eval_of_a_small_vocab_recipe_names_the_default_tokenizer(tmp_path, capsys):
    recipe = Recipe("small", tiny_arch(vocab_size=512), {"source": "test"}).save(tmp_path / "small.yaml")
    argv = ["eval", str(recipe), "--out", str(tmp_path / "out"), "--tasks", "none", "--ppl", "wikitext2"]
    assert cli([*argv, "--data-files", "wikitext2=embedded", "--limit", "1"]) == 2
    one_line(capsys, "vocab_size is 512", "EleutherAI/gpt-neox-20b")
    assert not (tmp_path / "out").exists()


def test_quantize_calibrating_with_a_tokenizer_past_the_vocabulary_is_one_line(small_vocab_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli(["quantize", str(small_vocab_dir), "--method", "rtn", "--bits", "8", "--out", str(out)]) == 2
    one_line(capsys, "vocab_size is 512", f"has {NEOX_IDS} ids")
    assert listing(tmp_path) == []


# ---- a study budget that admits too few designs ---------------------------------------------------
def _study_config(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((REPO / "search" / "study-cpu.yaml").read_text())
    fit = tmp_path / "fit.yaml"
    fit.write_text("trainer: {max_steps: 10}\n")
    data.update(space=str(REPO / "search" / "space-study.yaml"), fit={"config": str(fit), "args": []})
    for key in ("head_to_head", "lengths", "lr_grid"):
        data.pop(key, None)
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"budgets": ["flops=1M"]}, "budget flops=1M cannot be met"),
        (
            {"budgets": ["params=413K"], "architectures": 300},
            "architectures: 300: the budget params=413K admits only 256",
        ),
    ],
)
def test_a_study_budget_with_too_few_designs_is_refused_at_once(tmp_path, capsys, changes, named):
    config = _study_config(tmp_path, **changes)
    assert cli(["study", "run", "--config", str(config), "--out", str(tmp_path / "study")]) == 2
    one_line(capsys, named)  # counted up front, not "only N found in 50,000,000 draws" after sampling
    assert not (tmp_path / "study").exists()


def test_a_sample_rejection_sampling_would_not_finish_is_refused_naming_the_draws():
    from merino_pl.core.errors import MerinoError
    from merino_pl.core.space import load_space
    from merino_pl.search.api import parse_budget
    from merino_pl.study.sample import check_sample, sample_codes

    space, budgets = load_space(REPO / "search" / "space-study.yaml"), [parse_budget("params=413K")]
    with pytest.raises(
        MerinoError, match=r"admits 256 of the 2,293,760 architectures .* ~[0-9,]+ draws \(limit 1,000\)"
    ):
        check_sample(space, budgets, 24, max_draws=1000)
    assert len(sample_codes(space, budgets, 24, seed=0)) == 24  # within the real limit: sampled as before


# ---- outputs that are read-only folders, symlinks --------------------------------------------------
@pytest.fixture
def locked(tmp_path: Path):
    """A folder nobody can create files in, root included (``chattr +i``; ``chmod`` does not stop root)."""
    folder = tmp_path / "locked ü"
    folder.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i not available here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_generate_onnx_out_in_a_read_only_folder_is_one_line_before_the_export(small_vocab_dir, locked, capsys):
    graph = locked / "model.onnx"
    argv = ["generate", str(small_vocab_dir), "--runtime", "onnxruntime", "--onnx-out", str(graph)]
    assert cli(argv) == 2
    one_line(capsys, f"--onnx-out {graph}: cannot write in {locked}")


def test_study_calibrate_into_a_read_only_folder_is_one_line(locked, capsys):
    out = locked / "calibrated.yaml"
    assert cli(["study", "calibrate", str(REPO / "docs" / "study" / "cpu" / "report.json"), "--out", str(out)]) == 2
    one_line(capsys, f"--out {out}: cannot write in {locked}")


def test_a_library_refused_a_write_is_one_line_naming_the_folder():
    from merino_pl.core.errors import not_permitted

    inner = PermissionError(1, "Operation not permitted", "/data/runs ü/.model.onnx.host-1-abc.tmp")
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = inner
    assert str(not_permitted(wrapped)) == "no permission for /data/runs ü (Operation not permitted)"
    assert not_permitted(RuntimeError("something else")) is None


def test_export_overwrite_onto_a_symlink_replaces_the_link_and_keeps_the_folder_it_points_to(tmp_path, capsys):
    recipe = Recipe("tiny", tiny_arch(vocab_size=50304), {"source": "test"}).save(tmp_path / "tiny.yaml")
    user = tmp_path / "my folder"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(user)
    assert cli(["export", str(recipe), "--out", str(link)]) == 2  # not empty: needs --overwrite
    one_line(capsys, f"--out {link} exists and is not empty")
    assert cli(["export", str(recipe), "--out", str(link), "--overwrite"]) == 0
    assert (user / "notes.txt").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert link.is_dir() and not link.is_symlink() and (link / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "my folder", "tiny.yaml"]  # no .link.*.old left


# ---- model inputs that are not what they claim ---------------------------------------------------------
@pytest.mark.parametrize("name", ["model.ckpt", "an empty folder"])
@pytest.mark.parametrize("command", ["export", "eval", "quantize"])
def test_a_folder_given_as_the_model_is_one_line(tmp_path, capsys, name, command):
    folder = tmp_path / name
    folder.mkdir()
    extra = ["--tasks", "none", "--ppl", "wikitext2", "--data-files", "wikitext2=embedded"] if command == "eval" else []
    assert cli([command, str(folder), "--out", str(tmp_path / "out"), *extra]) == 2
    one_line(capsys, f"{folder}: not a model directory (no config.json)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        ('{"architecture": 5}', "config.json: not a MeRino config ('architecture' is 5;"),
        ('{"vocab_size": 50304}', "config.json: not a MeRino config (no 'architecture';"),
    ],
)
def test_a_config_json_of_the_wrong_shape_is_one_line_naming_it(small_vocab_dir, tmp_path, capsys, config, named):
    model = tmp_path / "model"
    shutil.copytree(small_vocab_dir, model)
    (model / "config.json").write_text(config)
    for command in ("export", "quantize"):
        assert cli([command, str(model), "--out", str(tmp_path / "out")]) == 2
        one_line(capsys, f"{model}/{named}")
    assert not (tmp_path / "out").exists()


def test_validate_names_a_wrong_checkpoint_with_the_configs_problems(tmp_path, capsys):
    """Both at once: the defaults' context problem and the checkpoint of another architecture."""
    import dataclasses

    other = Recipe("other", dataclasses.replace(tiny_arch(vocab_size=50304), d_model=64), {"source": "test"})
    model = MerinoForCausalLM.from_recipe(other)
    ckpt = tmp_path / "other run.ckpt"
    torch.save(
        {"merino": {"recipe": other.to_dict()}, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        ckpt,
    )
    argv = ["validate", "--model.recipe", "merino-tiny", "--data.seq_len", "1024", "--ckpt_path", str(ckpt)]
    assert cli([*argv, "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    one_line(capsys, "data.seq_len 1024 exceeds", f"ckpt_path {ckpt}: a checkpoint of recipe 'other'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other run.ckpt"]


# ---- a failed run leaves nothing it created ---------------------------------------------------------------
def test_locked_output_removes_what_a_failed_run_created_and_nothing_else(tmp_path):
    from merino_pl.core.lock import locked_output

    out = tmp_path / "new parent" / "out ü"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-run
        with locked_output(out, "test"):
            out.mkdir(parents=True)
            (out / "eval.json").write_text("{}")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []  # the folder, the parent it made, the lock file: all gone

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "eval.md").write_text("the user's")
    with pytest.raises(OSError):
        with locked_output(mine, "test", names=("eval.json", "eval.md", "accuracy.png")):
            (mine / "eval.json").write_text("{}")  # new: removed
            (mine / "other.txt").write_text("not the stage's name: kept")
            raise OSError("disk on fire")
    assert listing(tmp_path) == ["mine", "mine/eval.md", "mine/other.txt"]
    assert (mine / "eval.md").read_text() == "the user's"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[1, 2]\n", "not a fit config (mappings model: and trainer: expected)"),
        ("model: 5\ntrainer: {}\n", "not a fit config (mappings model: and trainer: expected)"),
        ("model: {recipe: merino-tiny}\ntrainer: {max_steps: lots}\n", "lots"),
    ],
)
def test_demo_with_a_config_of_the_wrong_types_is_one_line_before_its_table(tmp_path, capsys, text, named):
    config = tmp_path / "my config.yaml"
    config.write_text(text)
    assert cli(["demo", "--config", str(config), "--out", str(tmp_path / "runs")]) == 2
    one_line(capsys, named)  # and nothing on stdout: the recipe's table waits for a valid config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my config.yaml"]


@pytest.mark.parametrize(
    ("given", "named"), [("a folder", "a folder without a tokenizer.json"), ("gone/tok.json", "no such file")]
)
def test_a_tokenizer_path_naming_no_file_is_one_line_never_a_hub_lookup(tmp_path, monkeypatch, capsys, given, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a folder").mkdir()
    recipe = Recipe("tiny", tiny_arch(vocab_size=50304), {"source": "test"}).save(tmp_path / "tiny.yaml")
    assert cli(["export", str(recipe), "--tokenizer", given, "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, f"tokenizer {given}: {named}")


def test_the_float_dtype_names_quantize_checks_without_torch_are_the_formats():
    from merino_pl.core.quant.format import FLOAT_DTYPES, dtype_name
    from merino_pl.core.quant.spec import FLOAT_DTYPE_NAMES

    assert FLOAT_DTYPE_NAMES == tuple(dtype_name(d) for d in FLOAT_DTYPES.values())


def test_pipeline_out_dir_that_is_a_file_is_named_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the shipped config's paths are relative to the repository
    mine = tmp_path / "notes ü.txt"
    mine.write_text("mine")
    assert cli(["pipeline", "--config", "recipes/pipeline/cpu-demo.yaml", "--out-dir", str(mine)]) == 2
    err = one_line(capsys, f"out_dir {mine} exists and is not a directory")
    assert err.count(str(mine)) == 1 and mine.read_text() == "mine"
