"""``merino-pl export CKPT --out DIR [--overwrite] [--onnx]``: a checkpoint as a self-contained HF directory.

The directory loads where merino-pl is not installed: ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)``, ``pipeline("text-generation", ...)``, stock ``lm_eval --model hf``. It
holds safetensors weights, ``config.json`` (with ``auto_map`` and the tokenizer's token ids),
``generation_config.json``, the tokenizer and the remote code generated from this package's own
``model.py`` / ``config.py`` (``merino_pl.checkpoint.save_model_files``; docs/export.md).

``--out`` is replaced as one unit, so it must be a directory the user means to give up: an
existing non-empty one needs ``--overwrite``, and one that holds the checkpoint being exported
(``export RUN/checkpoints/last.ckpt --out RUN``) is refused even with it.

``--onnx`` additionally writes ``model.onnx`` (with KV-cache inputs for decoding) through the
latency stage's exporter: what a Jetson user feeds to TensorRT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merino_pl.core.errors import MerinoError, parse_problems
from merino_pl.core.io import check_out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .ckpt from `merino-pl fit`, an exported directory, or a recipe")
    p.add_argument("--out", required=True, help="output directory (written beside, then renamed into place)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to ship with the model (default: GPT-NeoX-20B)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx with KV-cache inputs")


def validate(args: argparse.Namespace) -> list[str]:
    """Problems with the paths and the tokenizer, before the model is read (``--out`` is
    replaced as a whole, so it must not hold anything this command reads)."""
    from merino_pl.core.tokenizer import load_tokenizer

    problems = []
    try:
        load_tokenizer(args.tokenizer)
    except MerinoError as e:
        problems.append(str(e))
    protect = [(p, what) for p, what in [(args.checkpoint, "the checkpoint being exported"),
                                         (args.tokenizer, "the --tokenizer file")] if p and Path(p).exists()]
    if (Path(args.checkpoint) / "quantize_config.json").exists() and not args.onnx:
        problems.append(f"{args.checkpoint}: a GPTQ directory is already an export (weights, config, tokenizer, "
                        "remote code): copy it, or add --onnx to write it with model.onnx")
    return problems + check_out(args.out, overwrite=args.overwrite, protect=protect)


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with these arguments, for ``pipeline`` before any stage runs (``pending``: paths
    earlier stages will write, so their absence is no problem)."""
    args, problems = parse_problems(add_arguments, argv, "export")
    return problems if args is None else validate(args)


def run(args: argparse.Namespace) -> int:
    from merino_pl.core.checkpoint import export_pretrained, load_model  # torch: not for --help / validation

    problems = validate(args)
    if problems:
        raise MerinoError("; ".join(problems))
    loaded = load_model(args.checkpoint)
    if loaded.kind == "gptq" and args.onnx:  # a quantized directory: its files + the packed graph (MatMulNBits)
        from merino_pl.export.onnx import export_quantized_onnx

        out = export_quantized_onnx(loaded, args.out)
        print(f"exported {loaded.recipe.name} (gptq) -> {out}, onnx -> {out / 'model.onnx'}")
        return 0
    out = export_pretrained(loaded.model, args.out, tokenizer=args.tokenizer)
    print(f"exported {loaded.recipe.name} ({loaded.kind}) -> {out}")
    if args.onnx:
        from merino_pl.export.onnx import export_onnx

        path = export_onnx(loaded.model, Path(out) / "model.onnx")
        print(f"onnx -> {path}")
    return 0
