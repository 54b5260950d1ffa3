"""Bad input a new user gives, each answered by one line naming the bad value, exit code 2,
before any heavy work, and nothing the user did not name deleted (issue 18's findings).

Tiny models on CPU: a hand-made Lightning-style checkpoint (what ``fit`` writes, minus the
trainer state no reader needs) and its export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_arch
from merino_pl.checkpoint import export_pretrained
from merino_pl.cli import main as cli
from merino_pl.config import Recipe
from merino_pl.io import atomic_dir, atomic_path, atomic_write_text, sha256_file
from merino_pl.model import MerinoForCausalLM


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
    from merino_pl.checkpoint import load_model

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
