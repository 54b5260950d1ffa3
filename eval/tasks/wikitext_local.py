"""Hooks of the local `wikitext_local` task: lm-eval's own wikitext functions, local documents."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

from merino_pl.eval.perplexity import wikitext_pages

doc_to_target = wikitext_detokenizer
__all__ = ["load", "doc_to_target", "process_results"]


def load(data_file: str | None = None, **_: Any):
    """A DatasetDict with a `test` split of `{"page": article}` rows from a WikiText raw file
    (the `data_file` metadata, else $MERINO_WIKITEXT_RAW)."""
    import datasets

    path = data_file or os.environ.get("MERINO_WIKITEXT_RAW")
    if not path:
        raise ValueError("wikitext_local: pass --metadata data_file=/abs/path/wiki.test.raw")
    pages = wikitext_pages(Path(path).read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"page": p} for p in pages])})
