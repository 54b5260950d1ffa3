"""``merino-pl quantize CKPT_OR_DIR --bits 4|8 [...] --out DIR``: GPTQ (or RTN) INT8 / INT4.

Reads any checkpoint ``load_model`` reads; writes a GPTQ v1 directory (see ``format.py``) that
``load_model`` / eval / latency load back, plus ``quantize_report.{json,md}`` beside it.
``--config quantize/int4-g128.yaml`` takes option defaults from a preset; flags still win.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError, parse_problems
from merino_pl.core.io import check_out, read_yaml
from merino_pl.quantize import SUPPORTED_BITS

METHODS = ("gptq", "rtn")


DEFAULTS: dict[str, Any] = {
    "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "method": "gptq",
    "calib": "embedded", "calib_text_field": "text", "nsamples": 128, "seq_len": 512, "holdout": 8,
    "damp_percent": 0.01, "block_size": 128, "true_sequential": True, "batch_size": 8, "seed": 0,
    "float_dtype": "float16", "embedding": "fp16",
}
EMBEDDINGS = ("fp16", "int8")  # as quantize.format.EMBEDDINGS (kept here: --help imports no torch)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options default to None here so a ``--config`` preset can tell them apart from flags."""
    d, flag = DEFAULTS, argparse.BooleanOptionalAction
    p.add_argument("checkpoint", help="a .ckpt from `merino-pl fit`, an exported directory, or a recipe")
    p.add_argument("--config", help="YAML preset of these options (e.g. quantize/int4-g128.yaml); flags override it")
    p.add_argument("--out", help="output directory (default: beside the checkpoint, <name>-<method>-int<bits>-g<group>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the shipped GPT-NeoX-20B)")
    p.add_argument("--bits", type=int, help=f"weight bits: {' or '.join(map(str, SUPPORTED_BITS))} (default {d['bits']})")
    p.add_argument("--group-size", type=int, help=f"input columns per scale/zero; -1 = per output channel (default {d['group_size']})")
    p.add_argument("--desc-act", action=flag, help="act-order: columns by decreasing Hessian diagonal (default off)")
    p.add_argument("--sym", action=flag, help="symmetric grid (default) or asymmetric (--no-sym)")
    p.add_argument("--method", help=f"{' or '.join(METHODS)}: GPTQ (default) or round-to-nearest baseline")
    p.add_argument("--calib", help="calibration text, any data-stage source: 'embedded' (default), .txt/.jsonl/.json/.parquet files, glob, directory, hub name")
    p.add_argument("--calib-text-field", help="text field of jsonl / parquet rows (default text)")
    p.add_argument("--nsamples", type=int, help=f"calibration windows (default {d['nsamples']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per calibration window (default {d['seq_len']})")
    p.add_argument("--holdout", type=int, help=f"held-out windows for the float-vs-quantized check (default {d['holdout']})")
    p.add_argument("--damp-percent", type=float, help=f"Hessian dampening, fraction of its mean diagonal (default {d['damp_percent']})")
    p.add_argument("--block-size", type=int, help=f"GPTQ lazy-update block of columns (default {d['block_size']})")
    p.add_argument("--true-sequential", action=flag, help="quantize q/k/v, o, up, down in order, re-running the block (default on)")
    p.add_argument("--batch-size", type=int, help=f"calibration windows per forward (default {d['batch_size']})")
    p.add_argument("--seed", type=int, help=f"seed of the calibration window draw (default {d['seed']})")
    p.add_argument("--float-dtype", help="dtype of the tensors left unquantized (embedding / tied head, norms, biases, "
                   "projections): float16 (default, as GPTQ checkpoints), bfloat16 or float32 (bit-exact)")
    p.add_argument("--embedding", help="the tied token table / LM head: fp16 (default: stored as --float-dtype, loadable by "
                   "standard GPTQ tools) or int8 (row-wise int8 + fp16 scales, ~4x smaller; merino-pl and its ONNX export only)")


def resolve_options(args: argparse.Namespace) -> None:
    """Options not given as flags: from the ``--config`` preset, else ``DEFAULTS``."""
    preset: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        preset = read_yaml(path, "--config preset") or {}
        if not isinstance(preset, dict):
            raise MerinoError(f"--config {path}: expected a mapping of option: value")
        preset = {k.replace("-", "_"): v for k, v in preset.items()}
        unknown = sorted(set(preset) - set(DEFAULTS) - {"out", "tokenizer"})
        if unknown:
            raise MerinoError(f"--config {path}: unknown keys {unknown} (valid: {', '.join(sorted(DEFAULTS))}, out, tokenizer)")
    for key in [*DEFAULTS, "out", "tokenizer"]:
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, DEFAULTS.get(key)))


def validate(args: argparse.Namespace, pending: frozenset[str] = frozenset()) -> list[str]:
    """Every problem with the options that needs no model (all at once); ``pending``: paths an
    earlier pipeline stage will write (not missing, only not there yet)."""
    problems = []
    if args.bits not in SUPPORTED_BITS:
        problems.append(f"--bits {args.bits} is not supported (valid: {', '.join(map(str, SUPPORTED_BITS))})")
    if args.group_size != -1 and args.group_size <= 0:
        problems.append(f"--group-size {args.group_size}: must be positive or -1 (per channel)")
    if args.method not in METHODS:
        problems.append(f"--method {args.method!r} (valid: {', '.join(METHODS)})")
    for flag in ("nsamples", "seq_len", "batch_size", "block_size"):
        if getattr(args, flag) <= 0:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if args.float_dtype not in ("float16", "bfloat16", "float32"):
        problems.append(f"--float-dtype {args.float_dtype!r} (valid: float16, bfloat16, float32)")
    if args.embedding not in EMBEDDINGS:
        problems.append(f"--embedding {args.embedding!r} (valid: {', '.join(EMBEDDINGS)})")
    if args.holdout < 0 or not 0 <= args.damp_percent < 1:
        problems.append(f"--holdout must be >= 0 and --damp-percent in [0, 1) (got {args.holdout}, {args.damp_percent})")
    ckpt = Path(args.checkpoint)
    if not ckpt.exists() and args.checkpoint not in pending and (ckpt.suffix == ".ckpt" or "/" in args.checkpoint):  # (a bare name may be a built-in recipe)
        problems.append(f"checkpoint not found: {ckpt}")
    return problems


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with these arguments that need no model, for ``pipeline`` before any stage runs."""
    args, problems = parse_problems(add_arguments, argv, "quantize")
    if args is None:
        return problems
    try:
        resolve_options(args)
    except MerinoError as e:
        return [str(e)]
    out = Path(args.out) if args.out else default_out(args)
    return validate(args, pending) + check_out(out, overwrite=args.overwrite)


def validate_for_model(args: argparse.Namespace, arch: Any) -> list[str]:
    """Problems that depend on the architecture (packing vs widths, seq_len). A group larger
    than a layer's input width is not one: that layer gets one group per row (``group_note``)."""
    problems = []
    widths = _widths(arch)
    if args.bits in SUPPORTED_BITS and any(w % (32 // args.bits) for w in widths):
        problems.append(f"layer widths {widths} must be multiples of {32 // args.bits} to pack {args.bits}-bit codes in int32")
    if args.seq_len > arch.max_position_embeddings:
        problems.append(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {arch.max_position_embeddings}")
    return problems


def _widths(arch: Any) -> list[int]:
    return sorted({w for b in arch.blocks for w in (b.embed_dim, b.ffn)})  # in- and out-features of every linear


def group_note(group_size: int, arch: Any) -> str | None:
    """What the group size means for layers it does not fit, or None when it divides every width.

    The format keeps one global ``group_size`` (as auto-gptq / GPTQModel write and read it) and
    every reader sizes a layer's scales as ``ceil(in / group_size)`` groups: a layer narrower
    than the group has one group per row (its whole input width), one whose width the group
    does not divide has a shorter last group.
    """
    if group_size == -1:
        return None
    widths = _widths(arch)
    narrow = [w for w in widths if w < group_size]
    ragged = [w for w in widths if w > group_size and w % group_size]
    parts = []
    if narrow:
        parts.append(f"layers with {' / '.join(map(str, narrow))} inputs are narrower than --group-size {group_size}: "
                     "one group per row there (the layer's whole input width, as GPTQ tools do)")
    if ragged:
        parts.append(f"--group-size {group_size} does not divide input widths {ragged}: their last group is shorter")
    if not parts:
        return None
    return ("note: " + "; ".join(parts) + " (valid GPTQ v1 with the global group_size, as auto-gptq / GPTQModel read it; "
            "fixed-shape kernels such as Marlin need a group that divides every width)")


def default_out(args: argparse.Namespace) -> Path:
    ckpt = Path(args.checkpoint)
    g = "pc" if args.group_size == -1 else f"g{args.group_size}"
    return ckpt.with_name(f"{ckpt.stem}-{args.method}-int{args.bits}-{g}")


def run(args: argparse.Namespace) -> int:
    """Validate everything (all problems in one message), then quantize, write and report."""
    from merino_pl.core.quant.format import QuantSpec
    from merino_pl.quantize.pipeline import quantize_checkpoint

    resolve_options(args)
    problems = validate(args)
    out = Path(args.out) if args.out else default_out(args)
    protect = [(p, what) for p, what in [(args.checkpoint, "the checkpoint being quantized"), (args.calib, "the --calib data"),
                                         (args.tokenizer, "the --tokenizer file")] if p and Path(p).exists()]
    problems += check_out(out, overwrite=args.overwrite, protect=protect)
    loaded, calib, held, tokenize_s, problems = _load_inputs(args, problems)
    if problems:
        raise MerinoError("; ".join(problems))
    spec = QuantSpec(args.bits, args.group_size, args.sym, args.desc_act, args.method, args.damp_percent, args.block_size,
                     args.true_sequential, args.embedding)
    print(f"quantize {loaded.recipe.name} ({loaded.kind}) -> {out}: {spec}")
    note = group_note(args.group_size, loaded.recipe.architecture)
    if note:
        print(note)
    report = quantize_checkpoint(loaded, spec, calib, held, out, args, tokenize_seconds=tokenize_s, group_note=note)
    print(report["summary_line"])
    return 0


def _load_inputs(args: argparse.Namespace, problems: list[str]) -> tuple[Any, Any, Any, float, list[str]]:
    """The model, the calibration windows and the seconds spent reading + tokenizing them,
    collecting their problems with the ones found so far."""
    import torch

    from merino_pl.core.checkpoint import load_model
    from merino_pl.quantize.calibration import calibration_tokens

    loaded = calib = held = None
    tokenize_s = 0.0
    if not any(p.startswith("checkpoint not found") for p in problems):
        try:
            loaded = load_model(args.checkpoint)
            if loaded.kind == "gptq":
                bits = loaded.model.config.quantization_config.get("bits")
                problems.append(f"{args.checkpoint} is already a GPTQ int{bits} directory (quantize_config.json); "
                                "quantize the float model it came from (the exported directory or the .ckpt)")
            else:
                problems += validate_for_model(args, loaded.recipe.architecture)
        except MerinoError as e:
            problems.append(str(e))
    n_calib = args.nsamples if args.method == "gptq" else 0
    if (n_calib or args.holdout > 0) and args.seq_len > 0 and args.nsamples > 0 and args.holdout >= 0:
        t0 = time.perf_counter()
        try:
            # no bar once a problem is known: the error must stay the only line on stderr
            calib, held = calibration_tokens(args.calib, n_calib, args.seq_len, args.holdout, args.tokenizer,
                                             args.calib_text_field, args.seed, progress=not problems)
            tokenize_s = time.perf_counter() - t0
        except MerinoError as e:
            problems.append(str(e))
    else:
        calib = held = torch.zeros(0, max(args.seq_len, 0), dtype=torch.long)
    return loaded, calib, held, tokenize_s, problems
