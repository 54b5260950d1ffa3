"""The demo's model (issue 25): its shipped tokenizer, and its pipeline's summary figures."""

from __future__ import annotations

from conftest import REPO, tiny_arch
from merino_pl.core.tokenizer import (
    DEMO_TOKENIZER,
    default_corpus_file,
    find_eos,
    load_tokenizer,
    shipped_tokenizer_file,
)


def test_demo_tokenizer_round_trips_the_corpus():
    tok = load_tokenizer(DEMO_TOKENIZER)
    text = default_corpus_file().read_text(encoding="utf-8")
    ids = tok.encode(text).ids
    assert tok.get_vocab_size() == 2048 and max(ids) < 2048
    assert tok.decode(ids) == text
    assert len(text) / len(ids) > 2.5  # a real BPE of this text, not bytes: ~2.9 characters per token
    assert tok.id_to_token(find_eos(tok, DEMO_TOKENIZER)) == "<|endoftext|>"


def test_demo_tokenizer_is_the_bpe_of_the_training_split(tmp_path):
    """Retrained from the corpus with the held-out paragraphs excluded (the fit config's
    val_fraction 0.05), it is the shipped file: no held-out text shaped the vocabulary."""
    import yaml

    from merino_pl.study.runner import train_tokenizer

    data = yaml.safe_load((REPO / "recipes" / "train" / "cpu-demo.yaml").read_text())["data"]
    assert data["tokenizer"] == DEMO_TOKENIZER and data["source"] == "embedded"
    fresh = train_tokenizer("embedded", data["val_fraction"], 2048, tmp_path / "tokenizer.json")
    assert fresh.read_text(encoding="utf-8") == shipped_tokenizer_file(DEMO_TOKENIZER).read_text(encoding="utf-8")


def test_intrinsic_scores_each_token_once_at_the_window():
    """Windows overlap by one token: every token but the first is predicted once, with at most
    ``window`` tokens of context; a window past the stream's length is one plain forward."""
    import math

    import torch

    from merino_pl.core.hf import MerinoForCausalLM
    from merino_pl.core.model import lm_loss
    from merino_pl.eval.intrinsic import first_chars, heldout_texts, intrinsic, token_stream

    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=2048)).eval()
    texts = first_chars(heldout_texts("indomain"), 300)  # a stream shorter than the model's 128 positions
    ids, chars, nbytes = token_stream(texts, DEMO_TOKENIZER)
    assert chars == sum(map(len, texts)) + len(texts) - len(load_tokenizer(DEMO_TOKENIZER).decode(ids[:1].tolist()))
    assert len(ids) <= 128 and len(texts) > 1
    whole = intrinsic(model, texts, window=len(ids) - 1, tokenizer=DEMO_TOKENIZER)
    with torch.no_grad():
        direct = float(lm_loss(model(ids[None, :-1], use_cache=False).logits, ids[None, 1:], reduction="sum"))
    assert whole.tokens == len(ids) - 1 and math.isclose(whole.nats, direct, rel_tol=1e-5)
    short = intrinsic(model, texts, window=16, tokenizer=DEMO_TOKENIZER)
    assert short.tokens == whole.tokens and short.characters == chars and short.bytes == nbytes
    assert short.nats != whole.nats  # less context, another loss
    assert math.isclose(short.nats_per_char * short.characters, short.nats_per_token * short.tokens)
    assert math.isclose(short.bits_per_byte, short.nats / short.bytes / math.log(2))
