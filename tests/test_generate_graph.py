"""`generate DIR --onnx OTHER/model.onnx` refuses a graph of other weights, even of the same
architecture (issue 28): the graph records the SHA-256 of the weights file it was exported from."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_arch
from merino_pl.cli import main
from merino_pl.core.checkpoint import export_pretrained
from merino_pl.core.hf import MerinoForCausalLM


def test_a_graph_of_other_weights_is_refused(tmp_path: Path, capsys) -> None:
    for seed, name in ((0, "a"), (1, "b")):  # two models of one architecture
        torch.manual_seed(seed)
        export_pretrained(MerinoForCausalLM.from_arch(tiny_arch(vocab_size=50304)), tmp_path / name)
    assert main(["export", str(tmp_path / "a"), "--onnx", "--out", str(tmp_path / "a-onnx")]) == 0
    graph = str(tmp_path / "a-onnx" / "model.onnx")
    capsys.readouterr()
    args = ["--prompt", "To be", "--max-new-tokens", "2", "--onnx", graph]
    assert main(["generate", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a graph of other weights than" in err and "Traceback" not in err
    assert main(["generate", str(tmp_path / "a-onnx"), *args]) == 0  # its own model directory
