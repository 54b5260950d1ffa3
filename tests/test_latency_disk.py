"""A `merino-pl latency` that fails on a full disk is one line, exit 2, and leaves no folder it
created behind (an empty --out would look like a report that is missing its files); a folder
that existed before is kept. On a real, tiny tmpfs (root can mount one; elsewhere these skip)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_arch
from merino_pl.cli import main as cli
from merino_pl.core.config import Recipe

FLAGS = ["--seq", "8", "--runs", "1", "--warmup", "0", "--decode-tokens", "1", "--generate-tokens", "0", "--no-fast"]


@pytest.fixture
def tiny_fs(mount_tmpfs, request: pytest.FixtureRequest):
    """A tmpfs of one page (or ``size`` of the test's parameter): the lock file fits, the report does not."""
    return mount_tmpfs(getattr(request, "param", "4k"), "full")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Recipe("tiny", tiny_arch()).save(tmp_path_factory.mktemp("recipe") / "tiny.yaml")


def _fails_with_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("merino-pl latency: error: no space"), err


def test_a_full_disk_leaves_no_out_it_created(tiny_fs: Path, recipe: Path, capsys: pytest.CaptureFixture) -> None:
    _fails_with_one_line(["latency", str(recipe), *FLAGS, "--out", str(tiny_fs / "new" / "report")], capsys)
    assert list(tiny_fs.iterdir()) == []  # neither --out nor the parent it made, nor the lock file


def test_a_full_disk_keeps_an_out_that_existed(tiny_fs: Path, recipe: Path, capsys: pytest.CaptureFixture) -> None:
    out = tiny_fs / "mine"
    out.mkdir()
    _fails_with_one_line(["latency", str(recipe), *FLAGS, "--out", str(out)], capsys)
    assert out.is_dir() and list(tiny_fs.iterdir()) == [out]


def test_a_full_disk_leaves_no_folder_of_a_profile_table(
    tiny_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_blocks: 1\nembed_dims: [64]\nffn_dims: [128]\nnum_layers: [1]\n"
        "architecture: {vocab_size: 512, d_model: 64, max_position_embeddings: 128}\n"
    )
    (tiny_fs / "filler").write_bytes(b"x" * 4096)  # no lock here: the disk is full before the table
    argv = ["latency", "profile", "--space", str(space), "--seq", "8", "--runs", "1", "--warmup", "0"]
    _fails_with_one_line([*argv, "--out", str(tiny_fs / "new" / "table.json")], capsys)
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]


@pytest.mark.parametrize("tiny_fs", ["64k"], indirect=True)
def test_a_full_disk_removes_only_the_new_files_of_an_out_that_existed(
    tiny_fs: Path, recipe: Path, capsys: pytest.CaptureFixture
) -> None:
    """In an --out that existed, the run's own new files go (here the ONNX graph, 200 KB, that
    did not fit), the user's stay."""
    out = tiny_fs / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails_with_one_line(["latency", str(recipe), *FLAGS, "--onnx", "--out", str(out)], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
