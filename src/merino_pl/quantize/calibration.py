"""Calibration samples: ``nsamples`` random windows of ``seq_len`` tokens from a text source.

GPTQ's recipe (random fixed-length segments of pretraining-like text) on the sources the data
stage reads: ``"embedded"`` (the corpus shipped in the package, the default), a ``.txt`` file, a
``.jsonl`` / ``.json`` / ``.parquet`` file (its ``text_field``), a glob, or a directory of those.
A few extra windows beyond the calibration set are kept aside as a held-out check.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator

import torch

from merino_pl.errors import MerinoError
from merino_pl.tokenizer import default_corpus_file, load_tokenizer

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve_files(source: str) -> list[Path]:
    """The files a source names; raises ``MerinoError`` when it names none."""
    if source == "embedded":
        return [default_corpus_file()]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix in SUFFIXES)
    elif path.exists():
        files = [path] if path.suffix in SUFFIXES else []
        if not files:
            raise MerinoError(f"calibration source {source}: unsupported file type (valid: {', '.join(SUFFIXES)})")
    else:
        raise MerinoError(f"calibration source {source!r} not found (a file, glob, directory, or 'embedded')")
    if not files:
        raise MerinoError(f"calibration source {source!r} holds no {'/'.join(SUFFIXES)} files")
    return files


def _texts(files: list[Path], text_field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pieces of the files in order; ``datasets`` streams json / parquet."""
    for f in files:
        if f.suffix == ".txt":  # one document, read in ~64 KB pieces so a big file stops early
            with open(f, encoding="utf-8", errors="replace") as fh:
                piece = fh.read(1 << 16)
                while piece:
                    piece += fh.readline()
                    nxt = fh.read(1 << 16)
                    yield piece, not nxt
                    piece = nxt
            continue
        from datasets import load_dataset

        ds = load_dataset(SUFFIXES[f.suffix], data_files=str(f), split="train", streaming=True)
        for row in ds:
            if text_field not in row:
                raise MerinoError(f"{f}: no field {text_field!r} (fields: {', '.join(row)}); pass --calib-text-field")
            yield row[text_field], True


def calibration_tokens(
    source: str, nsamples: int, seq_len: int, holdout: int = 0, tokenizer: str | None = None,
    text_field: str = "text", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nsamples, seq_len) calibration ids and (holdout, seq_len) held-out ids, disjoint windows.

    Documents are joined with EOS into one stream (as pretraining sees them) until enough tokens
    are read for 4× the windows needed, then windows are drawn at random non-overlapping offsets.
    """
    tok = load_tokenizer(tokenizer)
    eos = tok.token_to_id("<|endoftext|>")
    need = (nsamples + holdout) * seq_len
    stream: list[int] = []
    for text, end_of_doc in _texts(resolve_files(source), text_field):
        if text and text.strip():
            stream += tok.encode(text).ids
        if end_of_doc and eos is not None and stream:
            stream.append(eos)
        if len(stream) >= 4 * need:
            break
    if not stream:
        raise MerinoError(f"calibration source {source!r} is empty (no text)")
    slots = len(stream) // seq_len
    if slots < nsamples + holdout:
        raise MerinoError(
            f"calibration source {source!r} has {len(stream)} tokens: fewer than --nsamples {nsamples} "
            f"(+{holdout} held out) windows of --seq-len {seq_len}"
        )
    ids = torch.tensor(stream[: slots * seq_len]).view(slots, seq_len)
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))
    return ids[order[:nsamples]], ids[order[nsamples : nsamples + holdout]]
