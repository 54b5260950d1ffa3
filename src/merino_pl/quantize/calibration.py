"""Calibration samples: ``nsamples`` random windows of ``seq_len`` tokens from a text source.

GPTQ's recipe (random fixed-length segments of pretraining-like text) on exactly the sources the
DataModule reads (``merino_pl.data.sources``): ``"embedded"`` (the corpus shipped in the package,
the default), local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files, globs, directories,
or a hub dataset name. Documents are tokenized and packed with EOS after each by the data
stage's own ``DocumentTokenizer``, as training sees them. A few
more windows than the calibration set are kept aside as a held-out check. Reading and tokenizing
shows a tqdm bar (tokens, rate, ETA): at the paper's sizes from the hub it takes minutes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from merino_pl.core.errors import MerinoError
from merino_pl.core.tokenizer import find_eos, load_tokenizer
from merino_pl.data import DocumentTokenizer
from merino_pl.data.sources import Flags, check_text_field, open_stream, resolve_source

if TYPE_CHECKING:
    import torch

POOL = 4  # read up to POOL x the tokens needed, then draw windows at random from them
FLAGS = Flags(source="--calib", text_field="--calib-text-field")  # what hints name here


def calibration_tokens(
    source: str,
    nsamples: int,
    seq_len: int,
    holdout: int = 0,
    tokenizer: str | None = None,
    text_field: str = "text",
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nsamples, seq_len) calibration ids and (holdout, seq_len) held-out ids: disjoint windows,
    drawn at random (``seed``) from the first ``POOL`` x (nsamples + holdout) x seq_len tokens
    (``progress``: a bar on stderr while they are read and tokenized)."""
    import torch

    src, stream = check_source(source, text_field)
    field = src.field(text_field)
    tokenize = DocumentTokenizer(tokenizer, find_eos(load_tokenizer(tokenizer), tokenizer))
    need = (nsamples + holdout) * seq_len
    chunks: list[np.ndarray] = []  # token ids of the documents read so far, EOS after each
    batch: list[str] = []
    count = 0
    bar = tqdm(
        total=POOL * need,
        desc="calibration text",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )  # a log file gets a line per 10 s, not per 0.1 s
    for row in stream:
        if row[field] and row[field].strip():
            batch.append(row[field])
        if len(batch) == 256:
            count = _extend(chunks, tokenize(batch), bar)
            batch = []
        if count >= POOL * need:
            break
    _extend(chunks, tokenize(batch), bar)
    if bar.n < bar.total:  # the source ended before the pool filled: that is all there is
        bar.total = bar.n
    bar.close()
    ids = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    if not len(ids):
        raise MerinoError(f"calibration source {source!r} is empty (no text in {src.describe()})")
    slots = len(ids) // seq_len
    if slots < nsamples + holdout:
        raise MerinoError(
            f"calibration source {source!r} has {len(ids)} tokens: fewer than --nsamples {nsamples} "
            f"(+{holdout} held out) windows of --seq-len {seq_len}"
        )
    windows = torch.from_numpy(ids[: slots * seq_len].astype(np.int64)).view(slots, seq_len)
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))
    # held-out windows first: the same ones whatever nsamples is (GPTQ and RTN reports compare)
    return windows[order[holdout : holdout + nsamples]], windows[order[:holdout]]


def check_source(source: str, text_field: str = "text") -> tuple[Any, Any]:
    """The calibration source resolved and opened, its text field checked (a ``MerinoError``
    naming ``--calib`` / ``--calib-text-field`` otherwise): (the source, its row stream)."""
    src = resolve_source(source)
    stream = open_stream(src, flags=FLAGS)
    check_text_field(stream, src, text_field, flags=FLAGS)
    return src, stream


def _extend(chunks: list[np.ndarray], ids: np.ndarray, bar: tqdm) -> int:
    """Append ``ids``; returns the tokens read so far."""
    chunks.append(ids)
    count = sum(map(len, chunks))
    bar.update(min(count, bar.total) - bar.n)  # the last batch may overshoot the pool
    return count
