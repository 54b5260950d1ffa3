"""Latency times the model as trained (issue 23.1) and one run per --out (issue 28.3)."""

from __future__ import annotations

import os
from pathlib import Path

from merino_pl.cli import main
from merino_pl.core.lock import folder_lock
from test_eval_context import _ckpt


def test_latency_refuses_a_prompt_past_the_trained_context(tmp_path: Path, capsys) -> None:
    ckpt = _ckpt(tmp_path, 64)  # 128 positions, trained at 64
    args = ["latency", str(ckpt), "--runs", "1", "--warmup", "0", "--decode-tokens", "2", "--generate-tokens", "0"]
    assert main([*args, "--seq", "100", "--out", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq 100 + --decode-tokens 2" in err and "trained context of 64 tokens" in err
    assert not (tmp_path / "l").exists()


def test_latency_without_seq_shortens_the_prompt_to_the_trained_context(tmp_path: Path) -> None:
    """The paper's 128-token prompt plus the decode steps does not fit a model trained at 64: with
    no --seq named, the prompt is shortened (and the report says so) instead of refusing."""
    from merino_pl.latency.report import LatencyReport

    ckpt = _ckpt(tmp_path, 64)
    out = tmp_path / "l"
    args = ["latency", str(ckpt), "--runs", "1", "--warmup", "0", "--decode-tokens", "2", "--generate-tokens", "0"]
    assert main([*args, "--out", str(out)]) == 0
    report = LatencyReport.read(out / "latency.json")
    assert report.protocol["seq_len"] == 62
    assert any("prompt: 62 tokens, not the paper's 128" in w for w in report.warnings)


def test_a_second_latency_on_the_same_out_is_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "l"
    with folder_lock(out, "a test holding the folder"):
        rc = main(["latency", "merino-tiny", "--seq", "8", "--runs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(os.getpid()) in err and "a test holding the folder" in err
