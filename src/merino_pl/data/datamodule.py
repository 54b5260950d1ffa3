"""``PileDataModule``: the one LightningDataModule for streaming text and pre-tokenized shards.

Training batches are ``LongTensor (batch_size, seq_len + 1)``: inputs ``[:, :-1]``, targets
``[:, 1:]``. Validation batches have the same shape and come from documents held out by a hash
of their text (``val_fraction``), which training never sees.

Exact resume: the training loader is a torchdata ``StatefulDataLoader`` whose ``state_dict``
holds every rank's position (gathered across ranks, because Lightning saves the checkpoint from
rank 0 only) and whose ``load_state_dict`` picks this rank's; Lightning 2.x stores it in the
checkpoint and restores it before the first batch. From shards, the position is one cursor for
the whole job, so a run resumes exactly on another world size or ``num_workers``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from merino_pl.core.errors import MerinoError
from merino_pl.core.tokenizer import find_eos, load_tokenizer
from merino_pl.data.packing import DocumentTokenizer, PackedStream, is_heldout
from merino_pl.data.shards import ShardStream, TokenFiles, token_dtype, tokenizer_sha256
from merino_pl.data.sources import check_text_field, open_stream, resolve_source
from merino_pl.data.valset import load_or_build, val_key

log = logging.getLogger(__name__)
LOADER_FORMAT = "merino-loader/1"


class RankStatefulDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state holds the positions of all ranks, as of the last
    batch the training step actually used.

    - Lightning calls ``state_dict`` on every rank while saving (and writes rank 0's
      checkpoint), so the per-rank states are gathered here; ``load_state_dict`` takes this
      rank's entry.
    - Lightning fetches one batch ahead of the training step; a checkpoint taken after step k
      would otherwise resume at k + 2. ``ConsumedBatches`` (added to the Trainer by the
      DataModule) reports each used batch, and the state of that moment is returned.
    - Shards (``ShardStream``): the state also holds ``cursor``, the job's position in the
      window sequence (ranks consume batches in lockstep, so the used batches are exactly the
      first ones of the sequence). Resuming restarts every rank and worker from it, for any
      world size and ``num_workers`` (elastic exact resume); streaming needs both unchanged.
    """

    def __init__(self, *args: Any, rank: int = 0, world_size: int = 1, resume: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world_size, self.resume = rank, world_size, resume
        self.track_consumption = False
        self._history: deque[dict] = deque(maxlen=16)  # states after each of the last yielded batches
        self._yielded = self._consumed = 0
        self._start = 0  # shards: where the current iterator's global batch 0 begins
        self._iterators = 0

    def _get_iterator(self) -> Any:
        if isinstance(self.dataset, ShardStream):
            if self._iterators:  # a later pass over the loader continues where the last one ended
                self._start += self._yielded * self.world_size * self.dataset.batch_size
            self.dataset.rebase(self._start)  # workers get this copy when the iterator starts them
        self._iterators += 1
        return super()._get_iterator()

    def __iter__(self) -> Iterator[torch.Tensor]:
        inner = super().__iter__()
        self._history.clear()
        self._history.append(inner.state_dict())
        self._yielded = self._consumed = 0
        return self._tracked(inner)

    def _tracked(self, inner: Iterator) -> Iterator[torch.Tensor]:
        for batch in inner:
            self._yielded += 1
            self._history.append(self._iterator.state_dict())
            yield batch

    def mark_consumed(self) -> None:
        self.track_consumption = True
        self._consumed += 1

    def _local_state(self) -> tuple[int, dict]:
        """(batches used, loader state after them) of this rank."""
        ahead = self._yielded - self._consumed
        if self.track_consumption and 0 < ahead < len(self._history):
            return self._consumed, self._history[-1 - ahead]
        return self._yielded, super().state_dict()

    def state_dict(self) -> dict:
        used, local = self._local_state()
        states = [(used, local)]
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * self.world_size
            torch.distributed.all_gather_object(states, (used, local))
        state = {"format": LOADER_FORMAT, "world_size": self.world_size, "ranks": [s for _, s in states]}
        if isinstance(self.dataset, ShardStream):
            state["cursor"] = self._start + sum(u for u, _ in states) * self.dataset.batch_size
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not self.resume:
            return
        if state_dict.get("format") != LOADER_FORMAT:  # a plain StatefulDataLoader state
            return super().load_state_dict(state_dict)
        if isinstance(self.dataset, ShardStream):
            if state_dict.get("cursor") is None:
                raise MerinoError(
                    "the checkpoint's shard position was saved by an older merino-pl (no data cursor): "
                    "pass --data.resume false to restart the data stream"
                )
            self._start, self._iterators = int(state_dict["cursor"]), 0
            return super().load_state_dict({})  # a fresh iterator, rebased at the cursor
        ranks = state_dict["ranks"]
        if len(ranks) != self.world_size:
            raise MerinoError(
                f"data position was saved with {len(ranks)} rank(s) but this run has {self.world_size}: "
                "exact resume from a stream needs the same world size (pre-tokenize with `merino-pl prepare` "
                "and train from --data.shards to resume on any, or --data.resume false to restart the data stream)"
            )
        super().load_state_dict(ranks[self.rank])


class ConsumedBatches(L.Callback):
    """Tells the DataModule's training loader which batches the training step has used."""

    def __init__(self, datamodule: PileDataModule) -> None:
        self.datamodule = datamodule

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (loader := self.datamodule._train_loader) is not None:
            loader.mark_consumed()


class PileDataModule(L.LightningDataModule):
    """Streams (or reads pre-tokenized shards of) a text source, packed into LM windows.

    Args:
        source: hub dataset name (streamed), local file / glob / directory of txt, jsonl or
            parquet (comma-separated for several), or ``"embedded"`` (the shipped corpus).
        text_field: the column holding the text (jsonl / parquet).
        tokenizer: ``tokenizer.json`` path, folder or hub name; None = shipped GPT-NeoX-20B.
        seq_len: tokens per training sequence; batches hold ``seq_len + 1`` tokens per row.
        batch_size: sequences per batch, per device.
        num_workers: DataLoader worker processes per device (each tokenizes on one core).
        seed: seeds the shuffle (shard order, window permutation).
        shards: a directory written by ``merino-pl prepare``; when set, read it instead of
            streaming ``source``.
        val_fraction: fraction of documents (by a hash of their text) held out for validation.
        val_sequences: validation sequences in all (split across ranks); 0 = no validation.
        shuffle_windows: streaming: windows permuted together (a block; memory and the resume
            cost are one block per worker).
        sample_by: .txt files: one document per ``line``, ``paragraph`` or whole ``document``.
        epochs: passes over the data before the training loader ends; None = stream forever
            (train with ``max_steps``; with several devices keep None so ranks stay in step).
        resume: restore the data position from a checkpoint (False restarts the stream).
        verify_shards: SHA-256 of every shard at setup (a full read of the data on every rank;
            ``merino-pl prepare --verify DIR`` does it once). Every start checks each shard's
            size and its first and last 4 KiB against the manifest, whatever this is.
        verify_sample: SHA-256 of this many shards at setup, a different sample on each rank.
        val_cache: folder for the streaming validation set, built once by rank 0 and read by
            every rank and restart; None = ``<trainer default_root_dir>/data`` under a Trainer,
            else built in memory.
    """

    def __init__(
        self,
        source: str = "EleutherAI/the_pile_deduplicated",
        text_field: str = "text",
        tokenizer: str | None = None,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 1234,
        shards: str | None = None,
        val_fraction: float = 0.01,
        val_sequences: int = 256,
        shuffle_windows: int = 1024,
        sample_by: Literal["line", "paragraph", "document"] = "paragraph",
        epochs: int | None = None,
        resume: bool = True,
        verify_shards: bool = False,
        verify_sample: int = 0,
        val_cache: str | None = None,
    ) -> None:
        super().__init__()
        # plain strings in the checkpoint: torch.load(weights_only=True) refuses pathlib objects
        source, shards = str(source), None if shards is None else str(shards)
        val_cache = None if val_cache is None else str(val_cache)
        tokenizer = None if tokenizer is None else str(tokenizer)
        self.save_hyperparameters()
        self._check_arguments()
        self.tok = load_tokenizer(tokenizer)
        self.vocab_size: int = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id: int = find_eos(self.tok, self.hparams.tokenizer)
        self._rank_override: tuple[int, int] | None = None
        self._stream = None
        self._files: TokenFiles | None = None
        self._val: torch.Tensor | None = None
        self._train_loader: RankStatefulDataLoader | None = None

    # -- checks -------------------------------------------------------------------------------
    def _check_arguments(self) -> None:
        h = self.hparams
        problems = []
        for name in ("seq_len", "batch_size", "shuffle_windows"):
            if int(h[name]) < 1:
                problems.append(f"{name}={h[name]} (must be >= 1)")
        for name in ("num_workers", "val_sequences", "verify_sample"):
            if int(h[name]) < 0:
                problems.append(f"{name}={h[name]} (must be >= 0)")
        if not 0.0 <= h.val_fraction < 1.0:
            problems.append(f"val_fraction={h.val_fraction} (must be in [0, 1))")
        if h.epochs is not None and h.epochs < 1:
            problems.append(f"epochs={h.epochs} (must be >= 1, or None to stream forever)")
        if h.sample_by not in ("line", "paragraph", "document"):
            problems.append(f"sample_by={h.sample_by!r} (valid: line, paragraph, document)")
        if problems:
            raise MerinoError("bad data arguments: " + "; ".join(problems))

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise ``MerinoError`` when token ids could exceed the model's embedding table."""
        if self.vocab_size > model_vocab_size:
            raise MerinoError(
                f"tokenizer {self.hparams.tokenizer or 'gpt-neox-20b (default)'} "
                f"has {self.vocab_size} ids but the model's "
                f"vocab_size is {model_vocab_size}: "
                f"use a recipe with vocab_size >= {self.vocab_size} or a smaller tokenizer"
            )

    # -- distribution ---------------------------------------------------------------------------
    def set_rank(self, rank: int, world_size: int) -> None:
        """Pretend to be ``rank`` of ``world_size`` (tests; tools that shard without a Trainer)."""
        if not 0 <= rank < world_size:
            raise MerinoError(f"rank {rank} is not in [0, {world_size})")
        self._rank_override = (rank, world_size)

    def rank_world(self) -> tuple[int, int]:
        if self._rank_override is not None:
            return self._rank_override
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._stream is not None or self._files is not None:
            return
        h = self.hparams
        if h.shards:
            rank = self.rank_world()[0]
            self._files = TokenFiles(h.shards, "train", h.verify_shards, h.verify_sample, seed=h.seed + rank)
            self._check_shard_tokenizer(self._files.manifest)
            log.info("data: %s train tokens from shards in %s", f"{self._files.total:,}", h.shards)
            return
        source = resolve_source(h.source)
        stream = open_stream(source, sample_by=h.sample_by)
        check_text_field(stream, source, h.text_field)
        self._source, self._stream = source, stream
        log.info("data: streaming %s", source.describe())

    def _check_shard_tokenizer(self, manifest: dict) -> None:
        if manifest["tokenizer_sha256"] != tokenizer_sha256(self.hparams.tokenizer):
            raise MerinoError(
                f"shards in {self.hparams.shards} were tokenized with {manifest['tokenizer']}, not with "
                f"{self.hparams.tokenizer or 'the default tokenizer'}: pass --data.tokenizer {manifest['tokenizer']}"
            )

    def tokenize(self) -> DocumentTokenizer:
        return DocumentTokenizer(self.hparams.tokenizer, self.eos_id)

    def train_dataset(self) -> PackedStream | ShardStream:
        self.setup()
        h = self.hparams
        rank, world = self.rank_world()
        if self._files is not None:
            return ShardStream(self._files, h.seq_len, h.batch_size, h.seed, self.eos_id, rank, world, h.epochs)
        return PackedStream(
            self._stream,
            self._source.field(h.text_field),
            self.tokenize(),
            h.seq_len,
            h.batch_size,
            h.seed,
            rank=rank,
            world_size=world,
            shuffle_windows=h.shuffle_windows,
            val_fraction=h.val_fraction,
            epochs=h.epochs,
        )

    def train_dataloader(self) -> RankStatefulDataLoader:
        rank, world = self.rank_world()
        workers = self.hparams.num_workers
        self._train_loader = RankStatefulDataLoader(
            self.train_dataset(),
            batch_size=None,
            num_workers=workers,
            rank=rank,
            world_size=world,
            resume=self.hparams.resume,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, ConsumedBatches) for c in trainer.callbacks):
            trainer.callbacks.append(ConsumedBatches(self))
        return self._train_loader

    def val_dataloader(self) -> Any:
        windows = self.validation_windows()
        if windows is None:
            return []
        return torch.utils.data.DataLoader(windows, batch_size=self.hparams.batch_size, shuffle=False)

    def test_dataloader(self) -> Any:
        """``merino-pl test`` scores the same held-out windows as validation."""
        return self.val_dataloader()

    # -- validation -----------------------------------------------------------------------------
    def validation_windows(self) -> torch.Tensor | None:
        """This rank's validation sequences ``(n, seq_len + 1)``, the same count on every rank."""
        h = self.hparams
        if h.val_sequences == 0 or (h.val_fraction == 0 and not h.shards):
            return None
        if self._val is None:
            self._val = self._heldout_windows()
        rank, world = self.rank_world()
        per_rank = len(self._val) // world
        if per_rank == 0:
            raise MerinoError(
                f"validation hold-out too small: {len(self._val)} sequence(s) of {h.seq_len + 1} tokens "
                f"for {world} rank(s); "
                "raise --data.val_fraction, lower --data.seq_len, or set --data.val_sequences 0"
            )
        return self._val[rank * per_rank : (rank + 1) * per_rank]

    def _heldout_windows(self) -> torch.Tensor:
        """Pack held-out documents, in source order, into at most ``val_sequences`` windows."""
        self.setup()
        h = self.hparams
        size, need = h.seq_len + 1, h.val_sequences * (h.seq_len + 1)
        if self._files is not None:  # prepare held the same documents out into the val split
            val = TokenFiles(h.shards, "val", full=h.verify_shards)
            tokens = val.read(0, min(need, val.total - val.total % size)) if val.total else np.empty(0, np.int32)
            return torch.from_numpy(tokens.astype(np.int64).reshape(-1, size))
        folder = self._val_folder()
        if folder is None:
            return torch.from_numpy(self._scan_heldout().astype(np.int64))
        key = val_key(
            self._source,
            tokenizer_sha256(h.tokenizer),
            text_field=h.text_field,
            sample_by=h.sample_by,
            val_fraction=h.val_fraction,
            seq_len=h.seq_len,
            val_sequences=h.val_sequences,
        )
        windows, how = load_or_build(folder, key, self._scan_heldout, rank=self.rank_world()[0])
        log.info("data: validation set %s (%d windows) in %s", how, len(windows), folder)
        return torch.from_numpy(windows.astype(np.int64))

    def _val_folder(self) -> str | None:
        if self.hparams.val_cache is not None:
            return self.hparams.val_cache
        trainer = self.trainer
        return None if trainer is None else os.path.join(trainer.default_root_dir, "data")

    def _scan_heldout(self) -> np.ndarray:
        """The first held-out documents of the source, in order, packed into windows (the
        token dtype of the shards: 2 bytes a token with the default tokenizer)."""
        h = self.hparams
        size, need = h.seq_len + 1, h.val_sequences * (h.seq_len + 1)
        field, tokenize = self._source.field(h.text_field), self.tokenize()
        parts, have = [], 0
        for docs in self._stream.iter(batch_size=256):
            tokens = tokenize([t for t in docs[field] if t and is_heldout(t, h.val_fraction)])
            parts.append(tokens)
            have += len(tokens)
            if have >= need:
                break
        tokens = np.concatenate(parts or [np.empty(0, np.int32)])[:need]
        n = len(tokens) // size
        return tokens[: n * size].astype(token_dtype(self.vocab_size)).reshape(n, size)

    # -- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the data position depends on; checked on restore (the position itself travels
        with the training loader's state, which Lightning saves)."""
        h = self.hparams
        keys = (
            "source",
            "shards",
            "tokenizer",
            "seq_len",
            "batch_size",
            "num_workers",
            "seed",
            "shuffle_windows",
            "val_fraction",
        )
        return {"format": "merino-data/1", **{k: h[k] for k in keys}, "world_size": self.rank_world()[1]}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self.hparams.resume:
            return
        now = self.state_dict()
        elastic = ("world_size", "num_workers")  # shards resume on any (RankStatefulDataLoader)
        changed = [f"{k}: {state_dict[k]!r} -> {now[k]!r}" for k in now if k in state_dict and state_dict[k] != now[k]]
        if self.hparams.shards:
            changed = [c for c in changed if not c.startswith(elastic)]
        elif any(c.startswith(elastic) for c in changed):
            raise MerinoError(
                "cannot resume a streamed data source exactly on another number of readers ("
                + "; ".join(c for c in changed if c.startswith(elastic))
                + "): each rank and worker holds its own "
                "place in its own part of the source; resume with the same --trainer.devices / --data.num_workers, "
                "pre-tokenize with `merino-pl prepare` and train from --data.shards (resumes on any), "
                "or pass --data.resume false to restart the data stream"
            )
        if changed:
            raise MerinoError(
                "cannot resume the data stream exactly, its settings changed (" + "; ".join(changed) + "); "
                "restore them or pass --data.resume false to restart the data stream"
            )
