"""A full disk is one line naming the file system and the file, the partial file removed, the older
complete file intact: on a real, tiny tmpfs (root can mount one; elsewhere these skip)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_path, atomic_write_text


@pytest.fixture
def tiny_fs(mount_tmpfs):
    return mount_tmpfs("512k", "full")


def test_full_disk_is_one_line_and_keeps_the_older_file(tiny_fs: Path):
    target = tiny_fs / "report.json"
    atomic_write_text(target, "old, complete\n")
    with pytest.raises(MerinoError) as e:
        atomic_write_text(target, "x" * (1 << 20))  # 1 MiB into 512 KiB
    assert str(e.value) == f"no space left on {tiny_fs} writing {target}"
    assert target.read_text() == "old, complete\n"
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["report.json"]  # no partial temp file


def test_a_library_writer_on_a_full_disk_is_the_same_one_line(tiny_fs: Path):
    target = tiny_fs / "weights.pt"
    with pytest.raises(MerinoError, match="no space left on .* writing .*weights.pt"):
        with atomic_path(target) as tmp:
            torch.save({"w": torch.zeros(1 << 18)}, tmp)  # torch's zip writer: "file write failed" / "unexpected pos"
    assert list(tiny_fs.iterdir()) == []


def test_a_library_write_failure_names_the_full_folder_it_went_to(tiny_fs: Path, tmp_path: Path, monkeypatch):
    """torch's "file write failed" names no file: the full one of the folders a stage names is
    reported, wherever the working directory is; on a disk with room it is no full disk."""
    from merino_pl.core.errors import disk_full

    monkeypatch.chdir(tmp_path)  # a roomy working directory
    with pytest.raises(OSError):
        (tiny_fs / "filler").write_bytes(b"x" * (1 << 20))  # fills it
    error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    full = disk_full(error, near=[tiny_fs / "run" / "checkpoints", tiny_fs])
    assert full is not None and str(full) == f"no space left on {tiny_fs} writing in {tiny_fs}"
    assert disk_full(error) is None  # not on a full disk: a real error, shown as such
    assert disk_full(error, near=[tmp_path]) is None


def test_fit_checkpoints_on_a_full_disk_elsewhere_than_the_working_directory(mount_tmpfs, tmp_path: Path):
    """The run's folder on a 45 MiB tmpfs, the working directory on a roomy disk: the third
    checkpoint file (~20 MB each) does not fit. One line naming the file system and the file,
    exit 2, no temp file left, the step-4 checkpoints intact and loadable."""
    import sys

    import yaml

    from merino_pl.core.checkpoint import load_model

    sys.path.insert(0, str(Path(__file__).parent))
    from test_fit import REPO, micro_fit_config

    mnt = mount_tmpfs("45m")
    run = mnt / "run"
    cfg = micro_fit_config(tmp_path, run)
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "merino_pl.cli", "fit", "--config", "fit.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"merino-pl fit: error: no space left on {mnt} writing {run / 'checkpoints' / 'step-00000008.ckpt'}"
    assert "Traceback" not in proc.stderr
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000004.ckpt"]  # no partial temp file
    for name in ("last.ckpt", "step-00000004.ckpt"):
        assert torch.load(ckpts / name, weights_only=True, mmap=True)["global_step"] == 4
        load_model(ckpts / name)


@pytest.mark.parametrize("existed", [False, True])
def test_eval_on_a_full_disk_leaves_nothing_it_created(mount_tmpfs, tmp_path: Path, capsys, existed):
    """One 4 KiB page left on a 64 KiB tmpfs: the lock's record fits, eval.json does not. The
    error names the file system and the file; a --out eval created is gone (and the folders it
    made above it), one that existed keeps exactly the user's files."""
    from conftest import tiny_arch
    from merino_pl.cli import main as cli
    from merino_pl.core.checkpoint import export_pretrained
    from merino_pl.core.hf import MerinoForCausalLM

    torch.manual_seed(0)
    model = export_pretrained(MerinoForCausalLM.from_arch(tiny_arch(vocab_size=50304)), tmp_path / "model")
    mnt = mount_tmpfs("64k")
    if existed:
        out = mnt / "my results"
        out.mkdir()
        (out / "notes.txt").write_text("")  # no page: an empty file
    else:
        out = mnt / "new folder" / "eval out"
    (mnt / "filler").write_bytes(b"x" * (60 << 10))
    argv = ["eval", str(model), "--out", str(out), "--tasks", "none", "--ppl", "wikitext2"]
    assert cli([*argv, "--data-files", "wikitext2=embedded", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"merino-pl eval: error: no space left on {mnt} writing {out / 'eval.json'}"
    want = ["filler", "my results", "my results/notes.txt"] if existed else ["filler"]
    assert sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*")) == want
