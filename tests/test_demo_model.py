"""The demo's model (issue 25): its shipped tokenizer, and its pipeline's summary figures."""

from __future__ import annotations

import pytest

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

    from merino_pl.study.runs import train_tokenizer

    data = yaml.safe_load((REPO / "recipes" / "fit" / "cpu-demo.yaml").read_text())["data"]
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


@pytest.mark.slow
def test_demo_pipeline_summary_shows_heldout_figures_and_text(tmp_path):
    """The shipped demo pipeline, shortened (a few fit steps, fewer GPTQ samples, no eval or
    latency stage): its summary holds the per-character figure of the three precisions and what
    each model writes."""
    import json

    import yaml

    from merino_pl.cli import main as cli_main

    cfg = yaml.safe_load((REPO / "recipes" / "pipeline" / "cpu-demo.yaml").read_text())
    cfg.update(out_dir=str(tmp_path / "out"))
    cfg["search"]["args"] = ["--iterations", "600"]
    cfg["fit"]["args"] = ["--trainer.max_steps", "12", "--model.warmup_steps", "2", "--data.val_sequences", "0"]
    cfg["quantize"]["args"] = ["--group-size", "64", "--nsamples", "8", "--seq-len", "128"]
    for stage in ("eval", "latency"):
        cfg.pop(stage)
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert cli_main(["pipeline", "--config", str(config)]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "nats / char" in summary and "WikiText-2" in summary
    saved = json.loads((tmp_path / "out" / "plots" / "heldout.json").read_text())
    assert list(saved["figures"]) == ["fp32", "int8", "int4"]
    for label, sets in saved["figures"].items():
        assert 0 < sets["indomain"]["nats_per_char"] < 4 and f"| {label} | " in summary
    assert {(r["precision"], r["runtime"]) for r in saved["continuations"]} >= {
        ("fp32", "torch"),
        ("int8", "torch"),
        ("int4", "torch"),
        ("int4", "onnxruntime"),
    }
    assert all(any(r["text"] for r in saved["continuations"] if r["precision"] == lb) for lb in saved["figures"])


def test_shipped_demo_recipe_is_what_the_demo_search_finds(tmp_path):
    """``merino-demo`` (what `merino-pl demo` and the standalone fit config train) is the design
    `make demo`'s search stage finds: one model, whichever way the demo is started."""
    from merino_pl.cli import main
    from merino_pl.core.config import load_recipe

    out = tmp_path / "found.yaml"
    assert main(["search", "--config", str(REPO / "search/cpu-demo.yaml"), "--out", str(out), "--no-plot"]) == 0
    assert load_recipe(str(out)).architecture == load_recipe("merino-demo").architecture
