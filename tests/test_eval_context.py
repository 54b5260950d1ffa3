"""The trained context travels with the model (issue 23.1): a checkpoint trained at ``seq_len``
64 is scored with a 64-token window by default (recorded in the report and every perplexity
row); a longer ``--window`` is one line naming both numbers unless explicitly allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_arch
from merino_pl.cli import main
from merino_pl.core.checkpoint import context_window, export_pretrained, load_model, trained_context
from merino_pl.core.hf import MerinoForCausalLM

pytest.importorskip("lm_eval")


def _ckpt(tmp_path: Path, seq_len: int | None) -> Path:
    """A `.ckpt` in `merino-pl fit`'s layout (context 128) trained at ``seq_len`` (None: not recorded)."""
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=50304))
    recipe = load_model(export_pretrained(model, tmp_path / "base")).recipe
    meta = {"recipe": recipe.to_dict(), **({"seq_len": seq_len} if seq_len else {})}
    path = tmp_path / f"trained-{seq_len}.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "merino": meta}, path)
    return path


def _eval(ckpt: Path, out: Path, *extra: str) -> int:
    ptb = out.parent / "ptb.txt"
    ptb.write_text("".join(f" the <unk> company said N shares rose {i} points \n" for i in range(40)))
    args = ["eval", str(ckpt), "--tasks", "none", "--ppl", "ptb", "--data-files", f"ptb={ptb}", "--out", str(out)]
    return main([*args, *extra])


def test_trained_context_travels_from_checkpoint_to_export(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path, 64)
    assert trained_context(ckpt) == 64 and trained_context(load_model(ckpt)) == 64
    exported = export_pretrained(load_model(ckpt).model, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["trained_seq_len"] == 64
    assert trained_context(exported) == 64 and context_window(load_model(exported)) == (64, None)
    old = load_model(_ckpt(tmp_path, None))  # written before fit recorded it: max_position_embeddings, said so
    window, note = context_window(old)
    assert trained_context(old) is None and window == 128 and "max_position_embeddings 128" in note


def test_eval_defaults_to_the_trained_context_and_refuses_longer(tmp_path: Path, capsys) -> None:
    ckpt = _ckpt(tmp_path, 64)
    assert _eval(ckpt, tmp_path / "r") == 0
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert report["model"]["trained_context"] == 64 and report["model"]["window"] == 64
    assert report["perplexity"]["ptb"]["protocol"]["window"] == 64
    assert "(window 64)" in (tmp_path / "r" / "eval.md").read_text()  # the Table 3 row states it
    capsys.readouterr()
    assert _eval(ckpt, tmp_path / "r2", "--window", "128") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--window 128" in err and "(64 tokens)" in err and "Traceback" not in err
    assert not (tmp_path / "r2").exists()
    assert _eval(ckpt, tmp_path / "r3", "--window", "128", "--beyond-trained-context") == 0
    assert json.loads((tmp_path / "r3" / "eval.json").read_text())["perplexity"]["ptb"]["protocol"]["window"] == 128
