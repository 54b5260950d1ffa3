"""Data at scale: start-up O(metadata), the validation set built once, distributed prepare.

Real ``prepare`` runs on small local jsonl files; a sparse shard stands in for a big one."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from merino_pl.core.errors import MerinoError
from merino_pl.data.shards import tokenizer_sha256
from merino_pl.data.shardset import edges_sha256, verify_directory
from merino_pl.data.valset import load_or_build
from test_data import make_dm, prepare, take, write_corpus

COMMON = ["--shard-tokens", 300, "--workers", 1, "--val-fraction", 0.1, "--docs-per-batch", 7]


def split_tokens(out: Path, split: str) -> np.ndarray:
    """A split's token stream: its files back to back, in manifest order."""
    m = json.loads((out / "manifest.json").read_text())
    files = [np.fromfile(out / e["file"], dtype=m["dtype"]) for e in m["splits"][split]]
    return np.concatenate(files) if files else np.empty(0, m["dtype"])


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The same 3-file corpus prepared by one task and by two (part 1 from SLURM's variables)."""
    root = tmp_path_factory.mktemp("tasks")
    write_corpus(root / "c", n_docs=90, n_files=3)
    assert prepare(root / "c", "--out", root / "one", *COMMON) == 0
    assert prepare(root / "c", "--out", root / "two", "--num-tasks", 2, "--task-index", 0, *COMMON) == 0
    env = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert prepare(root / "c", "--out", root / "two", *COMMON) == 0  # part 1 of 2
    return root / "c", root / "one", root / "two"


def test_two_tasks_merge_into_the_one_task_stream(two_ways):
    _, one, two = two_ways
    assert sorted(p.name for p in two.iterdir()) == ["part-00000", "part-00001"]
    assert prepare("--merge", two) == 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(one, split), split_tokens(two, split)), split
    assert b["parts"] == 2 and b["complete"]
    same = ("tokens", "documents", "source", "source_files", "tokenizer_sha256", "dtype", "eos_id", "val_fraction")
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert all(e["file"].startswith(("part-00000/", "part-00001/")) for e in b["splits"]["train"])
    assert verify_directory(two)["shards"] == len(b["splits"]["train"]) + len(b["splits"]["val"])
    # fit reads the merged set exactly as the one-task set: the same batches, validation too
    kw = dict(batch_size=3, val_sequences=4)
    batches = [take(make_dm("unused", shards=d, **kw).train_dataloader(), 12) for d in (one, two)]
    assert all(torch.equal(x, y) for x, y in zip(*batches))
    vals = [make_dm("unused", shards=d, **kw).validation_windows() for d in (one, two)]
    assert torch.equal(*vals)
    assert prepare("--merge", two) == 0  # merging again rewrites the same manifest
    assert json.loads((two / "manifest.json").read_text()) == b


def test_merge_refuses_a_missing_part(two_ways, tmp_path, capsys):
    _, _, two = two_ways
    os.symlink(two / "part-00000", tmp_path / "part-00000")  # part 1 absent
    assert prepare("--merge", tmp_path) == 2
    err = capsys.readouterr().err
    assert "part(s) 1 missing of 2" in err and "--task-index I" in err and err.count("\n") == 1
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        (["--num-tasks", 0], {}, "--num-tasks 0 (must be >= 1)"),
        (["--num-tasks", 2, "--task-index", 2], {}, "--task-index 2 (must be in [0, 2)"),
        (["--num-tasks", 2], {}, "--task-index is needed with --num-tasks 2"),
        (
            [],
            {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "5"},
            "SLURM array task 5 is not in [0, 2) (SLURM_ARRAY_TASK_COUNT 2)",
        ),
        ([], {"SLURM_ARRAY_TASK_COUNT": "x"}, "SLURM_ARRAY_TASK_COUNT='x' (not an integer)"),
        (["--num-tasks", 4, "--task-index", 0], {}, "has 3 file(s) and a task tokenizes whole files"),
    ],
)
def test_bad_tasks_are_one_line_exit_2(two_ways, tmp_path, capsys, monkeypatch, argv, env, needle):
    corpus = two_ways[0]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert prepare(corpus, "--out", tmp_path / "o", *argv, *COMMON) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags,env,task",
    [
        ({}, {}, (1, 0)),
        ({}, {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "3"}, (8, 3)),
        ({"num_tasks": 8}, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "5"}, (8, 5)),  # re-run --array=3,5
        ({"num_tasks": 4, "task_index": 2}, {"SLURM_ARRAY_TASK_ID": "0"}, (4, 2)),  # flags win
    ],
)
def test_task_from_flags_or_slurm_array(monkeypatch, flags, env, task):
    from merino_pl.data.prepare import PrepareSettings, resolve_task

    for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    problems: list[str] = []
    assert resolve_task(PrepareSettings("embedded", "out", **flags), problems) == task and not problems


def test_one_task_array_rerun_without_num_tasks_is_refused(monkeypatch, tmp_path, capsys):
    """`sbatch --array=5` alone: COUNT is 1, so without --num-tasks it cannot be part 5 of a run."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert prepare("embedded", "--out", tmp_path / "o") == 2
    assert "SLURM array task 5 is not in [0, 1)" in capsys.readouterr().err


def test_merge_and_verify_take_no_source(tmp_path, capsys):
    assert prepare("embedded", "--merge", tmp_path) == 2
    assert prepare("embedded") == 2
    assert "takes no SOURCE" in capsys.readouterr().err


# -- start-up: O(metadata) ----------------------------------------------------------------------
def bytes_read() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io ``rchar``)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def sparse_shards(folder: Path, tokens: int) -> Path:
    """A shard set whose one train shard is ``tokens`` zeros (sparse: no disk) with a manifest
    of the real format; its recorded SHA-256 is wrong on purpose, so only a full read finds it."""
    folder.mkdir()
    with open(folder / "train-00000.bin", "wb") as f:
        f.truncate(tokens * 2)
    entry = {"file": "train-00000.bin", "tokens": tokens, "sha256": "0" * 64}
    entry["edges_sha256"] = edges_sha256(folder / "train-00000.bin")
    manifest = {
        "format": "merino-shards/1",
        "tokenizer": "default",
        "tokenizer_sha256": tokenizer_sha256(None),
        "vocab_size": 50281,
        "eos_id": 0,
        "dtype": "uint16",
        "complete": True,
        "tokens": {"train": tokens, "val": 0},
        "splits": {"train": [entry], "val": []},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes through /proc/self/io")
def test_a_restart_on_shards_reads_no_shard_in_full(tmp_path, capsys):
    size = 2**27  # tokens: a 256 MiB shard
    out = sparse_shards(tmp_path / "s", size)
    kw = dict(shards=out, batch_size=2, seq_len=63)
    before = bytes_read()
    loader = make_dm("unused", **kw).train_dataloader()
    take(loader, 3)
    fresh = make_dm("unused", **kw).train_dataloader()  # the restart
    fresh.load_state_dict(loader.state_dict())
    assert take(fresh, 1)[0].shape == (2, 64)
    assert bytes_read() - before < 2 * size // 8, "set-up, a restart and a batch read far less than the shard"
    with pytest.raises(MerinoError, match="SHA-256 mismatch"):  # the full check is there when asked for
        make_dm("unused", verify_shards=True, **kw).setup()
    assert prepare("--verify", out) == 2 and "train-00000.bin (SHA-256 mismatch)" in capsys.readouterr().err


def test_a_start_checks_sizes_and_edges(two_ways, tmp_path):
    _, one, _ = two_ways
    import shutil

    shutil.copytree(one, tmp_path / "s")
    path = tmp_path / "s" / "train-00001.bin"
    other = (tmp_path / "s" / "train-00002.bin").read_bytes()
    path.write_bytes(other)  # another shard of the same size in its place
    with pytest.raises(MerinoError, match="train-00001.bin: its first / last 4096 bytes differ"):
        make_dm("unused", shards=tmp_path / "s").setup()
    path.write_bytes(other[:-2])
    with pytest.raises(MerinoError, match="train-00001.bin is 598 bytes, expected 600"):
        make_dm("unused", shards=tmp_path / "s").setup()


def test_verify_sample_hashes_that_many_shards(two_ways, tmp_path):
    _, one, _ = two_ways
    import shutil

    shutil.copytree(one, tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for e in m["splits"]["train"]:
        e["sha256"] = "0" * 64  # every recorded hash wrong: a sample of k finds it, k = 0 does not
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    make_dm("unused", shards=tmp_path / "s", verify_sample=0).setup()
    with pytest.raises(MerinoError, match="SHA-256 mismatch"):
        make_dm("unused", shards=tmp_path / "s", verify_sample=1).setup()


# -- the streaming validation set, built once ------------------------------------------------------
def test_validation_set_is_built_once_and_keyed(tmp_path, caplog):
    write_corpus(tmp_path / "c", n_docs=200)
    kw = dict(val_fraction=0.2, val_sequences=6, val_cache=str(tmp_path / "vc"))
    caplog.set_level(logging.INFO, logger="merino_pl.data.datamodule")
    first = make_dm(tmp_path / "c", **kw).validation_windows()
    files = list((tmp_path / "vc").glob("val-*.npz"))
    assert len(files) == 1 and "validation set built" in caplog.text
    caplog.clear()
    again = make_dm(tmp_path / "c", **kw).validation_windows()  # a restart reads it
    assert torch.equal(first, again) and "validation set read" in caplog.text
    assert torch.equal(first, make_dm(tmp_path / "c", **{**kw, "val_cache": None}).validation_windows())
    make_dm(tmp_path / "c", seq_len=11, **kw).validation_windows()  # another key: another file
    with open(tmp_path / "c" / "part-0.jsonl", "a") as f:  # an edited source: rebuilt, never stale
        f.write(json.dumps({"text": "a new document"}) + "\n")
    make_dm(tmp_path / "c", **kw).validation_windows()
    assert len(list((tmp_path / "vc").glob("val-*.npz"))) == 3


def test_other_ranks_wait_for_rank_0(tmp_path):
    write_corpus(tmp_path / "c", n_docs=200)
    kw = dict(val_fraction=0.2, val_sequences=6, val_cache=str(tmp_path / "vc"))
    got = {}

    def rank1() -> None:
        dm = make_dm(tmp_path / "c", **kw)
        dm.set_rank(1, 2)
        got[1] = dm.validation_windows()

    waiter = threading.Thread(target=rank1)
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive(), "rank 1 waits while rank 0 has not written the set"
    dm = make_dm(tmp_path / "c", **kw)
    dm.set_rank(0, 2)
    got[0] = dm.validation_windows()
    waiter.join(timeout=60)
    whole = make_dm(tmp_path / "c", **kw).validation_windows()
    assert torch.equal(torch.cat([got[0], got[1]]), whole)
    with pytest.raises(MerinoError, match="rank 1 waited 0 s .*--data.val_cache"):
        load_or_build(tmp_path / "empty", {"k": 1}, lambda: np.zeros((1, 2)), rank=1, wait_s=0.1)


def test_validation_set_lives_beside_the_run(tmp_path):
    import lightning as L

    write_corpus(tmp_path / "c", n_docs=200)
    dm = make_dm(tmp_path / "c", val_fraction=0.2, val_sequences=4)
    dm.trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False, accelerator="cpu")
    assert dm.validation_windows().shape == (4, 16)
    assert len(list((tmp_path / "run" / "data").glob("val-*.npz"))) == 1


# -- a real SLURM array job (tests/slurm_cluster.py: a local single-node cluster) -------------------
@pytest.fixture(scope="module")
def local_slurm():
    from slurm_cluster import LocalSlurmCluster, unavailable_reason

    if reason := unavailable_reason():
        pytest.skip(reason)
    with LocalSlurmCluster(cpus=2) as cluster:
        yield cluster


@pytest.mark.slurm
def test_slurm_array_prepare_gives_the_one_task_stream(local_slurm, two_ways, tmp_path):
    """`sbatch --array=0-1` runs the same `merino-pl prepare` in both tasks; the array variables
    pick each task's part; the merge equals the one-task run."""
    import subprocess
    import sys

    corpus, one, _ = two_ways
    src = Path(__file__).resolve().parents[1] / "src"
    command = [sys.executable, "-m", "merino_pl.cli", "prepare", str(corpus), "--out", str(tmp_path / "s")]
    command += list(map(str, COMMON))
    env = {**local_slurm.env, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    sbatch = ["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.out"]
    proc = subprocess.run(
        [*sbatch, "--wrap", " ".join(command)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert proc.returncode == 0, proc.stderr + logs
    assert "part 0 of 2" in logs and "part 1 of 2" in logs
    assert prepare("--merge", tmp_path / "s") == 0
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(one, split), split_tokens(tmp_path / "s", split)), split


def _recorder():
    """A LightningModule that trains one scalar and logs the mean of each validation batch."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, _):
            return (self.w - batch.float().mean()) ** 2

        def validation_step(self, batch, _):
            self.log("val_mean", batch.float().mean(), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Recorder


@pytest.mark.slow
def test_two_process_fit_builds_the_validation_set_once(tmp_path):
    """Real DDP (2 processes, gloo, Lightning's launcher re-running a script): rank 0 builds the
    set, rank 1 waits for the file, both validate."""
    import subprocess
    import sys

    write_corpus(tmp_path / "c", n_docs=200)
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch, lightning as L\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_data_scale import _recorder\n"
        "from test_data import make_dm\n"
        "if __name__ == '__main__':\n"
        "    torch.set_num_threads(1)\n"
        f"    dm = make_dm({str(tmp_path / 'c')!r}, val_fraction=0.2, val_sequences=8, batch_size=2)\n"
        "    trainer = L.Trainer(accelerator='cpu', devices=2, strategy='ddp', max_steps=2, logger=False,\n"
        "                        enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,\n"
        f"                        val_check_interval=2, default_root_dir={str(tmp_path / 'run')!r})\n"
        "    trainer.fit(_recorder()(), datamodule=dm)\n"
        # one write per rank (short: atomic on a pipe), so the two ranks' lines cannot interleave
        "    line = f'windows {len(dm.validation_windows())} rank {dm.rank_world()}\\n'\n"
        "    sys.stdout.flush(); sys.stdout.write(line); sys.stdout.flush()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "run" / "data").glob("val-*.npz"))) == 1
    assert "windows 4 rank (0, 2)" in proc.stdout and "windows 4 rank (1, 2)" in proc.stdout, proc.stdout


def test_an_interrupted_part_resumes_to_the_same_shards(two_ways, tmp_path):
    corpus, _, two = two_ways
    args = (corpus, "--out", tmp_path / "s", "--num-tasks", 2, "--task-index", 1, *COMMON)
    assert prepare(*args, "--max-shards", 1) == 0
    assert not json.loads((tmp_path / "s" / "part-00001" / "manifest.json").read_text())["complete"]
    assert prepare(*args) == 0
    done, ref = (json.loads((d / "part-00001" / "manifest.json").read_text()) for d in (tmp_path / "s", two))
    for split in ("train", "val"):
        assert [e["sha256"] for e in done["splits"][split]] == [e["sha256"] for e in ref["splits"][split]]


@pytest.mark.parametrize(
    "edit,needle",
    [
        ({"complete": False}, "part(s) 1 unfinished of 2"),
        ({"shard_tokens": 999}, "part-00001 made with other settings than part-00000"),
    ],
)
def test_merge_refuses_unfinished_or_foreign_parts(two_ways, tmp_path, capsys, edit, needle):
    import shutil

    _, _, two = two_ways
    for part in ("part-00000", "part-00001"):
        shutil.copytree(two / part, tmp_path / part)
    m = json.loads((tmp_path / "part-00001" / "manifest.json").read_text())
    (tmp_path / "part-00001" / "manifest.json").write_text(json.dumps({**m, **edit}))
    assert prepare("--merge", tmp_path) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
