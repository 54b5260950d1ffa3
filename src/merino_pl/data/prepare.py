"""The prepare stage: ``prepare(PrepareSettings(source, out))`` tokenizes a text source once
into token shards (``merino-pl prepare SOURCE --out DIR`` parses its flags in ``data/cli.py``).

One process reads documents (the same ``datasets`` streaming path as training); a pool of
processes tokenizes batches of them (``tokenizers`` used one core per process here, so processes
are what reach all cores); the main process appends the ids, EOS after each document, to fixed-
size ``train`` / ``val`` shards (validation = documents held out by the same text hash as the
streaming path). After every shard the manifest is rewritten atomically with where each split
stands in the source (a ``datasets`` state); a re-run verifies the shards already written (size
and SHA-256), keeps the good prefix and continues from there.

Distributed: ``--num-tasks N --task-index I`` (or a SLURM array's variables) tokenizes the I-th
contiguous block of the source's files into ``OUT/part-0000I/``; ``merino-pl prepare --merge OUT``
then lists the parts' shards, in part order, in one manifest (``shardset.merge``): the same
token stream as a one-task run.

Example::

    merino-pl prepare data/my-corpus.txt --out runs/shards/my-corpus
    merino-pl prepare EleutherAI/the_pile_deduplicated --out /data/pile-neox --workers 32
    merino-pl prepare EleutherAI/the_pile_deduplicated --out /data/pile-neox --num-tasks 64 --task-index 0
    merino-pl prepare --merge /data/pile-neox
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
from merino_pl.core.io import atomic_path, check_out, write_json
from merino_pl.core.tokenizer import default_tokenizer_file, find_eos, load_tokenizer
from merino_pl.data.shardset import part_name
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
    num_tasks: int | None = None  # split the source into this many parts (None: SLURM_ARRAY_TASK_COUNT, else 1)
    task_index: int | None = None  # the part this run writes (None: SLURM_ARRAY_TASK_ID, else 0)


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
        from merino_pl.data.shardset import shard_entry, shard_name

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
        data = np.concatenate(parts).astype(self.dtype)
        with atomic_path(path) as tmp:
            data.tofile(tmp)
        end = self.pieces[0][0] if self.pieces else self.next
        self.entries.append(shard_entry(path, data, end=asdict(end)))  # hashed once, here


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


def _env_int(name: str, problems: list[str]) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        problems.append(f"{name}={value!r} (not an integer)")
        return None


def resolve_task(settings: PrepareSettings, problems: list[str]) -> tuple[int, int]:
    """(number of tasks, this task's index): the flags, else SLURM's array variables
    (``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_ID``), else (1, 0); problems are appended.

    The index is the array index itself, so ``--array=3,5 ... --num-tasks 8`` re-runs parts 3
    and 5 of an 8-task run (an index taken relative to the array's first would silently redo 0
    and 2); a full run is ``--array=0-(N-1)``."""
    n = settings.num_tasks
    n_from = "--num-tasks" if n is not None else "SLURM_ARRAY_TASK_COUNT"
    if n is None:
        n = _env_int("SLURM_ARRAY_TASK_COUNT", problems) or 1
    if n < 1:
        problems.append(f"{n_from} {n} (must be >= 1)")
        return n, 0
    if settings.task_index is not None:
        if not 0 <= settings.task_index < n:
            problems.append(f"--task-index {settings.task_index} (must be in [0, {n}) for --num-tasks {n})")
        return n, settings.task_index
    task_id = _env_int("SLURM_ARRAY_TASK_ID", problems)
    if task_id is None:
        if n > 1:
            problems.append(f"--task-index is needed with --num-tasks {n} (or run as a SLURM array task)")
        return n, 0
    if not 0 <= task_id < n:
        problems.append(
            f"SLURM array task {task_id} is not in [0, {n}) ({n_from} {n}): submit --array=0-{n - 1}, "
            "or pass --num-tasks N to re-run some tasks of an N-task run"
        )
    return n, task_id


def _check_settings(settings: PrepareSettings) -> tuple[int, int]:
    problems = []
    if settings.shard_tokens < 1:
        problems.append(f"--shard-tokens {settings.shard_tokens} (must be >= 1)")
    if not 0.0 <= settings.val_fraction < 1.0:
        problems.append(f"--val-fraction {settings.val_fraction} (must be in [0, 1))")
    if settings.workers < 1:
        problems.append(f"--workers {settings.workers} (must be >= 1)")
    if settings.docs_per_batch < 1:
        problems.append(f"--docs-per-batch {settings.docs_per_batch} (must be >= 1)")
    if settings.max_shards is not None and settings.max_shards < 1:
        problems.append(f"--max-shards {settings.max_shards} (must be >= 1)")
    task = resolve_task(settings, problems)
    problems += check_out(settings.out)  # a file, or a folder that cannot be written
    if problems:
        raise MerinoError("bad arguments: " + "; ".join(problems))
    return task


def _recorded(settings: PrepareSettings, source_files: tuple[str, ...], task: tuple[int, int]) -> dict:
    """What the manifest records of the run; a re-run must match it (the tokenizer path aside)."""
    from merino_pl.data.shards import SHARDS_FORMAT, token_dtype, tokenizer_sha256

    tok = load_tokenizer(settings.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = find_eos(tok, settings.tokenizer)  # the same rule as the streaming DataModule
    recorded = {
        "format": SHARDS_FORMAT,
        "source": settings.source,
        "source_files": list(source_files),
        "text_field": settings.text_field,
        "sample_by": settings.sample_by,
        "tokenizer": str(settings.tokenizer or default_tokenizer_file()),
        "tokenizer_sha256": tokenizer_sha256(settings.tokenizer),
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": token_dtype(vocab).name,
        "shard_tokens": settings.shard_tokens,
        "val_fraction": settings.val_fraction,
    }
    if task[0] > 1:  # a one-task manifest stays as it always was
        recorded.update(num_tasks=task[0], task_index=task[1])
    return recorded


def _resume(out: Path, recorded: dict) -> tuple[dict[str, list], dict[str, Position]]:
    """Shards and positions to continue from: the verified prefix of each split."""
    from merino_pl.data.shards import MANIFEST, read_manifest, verify_shard

    entries = {s: [] for s in SPLITS}
    positions = {s: Position() for s in SPLITS}
    if not (out / MANIFEST).exists():
        return entries, positions
    old = read_manifest(out)
    if "parts" in old:
        raise MerinoError(
            f"{out} holds a shard set merged from {old['parts']} parts; write a one-task run to another --out "
            f"(a part is re-run with --num-tasks {old['parts']} --task-index I)"
        )
    keys = dict.fromkeys([*recorded, "num_tasks", "task_index"])  # a part's manifest is no one-task run's
    changed = [k for k in keys if k != "tokenizer" and old.get(k) != recorded.get(k)]
    if changed:
        raise MerinoError(
            f"{out} holds shards made with other settings ({', '.join(changed)}); use a new --out or delete it"
        )
    dtype = np.dtype(recorded["dtype"])
    for split in SPLITS:
        for entry in old["splits"].get(split, []):
            try:
                verify_shard(out, entry, dtype, checksum=True)  # a re-run of prepare: worth the full read
            except MerinoError as e:
                print(f"prepare: {e}; rewriting from there")
                break
            entries[split].append(entry)
            positions[split] = Position(**entry["end"])
    return entries, positions


def prepare(settings: PrepareSettings) -> dict:
    """The stage's entry function: check ``settings`` (every problem in one ``MerinoError``), then
    tokenize the source (or this task's part of it) into shards under ``settings.out`` (a part:
    ``out/part-0000I``), continuing a run left there. Returns the manifest written last
    (``complete`` is False when it stopped at ``max_shards``)."""
    task = _check_settings(settings)
    source = resolve_source(settings.source)
    stream = open_stream(source, sample_by=settings.sample_by, flags=FLAGS)
    stream = _task_part(stream, source, task)
    check_text_field(stream, source, settings.text_field, flags=FLAGS)
    out = Path(settings.out) / part_name(task[1]) if task[0] > 1 else Path(settings.out)
    recorded = _recorded(settings, source.files, task)
    entries, positions = _resume(out, recorded)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(recorded["dtype"])
    writers = {s: SplitWriter(out, s, dtype, settings.shard_tokens, entries[s], positions[s]) for s in SPLITS}
    start = min(positions.values(), key=lambda p: p.batch)
    what = f"part {task[1]} of {task[0]} of " if task[0] > 1 else ""
    print(
        f"prepare: {what}{source.describe()} -> {out} ({len(entries['train'])} train shard(s) kept); "
        f"{settings.workers} worker(s)"
    )
    t0 = time.perf_counter()
    complete = _tokenize(settings, out, source.field(settings.text_field), stream, start, writers, recorded)
    manifest = _write_manifest(out, recorded, writers, complete)
    seconds = time.perf_counter() - t0
    new = sum(w.new_tokens for w in writers.values())
    print(
        f"prepare: {'done' if complete else 'stopped (--max-shards; re-run to continue)'}: "
        f"train {manifest['tokens']['train']:,} tokens in {len(manifest['splits']['train'])} shard(s), "
        f"val {manifest['tokens']['val']:,}; {new:,} tokens this run in {seconds:.1f} s "
        f"({new / max(seconds, 1e-9) / 1e6:.2f} M tokens/s)"
    )
    if complete and task[0] > 1:
        print(f"prepare: when all {task[0]} parts are done: merino-pl prepare --merge {settings.out}")
    return manifest


def _task_part(stream, source, task: tuple[int, int]):
    """Task ``i`` of ``n``: the ``i``-th contiguous block of the source's files (``datasets``
    shards), so parts 0, 1, ... read back to back are the one-task stream, document for document."""
    n, i = task
    if n == 1:
        return stream
    if n > stream.num_shards:
        raise MerinoError(
            f"--num-tasks {n}: {source.spec} has {stream.num_shards} file(s) and a task tokenizes whole files; "
            f"use at most {stream.num_shards} tasks (or split the source into more files)"
        )
    return stream.shard(num_shards=n, index=i, contiguous=True)


def _tokenize(
    settings: PrepareSettings, out: Path, text_field: str, stream, start: Position, writers: dict, recorded: dict
) -> bool:
    """Feed source batches to the pool (at most 2 per worker in flight, so memory stays flat);
    write shards in source order. True when the source is exhausted, False at --max-shards."""
    if start.state is not None:
        stream.load_state_dict(start.state)
    pool = mp.get_context("fork").Pool(settings.workers, _init_worker, (settings.tokenizer, recorded["eos_id"]))
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
                _write_manifest(out, recorded, writers, complete=False)
                if settings.max_shards is not None and len(writers["train"].entries) >= settings.max_shards:
                    return False
        return True

    try:
        batch, before = start.batch, start.state
        for docs in stream.iter(batch_size=settings.docs_per_batch):
            after = stream.state_dict()
            job = pool.apply_async(_encode, (docs[text_field], settings.val_fraction))
            pending.append((batch, before, after, job))
            batch, before = batch + 1, after
            if len(pending) >= 2 * settings.workers and not drain_one():
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


def _write_manifest(out: Path, recorded: dict, writers: dict, complete: bool) -> dict:
    from merino_pl.data.shards import MANIFEST

    manifest = {
        **recorded,
        "complete": complete,
        "tokens": {s: sum(e["tokens"] for e in w.entries) for s, w in writers.items()},
        "documents": {s: w.next.docs for s, w in writers.items()},
        "splits": {s: w.entries for s, w in writers.items()},
    }
    write_json(out / MANIFEST, manifest)
    return manifest
