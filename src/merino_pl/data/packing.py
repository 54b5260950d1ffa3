"""Tokenize documents, put EOS after each, pack into ``seq_len + 1`` windows, shuffle, batch.

``PackedStream`` is the streaming path: a ``torch`` ``IterableDataset`` that yields whole batches
(``LongTensor (B, seq_len + 1)``) and whose ``state_dict()`` after any batch lets a fresh copy
continue with exactly the next one (torchdata's ``StatefulDataLoader`` calls it in each worker).

Why not ``datasets``' own ``.shuffle(buffer_size)``: its buffer is not part of its state, so a
resume loses and repeats examples (datasets saves no shuffle buffer). Here the shuffle is a seeded permutation of
blocks of ``shuffle_windows`` packed windows; the state names where a block starts in the
source (a ``datasets`` state + a token offset) and how many of its windows were used, so a
resume re-reads one block and permutes it the same way. The shard (file) order changes every
pass through ``datasets``' epoch-seeded shard shuffle.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from merino_pl.core.errors import MerinoError
from merino_pl.core.tokenizer import load_tokenizer

STATE_FORMAT = "merino-stream/1"
EMPTY = np.empty(0, dtype=np.int32)


def worker_slot(rank: int, world_size: int) -> tuple[int, int]:
    """(global worker index, number of workers over all ranks) of the calling process."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world_size * nw


def check_slot(state: dict, g: int, n: int) -> None:
    """A saved position belongs to one reader: refuse it anywhere else (no silent overlap)."""
    if tuple(state["slot"]) != (g, n):
        raise MerinoError(
            f"data state was saved by worker {state['slot'][0]} of {state['slot'][1]}, but this is worker {g} of {n}: "
            "resume with the same number of devices and --data.num_workers"
        )


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the validation hold-out: a hash of its text, so that the
    split is the same for every pass, rank, worker and for ``prepare`` (and duplicates agree)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


def rng_for(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


class DocumentTokenizer:
    """Texts -> one int32 array of their token ids, each document followed by EOS.

    Holds the tokenizer spec, not the tokenizer, so it pickles cheaply into DataLoader workers
    and prepare's processes (each loads its own copy once).
    """

    def __init__(self, tokenizer: str | None, eos_id: int) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return EMPTY
        encodings = load_tokenizer(self.tokenizer).encode_batch_fast(texts, add_special_tokens=False)
        eos = (self.eos_id,)
        total = sum(len(e.ids) for e in encodings) + len(encodings)
        ids = itertools.chain.from_iterable(itertools.chain(e.ids, eos) for e in encodings)
        return np.fromiter(ids, dtype=np.int32, count=total)


@dataclass
class Cursor:
    """Where a worker's next window starts: pass ``epoch``, the ``datasets`` state before the
    chunk of documents holding its first token (None = start of the pass), tokens to skip."""

    epoch: int = 0
    source: dict | None = None
    skip: int = 0


def stack(windows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(windows).astype(np.int64))


class PackedStream(IterableDataset):
    """Batches of packed windows from a ``datasets`` streaming source (see module docstring).

    Every (rank, worker) reads a disjoint part of the source: whole shards when there are at
    least as many shards as workers overall, else every G-th document
    (``datasets.distributed.split_dataset_by_node``). ``epochs=None`` streams forever (passes
    follow each other seamlessly, so ranks never run dry at different times); with a number,
    each worker's last window is EOS-padded and its last batch may be short.
    """

    def __init__(
        self,
        stream: Any,
        text_field: str,
        tokenize: DocumentTokenizer,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_windows: int = 1024,
        val_fraction: float = 0.0,
        epochs: int | None = None,
        docs_per_chunk: int = 128,
    ) -> None:
        self.stream, self.text_field, self.tokenize = stream, text_field, tokenize
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_windows, self.val_fraction, self.epochs = max(1, shuffle_windows), val_fraction, epochs
        self.docs_per_chunk = docs_per_chunk
        self._start: dict | None = None  # state to resume from at the next __iter__
        self._state: dict | None = None  # state after the last batch yielded

    # -- state (torchdata's Stateful protocol) ---------------------------------------------
    def state_dict(self) -> dict:
        return dict(self._state or self._start or self._fresh_state())

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise MerinoError(f"data state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        self._start, self._state = dict(state), None

    def _fresh_state(self) -> dict:
        g, n = worker_slot(self.rank, self.world_size)
        return {"format": STATE_FORMAT, "slot": [g, n], **asdict(Cursor()), "block": 0, "taken": 0, "done": False}

    # -- reading ------------------------------------------------------------------------------
    def _partition(self, epoch: int, g: int, n: int):
        from datasets.distributed import split_dataset_by_node

        strategy = "shards" if self.stream.num_shards >= n else "examples"
        part = split_dataset_by_node(self.stream, rank=g, world_size=n, strategy=strategy)
        # datasets shuffles the shard order from the epoch number (skipping it for 0): seed it
        part.set_epoch(int(rng_for(self.seed, epoch).integers(1, 2**31)))
        return part

    def _chunks(self, cur: Cursor, g: int, n: int) -> Iterator[tuple[int, dict | None, int, np.ndarray]]:
        """(epoch, state before the chunk, tokens to skip, token ids) for consecutive chunks."""
        epoch, state, skip = cur.epoch, cur.source, cur.skip
        while self.epochs is None or epoch < self.epochs:
            part = self._partition(epoch, g, n)
            if state is not None:
                part.load_state_dict(state)
            fresh, produced = state is None, False
            for docs in part.iter(batch_size=self.docs_per_chunk):
                after = part.state_dict()
                texts = [t for t in docs[self.text_field] if t and not is_heldout(t, self.val_fraction)]
                tokens = self.tokenize(texts)
                produced |= len(tokens) > 0
                yield epoch, state, skip, tokens
                state, skip = after, 0
            if fresh and not produced and self.epochs is None:
                raise MerinoError(
                    f"data worker {g} of {n} (ranks x DataLoader workers) got no training documents: "
                    "the source is too small to split that many ways; lower --data.num_workers or add data"
                )
            epoch, state, skip = epoch + 1, None, 0

    def _windows(self, cur: Cursor, g: int, n: int) -> Iterator[tuple[np.ndarray, Cursor | None]]:
        """Consecutive ``seq_len + 1`` windows, each with the cursor of the window after it."""
        size = self.seq_len + 1
        window, filled = np.empty(size, dtype=np.int32), 0
        for epoch, before, skip, tokens in self._chunks(cur, g, n):
            i = skip
            while i < len(tokens):
                take = min(size - filled, len(tokens) - i)
                window[filled : filled + take] = tokens[i : i + take]
                filled, i = filled + take, i + take
                if filled == size:
                    yield window.copy(), Cursor(epoch, before, i)
                    filled = 0
        if filled:  # finite passes only: pad the tail rather than drop it (no gap)
            window[filled:] = self.tokenize.eos_id
            yield window.copy(), None

    def __iter__(self) -> Iterator[torch.Tensor]:
        g, n = worker_slot(self.rank, self.world_size)
        st = self._start or self._fresh_state()
        self._start = None
        check_slot(st, g, n)
        if st["done"]:
            return
        cursor: Cursor | None = Cursor(st["epoch"], st["source"], st["skip"])
        block, taken = st["block"], st["taken"]
        windows = self._windows(cursor, g, n)
        batch: list[np.ndarray] = []
        while cursor is not None:
            items = list(itertools.islice(windows, self.shuffle_windows))
            if not items:
                break
            after = items[-1][1]  # the cursor after this block
            order = rng_for(self.seed, g, block).permutation(len(items))
            for k in range(taken, len(items)):
                batch.append(items[order[k]][0])
                if len(batch) == self.batch_size:
                    self._state = self._position(g, n, cursor, block, k + 1, len(items), after)
                    yield stack(batch)
                    batch = []
            cursor, block, taken = after, block + 1, 0
        if batch:
            self._state = self._position(g, n, None, block, 0, 0, None)
            yield stack(batch)

    def _position(
        self, g: int, n: int, start: Cursor | None, block: int, taken: int, size: int, after: Cursor | None
    ) -> dict:
        """State after a batch that ended ``taken`` windows into a block of ``size`` windows."""
        if taken == size:  # the block is used up: the next one starts at ``after``
            start, block, taken = after, block + 1, 0
        cur = start or Cursor()
        return {
            "format": STATE_FORMAT,
            "slot": [g, n],
            **asdict(cur),
            "block": block,
            "taken": taken,
            "done": start is None,
        }
