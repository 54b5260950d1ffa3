"""Intrinsic quality on held-out text, in units that compare across tokenizers.

``intrinsic(model, texts, window)`` scores a model on a text set the way ``fit`` trained it: the
documents joined into one token stream (each followed by EOS, as ``merino_pl.data`` packs them),
cut into windows of ``window`` + 1 tokens that overlap by one token, so that every token but the
first is predicted exactly once, with at most ``window`` tokens of context (the trained context:
no position the model never trained at). It returns the summed loss and what it was spread over:

* nats per token and perplexity: depend on the tokenizer (a 2048-id BPE and GPT-NeoX's 50 k ids
  are not comparable);
* nats per character and bits per byte: the same total loss over the text's characters / UTF-8
  bytes, so they compare across tokenizers (nanoGPT's character-level loss is nats per character;
  lm-eval's ``bits_per_byte`` is total nats / (bytes * ln 2)). Each EOS counts as one character and
  one byte: the paragraph break it stands for.

``heldout_texts`` gives the two sets the demo reports: ``indomain`` (the paragraphs ``fit`` held
out of a source by hash, ``merino_pl.data.is_heldout``: never trained on, and excluded from the
demo tokenizer's training) and ``wikitext2`` (the shipped WikiText-2 test split: cross-domain for
a model trained on Shakespeare). Written here rather than through lm-eval's ``loglikelihood_rolling``
because lm-eval scores document by document (short paragraphs would see far less context than
training gave) and has no held-out split of our training source.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HELDOUT_SETS = ("indomain", "wikitext2")


@dataclass(frozen=True)
class IntrinsicScore:
    """Summed loss of one model on one text set, and the counts it is spread over."""

    nats: float  # summed next-token loss
    tokens: int  # tokens predicted
    characters: int  # characters of those tokens (EOS = 1)
    bytes: int  # UTF-8 bytes of those tokens (EOS = 1)
    window: int  # tokens of context at most (the trained context)

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def nats_per_char(self) -> float:
        return self.nats / self.characters

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (self.bytes * math.log(2))

    def to_dict(self) -> dict[str, Any]:
        figures = {
            "nats_per_token": self.nats_per_token,
            "perplexity": self.perplexity,
            "nats_per_char": self.nats_per_char,
            "bits_per_byte": self.bits_per_byte,
            "chars_per_token": self.characters / self.tokens,
        }
        return {**asdict(self), **figures}


def heldout_texts(
    name: str,
    source: str = "embedded",
    val_fraction: float = 0.05,
    text_field: str = "text",
    max_chars: int = 1_000_000,
) -> list[str]:
    """The documents of a held-out set (see the module docstring), in source order.

    ``indomain``: the documents of ``source`` that ``fit`` holds out at ``val_fraction`` (the fit
    config's ``data.source`` / ``data.val_fraction``), the first ``max_chars`` characters' worth
    (a corpus like the Pile is never read to its end; the embedded one holds 55 k); ``wikitext2``:
    the shipped test split's articles."""
    from merino_pl.core.errors import MerinoError

    if name == "wikitext2":
        from merino_pl.core.assets import embedded_wikitext2

        text = embedded_wikitext2().read_text(encoding="utf-8")
        return [d for d in text.split("\n \n") if d.strip()]
    if name != "indomain":
        raise MerinoError(f"held-out set {name!r}: valid sets are {', '.join(HELDOUT_SETS)}")
    if not 0 < val_fraction < 1:
        raise MerinoError(f"val_fraction must be in (0, 1) for an in-domain held-out set, got {val_fraction}")
    from merino_pl.data import is_heldout
    from merino_pl.data.sources import open_stream, resolve_source

    src = resolve_source(source)
    field = src.field(text_field)
    docs = []
    for batch in open_stream(src).iter(batch_size=1024):
        docs += [t for t in batch[field] if t and is_heldout(t, val_fraction)]
        if sum(map(len, docs)) >= max_chars:
            break
    if not docs:
        raise MerinoError(f"no held-out documents in {source!r} at val_fraction {val_fraction}")
    return docs


def token_stream(texts: list[str], tokenizer: str | None) -> tuple[torch.Tensor, int, int]:
    """The texts as one EOS-separated id stream, and the characters and UTF-8 bytes of all its
    tokens but the first (the ones a model predicts)."""
    from merino_pl.core.tokenizer import find_eos, load_tokenizer

    tok = load_tokenizer(tokenizer)
    eos = find_eos(tok, tokenizer)
    ids: list[int] = []
    for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
        ids += [*enc.ids, eos]
    first = tok.decode(ids[:1])  # the stream starts a document: its first token is whole characters
    chars = sum(len(t) for t in texts) + len(texts) - len(first)
    nbytes = sum(len(t.encode("utf-8")) for t in texts) + len(texts) - len(first.encode("utf-8"))
    return torch.tensor(ids, dtype=torch.long), chars, nbytes


def first_chars(texts: list[str], limit: int) -> list[str]:
    """The texts up to ``limit`` characters in all (the last one cut)."""
    out, left = [], limit
    for t in texts:
        if left <= 0:
            break
        out.append(t[:left])
        left -= len(out[-1])
    return out


@torch.no_grad()
def intrinsic(
    model: torch.nn.Module,
    texts: list[str],
    window: int,
    tokenizer: str | None = None,
    batch_size: int = 16,
    max_chars: int | None = None,
) -> IntrinsicScore:
    """Score ``model`` (a ``MerinoForCausalLM``, float or quantized) on ``texts`` with at most
    ``window`` tokens of context (see the module docstring); ``max_chars``: the texts' first N
    characters only."""
    from merino_pl.core.model import lm_loss

    ids, chars, nbytes = token_stream(first_chars(texts, max_chars) if max_chars else texts, tokenizer)
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.max()) >= vocab:
        from merino_pl.core.errors import MerinoError

        raise MerinoError(
            f"tokenizer {tokenizer or 'gpt-neox-20b (default)'} gives ids up to {int(ids.max())}, past the model's "
            f"{vocab}-row embedding: score it with the tokenizer it was trained with"
        )
    starts = list(range(0, len(ids) - 1, window))  # window k predicts tokens k*window+1 .. (k+1)*window
    model.eval()
    nats = 0.0
    for i in range(0, len(starts), batch_size):
        group = [ids[s : s + window + 1] for s in starts[i : i + batch_size]]
        for length in sorted({len(g) for g in group}):  # the stream's last window may be shorter
            batch = torch.stack([g for g in group if len(g) == length])  # (B, length)
            logits = model(batch[:, :-1], use_cache=False).logits  # (B, length - 1, V)
            nats += float(lm_loss(logits, batch[:, 1:], reduction="sum"))
    return IntrinsicScore(nats, len(ids) - 1, chars, nbytes, window)


def score_model(
    path: str | Path,
    sets: dict[str, list[str]],
    window: int,
    max_chars: int | None = None,
    tokenizer: str | None = None,
) -> dict[str, IntrinsicScore]:
    """Each held-out set's score of the model at ``path`` (a ``.ckpt``, an exported or GPTQ
    directory) with its own tokenizer (unless ``tokenizer`` names one), at ``window`` tokens of
    context (give the trained one)."""
    from merino_pl.core.checkpoint import load_model, trained_tokenizer

    model = load_model(path).model
    tokenizer = tokenizer or trained_tokenizer(path)
    return {name: intrinsic(model, texts, window, tokenizer, max_chars=max_chars) for name, texts in sets.items()}


# ---- what the pipeline's summary shows (issue 25) -------------------------------------------------
DEMO_PROMPT = "ROMEO:\n"
CROSS_DOMAIN_CHARS = 50_000  # WikiText-2's first 50 k characters: ~22 k tokens of the 2048-id BPE


def heldout_figures(
    models: dict[str, Path], data: dict[str, Any], wikitext_chars: int | None = CROSS_DOMAIN_CHARS
) -> dict[str, dict[str, dict[str, Any]]]:
    """precision label -> held-out set -> ``IntrinsicScore.to_dict()`` of each model directory (or
    ``.ckpt``), at the trained context. ``data``: the fit config's ``data`` section (source,
    text_field, val_fraction, seq_len: what was held out, and the context)."""
    data = fit_data(data)
    window = int(data["seq_len"])
    sets = {
        "indomain": heldout_texts(
            "indomain", str(data["source"]), float(data["val_fraction"]), str(data["text_field"])
        ),
        "wikitext2": first_chars(heldout_texts("wikitext2"), wikitext_chars) if wikitext_chars else [],
    }
    sets = {k: v for k, v in sets.items() if v}
    return {
        label: {name: s.to_dict() for name, s in score_model(path, sets, window).items()}
        for label, path in models.items()
    }


def fit_data(data: dict[str, Any]) -> dict[str, Any]:
    """What ``fit`` trained on and held out: the config's ``data`` values, the data module's
    defaults for those it leaves out (a default is what that run used)."""
    from inspect import signature

    from merino_pl.data import PileDataModule

    params = signature(PileDataModule.__init__).parameters
    return {k: data.get(k, params[k].default) for k in ("source", "text_field", "val_fraction", "seq_len")}


def figures_lines(figures: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The held-out figures as a Markdown table, the in-domain set first, each precision's change
    of nats / character against fp32."""
    if not figures:
        return []
    base = figures.get("fp32", {}).get("indomain", {}).get("nats_per_char")
    lines = [
        "| precision | in-domain ppl (tokens) | nats / char | bits / byte | vs fp32 | WikiText-2 nats / char "
        "(cross-domain) | WikiText-2 bits / byte |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, sets in figures.items():
        ind, wiki = sets.get("indomain", {}), sets.get("wikitext2", {})
        delta = f"{100 * (ind['nats_per_char'] / base - 1):+.2f} %" if base and label != "fp32" and ind else "—"
        lines.append(
            f"| {label} | {_f(ind.get('perplexity'), 2)} | {_f(ind.get('nats_per_char'))} | "
            f"{_f(ind.get('bits_per_byte'))} | {delta} | {_f(wiki.get('nats_per_char'))} | "
            f"{_f(wiki.get('bits_per_byte'))} |"
        )
    ind = next(iter(figures.values())).get("indomain")
    if ind:
        lines += [
            "",
            f"In-domain: the {ind['characters']:,} characters ({ind['tokens']:,} tokens) of the paragraphs `fit` "
            f"held out (never trained on), scored as trained: windows of {ind['window']} tokens. Nats per "
            "character and bits per byte compare across tokenizers (nanoGPT's character-level loss is nats per "
            "character); perplexity is per token of this model's tokenizer. WikiText-2 is cross-domain for a "
            "model trained on Shakespeare: shown for what it is, not as the paper's figure.",
        ]
    return lines


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def continuations(
    models: dict[str, Path],
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = 48,
    onnx: tuple[str, ...] = ("int4",),
) -> list[dict[str, Any]]:
    """A greedy and a seeded sampled continuation of ``prompt`` per model (torch; onnxruntime too
    for the labels in ``onnx``), through the generate stage's entry: text and decode tokens/s."""
    from merino_pl.generate.api import GenerateSettings, generate

    rows = []
    for label, path in models.items():
        for runtime in ("torch", "onnxruntime") if label in onnx else ("torch",):
            for temperature, top_k in ((0.0, None), (0.8, 40)):
                s = GenerateSettings(str(path), prompt, max_new_tokens, runtime, temperature=temperature, top_k=top_k)
                r = generate(s)
                rows.append(
                    {
                        "precision": label,
                        "runtime": runtime,
                        "sampling": r.sampling,
                        "text": r.text,
                        "tokens": len(r.tokens),
                        "tokens_per_s": r.decode_tokens_per_s,
                    }
                )
    return rows


def continuation_lines(rows: list[dict[str, Any]], prompt: str = DEMO_PROMPT) -> list[str]:
    """The continuations as Markdown: one quoted block each, under its precision, runtime, sampling, speed."""
    lines = [f"Prompt: `{prompt!r}`; at most {max((r['tokens'] for r in rows), default=0)} new tokens.", ""]
    for r in rows:
        rate = f"{r['tokens_per_s']:.0f} tokens/s" if r["tokens_per_s"] else "—"
        lines += [
            f"**{r['precision']}**, {r['runtime']}, {r['sampling']} ({rate}):",
            "",
            "```",
            prompt + r["text"],
            "```",
            "",
        ]
    return lines


def demo_section(models: dict[str, Path], data: dict[str, Any], cache: Path) -> list[str]:
    """The summary's section: held-out figures and continuations of each model, computed once per
    set of model files (``cache``: a JSON of both, keyed by the models' files and ``data``)."""
    import json

    from merino_pl.core.io import write_json

    key = {"data": data, "models": {label: _stamp(path) for label, path in models.items()}}
    saved = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    if saved.get("key") != json.loads(json.dumps(key)):
        saved = {"key": key, "figures": heldout_figures(models, data), "continuations": continuations(models)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, saved)
    return [
        "## Held-out quality at the trained context",
        "",
        *figures_lines(saved["figures"]),
        "",
        "## What the models write",
        "",
        *continuation_lines(saved["continuations"]),
    ]


def _stamp(path: Path) -> list:
    """Name, size and mtime of every file of a model (directory or file): its cache key."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
