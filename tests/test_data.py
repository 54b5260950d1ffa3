"""Data stage: packing, sharding over ranks x workers, exact resume, hold-out, bad input.

Everything runs through the real ``datasets`` streaming path on small local files."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from merino_pl.core.errors import MerinoError
from merino_pl.core.tokenizer import load_tokenizer
from merino_pl.data import PileDataModule
from merino_pl.data.packing import is_heldout

WORDS = "alpha beta gamma delta river stone cloud ember maple quartz violet lantern harbor".split()


def write_corpus(folder: Path, n_docs: int = 120, n_files: int = 3, field: str = "text") -> list[str]:
    """``n_docs`` distinct documents of varied length spread over ``n_files`` jsonl files."""
    rng = np.random.default_rng(0)
    docs = [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 60)))) for i in range(n_docs)]
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = [json.dumps({field: d, "id": i}) for i, d in enumerate(docs) if i % n_files == f]
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return docs


def make_dm(source, **kw) -> PileDataModule:
    args = dict(
        source=str(source),
        seq_len=15,
        batch_size=2,
        num_workers=0,
        val_fraction=0.0,
        val_sequences=0,
        shuffle_windows=8,
    )
    return PileDataModule(**{**args, **kw})


def take(loader, n: int) -> list[torch.Tensor]:
    """The first ``n`` batches; worker processes are stopped now rather than at garbage collection."""
    it = iter(loader)
    batches = [next(it) for _ in range(n)]
    if hasattr(loader._iterator, "_shutdown_workers"):
        loader._iterator._shutdown_workers()
    return batches


def doc_tokens(docs: list[str], eos: int) -> Counter:
    tok = load_tokenizer(None)
    return Counter(tuple(tok.encode(d, add_special_tokens=False).ids) + (eos,) for d in docs)


def split_docs(windows: list[np.ndarray], eos: int) -> list[tuple[int, ...]]:
    """A worker's stream (unshuffled) cut back into documents; drops the EOS tail padding."""
    stream = np.concatenate(windows).tolist() if windows else []
    docs, cur = [], []
    for t in stream:
        cur.append(t)
        if t == eos:
            docs.append(tuple(cur))
            cur = []
    assert not cur, "a worker's stream must end at a document boundary (then EOS padding)"
    return [d for d in docs if d != (eos,)]


def test_batches_shape_dtype_and_eos(tmp_path):
    write_corpus(tmp_path / "c")
    dm = make_dm(tmp_path / "c", batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (3, 16) and batch.dtype == torch.long
    assert dm.eos_id == load_tokenizer(None).token_to_id("<|endoftext|>")
    assert dm.vocab_size == load_tokenizer(None).get_vocab_size(with_added_tokens=True)
    assert (batch == dm.eos_id).any(), "documents are separated by EOS"


@pytest.mark.parametrize("n_files", [3, 8])  # 3 files < 4 workers: every 4th doc; 8: whole files
def test_two_ranks_two_workers_cover_every_token_once(tmp_path, n_files):
    docs = write_corpus(tmp_path / "c", n_docs=90, n_files=n_files)
    eos = load_tokenizer(None).token_to_id("<|endoftext|>")
    # global worker g of 4 == rank g of 4 without DataLoader workers: read each slot unshuffled
    seen: Counter = Counter()
    windows_by_slot = []
    for g in range(4):
        dm = make_dm(tmp_path / "c", epochs=1, shuffle_windows=1, batch_size=1)
        dm.set_rank(g, 4)
        windows = [b[0].numpy() for b in dm.train_dataloader()]
        windows_by_slot.extend(tuple(w) for w in windows)
        seen.update(split_docs(windows, eos))
    assert seen == doc_tokens(docs, eos), "every document exactly once over the 4 slots"
    # the real thing: 2 ranks x 2 DataLoader workers, shuffled, give the same windows
    real = []
    for rank in range(2):
        dm = make_dm(tmp_path / "c", epochs=1, num_workers=2, batch_size=3)
        dm.set_rank(rank, 2)
        real.extend(tuple(w) for b in dm.train_dataloader() for w in b.numpy())
    assert Counter(real) == Counter(windows_by_slot)


@pytest.mark.parametrize("num_workers,n_files", [(0, 3), (2, 3), (2, 1)])  # (2, 1): every 2nd document
def test_streaming_resume_is_exact(tmp_path, num_workers, n_files):
    write_corpus(tmp_path / "c", n_docs=40, n_files=n_files)
    kw = dict(num_workers=num_workers, shuffle_windows=5, batch_size=3)
    full = take(make_dm(tmp_path / "c", **kw).train_dataloader(), 40)  # several passes, many blocks
    for k in (1, 7, 23):
        loader = make_dm(tmp_path / "c", **kw).train_dataloader()
        assert all(torch.equal(a, b) for a, b in zip(take(loader, k), full))
        state = loader.state_dict()
        fresh = make_dm(tmp_path / "c", **kw).train_dataloader()
        fresh.load_state_dict(state)
        rest = take(fresh, 40 - k)
        assert all(torch.equal(a, b) for a, b in zip(rest, full[k:])), f"resume after {k} batches"


def test_shuffle_depends_on_seed_only(tmp_path):
    write_corpus(tmp_path / "c")
    a = take(make_dm(tmp_path / "c", seed=1).train_dataloader(), 6)
    b = take(make_dm(tmp_path / "c", seed=1).train_dataloader(), 6)
    c = take(make_dm(tmp_path / "c", seed=2).train_dataloader(), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_validation_is_held_out(tmp_path):
    docs = write_corpus(tmp_path / "c", n_docs=300)
    dm = make_dm(tmp_path / "c", val_fraction=0.2, val_sequences=8, epochs=1, shuffle_windows=1, batch_size=1)
    val = dm.validation_windows()
    assert val.shape == (8, 16)
    held = [d for d in docs if is_heldout(d, 0.2)]
    assert 30 < len(held) < 90
    eos = dm.eos_id
    train_docs = Counter(split_docs([b[0].numpy() for b in dm.train_dataloader()], eos))
    assert train_docs == doc_tokens([d for d in docs if d not in held], eos)
    assert next(iter(dm.val_dataloader())).shape == (1, 16)


def test_embedded_source_streams_shakespeare():
    dm = PileDataModule(source="embedded", seq_len=32, batch_size=2, num_workers=0, val_fraction=0.05, val_sequences=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 33)
    assert dm.validation_windows().shape == (4, 33)


def test_txt_files_one_document_per_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond para\n\n\nthird\n")
    dm = make_dm(tmp_path / "a.txt", epochs=1, shuffle_windows=1, batch_size=1, seq_len=3)
    docs = split_docs([b[0].numpy() for b in dm.train_dataloader()], dm.eos_id)
    tok = load_tokenizer(None)
    assert [tok.decode(list(d[:-1])) for d in docs] == ["first para\nline two", "second para", "\nthird\n"]


# -- bad input ------------------------------------------------------------------------------------
def test_missing_text_field_lists_fields(tmp_path):
    write_corpus(tmp_path / "c", field="content")
    with pytest.raises(MerinoError, match=r"no text field 'text' \(fields: content, id\)"):
        make_dm(tmp_path / "c").setup()


def test_empty_source(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MerinoError, match="empty"):
        make_dm(tmp_path / "empty.jsonl").setup()
    with pytest.raises(MerinoError, match="no such file"):
        make_dm(tmp_path / "nothing-*.jsonl").setup()


def test_unreachable_hub_fails_fast_with_local_hint(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(MerinoError, match="local files"):
        PileDataModule(num_workers=0).setup()
    assert time.perf_counter() - t < 10


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    t = time.perf_counter()
    with pytest.raises(MerinoError, match="unreachable.*local files"):
        PileDataModule(num_workers=0).setup()
    assert time.perf_counter() - t < 10


def test_tokenizer_larger_than_model_vocab():
    dm = PileDataModule(source="embedded", num_workers=0)
    dm.check_vocab(50304)
    with pytest.raises(MerinoError, match="50281 ids.*vocab_size is 512"):
        dm.check_vocab(512)


def test_bad_arguments_reported_together():
    with pytest.raises(MerinoError, match=r"seq_len=0.*batch_size=-1.*val_fraction=1.5"):
        PileDataModule(source="embedded", seq_len=0, batch_size=-1, val_fraction=1.5)


def test_resume_refuses_a_different_world_size(tmp_path):
    write_corpus(tmp_path / "c")
    loader = make_dm(tmp_path / "c").train_dataloader()
    take(loader, 2)
    state = loader.state_dict()
    dm = make_dm(tmp_path / "c")
    dm.set_rank(0, 2)
    with pytest.raises(MerinoError, match="same world size"):
        dm.train_dataloader().load_state_dict(state)


# -- pre-tokenized shards -------------------------------------------------------------------------
def prepare(*argv) -> int:
    from merino_pl.cli import main

    return main(["prepare", *map(str, argv)])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("prepared")
    docs = write_corpus(root / "c", n_docs=90, n_files=3)
    assert prepare(root / "c", "--out", root / "s", "--shard-tokens", 300, "--workers", 2, "--val-fraction", 0.1) == 0
    return root / "s", docs


@pytest.fixture
def shard_dir(prepared, tmp_path) -> tuple[Path, list[str]]:
    """A private copy of the prepared shards (tests may corrupt them) beside the corpus."""
    import shutil

    out, docs = prepared
    shutil.copytree(out, tmp_path / "s")
    shutil.copytree(out.parent / "c", tmp_path / "c")
    return tmp_path / "s", docs


def test_prepare_writes_uint16_shards_with_manifest(shard_dir):
    out, docs = shard_dir
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["dtype"] == "uint16" and m["vocab_size"] == 50281
    assert all(e["tokens"] == 300 for e in m["splits"]["train"][:-1])
    held = [d for d in docs if is_heldout(d, 0.1)]
    assert m["documents"] == {"train": len(docs) - len(held), "val": len(held)}
    eos = m["eos_id"]
    train = np.concatenate([np.fromfile(out / e["file"], dtype=np.uint16) for e in m["splits"]["train"]])
    assert Counter(split_docs([train.astype(np.int64)], eos)) == doc_tokens([d for d in docs if d not in held], eos)
    assert m["tokens"]["train"] == len(train)


def test_prepare_resumes_after_interruption(shard_dir, tmp_path):
    out, _ = shard_dir
    part = tmp_path / "part"
    common = ["--shard-tokens", 300, "--workers", 2, "--val-fraction", 0.1, "--docs-per-batch", 7]
    assert prepare(tmp_path / "c", "--out", part, "--max-shards", 2, *common) == 0
    m = json.loads((part / "manifest.json").read_text())
    assert not m["complete"] and len(m["splits"]["train"]) == 2
    (part / "train-00001.bin").write_bytes(b"\0" * 600)  # corrupt one: it is rewritten, not trusted
    assert prepare(tmp_path / "c", "--out", part, *common) == 0
    done = json.loads((part / "manifest.json").read_text())
    ref = json.loads((out / "manifest.json").read_text())
    assert done["complete"] and done["documents"] == ref["documents"]
    for split in ("train", "val"):
        assert [e["sha256"] for e in done["splits"][split]] == [e["sha256"] for e in ref["splits"][split]]


def shard_windows(out: Path, size: int = 16) -> Counter:
    """Every ``size``-token window of a shard directory's train split, once (one epoch)."""
    total = json.loads((out / "manifest.json").read_text())["tokens"]["train"]
    n_windows = -(-total // size)
    files = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in sorted(out.glob("train-*.bin"))]).astype(np.int64)
    padded = np.concatenate([files, np.zeros(n_windows * size - total, np.int64)])  # EOS id 0 pads the tail
    return Counter(map(tuple, padded.reshape(n_windows, size)))


def windows_of(batches) -> Counter:
    return Counter(tuple(w) for b in batches for w in b.numpy())


def test_shards_two_ranks_two_workers_cover_every_window_once(shard_dir):
    out, _ = shard_dir
    real = Counter()
    for rank in range(2):
        dm = make_dm("unused", shards=out, epochs=1, num_workers=2, batch_size=3)
        dm.set_rank(rank, 2)
        real += windows_of(dm.train_dataloader())
    assert real == shard_windows(out)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shards_resume_is_exact(shard_dir, num_workers):
    out, _ = shard_dir
    kw = dict(shards=out, num_workers=num_workers, batch_size=3)
    full = take(make_dm("unused", **kw).train_dataloader(), 30)  # > 1 pass
    loader = make_dm("unused", **kw).train_dataloader()
    take(loader, 11)
    fresh = make_dm("unused", **kw).train_dataloader()
    fresh.load_state_dict(loader.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(take(fresh, 19), full[11:]))


@pytest.mark.parametrize("before,after", [(2, 0), (0, 2)])
def test_shards_resume_on_another_num_workers(shard_dir, before, after):
    """One rank: the job's batch order does not depend on the workers, so a resume with
    another ``num_workers`` continues it exactly, and one epoch is every window once."""
    out, _ = shard_dir
    kw = dict(shards=out, batch_size=3, epochs=1)
    straight = list(make_dm("unused", num_workers=0, **kw).train_dataloader())
    loader = make_dm("unused", num_workers=before, **kw).train_dataloader()
    head = take(loader, 7)
    fresh = make_dm("unused", num_workers=after, **kw).train_dataloader()
    fresh.load_state_dict(loader.state_dict())
    tail = list(fresh)
    assert len(head + tail) == len(straight) and all(torch.equal(a, b) for a, b in zip(head + tail, straight))
    assert windows_of(head + tail) == shard_windows(out)


def test_shards_resume_two_ranks_two_workers_on_one_rank(shard_dir, monkeypatch):
    """2 ranks x 2 workers stopped after 4 batches each, resumed on 1 rank x 0 workers: no
    window repeated or skipped in the epoch (the gather across ranks is simulated here; the
    2-process run is tests/test_fit.py::test_ddp_kill_resumes_on_one_process_exactly)."""
    out, _ = shard_dir
    kw = dict(shards=out, batch_size=3, epochs=1)
    loaders, seen = [], Counter()
    for rank in range(2):
        dm = make_dm("unused", num_workers=2, **kw)
        dm.set_rank(rank, 2)
        loaders.append(dm.train_dataloader())
        seen += windows_of(take(loaders[-1], 4))
    local = [loader._local_state() for loader in loaders]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(
        torch.distributed, "all_gather_object", lambda gathered, _: gathered.__setitem__(slice(None), local)
    )
    state = loaders[0].state_dict()
    monkeypatch.undo()
    assert state["cursor"] == 2 * 4 * 3
    fresh = make_dm("unused", num_workers=0, **kw).train_dataloader()
    fresh.load_state_dict(state)
    seen += windows_of(fresh)
    assert seen == shard_windows(out)


def test_streaming_resume_on_another_world_size_is_refused(tmp_path):
    write_corpus(tmp_path / "c")
    saved = make_dm(tmp_path / "c")
    saved.set_rank(0, 2)
    dm = make_dm(tmp_path / "c")
    with pytest.raises(MerinoError, match=r"streamed data source.*world_size: 2 -> 1.*--data.shards"):
        dm.load_state_dict(saved.state_dict())
    dm = make_dm(tmp_path / "c", shards="unused")  # shards resume on any world size
    dm.load_state_dict({**saved.state_dict(), "shards": "unused"})


def test_shards_resume_refuses_a_state_without_cursor(shard_dir):
    out, _ = shard_dir
    old = {"format": "merino-loader/1", "world_size": 1, "ranks": [{}]}  # before the cursor existed
    with pytest.raises(MerinoError, match="older merino-pl.*--data.resume false"):
        make_dm("unused", shards=out).train_dataloader().load_state_dict(old)


def test_shards_validation_split(shard_dir):
    out, _ = shard_dir
    dm = make_dm("unused", shards=out, val_sequences=4)
    val = dm.validation_windows()
    assert val.shape[1] == 16 and 1 <= len(val) <= 4
    first = np.fromfile(out / "val-00000.bin", dtype=np.uint16)[:16]
    assert val[0].tolist() == first.tolist()


def test_corrupted_shard_exits_2(shard_dir, capsys):
    out, _ = shard_dir
    data = bytearray((out / "train-00000.bin").read_bytes())
    data[10] ^= 0xFF
    (out / "train-00000.bin").write_bytes(bytes(data))
    # a start reads each shard's first and last 4 KiB (here: the whole 600-byte file)
    with pytest.raises(MerinoError, match="train-00000.bin: its first / last 4096 bytes differ"):
        make_dm("unused", shards=out).setup()
    assert prepare("--verify", out) == 2
    err = capsys.readouterr().err
    assert "1 of" in err and "train-00000.bin (SHA-256 mismatch)" in err and err.count("\n") == 1
    rc = prepare(out.parent / "c", "--out", out, "--shard-tokens", 999)
    assert rc == 2 and "other settings" in capsys.readouterr().err


def test_prepare_bad_arguments_exit_2(tmp_path, capsys):
    rc = prepare(tmp_path / "missing.jsonl", "--out", tmp_path / "o", "--workers", 0, "--val-fraction", 2)
    err = capsys.readouterr().err
    assert rc == 2 and "--workers 0" in err and "--val-fraction 2" in err


class _Recorder:
    """A LightningModule that trains one scalar and remembers every batch it saw."""

    @staticmethod
    def make():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(()))
                self.seen: list[torch.Tensor] = []

            def training_step(self, batch, _):
                self.seen.append(batch.clone())
                return (self.w - batch.float().mean()) ** 2

            def validation_step(self, batch, _):
                assert batch.shape[1] == 16

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Recorder()


@pytest.mark.slow
@pytest.mark.parametrize("use_shards", [False, True])
def test_lightning_checkpoint_resumes_the_data_stream(tmp_path, use_shards, prepared):
    import lightning as L

    write_corpus(tmp_path / "c", n_docs=60)
    kw = dict(
        num_workers=2, batch_size=2, shards=prepared[0] if use_shards else None, val_fraction=0.1, val_sequences=4
    )

    def fit(max_steps: int, ckpt: str | None = None):
        module = _Recorder.make()
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            val_check_interval=4,
            limit_val_batches=2,
            callbacks=[
                L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1)
            ],
        )
        trainer.fit(module, datamodule=make_dm(tmp_path / "c", **kw), ckpt_path=ckpt)
        return module.seen

    full = fit(9)
    ckpt = next((tmp_path / "ck").glob("*step=5.ckpt"))
    rest = fit(9, str(ckpt))
    assert len(rest) == 4 and all(torch.equal(a, b) for a, b in zip(rest, full[5:]))
