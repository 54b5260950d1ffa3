"""The streaming validation set, built once and read by every rank and every restart.

Building it means scanning the source for held-out documents (``is_heldout``): at the Pile's
``val_fraction: 0.001`` that is ~1 B tokens of text read for 1 M held-out tokens, too much to
repeat on every rank at every (re)start. So rank 0 builds it and writes it atomically as
``val-<key digest>.npz`` in the cache folder (beside the run: ``<default_root_dir>/data``);
the other ranks wait for that file to appear, and a restart reads it. The file name is a digest
of everything the windows depend on (source files with their sizes and modification times,
text field, document unit, tokenizer, ``val_fraction``, ``seq_len``, ``val_sequences``), and the
key is stored inside and compared on reading: a changed setting or edited file gives another
name, so a set is rebuilt, never silently stale. The seed is not in the key: the windows are the
first held-out documents in source order, whatever the seed.

Several ranks must see one folder (the run directory is on a shared file system in a
multi-node job, as its checkpoints already need).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_path
from merino_pl.data.sources import Source

VAL_FORMAT = "merino-val/1"
WAIT_S = 3 * 3600.0  # how long ranks > 0 wait for rank 0's build before giving up
POLL_S = 0.5


def val_key(source: Source, tokenizer_sha256: str, **settings: object) -> dict:
    """What the validation windows depend on (``settings``: text_field, sample_by, val_fraction,
    seq_len, val_sequences); local files add their size and modification time."""
    files = [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in source.files]
    return {
        "format": VAL_FORMAT,
        "source": source.spec,
        "files": files,
        "tokenizer_sha256": tokenizer_sha256,
        **settings,
    }


def cache_file(folder: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"val-{digest}.npz"


def _read(path: Path, key: dict) -> np.ndarray | None:
    """The windows stored at ``path`` when its key is ``key`` (None when the key differs)."""
    with np.load(path, allow_pickle=False) as data:
        if json.loads(str(data["key"])) != json.loads(json.dumps(key)):
            return None
        return data["windows"]


def _write(path: Path, key: dict, windows: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # appears whole, in one rename
        np.savez(f, windows=windows, key=np.array(json.dumps(key)))


def load_or_build(
    folder: str | Path, key: dict, build: Callable[[], np.ndarray], rank: int, wait_s: float = WAIT_S
) -> tuple[np.ndarray, str]:
    """(windows, how they were obtained: 'built' / 'read'): rank 0 builds and writes them when
    the file is absent or holds another key; other ranks wait for the file and read it."""
    path = cache_file(folder, key)
    if rank == 0:
        if path.is_file() and (windows := _read(path, key)) is not None:
            return windows, "read"
        windows = build()
        _write(path, key, windows)
        return windows, "built"
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise MerinoError(
                f"rank {rank} waited {wait_s:.0f} s for the validation set rank 0 writes to {path}: did rank 0 fail, "
                "or do the ranks not share that folder? (set --data.val_cache to a folder every node sees)"
            )
        time.sleep(POLL_S)
    windows = _read(path, key)
    if windows is None:
        raise MerinoError(f"{path} holds a validation set for other data settings; delete it and restart")
    return windows, "read"
