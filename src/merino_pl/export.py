"""``merino-pl export CKPT --out DIR [--onnx]``: a checkpoint as an HF-loadable directory.

``--onnx`` additionally writes ``model.onnx`` (with KV-cache inputs for decoding) through the
latency stage's exporter: what a Jetson user feeds to TensorRT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merino_pl.checkpoint import export_pretrained, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .ckpt from `merino-pl fit`, an exported directory, or a recipe")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to ship with the model (default: GPT-NeoX-20B)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx with KV-cache inputs")


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.checkpoint)
    out = export_pretrained(loaded.model, args.out, tokenizer=args.tokenizer)
    print(f"exported {loaded.recipe.name} ({loaded.kind}) -> {out}")
    if args.onnx:
        from merino_pl.latency.onnx_export import export_onnx

        path = export_onnx(loaded.model, Path(out) / "model.onnx")
        print(f"onnx -> {path}")
    return 0
