"""Bad input a new user gives, each answered by one line naming the bad value, exit code 2,
before any heavy work, and nothing the user did not name deleted (issue 18's findings).

Tiny models on CPU: a hand-made Lightning-style checkpoint (what ``fit`` writes, minus the
trainer state no reader needs) and its export.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import quantize_argv, tiny_arch
from merino_pl.cli import main as cli
from merino_pl.core.checkpoint import export_pretrained
from merino_pl.core.config import Recipe
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.io import atomic_dir, atomic_path, atomic_write_text, sha256_file


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """``RUN/checkpoints/last.ckpt`` with the keys ``load_model`` reads from a fit checkpoint."""
    run = tmp_path_factory.mktemp("run")
    recipe = Recipe("tiny", tiny_arch(vocab_size=50304), {"source": "test"})
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_recipe(recipe)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = run / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"merino": {"recipe": recipe.to_dict()}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def model_dir(ckpt, tmp_path_factory) -> Path:
    from merino_pl.core.checkpoint import load_model

    return export_pretrained(load_model(ckpt).model, tmp_path_factory.mktemp("exported") / "model")


def one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@contextlib.contextmanager
def immutable(folder: Path):
    """A folder nobody can create files in, root included (``chmod`` does not stop root)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr not available")
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not permitted here (not root, or the file system has no attributes)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# ---- export ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_onto_its_own_run_dir_is_refused_and_keeps_the_checkpoint(ckpt, capsys, overwrite):
    run = ckpt.parent.parent
    (run / "notes.txt").write_text("mine")
    before = sha256_file(ckpt)
    argv = ["export", str(ckpt), "--out", str(run)] + (["--overwrite"] if overwrite else [])
    assert cli(argv) == 2
    one_line_error(capsys, f"--out {run}", "checkpoint")
    assert sha256_file(ckpt) == before and (run / "notes.txt").read_text() == "mine"


def test_export_into_a_non_empty_dir_needs_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli(["export", str(ckpt), "--out", str(out)]) == 2
    one_line_error(capsys, f"--out {out}", "--overwrite")
    assert (out / "keep.txt").exists()
    assert cli(["export", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert not list(tmp_path.glob(".out.*")), "temp directories left behind"


def test_export_to_an_unwritable_folder_fails_before_loading(ckpt, tmp_path, capsys):
    with immutable(tmp_path):
        assert cli(["export", str(ckpt), "--out", str(tmp_path / "sub" / "model")]) == 2
    one_line_error(capsys, "cannot write in", str(tmp_path))


# ---- files written through io ----------------------------------------------------------------
def test_atomic_files_follow_the_umask_and_temp_names_are_unique_and_cleaned(tmp_path):
    target = tmp_path / "a.txt"
    old = os.umask(0o022)
    try:
        atomic_write_text(target, "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o644
    with atomic_path(target) as t1, atomic_path(target) as t2:  # two writers never share a temp file
        assert t1 != t2
        t1.write_text("1")
        t2.write_text("2")
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    stale = tmp_path / f".a.txt.{host}-{gone.pid}-abc123.tmp"
    live = tmp_path / f".a.txt.{host}-{os.getpid()}-abc123.tmp"
    stale_dir = tmp_path / f".d.{host}-{gone.pid}-abc123.tmp"
    for p in (stale, live):
        p.write_text("")
    stale_dir.mkdir()
    atomic_write_text(target, "y")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert not stale.exists() and not stale_dir.exists(), "a dead process's temp files are removed on the next write"
    assert live.exists(), "a live process's temp file is left alone"


# ---- corrupt inputs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_dir(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "q"
    assert cli(quantize_argv(model_dir, out, method="rtn", bits=4, group_size=32, holdout=0, seq_len=32)) == 0
    return out


def _damaged_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # the JSON header after its 8-byte length
        data[8:24] = b"#" * 16
    weights.write_bytes(bytes(data))
    return dst


COMMANDS = {
    "export": ["export", "MODEL", "--out", "OUT"],
    "quantize": ["quantize", "MODEL", "--nsamples", "2", "--seq-len", "32", "--holdout", "0", "--out", "OUT"],
    "eval": [
        "eval",
        "MODEL",
        "--tasks",
        "none",
        "--ppl",
        "wikitext2",
        "--data-files",
        "wikitext2=embedded",
        "--out",
        "OUT",
    ],
}


@pytest.mark.parametrize("how", ["truncated", "header"])
@pytest.mark.parametrize("command", COMMANDS)
def test_damaged_safetensors_is_one_line(model_dir, tmp_path, capsys, command, how):
    bad = _damaged_copy(model_dir, tmp_path / "bad", how)
    argv = [a.replace("MODEL", str(bad)).replace("OUT", str(tmp_path / "out")) for a in COMMANDS[command]]
    assert cli(argv) == 2
    one_line_error(capsys, f"{bad / 'model.safetensors'}: truncated or corrupt safetensors file")
    assert not (tmp_path / "out").exists()


def test_truncated_int4_dir_in_latency(int4_dir, tmp_path, capsys):
    bad = _damaged_copy(int4_dir, tmp_path / "bad", "truncated")
    assert (
        cli(["latency", str(bad), "--precision", "int4", "--seq", "16", "--runs", "1", "--out", str(tmp_path / "lat")])
        == 2
    )
    one_line_error(capsys, "truncated or corrupt safetensors file")


def test_quantize_of_a_gptq_dir_is_refused(int4_dir, tmp_path, capsys):
    assert cli(["quantize", str(int4_dir), "--nsamples", "2", "--seq-len", "32", "--out", str(tmp_path / "q")]) == 2
    one_line_error(capsys, f"{int4_dir} is already a GPTQ int4 directory")


def test_latency_of_a_gptq_dir_at_another_precision_is_refused(int4_dir, tmp_path, capsys):
    assert (
        cli(
            [
                "latency",
                str(int4_dir),
                "--precision",
                "int8",
                "--seq",
                "16",
                "--runs",
                "1",
                "--out",
                str(tmp_path / "lat"),
            ]
        )
        == 2
    )
    one_line_error(capsys, "--precision int8", "GPTQ int4", "--precision int4")
    assert not (tmp_path / "lat" / "latency.json").exists()


# ---- devices -----------------------------------------------------------------------------------
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@no_cuda
def test_eval_on_cuda_without_cuda(model_dir, tmp_path, capsys):
    assert (
        cli(
            [
                "eval",
                str(model_dir),
                "--tasks",
                "none",
                "--ppl",
                "wikitext2",
                "--device",
                "cuda",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    one_line_error(capsys, "--device cuda: no CUDA device")


# ---- eval that would measure nothing -----------------------------------------------------------
def test_eval_ppl_without_data_offline_is_an_error(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))  # nothing cached
    assert cli(["eval", str(model_dir), "--tasks", "none", "--ppl", "ptb", "--out", str(tmp_path / "e")]) == 2
    one_line_error(capsys, "--ppl ptb", "--data-files ptb=PATH")
    assert not (tmp_path / "e").exists()


# ---- outputs that cannot be written ------------------------------------------------------------
OUT_COMMANDS = {
    "quantize": ["quantize", "MODEL", "--nsamples", "2", "--seq-len", "32", "--holdout", "0", "--out", "OUT"],
    "eval": [
        "eval",
        "MODEL",
        "--tasks",
        "none",
        "--ppl",
        "wikitext2",
        "--data-files",
        "wikitext2=embedded",
        "--out",
        "OUT",
    ],
    "latency": ["latency", "MODEL", "--seq", "16", "--runs", "1", "--out", "OUT"],
}


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_unwritable_out_is_found_before_the_work(model_dir, tmp_path, capsys, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    argv = [
        a.replace("MODEL", str(model_dir)).replace("OUT", str(locked / "sub" / "out")) for a in OUT_COMMANDS[command]
    ]
    with immutable(locked):
        assert cli(argv) == 2
    err = one_line_error(capsys, f"--out {locked / 'sub' / 'out'}: cannot write in {locked}")
    assert "Operation not permitted" in err or "Permission denied" in err or "Read-only" in err


# ---- data sources ------------------------------------------------------------------------------
def test_prepare_reads_any_text_file_name_as_text(tmp_path, capsys):
    src = tmp_path / "wiki.valid.tokens"  # WikiText's own file name
    src.write_text(
        "".join(f" = Article {i} = \n\n the <unk> company said N shares rose {i} points . \n\n" for i in range(50))
    )
    assert cli(["prepare", str(src), "--out", str(tmp_path / "shards"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert sum(s["tokens"] for s in manifest["splits"]["train"]) > 0
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    capsys.readouterr()
    assert cli(["prepare", str(binary), "--out", str(tmp_path / "s2"), "--workers", "1"]) == 2
    one_line_error(capsys, f"{binary}: not UTF-8 text")


def test_hints_name_the_flags_of_the_command_at_hand(model_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(5)))
    assert cli(["prepare", str(rows), "--out", str(tmp_path / "shards"), "--workers", "1"]) == 2
    err = one_line_error(capsys, "no text field 'text'", "body", "set --text-field")
    assert "--data." not in err
    assert cli(quantize_argv(model_dir, tmp_path / "q", calib=rows, nsamples=2, seq_len=32)) == 2
    err = one_line_error(capsys, "no text field 'text'", "set --calib-text-field")
    assert "--data." not in err


def test_search_to_an_unwritable_folder_fails_before_searching(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    with immutable(locked):
        assert cli(["search", "--budget", "params=1M", "--out", str(locked / "r.yaml")]) == 2
    one_line_error(capsys, f"--out {locked / 'r.yaml'}: cannot write in {locked}")


@pytest.mark.parametrize("command", ["export", "eval"])
def test_weights_of_another_architecture_are_one_line_without_a_load_report(model_dir, tmp_path, capsys, command):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    for block in config["architecture"]["blocks"]:
        block["embed_dim"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    args = (
        ["export", str(other), "--out", str(tmp_path / "x")]
        if command == "export"
        else [
            "eval",
            str(other),
            "--out",
            str(tmp_path / "x"),
            "--ppl",
            "wikitext2",
            "--data-files",
            "wikitext2=embedded",
        ]
    )
    assert cli(args) == 2
    one_line_error(capsys, "weights do not match the architecture in config.json", "by config.json")
