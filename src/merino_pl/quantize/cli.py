"""``merino-pl quantize CKPT_OR_DIR --bits 4|8 [...] --out DIR``: GPTQ (or RTN) INT8 / INT4.

Reads any checkpoint ``load_model`` reads; writes a GPTQ v1 directory (see ``format.py``) that
``load_model`` / eval / latency load back, plus ``quantize_report.{json,md}`` beside it.
``--config quantize/int4-g128.yaml`` takes option defaults from a preset; flags still win.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError, parse_problems
from merino_pl.core.io import check_out, read_yaml
from merino_pl.core.quant.spec import SUPPORTED_BITS, QuantSpec
from merino_pl.core.tracking import add_wandb_argument
from merino_pl.quantize.api import DEFAULT_SEQ_LEN, METHODS, CalibrationSettings, QuantizeSettings

# flag name (dashes as underscores) -> CalibrationSettings field
CALIB_FLAGS = {
    "calib": "source",
    "calib_text_field": "text_field",
    "nsamples": "nsamples",
    "seq_len": "seq_len",
    "holdout": "holdout",
    "batch_size": "batch_size",
    "seed": "seed",
}
# every option's default, read from the settings dataclasses (QuantSpec is torch-free: --help loads no torch)
DEFAULTS: dict[str, Any] = {
    **{f.name: getattr(QuantSpec(), f.name) for f in fields(QuantSpec)},
    **{flag: getattr(CalibrationSettings(), name) for flag, name in CALIB_FLAGS.items()},
    "float_dtype": QuantizeSettings.__dataclass_fields__["float_dtype"].default,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options default to None here so a ``--config`` preset can tell them apart from flags
    (``DEFAULTS``: the defaults of ``QuantSpec`` and ``CalibrationSettings``)."""
    d, flag = DEFAULTS, argparse.BooleanOptionalAction
    p.add_argument("checkpoint", help="a .ckpt from `merino-pl fit`, an exported directory, or a recipe")
    p.add_argument("--config", help="YAML preset of these options (e.g. quantize/int4-g128.yaml); flags override it")
    p.add_argument(
        "--out", help="output directory (default: beside the checkpoint, <name>-<method>-int<bits>-g<group>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the model's own, else the shipped GPT-NeoX-20B)")
    p.add_argument(
        "--bits", type=int, help=f"weight bits: {' or '.join(map(str, SUPPORTED_BITS))} (default {d['bits']})"
    )
    p.add_argument(
        "--group-size",
        type=int,
        help=f"input columns per scale/zero; -1 = per output channel (default {d['group_size']})",
    )
    p.add_argument("--desc-act", action=flag, help="act-order: columns by decreasing Hessian diagonal (default off)")
    p.add_argument("--sym", action=flag, help="symmetric grid (default) or asymmetric (--no-sym)")
    p.add_argument("--method", help=f"{' or '.join(METHODS)}: GPTQ (default) or round-to-nearest baseline")
    p.add_argument(
        "--calib",
        help="calibration text, any data-stage source: 'embedded' (default), .txt/.jsonl/.json/.parquet files, "
        "glob, directory, hub name",
    )
    p.add_argument("--calib-text-field", help="text field of jsonl / parquet rows (default text)")
    p.add_argument("--nsamples", type=int, help=f"calibration windows (default {d['nsamples']})")
    p.add_argument(
        "--seq-len",
        type=int,
        help=f"tokens per calibration window (default {DEFAULT_SEQ_LEN}, or the model's trained context if shorter)",
    )
    p.add_argument(
        "--holdout", type=int, help=f"held-out windows for the float-vs-quantized check (default {d['holdout']})"
    )
    p.add_argument(
        "--damp-percent",
        type=float,
        help=f"Hessian dampening, fraction of its mean diagonal (default {d['damp_percent']})",
    )
    p.add_argument("--block-size", type=int, help=f"GPTQ lazy-update block of columns (default {d['block_size']})")
    p.add_argument(
        "--true-sequential",
        action=flag,
        help="quantize q/k/v, o, up, down in order, one pass through the block each "
        "(5 passes per block instead of 2; same held-out error measured, docs/quantize.md; default off)",
    )
    p.add_argument("--batch-size", type=int, help=f"calibration windows per forward (default {d['batch_size']})")
    p.add_argument("--seed", type=int, help=f"seed of the calibration window draw (default {d['seed']})")
    p.add_argument(
        "--float-dtype",
        help="dtype of the tensors left unquantized (embedding / tied head, norms, biases, "
        "projections): float16 (default, as GPTQ checkpoints), bfloat16 or float32 (bit-exact)",
    )
    p.add_argument(
        "--embedding",
        help="the tied token table / LM head: fp16 (default: stored as --float-dtype, loadable by "
        "standard GPTQ tools) or int8 (row-wise int8 + fp16 scales, ~4x smaller; merino-pl and its ONNX export only)",
    )
    add_wandb_argument(p)


def resolve_options(given: dict[str, Any]) -> dict[str, Any]:
    """Every option: the flags given (not None), else the ``--config`` preset's value, else ``DEFAULTS``."""
    preset: dict[str, Any] = {}
    if given.get("config"):
        path = Path(given["config"])
        preset = read_yaml(path, "--config preset") or {}
        if not isinstance(preset, dict):
            raise MerinoError(f"--config {path}: expected a mapping of option: value")
        preset = {k.replace("-", "_"): v for k, v in preset.items()}
        unknown = sorted(set(preset) - set(DEFAULTS) - {"out", "tokenizer"})
        if unknown:
            raise MerinoError(
                f"--config {path}: unknown keys {unknown} (valid: {', '.join(sorted(DEFAULTS))}, out, tokenizer)"
            )
    resolved = dict(given)
    for key in [*DEFAULTS, "out", "tokenizer"]:
        if resolved.get(key) is None:
            resolved[key] = preset.get(key, DEFAULTS.get(key))
    return resolved


def settings(args: argparse.Namespace) -> QuantizeSettings:
    """The flags (and the ``--config`` preset) as the typed settings ``api.quantize`` takes."""
    o = resolve_options(vars(args))
    spec = QuantSpec(**{f.name: o[f.name] for f in fields(QuantSpec)})
    calib = CalibrationSettings(**{name: o[flag] for flag, name in CALIB_FLAGS.items()})
    return QuantizeSettings(
        o["checkpoint"], spec, calib, o["out"], o["float_dtype"], o["tokenizer"], bool(o["overwrite"]), o.get("wandb")
    )


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with these arguments that need no model, for ``pipeline`` before any stage runs."""
    args, problems = parse_problems(add_arguments, argv, "quantize")
    if args is None:
        return problems
    try:
        s = settings(args)
    except MerinoError as e:
        return [str(e)]
    return s.problems(pending) + check_out(s.out_dir, overwrite=s.overwrite)


def run(args: argparse.Namespace) -> int:
    """Validate everything (all problems in one message), then quantize, write and report."""
    from merino_pl.quantize.api import quantize

    report = quantize(settings(args))
    print(report.summary_line)
    return 0
