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
def tiny_fs(tmp_path: Path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


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
