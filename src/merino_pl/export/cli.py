"""``merino-pl export CKPT --out DIR [--overwrite] [--onnx]``: a checkpoint as a self-contained HF directory.

The directory loads where merino-pl is not installed: ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)``, ``pipeline("text-generation", ...)``, stock ``lm_eval --model hf``. It
holds safetensors weights, ``config.json`` (with ``auto_map`` and the tokenizer's token ids),
``generation_config.json``, the tokenizer and the remote code generated from this package's own
``model.py`` / ``config.py`` (``merino_pl.core.checkpoint.save_model_files``; docs/export.md).
The work is ``api.export``; this module only turns the flags into ``ExportSettings``.

``--out`` is replaced as one unit, so it must be a directory the user means to give up: an
existing non-empty one needs ``--overwrite``, and one that holds the checkpoint being exported
(``export RUN/checkpoints/last.ckpt --out RUN``) is refused even with it.

``--onnx`` additionally writes ``model.onnx`` with KV-cache inputs for decoding (``onnx.py``):
what a Jetson user feeds to TensorRT. ``--executorch [fp32,8da4w]`` writes ExecuTorch programs with
their KV cache (``executorch.py``; bare: both), for phones and embedded Linux. Everything goes into
``--out`` as one unit.
"""

from __future__ import annotations

import argparse

from merino_pl.core.errors import parse_problems
from merino_pl.export.api import ExportSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .ckpt from `merino-pl fit`, an exported directory, or a recipe")
    p.add_argument("--out", required=True, help="output directory (written beside, then renamed into place)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json to ship with the model (default: the one it was trained with, else GPT-NeoX-20B)",
    )
    p.add_argument("--onnx", action="store_true", help="also write model.onnx with KV-cache inputs")
    p.add_argument(
        "--executorch",
        nargs="?",
        const="fp32,8da4w",
        default="",
        metavar="KINDS",
        help="also write ExecuTorch programs (XNNPACK, KV cache): fp32 -> model.pte, 8da4w -> model-8da4w.pte "
        "(comma-separated; bare: both). Needs executorch (make executorch-env)",
    )


def settings(args: argparse.Namespace) -> ExportSettings:
    """The flags as the typed settings ``api.export`` takes."""
    kinds = tuple(dict.fromkeys(k.strip() for k in args.executorch.split(",") if k.strip()))
    return ExportSettings(args.checkpoint, args.out, args.overwrite, args.tokenizer, args.onnx, kinds)


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with these arguments, for ``pipeline`` before any stage runs (``pending``: paths
    earlier stages will write, so their absence is no problem)."""
    args, problems = parse_problems(add_arguments, argv, "export")
    return problems if args is None else settings(args).problems(pending)


def run(args: argparse.Namespace) -> int:
    from merino_pl.export.api import export

    done = export(settings(args))
    if done.kind == "gptq" and done.onnx:
        print(f"exported {done.recipe} (gptq) -> {done.out}, onnx -> {done.onnx}")
        return 0
    print(f"exported {done.recipe} ({done.kind}) -> {done.out}")
    if done.onnx:
        print(f"onnx -> {done.onnx}")
    for pte in done.pte:
        print(f"executorch -> {pte}")
    return 0
