"""Start-up cost of training from shards vs the size of the shard set: flat, not linear.

    python bench/data_startup.py                     # 1 GB and 20 GB of shards (~2 min, 1 GB of /tmp)
    python bench/data_startup.py --sizes-gb 0.25 2   # quicker

For each size it writes synthetic uint16 shards (256 MiB files, as ``prepare``'s default
``--shard-tokens 2^27``; hard links to a few distinct files, see ``ShardPool``) with a manifest of
the real format into a temporary folder, then times:

- the shard check every start does (``TokenFiles``: sizes and each file's first / last 4 KiB);
- ``PileDataModule(shards=...)`` set-up to the first batch (seq_len 1024, batch 8, the 256
  validation windows read too), and a restart: a new DataModule resuming a saved position;
- the full SHA-256 check (``merino-pl prepare --verify``), which every rank did at every start
  before (``verify_shards: true`` was the default): the linear cost this removes.

The files were just written, so they sit in the page cache: the full check's seconds are a
lower bound (a cold read of 400 GB from a parallel file system is far slower); the start-up rows
read almost nothing, cached or not. The folders are deleted afterwards. Writes
runs/bench/data_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

from merino_pl.data.shards import TokenFiles, tokenizer_sha256  # noqa: E402
from merino_pl.data.shardset import MANIFEST, SHARDS_FORMAT, shard_entry, shard_name, verify_directory  # noqa: E402

SHARD_TOKENS = 2**27  # 256 MiB of uint16, prepare's default
VAL_TOKENS = 2**20
VOCAB = 50281


class ShardPool:
    """Distinct 256 MiB shards of random ids, written once; a shard set hard-links them in turn.

    The disk here writes ~40 MB/s, so 20 GB of distinct files would take ~9 minutes; the start
    reads only sizes and 4 KiB edges, and the full check hashes every linked file in full, so
    links measure both. (Partial last shards are written for real.)"""

    def __init__(self, folder: Path, distinct: int) -> None:
        self.folder, self.distinct, self.files = folder, distinct, []
        folder.mkdir(parents=True, exist_ok=True)

    def shard(self, path: Path, index: int, tokens: int) -> dict:
        if tokens < SHARD_TOKENS:
            return write(path, random_ids(10_000 + index, tokens))
        if len(self.files) <= index % self.distinct:
            base = self.folder / f"base-{len(self.files)}.bin"
            self.files.append((base, write(base, random_ids(len(self.files), SHARD_TOKENS))))
        base, entry = self.files[index % self.distinct]
        os.link(base, path)
        return {**entry, "file": path.name}


def random_ids(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n, dtype=np.uint16)


def write(path: Path, data: np.ndarray) -> dict:
    data.tofile(path)
    return shard_entry(path, data)


def write_shards(folder: Path, gb: float, pool: ShardPool) -> dict:
    """``gb`` GB of train shards + one val shard and their manifest (the real format)."""
    folder.mkdir(parents=True)
    splits: dict[str, list] = {"train": [], "val": []}
    for split, tokens in (("train", int(gb * 1e9 / 2)), ("val", VAL_TOKENS)):
        for i in range(-(-tokens // SHARD_TOKENS)):
            n = min(SHARD_TOKENS, tokens - i * SHARD_TOKENS)
            splits[split].append(pool.shard(folder / shard_name(split, i), i, n))
    manifest = {
        "format": SHARDS_FORMAT,
        "source": "synthetic",
        "tokenizer": "default",
        "tokenizer_sha256": tokenizer_sha256(None),
        "vocab_size": VOCAB,
        "eos_id": 0,
        "dtype": "uint16",
        "shard_tokens": SHARD_TOKENS,
        "val_fraction": 0.01,
        "complete": True,
        "tokens": {s: sum(e["tokens"] for e in entries) for s, entries in splits.items()},
        "splits": splits,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def first_batch(folder: Path, state: dict | None = None):
    """Set-up to first batch of a fresh DataModule (resuming ``state`` when given)."""
    from merino_pl.data import PileDataModule

    dm = PileDataModule(shards=str(folder), seq_len=1024, batch_size=8, num_workers=0, val_sequences=256)
    dm.validation_windows()
    loader = dm.train_dataloader()
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    for _ in range(3):
        next(it)
    return loader.state_dict()


def check_splits(folder: Path) -> None:
    TokenFiles(folder, "train")
    TokenFiles(folder, "val")


def measure(folder: Path, repeats: int) -> dict:
    check = min(timed(check_splits, folder)[0] for _ in range(repeats))
    starts = [timed(first_batch, folder) for _ in range(repeats)]
    restart = min(timed(first_batch, folder, starts[0][1])[0] for _ in range(repeats))
    full, report = timed(verify_directory, folder)
    return {
        "shards": report["shards"],
        "bytes": report["bytes"],
        "start_check_s": check,
        "setup_to_first_batch_s": min(s for s, _ in starts),
        "restart_to_first_batch_s": restart,
        "full_sha256_s": full,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 20.0])
    parser.add_argument("--repeats", type=int, default=3, help="start-up timings: the best of this many")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the synthetic shards go (deleted after)")
    parser.add_argument("--distinct", type=int, default=4, help="distinct 256 MiB files the sets link to")
    args = parser.parse_args()
    rows = {}
    tmp = Path(tempfile.mkdtemp(prefix="merino-bench-startup-", dir=args.tmp))
    try:
        pool = ShardPool(tmp / "pool", args.distinct)
        for gb in args.sizes_gb:
            folder = tmp / f"shards-{gb:g}gb"
            write_s, _ = timed(write_shards, folder, gb, pool)
            rows[f"{gb:g} GB"] = {"gb": gb, "write_s": write_s, **measure(folder, args.repeats)}
            print(f"{gb:g} GB: {rows[f'{gb:g} GB']['shards']} shards (written in {write_s:.0f} s)", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows)


def report(rows: dict) -> None:
    cols = [
        ("start_check_s", "start check"),
        ("setup_to_first_batch_s", "set-up->batch"),
        ("restart_to_first_batch_s", "restart->batch"),
        ("full_sha256_s", "full SHA-256"),
    ]
    print(f"\n{'shards':>12} {'files':>6} " + " ".join(f"{title:>15}" for _, title in cols) + "   (seconds)")
    for name, r in rows.items():
        print(f"{name:>12} {r['shards']:>6} " + " ".join(f"{r[key]:>15.4f}" for key, _ in cols))
    print(
        "start check: sizes + first/last 4 KiB of every file; set-up->batch: PileDataModule from shards to its "
        "first 3 batches (seq 1024, batch 8) with 256 validation windows; full SHA-256: prepare --verify "
        "(page-cached: a lower bound)"
    )
    out = REPO / "runs" / "bench" / "data_startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
