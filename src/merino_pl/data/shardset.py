"""The on-disk shard set ``merino-pl prepare`` writes, and its checks, without torch.

A shard directory holds ``manifest.json`` and raw little-endian token files (``uint16`` when the
vocabulary fits, else ``uint32``). Each manifest entry records the file's ``tokens``, its
``sha256`` (hashed once, when ``prepare`` wrote it) and ``edges_sha256``, a digest of its first
and last 4 KiB. Checking a shard set therefore comes in three costs:

- ``quick`` (every ``fit`` start, every rank): the file exists, has its size, and its edges
  match: two 4 KiB reads per file, O(files) whatever the data size;
- a ``sample``: SHA-256 of a few shards the user asks for (``--data.verify_sample K``);
- ``full``: SHA-256 of every shard (``merino-pl prepare --verify DIR``, ``--data.verify_shards``).

A distributed ``prepare`` (``--num-tasks N``) writes part ``I`` into ``DIR/part-0000I/`` (each
part a complete shard set of its own); ``merge`` writes ``DIR/manifest.json`` listing the parts'
files in part order, which is the token stream of a one-task run (parts are contiguous blocks of
the source's files). It moves and rewrites no shard: O(files).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_json, sha256_file, write_json

MANIFEST = "manifest.json"
SHARDS_FORMAT = "merino-shards/1"
SPLITS = ("train", "val")
EDGE_BYTES = 4096
PART_PREFIX = "part-"
# settings a task records that differ between the parts of one distributed run
TASK_KEYS = ("task_index",)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:05d}"


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MerinoError(f"{directory}: not a shard directory (no {MANIFEST}); write one with `merino-pl prepare`")
    manifest = read_json(path, "shard manifest")
    if manifest.get("format") != SHARDS_FORMAT:
        raise MerinoError(f"{path}: format {manifest.get('format')!r}, expected {SHARDS_FORMAT!r}")
    return manifest


def edges_sha256(data: str | Path | bytes | memoryview) -> str:
    """SHA-256 of the first and last ``EDGE_BYTES`` of a file (a path) or of its bytes.

    What a start checks of a shard's content at O(1) cost: it catches a shard swapped for
    another of the same size and zeroed or rewritten ends; a change in the middle needs the full
    SHA-256 (``merino-pl prepare --verify``)."""
    h = hashlib.sha256()
    if isinstance(data, (str, Path)):
        size = os.path.getsize(data)
        with open(data, "rb") as f:
            h.update(f.read(EDGE_BYTES))
            if size > EDGE_BYTES:
                f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
                h.update(f.read(EDGE_BYTES))
        return h.hexdigest()
    view = memoryview(data).cast("B")
    h.update(view[:EDGE_BYTES])
    if len(view) > EDGE_BYTES:
        h.update(view[max(EDGE_BYTES, len(view) - EDGE_BYTES) :])
    return h.hexdigest()


def shard_entry(path: Path, data: np.ndarray, **extra: object) -> dict:
    """A manifest entry for ``data`` just written to ``path``: hashed from memory, not re-read."""
    return {
        "file": path.name,
        "tokens": int(len(data)),
        "sha256": hashlib.sha256(memoryview(data).cast("B")).hexdigest(),
        "edges_sha256": edges_sha256(data),
        **extra,
    }


def verify_shard(directory: Path, entry: dict, dtype: np.dtype, checksum: bool = False) -> None:
    """Existence and size always; then the SHA-256 of the whole file when ``checksum``, else
    of its edges (when recorded: manifests written before them have none). A mismatch is a
    ``MerinoError`` naming the file."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise MerinoError(f"shard {path} is missing (listed in {MANIFEST}); re-run `merino-pl prepare` to rewrite it")
    size = path.stat().st_size
    if size != entry["tokens"] * dtype.itemsize:
        raise MerinoError(
            f"shard {path} is {size} bytes, expected {entry['tokens'] * dtype.itemsize}: truncated or corrupted"
        )
    if checksum:
        if sha256_file(path) != entry["sha256"]:
            raise MerinoError(
                f"shard {path}: SHA-256 mismatch with {MANIFEST} (corrupted); delete it and re-run `merino-pl prepare`"
            )
    elif "edges_sha256" in entry and edges_sha256(path) != entry["edges_sha256"]:
        raise MerinoError(
            f"shard {path}: its first / last {EDGE_BYTES} bytes differ from {MANIFEST} (corrupted or replaced); "
            "delete it and re-run `merino-pl prepare`"
        )


def sampled(n: int, sample: int, seed: int) -> set[int]:
    """Indices of ``sample`` of ``n`` shards, a function of ``seed`` (each rank passes its own)."""
    k = min(max(0, sample), n)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed)]))
    return {int(i) for i in rng.choice(n, size=k, replace=False)} if k else set()


def check_split(
    directory: Path, entries: list[dict], dtype: np.dtype, full: bool = False, sample: int = 0, seed: int = 0
) -> None:
    """Quick checks of every shard of a split; SHA-256 of all (``full``) or of ``sample`` of them."""
    hashed = set(range(len(entries))) if full else sampled(len(entries), sample, seed)
    for i, entry in enumerate(entries):
        verify_shard(directory, entry, dtype, checksum=i in hashed)


def verify_directory(directory: str | Path) -> dict:
    """``merino-pl prepare --verify DIR``: SHA-256 of every shard against the manifest.

    Every bad shard is named in one ``MerinoError``; returns counts and seconds when all match."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    t0, bad, files, size = time.perf_counter(), [], 0, 0
    for split in SPLITS:
        for entry in manifest["splits"].get(split, []):
            try:
                verify_shard(directory, entry, dtype, checksum=True)
            except MerinoError as e:
                bad.append(f"{entry['file']} ({_reason(e)})")
            files += 1
            size += entry["tokens"] * dtype.itemsize
    if bad:
        raise MerinoError(
            f"{directory}: {len(bad)} of {files} shard(s) do not match {MANIFEST}: {', '.join(bad)}; "
            "delete them and re-run `merino-pl prepare` (for a merged set: the part's task, then --merge)"
        )
    return {"directory": str(directory), "shards": files, "bytes": size, "seconds": time.perf_counter() - t0}


def _reason(error: MerinoError) -> str:
    text = str(error)
    for key in ("missing", "SHA-256 mismatch", "truncated", "first / last"):
        if key in text:
            return {"first / last": "edges differ", "truncated": "wrong size"}.get(key, key)
    return text


# -- distributed prepare: parts and their merge ---------------------------------------------
def merge(directory: str | Path) -> dict:
    """``merino-pl prepare --merge DIR``: one manifest over the parts ``DIR/part-*`` wrote.

    Refuses (one ``MerinoError``) a missing or unfinished part, parts of different runs, and a
    ``DIR`` that already holds a one-task shard set. Re-running it rewrites the same manifest."""
    out = Path(directory)
    found = {p.parent.name: read_manifest(p.parent) for p in sorted(out.glob(f"{PART_PREFIX}*/{MANIFEST}"))}
    if not found:
        raise MerinoError(
            f"{out}: no {PART_PREFIX}*/{MANIFEST} to merge; run `merino-pl prepare SOURCE --out {out} "
            "--num-tasks N --task-index I` for every I first"
        )
    n = _check_parts(out, found)
    settings = _run_settings(found[part_name(0)])
    _check_target(out)
    parts = [found[part_name(i)] for i in range(n)]
    dtype = np.dtype(settings["dtype"])
    splits: dict[str, list] = {s: [] for s in SPLITS}
    for i, part in enumerate(parts):
        for split in SPLITS:
            for entry in part["splits"].get(split, []):
                verify_shard(out / part_name(i), entry, dtype)  # quick: the hashes were taken at prepare
                kept = {k: entry[k] for k in ("tokens", "sha256", "edges_sha256") if k in entry}
                splits[split].append({"file": f"{part_name(i)}/{entry['file']}", **kept})
    merged = {
        **{k: v for k, v in settings.items() if k != "num_tasks"},
        "parts": n,
        "complete": True,
        "tokens": {s: sum(p["tokens"][s] for p in parts) for s in SPLITS},
        "documents": {s: sum(p["documents"][s] for p in parts) for s in SPLITS},
        "splits": splits,
    }
    write_json(out / MANIFEST, merged)
    return merged


def _check_parts(out: Path, found: dict[str, dict]) -> int:
    """The number of parts, once parts 0..N-1 are all there, finished and of one run."""
    n = int(next(iter(found.values())).get("num_tasks", 1))
    missing = [i for i in range(n) if part_name(i) not in found]
    unfinished = [i for i in range(n) if part_name(i) in found and not found[part_name(i)].get("complete")]
    what = [
        f"part(s) {', '.join(map(str, ids))} {word}"
        for ids, word in ((missing, "missing"), (unfinished, "unfinished"))
        if ids
    ]
    if what:
        raise MerinoError(
            f"cannot merge {out}: {' and '.join(what)} of {n}; run `merino-pl prepare SOURCE --out {out} "
            f"--num-tasks {n} --task-index I` for those, then merge again"
        )
    settings = _run_settings(found[part_name(0)])
    names = {part_name(i) for i in range(n)}
    strays = [name for name, m in found.items() if name not in names or _run_settings(m) != settings]
    if strays:
        raise MerinoError(f"cannot merge {out}: {', '.join(strays)} made with other settings than {part_name(0)}")
    return n


def _run_settings(manifest: dict) -> dict:
    """What every part of one distributed run records alike."""
    skip = ("complete", "tokens", "documents", "splits", *TASK_KEYS)
    return {k: v for k, v in manifest.items() if k not in skip}


def _check_target(out: Path) -> None:
    if (out / MANIFEST).is_file() and "parts" not in read_json(out / MANIFEST, "shard manifest"):
        raise MerinoError(
            f"cannot merge into {out}: it already holds a one-task shard set ({out / MANIFEST}); "
            "merge parts in a directory of their own"
        )
