"""Progress a user can plan by in ``quantize``: tqdm bars (count, rate, ETA) for reading the
calibration text and for GPTQ's layer loop. (``fit``'s ETA lines: tests/test_fit.py.)"""

from __future__ import annotations

import re

import torch

from conftest import tiny_arch
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.quant.format import QuantSpec
from merino_pl.quantize.calibration import POOL, calibration_tokens
from merino_pl.quantize.passes import quantize_model


def test_calibration_loading_shows_tokens_rate_and_eta(capsys):
    calib, held = calibration_tokens("embedded", nsamples=4, seq_len=32, holdout=2)
    assert calib.shape == (4, 32) and held.shape == (2, 32)
    err = capsys.readouterr().err
    # the pool is filled: the bar reaches its total, POOL x (4 + 2) x 32 tokens, with a rate
    total = POOL * 6 * 32
    assert re.search(rf"calibration text: 100%.*{total}/{total} .*tok/s", err), err
    calibration_tokens("embedded", nsamples=4, seq_len=32, holdout=2, progress=False)
    assert "calibration text" not in capsys.readouterr().err


def test_gptq_layer_loop_shows_a_bar(capsys):
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch())
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    _, reports = quantize_model(model, QuantSpec(bits=4, group_size=32), ids, batch_size=2)
    err = capsys.readouterr().err
    n = len(reports)
    assert re.search(rf"gptq int4: 100%.*{n}/{n} \[.*<00:00", err), err  # elapsed<remaining, rate
