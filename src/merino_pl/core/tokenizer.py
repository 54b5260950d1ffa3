"""The tokenizers shipped with the package: GPT-NeoX-20B's byte-level BPE (the Pile's, Pythia's; the
default) and the demo's 2048-id byte-level BPE of the embedded corpus (``DEMO_TOKENIZER``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from merino_pl.core.assets import asset
from merino_pl.core.errors import MerinoError

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
# trained on the embedded corpus's training split (val_fraction 0.05: held-out paragraphs excluded);
# a 50 k-row embedding would dominate a CPU-sized model (assets/README.md says how it was built)
DEMO_TOKENIZER = "shakespeare-bpe-2048"
SHIPPED_TOKENIZERS = {DEFAULT_TOKENIZER: "gpt-neox-20b", DEMO_TOKENIZER: "shakespeare-bpe-2048"}
EOS_TOKEN = "<|endoftext|>"
# end-of-document tokens of common tokenizers, first found wins (GPT-NeoX / GPT-2 first)
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


def default_tokenizer_file() -> Path:
    return shipped_tokenizer_file(DEFAULT_TOKENIZER)


def shipped_tokenizer_file(name: str) -> Path:
    """The ``tokenizer.json`` of a name in ``SHIPPED_TOKENIZERS``."""
    folder = SHIPPED_TOKENIZERS[name]
    return asset("tokenizers", folder, "tokenizer.json")


def default_corpus_file() -> Path:
    """The embedded pretraining corpus (public-domain Shakespeare) for demos and tests."""
    return asset("corpus", "tinyshakespeare.txt")


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` path, a folder holding one, or a hub
    name. ``None`` (the default) and the names in ``SHIPPED_TOKENIZERS`` resolve to the package's
    copies (no network needed)."""
    if name_or_path is None or name_or_path in SHIPPED_TOKENIZERS:
        return Tokenizer.from_file(str(shipped_tokenizer_file(name_or_path or DEFAULT_TOKENIZER)))
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():  # a folder is never a hub name: no minutes of hub retries for it
            raise MerinoError(f"tokenizer {name_or_path}: a folder without a tokenizer.json")
    elif path.suffix == ".json" and not path.exists():
        raise MerinoError(f"tokenizer {name_or_path}: no such file")
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise MerinoError(f"{path}: not a valid tokenizer.json ({e})") from None
    try:
        return Tokenizer.from_pretrained(str(name_or_path))
    except Exception as e:
        raise MerinoError(
            f"tokenizer {name_or_path!r}: not a local file and not loadable from the hub ({type(e).__name__}); "
            "pass a local tokenizer.json path"
        ) from None


def hf_tokenizer(name_or_path: str | None = None, model_max_length: int | None = None):
    """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (for generate, lm-eval).

    Its end-of-text token (``find_eos``) is also bos, pad and unk, GPT-NeoX's convention.
    ``model_max_length``: the model's context, so that ``truncation=True`` and lm-eval's stock
    ``hf`` backend stop where the model does (without it transformers stores 1e30).
    """
    from transformers import PreTrainedTokenizerFast

    raw = load_tokenizer(name_or_path)
    eos = raw.id_to_token(find_eos(raw, name_or_path))
    limits = {"model_max_length": model_max_length} if model_max_length is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos, **limits
    )


def find_eos(tok: Tokenizer, spec: str | None) -> int:
    """The id of ``tok``'s end-of-document token (``spec`` names the tokenizer in the error)."""
    for token in EOS_CANDIDATES:
        if (i := tok.token_to_id(token)) is not None:
            return i
    raise MerinoError(f"tokenizer {spec!r} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")


def check_vocab(tok: Tokenizer, vocab_size: int, model: str | os.PathLike, spec: str | None) -> int:
    """The tokenizer's size (ids ``0 .. size - 1``, added tokens included); a ``MerinoError`` naming
    both sizes when its ids reach past the model's ``vocab_size`` rows: it is not the tokenizer the
    model was trained with (``merino-pl fit`` refuses such a pair), and its text would index past
    the embedding. Every stage that feeds a tokenizer's ids to a model checks this first."""
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise MerinoError(
            f"{model}: its vocab_size is {vocab_size} but the tokenizer {spec or DEFAULT_TOKENIZER} has {size} ids: "
            "use the tokenizer it was trained with"
        )
    return size


def model_tokenizer(source: str | os.PathLike) -> str:
    """The tokenizer a model goes with, for every stage that ships or reads text with it (export,
    generate, quantize, eval, latency): a ``tokenizer.json`` path, or a hub name a checkpoint
    recorded (never the default in place of a recorded one).

    * a model / GPTQ directory: its own ``tokenizer.json`` (a directory without one is an error);
    * a ``.ckpt`` from ``merino-pl fit``: the ``merino.tokenizer`` it recorded (a shipped name ->
      the package's file; a path, which must still exist), else the default GPT-NeoX-20B (fit
      records only a tokenizer other than the default);
    * anything else (a recipe: a fresh model): the default.
    """
    path = Path(source)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise MerinoError(f"{path}: no tokenizer.json beside the model; pass the tokenizer it was trained with")
        return str(path / "tokenizer.json")
    if path.suffix != ".ckpt" or not path.is_file():
        return str(default_tokenizer_file())
    from merino_pl.core.checkpoint import trained_tokenizer  # torch: only for a checkpoint

    recorded = trained_tokenizer(path)
    if recorded is None or recorded in SHIPPED_TOKENIZERS:
        return str(shipped_tokenizer_file(recorded or DEFAULT_TOKENIZER))
    file = Path(recorded) / "tokenizer.json" if Path(recorded).is_dir() else Path(recorded)
    if file.is_file():
        return str(file)
    if file.is_absolute() or file.suffix == ".json" or os.sep in recorded:  # a path (fit records files absolute)
        raise MerinoError(
            f"{path} was trained with the tokenizer {recorded}, which is missing: put it back, "
            "or pass the same tokenizer.json with --tokenizer"
        )
    return recorded  # a hub name the checkpoint recorded: load_tokenizer fetches it
