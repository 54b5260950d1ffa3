"""Pre-tokenized token shards: the reader of the set ``merino-pl prepare`` writes (the format
and its checks are in ``shardset``).

A shard directory holds ``manifest.json`` and raw little-endian token files
``{split}-{index:05d}.bin`` (``uint16`` when the vocabulary fits, else ``uint32``), each
``shard_tokens`` long except the last of a split (of each part, in a merged set). Documents are
concatenated with EOS after each, so the files of a split read back-to-back are one token stream.
``np.memmap`` gives random access at page-cache speed, which is what lets ``ShardStream`` shuffle
globally.

``ShardStream`` cuts the stream into ``seq_len + 1`` windows (the last one EOS-padded) and visits
them in a seeded two-level order (a permutation of blocks of windows, then of the windows inside
each block: O(blocks) memory, not O(windows)): one endless sequence pass 0, pass 1, ... for the
whole job. From a cursor ``start`` on, it is cut into global batches of ``batch_size``
consecutive windows; global batch b goes to rank b mod W and, within that rank, to DataLoader
worker (b // W) mod K (the order in which the loader polls its workers). So once every rank has
consumed k batches, exactly the first k·W global batches are used, whatever W and K: the
position of the whole job is one number (``start + k·W·batch_size``), and a resume with other
W' x K' restarts every reader from it (elastic exact resume).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from merino_pl.core.errors import MerinoError
from merino_pl.data.packing import check_slot, rng_for, worker_slot
from merino_pl.data.shardset import (  # noqa: F401 - the format's names, importable from here too
    MANIFEST,
    SHARDS_FORMAT,
    check_split,
    read_manifest,
    shard_name,
    token_dtype,
    verify_shard,
)

STATE_FORMAT = "merino-shard-stream/2"
BLOCK_WINDOWS = 4096


def tokenizer_sha256(spec: str | None) -> str:
    """The manifest's ``tokenizer_sha256``: a digest of the tokenizer's JSON, so a reader can
    tell that shards were cut with the tokenizer it was given."""
    from merino_pl.core.tokenizer import load_tokenizer

    return hashlib.sha256(load_tokenizer(spec).to_str().encode()).hexdigest()


class TokenFiles:
    """The token files of one split as one random-access array (opened lazily per process).

    Opening checks every file's size and edges (O(files), see ``shardset``); ``full`` hashes
    every file, ``sample`` that many chosen by ``seed``."""

    def __init__(self, directory: str | Path, split: str, full: bool = False, sample: int = 0, seed: int = 0) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if not manifest.get("complete"):
            raise MerinoError(f"{self.directory}: `merino-pl prepare` did not finish; re-run it to complete the shards")
        self.manifest, self.split = manifest, split
        self.dtype = np.dtype(manifest["dtype"])
        self.entries = manifest["splits"].get(split, [])
        check_split(self.directory, self.entries, self.dtype, full=full, sample=sample, seed=seed)
        self.starts = np.cumsum([0] + [e["tokens"] for e in self.entries])
        self.total = int(self.starts[-1])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return self.total

    def __getstate__(self) -> dict:  # memmaps are reopened in each worker, not pickled
        return {**self.__dict__, "_maps": None}

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` of the split, across file boundaries."""
        if self._maps is None:
            self._maps = [np.memmap(self.directory / e["file"], dtype=self.dtype, mode="r") for e in self.entries]
        out, end = [], min(start + n, self.total)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            local = start - self.starts[i]
            take = min(end - start, self.entries[i]["tokens"] - local)
            out.append(self._maps[i][local : local + take])
            start, i = start + take, i + 1
        return np.concatenate(out) if len(out) != 1 else np.asarray(out[0])


class ShardStream(IterableDataset):
    """Batches ``(B, seq_len + 1)`` from shards in a seeded global order (see module docstring)."""

    def __init__(
        self,
        files: TokenFiles,
        seq_len: int,
        batch_size: int,
        seed: int,
        eos_id: int,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        block_windows: int = BLOCK_WINDOWS,
    ) -> None:
        self.files, self.seq_len, self.batch_size, self.seed, self.eos_id = files, seq_len, batch_size, seed, eos_id
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.windows = -(-files.total // (seq_len + 1))  # the last one is EOS-padded
        self.block = max(1, min(block_windows, self.windows))
        if self.windows == 0:
            raise MerinoError(f"{files.directory}: split {files.split!r} holds no tokens")
        self.start = 0  # position (in windows) of the sequence where global batch 0 begins
        self._taken = 0  # batches this worker has yielded since ``start``

    def state_dict(self) -> dict:
        g, n = worker_slot(self.rank, self.world_size)
        return {"format": STATE_FORMAT, "slot": [g, n], "start": self.start, "taken": self._taken}

    def load_state_dict(self, state: dict) -> None:
        g, n = worker_slot(self.rank, self.world_size)
        if state.get("format") != STATE_FORMAT:
            raise MerinoError(
                f"data state has format {state.get('format')!r}, expected {STATE_FORMAT!r} "
                "(saved by an older merino-pl): pass --data.resume false to restart the data stream"
            )
        check_slot(state, g, n)
        self.start, self._taken = int(state["start"]), int(state["taken"])

    def rebase(self, start: int) -> None:
        """Continue from window ``start`` of the job's sequence, with global batch 0 there."""
        self.start, self._taken = int(start), 0

    @lru_cache(maxsize=2)  # noqa: B019 - bounded: keeps at most 2 (stream, pass) entries alive
    def _pass_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Block order of a pass and where each block starts in that pass's sequence."""
        n_blocks = -(-self.windows // self.block)
        order = rng_for(self.seed, epoch).permutation(n_blocks)
        sizes = np.minimum(self.block, self.windows - order * self.block)
        return order, np.concatenate([[0], np.cumsum(sizes)])

    @lru_cache(maxsize=4)  # noqa: B019 - bounded: keeps at most 4 (stream, pass, block) entries alive
    def _block_order(self, epoch: int, block: int) -> np.ndarray:
        size = min(self.block, self.windows - block * self.block)
        return rng_for(self.seed, epoch, block).permutation(size)

    def window_index(self, position: int) -> int:
        """The window at ``position`` of the endless sequence pass 0, pass 1, ..."""
        epoch, i = divmod(position, self.windows)
        order, starts = self._pass_layout(epoch)
        k = int(np.searchsorted(starts, i, side="right")) - 1
        block = int(order[k])
        return block * self.block + int(self._block_order(epoch, block)[i - starts[k]])

    def window(self, index: int) -> np.ndarray:
        size = self.seq_len + 1
        tokens = self.files.read(index * size, size).astype(np.int64)
        if len(tokens) < size:
            tokens = np.concatenate([tokens, np.full(size - len(tokens), self.eos_id, dtype=np.int64)])
        return tokens

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        end = None if self.epochs is None else self.epochs * self.windows
        while True:
            local = worker + self._taken * workers  # this rank's batch number
            first = self.start + (self.rank + local * self.world_size) * self.batch_size
            positions = range(first, first + self.batch_size)
            if end is not None:
                positions = [p for p in positions if p < end]
            if not positions:
                return
            batch = np.stack([self.window(self.window_index(p)) for p in positions])
            self._taken += 1
            yield torch.from_numpy(batch)
