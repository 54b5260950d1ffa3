"""WikiText-2 (raw) and PTB perplexity with the protocol recorded beside every figure.

Published perplexities differ mostly by protocol, so each result carries it:

* ``mode="document"``: every document is scored on its own, starting from the EOS token, in
  windows of the model's context (lm-eval's ``loglikelihood_rolling`` rule when
  ``stride == window``). For WikiText-2 the documents are the articles of
  ``EleutherAI/wikitext_document_level`` and the text goes through lm-eval's ``wikitext``
  detokenizer: with the default stride this *is* lm-eval's ``wikitext`` task.
* ``mode="concatenated"``: the whole split is one token stream (the GPTQ / HF-guide protocol:
  WikiText-2 raw text as is, PTB sentences joined by spaces).

Windows are ``window`` tokens long (default: the model's context); after the first, each
window advances by ``stride`` tokens and scores only those, with the rest as context
(``stride < window`` = more context per prediction = lower perplexity).

Normalisations: token perplexity ``exp(NLL / tokens)``, word perplexity ``exp(NLL / words)``
with words counted as lm-eval does (``re.split(r"\\s+", original_text)``), and bits per byte
``NLL / (ln 2 · UTF-8 bytes of the original text)``. Word-level and byte-level figures do not
depend on the tokenizer, so they compare across models; token-level ones do not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import sha256_file

if TYPE_CHECKING:  # torch: imported by perplexity() only, so `eval --help` and validation start without it
    from merino_pl.core.hf import MerinoForCausalLM

MODES = ("document", "concatenated")


class DataUnavailable(Exception):
    """The corpus could not be read (offline hub, unreadable file): the CLI reports it as skipped."""


@dataclass(frozen=True)
class Corpus:
    """Where a perplexity data set comes from and how its text is scored by default."""

    name: str
    hub_path: str
    hub_name: str | None
    field: str
    default_mode: str
    description: str


CORPORA = {
    "wikitext2": Corpus(
        "wikitext2",
        "EleutherAI/wikitext_document_level",
        "wikitext-2-raw-v1",
        "page",
        "document",
        "WikiText-2 raw, test split (local: wiki.test.raw)",
    ),
    "ptb": Corpus(
        "ptb",
        "ptb-text-only/ptb_text_only",
        "penn_treebank",
        "sentence",
        "concatenated",
        "Penn Treebank (Mikolov), test split (local: ptb.test.txt, one sentence per line)",
    ),
}


def wikitext_pages(raw: str) -> list[str]:
    """Split a WikiText raw file into articles exactly as ``EleutherAI/wikitext_document_level``
    does: a new page starts at each level-1 heading (`` = Title = ``); pages of only
    whitespace are dropped, the last one is always kept."""
    pages, current = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def load_documents(corpus: Corpus, data_file: str | None) -> tuple[list[str], dict[str, Any]]:
    """The split's documents (WikiText-2: articles; PTB: sentences) and where they came from."""
    try:
        return _load_documents(corpus, data_file)
    except Exception as e:  # hub / datasets errors share no base class; all mean "no data"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataUnavailable(f"{type(e).__name__}: {msg}") from e


def _load_documents(corpus: Corpus, data_file: str | None) -> tuple[list[str], dict[str, Any]]:
    if data_file is not None:
        path = Path(data_file)
        raw = path.read_text(encoding="utf-8")
        docs = wikitext_pages(raw) if corpus.name == "wikitext2" else [s.strip() for s in raw.splitlines() if s.strip()]
        return docs, {"source": str(path), "sha256": sha256_file(path)}
    from datasets import load_dataset

    split = load_dataset(corpus.hub_path, corpus.hub_name, split="test")
    docs = [str(x) for x in split[corpus.field]]
    if corpus.name == "ptb":
        docs = [s.strip() for s in docs if s.strip()]
    return docs, {"source": f"hf:{corpus.hub_path}/{corpus.hub_name}", "fingerprint": split._fingerprint}


def _texts(corpus: Corpus, docs: Sequence[str], mode: str) -> list[tuple[str, str]]:
    """(text the model scores, original text words and bytes are counted on), per unit scored."""
    if mode == "document":
        if corpus.name == "wikitext2":
            from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

            return [(wikitext_detokenizer({"page": d}), d) for d in docs]
        return [(d, d) for d in docs]
    joined = "\n".join(docs) if corpus.name == "wikitext2" else " ".join(docs)
    return [(joined, joined)]


def windows(tokens: Sequence[int], prefix: int, window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that predict every token of ``tokens`` exactly once.

    ``seq = [prefix] + tokens``; the first request predicts the first ``window`` tokens, each
    later one the next ``stride`` tokens from the ``window`` tokens before them. With
    ``stride == window`` these are lm-eval's disjoint rolling windows.
    """
    if not 1 <= stride <= window:
        raise MerinoError(f"stride {stride}: must be between 1 and the window ({window})")
    seq = [prefix, *tokens]
    out, done = [], 0
    while done < len(tokens):
        end = min(done + (window if done == 0 else stride), len(tokens))
        out.append((seq[max(0, end - window) : done + 1], list(tokens[done:end])))
        done = end
    return out


@dataclass
class Perplexity:
    dataset: str
    word_perplexity: float
    token_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    nll: float
    tokens: int
    words: int
    bytes: int
    documents: int
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_words(text: str) -> int:
    """lm-eval's word count for word perplexity (``wikitext`` task), on the original text."""
    return len(re.split(r"\s+", text))


def perplexity(
    model: MerinoForCausalLM,
    tokenizer: Any,
    name: str,
    *,
    data_file: str | None = None,
    mode: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    eos_id: int = 0,
) -> Perplexity:
    """Perplexity of ``model`` on corpus ``name`` (``wikitext2`` / ``ptb``), see module docstring.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; ``limit`` keeps the first N documents.
    """
    from merino_pl.eval.scoring import score

    corpus = CORPORA[name]
    mode = mode or corpus.default_mode
    window = window or model.config.max_position_embeddings
    stride = stride or window
    docs, source = load_documents(corpus, data_file)
    docs = docs[:limit] if limit else docs
    units = _texts(corpus, docs, mode)
    requests = []
    n_tokens = 0
    for text, _ in units:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        n_tokens += len(ids)
        requests += windows(ids, eos_id, window, stride)
    logprob = sum(
        lp
        for lp, _ in score(
            model, requests, batch_size=batch_size, max_length=window, pad_id=eos_id, progress=f"ppl {name}"
        )
    )
    nll = -logprob
    words = sum(count_words(orig) for _, orig in units)
    n_bytes = sum(len(orig.encode("utf-8")) for _, orig in units)
    protocol = {
        "mode": mode,
        "window": window,
        "stride": stride,
        "prefix_token": eos_id,
        "detokenizer": "lm-eval wikitext" if (mode == "document" and name == "wikitext2") else None,
        "joined_with": None if mode == "document" else ("\\n" if name == "wikitext2" else " "),
        "word_count": "len(re.split(r'\\s+', original_text)) (lm-eval)",
        "split": "test",
        "documents_used": len(docs),
        "limit": limit,
        **source,
    }
    return Perplexity(
        dataset=name,
        word_perplexity=math.exp(nll / words),
        token_perplexity=math.exp(nll / n_tokens),
        byte_perplexity=math.exp(nll / n_bytes),
        bits_per_byte=nll / (n_bytes * math.log(2)),
        nll=nll,
        tokens=n_tokens,
        words=words,
        bytes=n_bytes,
        documents=len(docs),
        protocol=protocol,
    )
