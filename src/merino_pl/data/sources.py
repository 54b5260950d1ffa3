"""One place that turns a source string into a ``datasets`` streaming ``IterableDataset``.

A source is one of
- ``"embedded"``: the public-domain corpus shipped in the package (one document per paragraph);
- local files: a file, a glob (``data/*.jsonl``), a directory, or several joined by commas, of
  ``.txt`` (one document per blank-line-separated paragraph by default), ``.jsonl`` / ``.json``
  or ``.parquet`` (one document per row, text in ``text_field``); ``.gz`` / ``.zst`` allowed; a
  file named explicitly with any other extension is read as text if it is UTF-8 text;
- a hub dataset name (``EleutherAI/the_pile_deduplicated``), always streamed.

Every source goes through ``datasets.load_dataset(..., streaming=True)`` so that local test files
and the Pile take the same code path (one shard per file).
"""

from __future__ import annotations

import codecs
import glob
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from merino_pl.core.errors import MerinoError
from merino_pl.core.tokenizer import default_corpus_file

EMBEDDED = "embedded"
SampleBy = Literal["line", "paragraph", "document"]
# extension (after stripping a compression suffix) -> datasets' packaged builder
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".zst", ".bz2", ".xz")
HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Flags:
    """The options of the command at hand that hints name (fit's by default)."""

    source: str = "--data.source"
    text_field: str = "--data.text_field"

    def local_hint(self) -> str:
        hint = (
            f"to work offline, point {self.source} at local files, e.g. 'corpus/*.jsonl' (txt, jsonl or parquet; "
            f"{self.text_field} names the text column), or 'embedded' for the shipped corpus"
        )
        if self.source == FIT_FLAGS.source:
            hint += ", or pre-tokenize once with `merino-pl prepare` and pass --data.shards DIR"
        return hint


FIT_FLAGS = Flags()


@dataclass(frozen=True)
class Source:
    """A resolved source: a hub name, or a builder over a sorted list of local files."""

    spec: str
    builder: str | None  # None = hub dataset
    files: tuple[str, ...] = ()

    @property
    def is_hub(self) -> bool:
        return self.builder is None

    def field(self, text_field: str) -> str:
        """The column holding the text: always ``text`` for .txt files (datasets' text builder)."""
        return "text" if self.builder == "text" else text_field

    def describe(self) -> str:
        if self.is_hub:
            return f"hub dataset {self.spec}"
        return f"{len(self.files)} local {self.builder} file(s) from {self.spec}"


def _extension(path: str) -> str:
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _is_text(path: str, probe: int = 1 << 16) -> bool:
    """Whether a file reads as UTF-8 text (its first ``probe`` bytes; compressed: trusted)."""
    if Path(path).suffix.lower() in COMPRESSION:
        return True
    with open(path, "rb") as f:
        head = f.read(probe)
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut multi-byte tail is fine
    except UnicodeDecodeError:
        return False
    return True


def _expand(part: str) -> list[str]:
    """Files named by one comma-separated part: a file, a directory (recursive) or a glob."""
    path = Path(part).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and _extension(p.name) in BUILDERS)
    if path.is_file():
        return [str(path)]
    return sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))


def _looks_local(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or any(ch in spec for ch in "*?[,")
        or _extension(spec) in BUILDERS
        or spec.count("/") > 1
        or os.path.exists(os.path.expanduser(spec))
    )


def resolve_source(spec: str) -> Source:
    """Classify ``spec`` (see module docstring); local files must exist and share one format."""
    if not spec or not spec.strip():
        raise MerinoError("data source is empty; pass a hub name, local files or 'embedded'")
    if spec == EMBEDDED:
        return Source(spec, "text", (str(default_corpus_file()),))
    if not _looks_local(spec):
        return Source(spec, None)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    files: list[str] = []
    for part in parts:
        found = _expand(part)
        if not found:
            raise MerinoError(f"data source {part!r}: no such file, or no .txt/.jsonl/.json/.parquet files match")
        files.extend(found)
    for f in files:  # any other name is plain text (WikiText's wiki.valid.tokens), if it is text
        if _extension(f) not in BUILDERS and not _is_text(f):
            raise MerinoError(
                f"data source file {f}: not UTF-8 text, and not {', '.join(sorted(BUILDERS))} by its name"
            )
    kinds = {BUILDERS.get(_extension(f), "text") for f in files}
    if len(kinds) > 1:
        raise MerinoError(f"data source {spec!r} mixes formats {sorted(kinds)}; use one format per source")
    return Source(spec, kinds.pop(), tuple(dict.fromkeys(files)))


def hub_offline() -> bool:
    """Whether this process reads the hub from the local cache only (HF_*_OFFLINE set)."""
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def hub_unreachable(timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (``None`` when it can), within ``timeout_s``.

    DNS lookups ignore socket timeouts, so the lookup + connect runs in a thread we stop waiting
    for after ``timeout_s`` (``datasets`` itself spends ~23 s on DNS retries).
    """
    if hub_offline():
        return "offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((host, port), timeout=timeout_s).close()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout_s)
    except (OSError, FutureTimeout) as e:
        return f"{host}:{port} unreachable ({'timed out' if isinstance(e, FutureTimeout) else type(e).__name__})"
    finally:
        pool.shutdown(wait=False)
    return None


def check_hub_reachable(name: str, timeout_s: float = HUB_TIMEOUT_S, flags: Flags = FIT_FLAGS) -> None:
    """Fail fast, with how to use local files, when the hub cannot be reached."""
    reason = hub_unreachable(timeout_s)
    if reason:
        raise MerinoError(f"hub dataset {name!r} cannot be streamed: {reason}; {flags.local_hint()}")


def offline_unless_reachable(timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """Switch this process to the hub's offline mode when the hub cannot be reached.

    Without it every hub dataset (each lm-eval task, say) spends ~40 s in retries before failing;
    in offline mode cached datasets still load and the others fail at once. Returns the reason
    when it switched.
    """
    if hub_offline():
        return None  # already offline: nothing to do
    reason = hub_unreachable(timeout_s)
    if reason:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        import huggingface_hub.constants as hub_constants  # read at import: set it there too

        hub_constants.HF_HUB_OFFLINE = True
        if "datasets" in sys.modules:
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return reason


def open_stream(source: Source, sample_by: SampleBy = "paragraph", split: str = "train", flags: Flags = FIT_FLAGS):
    """The source as a ``datasets.IterableDataset`` (text in ``source.field(text_field)``).

    ``sample_by`` applies to text files: one document per ``line``, blank-line-separated
    ``paragraph`` (default), or whole file (``document``). ``flags``: the options hints name.
    """
    import datasets

    datasets.logging.set_verbosity_error()  # "Too many dataloader workers" etc. do not apply: we split ourselves
    if source.is_hub:
        check_hub_reachable(source.spec, flags=flags)
        try:
            return datasets.load_dataset(source.spec, split=split, streaming=True)
        except Exception as e:  # the hub raises many types (connection, not found, gated)
            raise MerinoError(
                f"hub dataset {source.spec!r} could not be opened ({type(e).__name__}: {e}); {flags.local_hint()}"
            ) from None
    kwargs: dict = {}
    if source.builder == "text":
        kwargs = {"sample_by": sample_by, "keep_linebreaks": True}
    if all(os.path.getsize(f) == 0 for f in source.files):
        raise MerinoError(f"data source {source.spec!r} is empty: {source.describe()}, all of 0 bytes")
    try:
        return datasets.load_dataset(
            source.builder, data_files={split: list(source.files)}, split=split, streaming=True, **kwargs
        )
    except Exception as e:  # malformed json / parquet: datasets raises many types
        raise MerinoError(
            f"data source {source.spec!r}: cannot read {source.describe()} ({type(e).__name__}: {e})"
        ) from None


def check_text_field(stream, source: Source, text_field: str, flags: Flags = FIT_FLAGS) -> None:
    """Peek at the first example: the source must not be empty and must hold ``text_field``."""
    try:
        first = next(iter(stream.take(1)), None)
    except MerinoError:
        raise
    except Exception as e:  # malformed json / parquet surfaces here
        raise MerinoError(
            f"data source {source.spec!r}: cannot read the first document ({type(e).__name__}: {e})"
        ) from None
    if first is None:
        raise MerinoError(f"data source {source.spec!r} is empty: no documents in {source.describe()}")
    text_field = source.field(text_field)
    if text_field not in first:
        raise MerinoError(
            f"data source {source.spec!r} has no text field {text_field!r} (fields: {', '.join(first)}); "
            f"set {flags.text_field}"
        )
    if not isinstance(first[text_field], str):
        raise MerinoError(
            f"data source {source.spec!r}: field {text_field!r} is {type(first[text_field]).__name__}, not text"
        )
