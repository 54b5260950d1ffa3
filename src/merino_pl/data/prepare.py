"""The prepare stage: ``prepare(PrepareSettings(source, out))`` tokenizes a text source once
into token shards (``merino-pl prepare SOURCE --out DIR`` parses its flags in ``data/cli.py``).

One process reads documents (the same ``datasets`` streaming path as training); a pool of
processes tokenizes batches of them (``tokenizers`` used one core per process here, so processes
are what reach all cores); the main process appends the ids, EOS after each document, to fixed-
size ``train`` / ``val`` shards (validation = documents held out by the same text hash as the
streaming path). After every shard the manifest is rewritten atomically with where each split
stands in the source (a ``datasets`` state); a re-run verifies the shards already written (size
and SHA-256), keeps the good prefix and continues from there.

Example::

    merino-pl prepare ../shared/data/corpus/tinyshakespeare.txt --out runs/shards/shakespeare
    merino-pl prepare EleutherAI/the_pile_deduplicated --out /data/pile-neox --workers 32
"""

from __future__ import annotations

# packing and shards import torch: they are imported inside the functions that use them, so that
# `merino-pl prepare --help` (and the worker-free parts of a run) start without it
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_path, check_out, sha256_file, write_json
from merino_pl.core.tokenizer import default_tokenizer_file, find_eos, load_tokenizer
from merino_pl.data.sources import Flags, check_text_field, open_stream, resolve_source

if TYPE_CHECKING:
    from merino_pl.data.packing import DocumentTokenizer

FLAGS = Flags(source="SOURCE", text_field="--text-field")  # the options hints name here

SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB of uint16 per file
_ENCODE: DocumentTokenizer | None = None


@dataclass
class PrepareSettings:
    """One ``prepare`` run, as ``merino-pl prepare``'s flags give it (same names, same defaults)."""

    source: str  # hub dataset name, local txt/jsonl/parquet file, glob or directory, or 'embedded'
    out: str  # output directory (re-running continues an interrupted run)
    tokenizer: str | None = None  # tokenizer.json path / folder / hub name (None: shipped GPT-NeoX-20B)
    text_field: str = "text"  # column holding the text (jsonl / parquet)
    sample_by: str = "paragraph"  # .txt: what one document is (line, paragraph, document)
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_fraction: float = 0.01  # fraction of documents held out (by text hash) for validation
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # tokenizer processes
    docs_per_batch: int = 256  # documents sent to a worker at once
    max_shards: int | None = None  # stop after this many train shards (a later run continues)


@dataclass
class Position:
    """Where the first token not yet in a finished shard of a split comes from: source batch
    ``batch`` (``state`` = the ``datasets`` state before it), ``skip`` ids into that batch's output;
    ``docs`` = documents of this split in the batches before it."""

    batch: int = 0
    state: dict | None = None
    skip: int = 0
    docs: int = 0


@dataclass
class SplitWriter:
    """Appends a split's token ids and writes a shard file whenever ``shard_tokens`` are buffered."""

    out: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    entries: list = field(default_factory=list)
    resume: Position = field(default_factory=Position)

    def __post_init__(self) -> None:
        self.pieces: deque[tuple[Position, np.ndarray]] = deque()  # buffered ids and where they start
        self.buffered = self.new_tokens = 0
        self.next = self.resume  # the position after everything added so far

    def add(self, batch: int, before: dict | None, after: dict | None, ids: np.ndarray, docs: int) -> None:
        """Batch ``batch``'s ids (``before`` / ``after``: the source state around it)."""
        if batch < self.resume.batch:
            return  # already in finished shards
        skip = self.resume.skip if batch == self.resume.batch else 0
        if len(ids) > skip:
            self.pieces.append((Position(batch, before, skip, self.next.docs), ids[skip:]))
            self.buffered += len(ids) - skip
        self.next = Position(batch + 1, after, 0, self.next.docs + docs)

    def full(self) -> bool:
        return self.buffered >= self.shard_tokens

    def write_shard(self) -> None:
        """Write the next ``shard_tokens`` ids (fewer for a split's last shard) as one file."""
        from merino_pl.data.shards import shard_name

        n = min(self.buffered, self.shard_tokens)
        if n == 0:
            return
        parts, need = [], n
        while need:
            pos, ids = self.pieces.popleft()
            take = min(need, len(ids))
            parts.append(ids[:take])
            if take < len(ids):
                self.pieces.appendleft((Position(pos.batch, pos.state, pos.skip + take, pos.docs), ids[take:]))
            need -= take
        self.buffered -= n
        self.new_tokens += n
        path = self.out / shard_name(self.split, len(self.entries))
        with atomic_path(path) as tmp:
            np.concatenate(parts).astype(self.dtype).tofile(tmp)
        end = self.pieces[0][0] if self.pieces else self.next
        self.entries.append({"file": path.name, "tokens": int(n), "sha256": sha256_file(path), "end": asdict(end)})


def _init_worker(tokenizer: str | None, eos_id: int) -> None:
    from merino_pl.data.packing import DocumentTokenizer

    global _ENCODE
    _ENCODE = DocumentTokenizer(tokenizer, eos_id)


def _encode(texts: list[str], val_fraction: float) -> dict[str, tuple[np.ndarray, int]]:
    """One batch of documents -> {split: (ids with EOS after each doc, documents)}."""
    from merino_pl.data.packing import is_heldout

    assert _ENCODE is not None
    held = [is_heldout(t, val_fraction) for t in texts]
    out = {}
    for split, keep in (("train", False), ("val", True)):
        docs = [t for t, h in zip(texts, held) if t and h == keep]
        out[split] = (_ENCODE(docs), len(docs))
    return out


def _check_args(args: PrepareSettings) -> None:
    problems = []
    if args.shard_tokens < 1:
        problems.append(f"--shard-tokens {args.shard_tokens} (must be >= 1)")
    if not 0.0 <= args.val_fraction < 1.0:
        problems.append(f"--val-fraction {args.val_fraction} (must be in [0, 1))")
    if args.workers < 1:
        problems.append(f"--workers {args.workers} (must be >= 1)")
    if args.docs_per_batch < 1:
        problems.append(f"--docs-per-batch {args.docs_per_batch} (must be >= 1)")
    if args.max_shards is not None and args.max_shards < 1:
        problems.append(f"--max-shards {args.max_shards} (must be >= 1)")
    problems += check_out(args.out)  # a file, or a folder that cannot be written
    if problems:
        raise MerinoError("bad arguments: " + "; ".join(problems))


def _settings(args: PrepareSettings, source_files: tuple[str, ...]) -> dict:
    from merino_pl.data.shards import SHARDS_FORMAT, token_dtype, tokenizer_sha256

    tok = load_tokenizer(args.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = find_eos(tok, args.tokenizer)  # the same rule as the streaming DataModule
    return {
        "format": SHARDS_FORMAT,
        "source": args.source,
        "source_files": list(source_files),
        "text_field": args.text_field,
        "sample_by": args.sample_by,
        "tokenizer": str(args.tokenizer or default_tokenizer_file()),
        "tokenizer_sha256": tokenizer_sha256(args.tokenizer),
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": token_dtype(vocab).name,
        "shard_tokens": args.shard_tokens,
        "val_fraction": args.val_fraction,
    }


def _resume(out: Path, settings: dict) -> tuple[dict[str, list], dict[str, Position]]:
    """Shards and positions to continue from: the verified prefix of each split."""
    from merino_pl.data.shards import MANIFEST, read_manifest, verify_shard

    entries = {s: [] for s in SPLITS}
    positions = {s: Position() for s in SPLITS}
    if not (out / MANIFEST).exists():
        return entries, positions
    old = read_manifest(out)
    changed = [k for k in settings if k != "tokenizer" and old.get(k) != settings[k]]
    if changed:
        raise MerinoError(
            f"{out} holds shards made with other settings ({', '.join(changed)}); use a new --out or delete it"
        )
    dtype = np.dtype(settings["dtype"])
    for split in SPLITS:
        for entry in old["splits"].get(split, []):
            try:
                verify_shard(out, entry, dtype)
            except MerinoError as e:
                print(f"prepare: {e}; rewriting from there")
                break
            entries[split].append(entry)
            positions[split] = Position(**entry["end"])
    return entries, positions


def prepare(args: PrepareSettings) -> dict:
    """The stage's entry function: check ``args`` (every problem in one ``MerinoError``), then
    tokenize the source into shards under ``args.out``, continuing a run left there. Returns the
    manifest written last (``complete`` is False when it stopped at ``max_shards``)."""
    _check_args(args)
    source = resolve_source(args.source)
    out = Path(args.out)
    settings = _settings(args, source.files)
    stream = open_stream(source, sample_by=args.sample_by, flags=FLAGS)
    check_text_field(stream, source, args.text_field, flags=FLAGS)
    entries, positions = _resume(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(settings["dtype"])
    writers = {s: SplitWriter(out, s, dtype, args.shard_tokens, entries[s], positions[s]) for s in SPLITS}
    start = min(positions.values(), key=lambda p: p.batch)
    print(
        f"prepare: {source.describe()} -> {out} ({len(entries['train'])} train shard(s) kept); {args.workers} worker(s)"
    )
    t0 = time.perf_counter()
    complete = _tokenize(args, source.field(args.text_field), stream, start, writers, settings)
    manifest = _write_manifest(out, settings, writers, complete)
    seconds = time.perf_counter() - t0
    new = sum(w.new_tokens for w in writers.values())
    print(
        f"prepare: {'done' if complete else 'stopped (--max-shards; re-run to continue)'}: "
        f"train {manifest['tokens']['train']:,} tokens in {len(manifest['splits']['train'])} shard(s), "
        f"val {manifest['tokens']['val']:,}; {new:,} tokens this run in {seconds:.1f} s "
        f"({new / max(seconds, 1e-9) / 1e6:.2f} M tokens/s)"
    )
    return manifest


def _tokenize(args: PrepareSettings, text_field: str, stream, start: Position, writers: dict, settings: dict) -> bool:
    """Feed source batches to the pool (at most 2 per worker in flight, so memory stays flat);
    write shards in source order. True when the source is exhausted, False at --max-shards."""
    out = Path(args.out)
    if start.state is not None:
        stream.load_state_dict(start.state)
    pool = mp.get_context("fork").Pool(args.workers, _init_worker, (args.tokenizer, settings["eos_id"]))
    pending: deque = deque()
    bar = tqdm(unit="tok", unit_scale=True, desc="prepare", mininterval=1.0)

    def drain_one() -> bool:
        batch, before, after, result = pending.popleft()
        for split, (ids, docs) in result.get().items():
            writers[split].add(batch, before, after, ids, docs)
            bar.update(len(ids))
        for w in writers.values():
            while w.full():
                w.write_shard()
                _write_manifest(out, settings, writers, complete=False)
                if args.max_shards is not None and len(writers["train"].entries) >= args.max_shards:
                    return False
        return True

    try:
        batch, before = start.batch, start.state
        for docs in stream.iter(batch_size=args.docs_per_batch):
            after = stream.state_dict()
            pending.append((batch, before, after, pool.apply_async(_encode, (docs[text_field], args.val_fraction))))
            batch, before = batch + 1, after
            if len(pending) >= 2 * args.workers and not drain_one():
                return False
        while pending:
            if not drain_one():
                return False
        for w in writers.values():
            while w.buffered:
                w.write_shard()
        return True
    finally:
        bar.close()
        pool.terminate()


def _write_manifest(out: Path, settings: dict, writers: dict, complete: bool) -> dict:
    from merino_pl.data.shards import MANIFEST

    manifest = {
        **settings,
        "complete": complete,
        "tokens": {s: sum(e["tokens"] for e in w.entries) for s, w in writers.items()},
        "documents": {s: w.next.docs for s, w in writers.items()},
        "splits": {s: w.entries for s, w in writers.items()},
    }
    write_json(out / MANIFEST, manifest)
    return manifest
