"""``pipeline`` owns only what its state file says it wrote: files it did not write stop a run
(unless ``--keep-unknown``, and then only outside the stage folders), an unreadable state stops
it without deleting anything, cleaning a stage's folder removes only the pipeline's own files,
and one run at a time holds an output folder (``core.lock``). Every refusal: exit code 2, one
line, no traceback, the user's files byte-identical. No stage runs here (seconds each)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from merino_pl.cli import main as cli_main
from merino_pl.core.errors import MerinoError
from merino_pl.core.lock import folder_lock, lock_path
from merino_pl.pipeline.state import RunState

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path: Path) -> Path:
    """recipe -> fit -> export into tmp_path/out (the refusals come before any stage runs)."""
    path = tmp_path / "p.yaml"
    fit = str(REPO / "recipes" / "fit" / "cpu-demo.yaml")
    path.write_text(
        yaml.safe_dump({"name": "t", "recipe": "merino-tiny", "out_dir": str(tmp_path / "out"), "fit": {"config": fit}})
    )
    return path


def put(out: Path, files: dict[str, bytes]) -> dict[Path, bytes]:
    written = {}
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        written[out / rel] = data
    return written


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "running" not in captured.out
    return err


def unchanged(files: dict[Path, bytes]) -> bool:
    return all(p.read_bytes() == data for p, data in files.items())


def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    users = put(
        out,
        {
            "fit/my.ckpt": b"weights I trained",
            "model/README.md": b"# my model card\n",
            "quantized/int4/notes.txt": b"notes\n",
            "summary.md": b"my summary\n",
        },
    )
    err = one_line_error(capsys, cli_main(["pipeline", "--config", str(config(tmp_path))]))
    assert str(out) in err and "4 file(s)" in err and "--keep-unknown" in err
    assert unchanged(users) and sorted(p.name for p in out.iterdir()) == ["fit", "model", "quantized", "summary.md"]
    # --keep-unknown runs beside files only outside the folders stages write into
    err = one_line_error(capsys, cli_main(["pipeline", "--config", str(config(tmp_path)), "--keep-unknown"]))
    assert "fit/my.ckpt" in err and unchanged(users)


def test_keep_unknown_runs_beside_files_outside_the_stage_folders(tmp_path, capsys):
    users = put(tmp_path / "out", {"notes/mine.md": b"mine\n"})
    one_line_error(capsys, cli_main(["pipeline", "--config", str(config(tmp_path)), "--dry-run"]))
    assert cli_main(["pipeline", "--config", str(config(tmp_path)), "--dry-run", "--keep-unknown"]) == 0
    assert capsys.readouterr().out.count("would run") == 2 and unchanged(users)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"format": 2, "stages": {"fit": {"key"', "malformed JSON"),  # truncated by a crash
        ("", "malformed JSON"),
        ("[1, 2]", "a JSON list"),
        ('{"format": 2, "stages": {"fit": "done"}, "files": {}}', "stage 'fit' is 'done'"),
        ('{"format": 2, "stages": {"fit": null}, "files": {}}', "stage 'fit' is None"),
        ('{"format": 2, "stages": {}, "files": {"fit/a": 3}}', "file 'fit/a' is 3"),
        ('{"fit": {"key": "abc", "status": "done"}}', "older merino-pl"),  # before files were recorded
    ],
)
def test_an_unreadable_state_deletes_nothing(tmp_path, capsys, text, why):
    out = tmp_path / "out"
    files = put(out, {"fit/checkpoints/last.ckpt": b"finished fit", "pipeline-state.json": text.encode()})
    for extra in ([], ["--force", "all"], ["--keep-unknown"]):
        err = one_line_error(capsys, cli_main(["pipeline", "--config", str(config(tmp_path)), *extra]))
        assert str(out / "pipeline-state.json") in err and why in err, err
        assert unchanged(files)


def owned_run(out: Path) -> tuple[RunState, dict[Path, bytes]]:
    """A folder as a finished run leaves it: the pipeline's files recorded in its state."""
    files = put(out, {"fit/checkpoints/last.ckpt": b"ckpt", "model/config.json": b"{}", "summary.md": b"# s\n"})
    state = RunState(out, {"fit": {"key": "k", "status": "done"}, "export": {"key": "k2", "status": "done"}})
    state.record(files)
    state.save()
    return state, files


def test_force_all_never_deletes_what_the_user_added_in_a_stage_folder(tmp_path, capsys):
    out = tmp_path / "out"
    _, ours = owned_run(out)
    users = put(out, {"fit/checkpoints/mine.ckpt": b"mine", "model/CARD.md": b"card"})
    for extra in ([], ["--keep-unknown"]):
        err = one_line_error(
            capsys, cli_main(["pipeline", "--config", str(config(tmp_path)), "--force", "all", *extra])
        )
        assert "mine.ckpt" in err or "CARD.md" in err
        assert unchanged(users) and unchanged(ours)
    # an owned file the user edited is theirs now
    (out / "model" / "CARD.md").unlink()
    (out / "fit" / "checkpoints" / "mine.ckpt").unlink()
    (out / "summary.md").write_text("# my edits\n")
    err = one_line_error(capsys, cli_main(["pipeline", "--config", str(config(tmp_path)), "--force", "all"]))
    assert "summary.md" in err and (out / "summary.md").read_text() == "# my edits\n"


def test_clean_removes_only_the_pipelines_own_unchanged_files(tmp_path):
    out = tmp_path / "out"
    state, _ = owned_run(out)
    put(out, {"fit/logs/version_0/metrics.csv": b"step\n"})
    state.record([out / "fit/logs/version_0/metrics.csv"])
    users = put(out, {"fit/mine.txt": b"mine"})
    (out / "fit/checkpoints/last.ckpt").write_bytes(b"edited by hand")  # no longer the pipeline's
    state.clean(out / "fit")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "fit/checkpoints/last.ckpt",
        "fit/mine.txt",
        "model/config.json",
        "pipeline-state.json",
        "summary.md",
    ]
    assert not (out / "fit" / "logs").exists() and unchanged(users)
    assert "fit/logs/version_0/metrics.csv" not in state.files


def test_files_a_killed_stage_left_in_its_folder_are_its_own(tmp_path):
    out = tmp_path / "out"
    put(out, {"fit/old.txt": b"before the stage started"})
    os.utime(out / "fit/old.txt", (time.time() - 3600,) * 2)
    state = RunState(out, {"fit": {"key": "k", "status": "running", "started": time.time() - 60}})
    put(out, {"fit/checkpoints/step-4.ckpt": b"written by the killed fit", "logs/fit.log": b"log"})
    unknown = state.unknown({"fit": [out / "fit", out / "logs" / "fit.log"]})
    assert unknown == [out / "fit" / "old.txt"]
    # a start time that is not a number gives the stage nothing (no traceback)
    state = RunState(out, {"fit": {"key": "k", "status": "running", "started": "yesterday"}})
    assert len(state.unknown({"fit": [out / "fit", out / "logs" / "fit.log"]})) == 3


# ---- one run per folder ------------------------------------------------------------------------
def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    code = (
        "import sys, time\nfrom merino_pl.core.lock import folder_lock\n"
        f"with folder_lock({str(folder)!r}, 'pipeline'):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_folder_is_one_line_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    proc = hold_lock(out)
    try:
        err = one_line_error(capsys, cli_main(["pipeline", "--config", str(config(tmp_path))]))
        assert f"{out} is in use by pid {proc.pid} on {socket.gethostname()}" in err and "(pipeline)" in err
        assert not out.exists()  # refused before anything was written
    finally:
        proc.kill()  # kill -9: the lock file stays behind, its owner gone
        proc.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid
    with folder_lock(out, "test") as held:
        assert held.previous["pid"] == proc.pid
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_a_lock_left_by_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "node-7", "started": "then", "command": "pipeline"}))
    with pytest.raises(MerinoError, match=r"in use by pid 1 on node-7 .* remove .*\.out\.lock"):
        with folder_lock(out, "test"):
            pass
    assert json.loads(lock_path(out).read_text())["host"] == "node-7"


def test_a_users_symlink_is_theirs_and_never_followed(tmp_path):
    out = tmp_path / "out"
    state, _ = owned_run(out)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"x")
    (out / "fit" / "data").symlink_to(tmp_path / "data")  # a link to a directory: one entry, not its files
    assert state.unknown({}) == [out / "fit" / "data"]
    state.clean(out / "fit")
    assert (out / "fit" / "data").is_symlink() and (tmp_path / "data" / "big.bin").read_bytes() == b"x"
