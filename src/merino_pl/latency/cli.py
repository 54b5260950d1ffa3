"""``merino-pl latency``: reports, device latency tables and the Figure-1 chart.

    merino-pl latency CKPT_OR_RECIPE --device cpu --precision fp32,fp16 --peers opt-350m --out DIR
    merino-pl latency profile --device cpu [--space search/space.yaml] --out table.json
    merino-pl latency plot --latency REPORT.json ... [--eval REPORT.json ...] --out chart.png
    merino-pl latency kit MODEL|--space SPACE --out KIT      (then, on the device: python run_kit.py)
    merino-pl latency import RESULTS.json --kit KIT --out TABLE.json|DIR

The first form owns the positional argument, so the sub-commands are recognised by the first
word before argparse sees the rest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from merino_pl.core.errors import ArgumentParser, parse_problems
from merino_pl.core.tracking import add_wandb_argument

if TYPE_CHECKING:
    from merino_pl.latency.api import LatencySettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    from merino_pl.latency import PRECISIONS

    p.add_argument(
        "source",
        metavar="CKPT_OR_RECIPE",
        help="a .ckpt, an exported / GPTQ directory, a recipe YAML or a built-in recipe name",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--precision", default="fp32", help=f"comma-separated, of {','.join(PRECISIONS)} (default: fp32)")
    p.add_argument("--batch", type=int, default=1, help="batch size (paper: 1)")
    p.add_argument(
        "--seq",
        type=int,
        default=None,
        help="prompt length (default: the paper's 128, shortened to fit a shorter trained context with the "
        "decode steps)",
    )
    p.add_argument("--runs", type=int, default=16, help="timed runs; the paper reports their mean (default: 16)")
    p.add_argument("--warmup", type=int, default=4, help="untimed runs first (default: 4)")
    p.add_argument(
        "--decode-tokens", type=int, default=8, help="one-token decode steps per timed decode run (default: 8)"
    )
    p.add_argument(
        "--peers",
        default="",
        help="comma-separated peers timed in the same run: pythia-70m,pythia-160m,opt-125m,opt-350m,gpt2,cerebras-111m",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export to ONNX and time the onnxruntime path (= --runtime torch,onnxruntime)",
    )
    p.add_argument(
        "--runtime",
        default="torch",
        help="comma-separated, of torch,onnxruntime,executorch: onnxruntime adds its rows (float graphs; "
        "GPTQ / int rows as MatMulNBits), executorch its .pte rows (fp32; int4 as 8da4w; needs `make "
        "executorch-env`) beside torch's, which every ratio and check refers to (default: torch)",
    )
    p.add_argument(
        "--protocol",
        default="full",
        help="comma-separated, of full,paper: full = every model with its head, prefill / "
        "decode / generation (default); paper = the authors' latency_test (1 thread, zero ids, timeit(16).mean, "
        "MeRino and OPT without their LM head, Pythia and GPT-2 with it)",
    )
    p.add_argument(
        "--generate-tokens",
        type=int,
        default=128,
        help="new tokens of the generation rows after the --seq prompt (0: none; default: 128)",
    )
    p.add_argument("--generate-runs", type=int, default=2, help="timed generations per row (default: 2)")
    p.add_argument(
        "--onnx-accuracy-level",
        type=int,
        default=4,
        help="MatMulNBits compute type of the int onnxruntime rows: 4 = int8 activations (fast; logits ~1 %% "
        "from torch's) or 0 = fp32 (exact; 8-bit then dequantizes every call) (default: 4)",
    )
    p.add_argument(
        "--embedding",
        default="fp16",
        help="int rows made from a float model: its tied table fp16 (default) or int8 "
        "(as merino-pl quantize --embedding)",
    )
    p.add_argument("--no-fast", action="store_true", help="skip the fast-path rows")
    p.add_argument(
        "--threads", type=int, default=None, help="torch (and onnxruntime) intra-op threads (default: torch's)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (and of a recipe's fresh weights)")
    p.add_argument("--out", required=True, help="output directory: latency.json, latency.md (and model-*.onnx)")
    add_wandb_argument(p)


def run(args: argparse.Namespace) -> int:
    """Measure, then write ``latency.json`` and ``latency.md`` into ``--out``."""
    from merino_pl.latency.api import latency
    from merino_pl.latency.report import JSON_NAME, MARKDOWN_NAME

    report = latency(settings(args))
    print(report.markdown())
    print(f"wrote {Path(args.out) / JSON_NAME} and {Path(args.out) / MARKDOWN_NAME}")
    return 0


def settings(args: argparse.Namespace) -> LatencySettings:
    """The flags as the typed settings ``api.latency`` takes."""
    from merino_pl.latency.api import LatencySettings
    from merino_pl.latency.options import Options

    def items(flag: str) -> tuple[str, ...]:
        return tuple(x.strip().lower() for x in flag.split(",") if x.strip())

    runtimes = items(args.runtime)
    options = Options(
        device=args.device,
        precisions=items(args.precision),
        batch=args.batch,
        seq=128 if args.seq is None else args.seq,
        seq_given=args.seq is not None,
        runs=args.runs,
        warmup=args.warmup,
        decode_tokens=args.decode_tokens,
        peers=items(args.peers),
        onnx=args.onnx or "onnxruntime" in runtimes,
        fast=not args.no_fast,
        seed=args.seed,
        protocols=items(args.protocol),
        generate_tokens=args.generate_tokens,
        onnx_accuracy_level=args.onnx_accuracy_level,
        generate_runs=args.generate_runs,
        embedding=args.embedding,
        runtimes=runtimes,
    )
    return LatencySettings(args.source, args.out, options, args.threads, args.wandb)


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--latency",
        nargs="*",
        default=[],
        metavar="REPORT.json",
        help="latency reports (`merino-pl latency ... --out DIR` wrote DIR/latency.json)",
    )
    p.add_argument(
        "--eval",
        nargs="*",
        default=[],
        metavar="REPORT.json",
        help="eval reports: their average accuracy, matched by model name",
    )
    p.add_argument(
        "--paper", action="store_true", help="add a panel with the paper's published Jetson Nano points (Tables 2, 3)"
    )
    p.add_argument("--precision", default="fp32", help="which rows of the latency reports (default: fp32)")
    p.add_argument("--out", required=True, help="PNG to write (the points go beside it as .json)")


def run_plot(args: argparse.Namespace) -> int:
    from merino_pl.latency.plot import plot

    plot(args.latency, args.eval, args.paper, args.precision, args.out)
    return 0


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--space", default=None, help="search space YAML (default: the shipped search/space.yaml)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16 (default: fp32)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--seq", type=int, default=128, help="tokens per prefill (default: 128)")
    p.add_argument(
        "--runs", type=int, default=16, help="timed runs per shape; the table keeps their mean (default: 16)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per shape first (default: 2)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    p.add_argument(
        "--runtime",
        default="torch",
        help="torch (the modules) or onnxruntime (the ONNX graphs `latency kit` ships, on this CPU; "
        "what a kit's results here should match) (default: torch)",
    )
    p.add_argument("--out", required=True, help="the table (JSON) to write")


def run_profile(args: argparse.Namespace) -> int:
    """Validate, profile, write the table; print a one-line summary."""
    from merino_pl.latency.api import ProfileSettings, profile

    table = profile(
        ProfileSettings(
            args.out,
            args.device,
            args.space,
            args.precision,
            args.batch,
            args.seq,
            args.runs,
            args.warmup,
            args.threads,
            args.runtime,
        )
    )
    print(
        f"wrote {args.out}: {len(table.layers)} layer shapes, {len(table.projections)} projections, "
        f"fixed {table.fixed['ms']:.3f} ms on {table.device['summary']}"
    )
    return 0


def add_kit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", metavar="MODEL", help="a .ckpt, an exported / GPTQ directory or a recipe")
    p.add_argument("--space", default=None, help="a search space YAML: its pieces, as `latency profile` times them")
    p.add_argument("--precision", default="fp32", help="model graphs: comma-separated, of fp32,fp16 (default: fp32)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--seq", type=int, default=128, help="prompt length (default: 128)")
    p.add_argument("--runs", type=int, default=16, help="timed runs per graph (default: 16)")
    p.add_argument("--warmup", type=int, default=4, help="untimed runs first (default: 4)")
    p.add_argument("--decode-tokens", type=int, default=8, help="one-token decode steps per timed run (default: 8)")
    p.add_argument("--out", required=True, help="the kit folder to write (a new one, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing kit folder at --out")


def run_kit(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from merino_pl.latency.kit import RUNNER, KitSettings, build_kit
    from merino_pl.latency.options import Timing

    precisions = tuple(x.strip().lower() for x in args.precision.split(",") if x.strip())
    timing = {f.name: getattr(args, f.name) for f in fields(Timing)}  # --batch, --seq, --runs, ...
    s = KitSettings(
        out=args.out, source=args.source, space=args.space, precisions=precisions, overwrite=args.overwrite, **timing
    )
    manifest = build_kit(s)
    print(
        f"wrote {args.out}: {len(manifest['graphs'])} graphs, {RUNNER}; on the device: "
        f"python {RUNNER} --providers cpu (or tensorrt,cuda,cpu), then merino-pl latency import results.json "
        f"--kit {args.out} --out OUT"
    )
    return 0


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", metavar="RESULTS.json", help="what the kit's run_kit.py wrote on the device")
    p.add_argument("--kit", required=True, help="the kit folder the results are of")
    p.add_argument("--out", required=True, help="a space kit: the latency table (JSON); a model kit: the report folder")


def run_import(args: argparse.Namespace) -> int:
    from merino_pl.core.io import check_out
    from merino_pl.latency.kit import import_results

    problems = check_out(args.out)
    if problems:
        from merino_pl.core.errors import MerinoError

        raise MerinoError("; ".join(problems))
    print(f"wrote {import_results(args.results, args.kit, args.out)}")
    return 0


# sub-command -> (its flags, its run, one-line description)
SUBCOMMANDS = {
    "kit": (add_kit_arguments, run_kit, "write a device kit: ONNX graphs, manifest, a numpy + onnxruntime runner"),
    "import": (add_import_arguments, run_import, "a device kit's results as a latency report or latency table"),
    "plot": (add_plot_arguments, run_plot, "accuracy vs latency bubble chart in the style of the paper's Figure 1"),
    "profile": (add_profile_arguments, run_profile, "measure a device latency table over a search space"),
}


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with these arguments that need no model, for ``pipeline`` before any stage runs
    (the sub-commands: their own parsers)."""
    if argv and argv[0] in SUBCOMMANDS:
        return parse_problems(SUBCOMMANDS[argv[0]][0], argv[1:], f"latency {argv[0]}")[1]
    args, problems = parse_problems(add_arguments, argv, "latency")
    return problems if args is None else settings(args).problems()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        add, run_sub, description = SUBCOMMANDS[argv[0]]
        parser = ArgumentParser(prog=f"merino-pl latency {argv[0]}", description=description)
        add(parser)
        return int(run_sub(parser.parse_args(argv[1:])) or 0)
    parser = ArgumentParser(
        prog="merino-pl latency",
        description="latency report on this device (sub-commands: profile, plot, kit, import)",
        epilog="sub-commands: `merino-pl latency profile --help`, `merino-pl latency plot --help`, "
        "`merino-pl latency kit --help` (a device kit: ONNX graphs + a numpy / onnxruntime runner), "
        "`merino-pl latency import --help` (its results as a report or table)",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
