"""``merino-pl generate MODEL [--prompt TEXT | --prompt-file F] [--max-new-tokens N]
[--runtime torch|onnxruntime|executorch] [--onnx PATH | --onnx-out PATH | --pte PATH]
[--temperature T --top-k K --seed S] [--threads N]``.

Streams the prompt and its continuation to stdout, then one line: prompt tokens, new tokens, why
it stopped, prefill ms, decode tokens/s (what it does: ``generate.api``; docs/generate.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merino_pl.core.errors import MerinoError
from merino_pl.generate.api import RUNTIMES, GenerateSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="a `merino-pl export` or `merino-pl quantize` directory, or a .ckpt from `merino-pl fit`"
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text to continue (default: none, a new document)")
    prompt.add_argument("--prompt-file", default=None, metavar="F", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="stop after N new tokens (default: 64)")
    p.add_argument("--runtime", default=None, help=f"{' or '.join(RUNTIMES)} (default: torch; onnxruntime with --onnx)")
    p.add_argument(
        "--onnx",
        default=None,
        metavar="PATH",
        help="onnxruntime: decode with this graph (default: MODEL/model.onnx, else one exported on the fly)",
    )
    p.add_argument(
        "--onnx-out",
        default=None,
        metavar="PATH",
        help="onnxruntime: keep the graph exported on the fly here, a new file (default: a temporary one)",
    )
    p.add_argument(
        "--pte", default=None, metavar="PATH", help="executorch: run this program (default: MODEL/model.pte)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="sample at this temperature (default: greedy; 1 when only --top-k is given; 0: greedy)",
    )
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampling (default: 0)")
    p.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch / onnxruntime threads (default: torch's)"
    )


def settings_from_args(args: argparse.Namespace) -> tuple[GenerateSettings, list[str]]:
    """The settings these flags give, and the problems only the flags show (a prompt file)."""
    problems, prompt = [], args.prompt or ""
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"--prompt-file {args.prompt_file}: cannot read it ({type(e).__name__}: {e.args[-1]})")
    runtime = args.runtime or ("onnxruntime" if args.onnx or args.onnx_out else "executorch" if args.pte else "torch")
    temperature = args.temperature if args.temperature is not None else (1.0 if args.top_k is not None else 0.0)
    settings = GenerateSettings(
        model=args.model,
        prompt=prompt,
        max_new_tokens=args.max_new_tokens,
        runtime=runtime,
        onnx=args.onnx,
        onnx_out=args.onnx_out,
        pte=args.pte,
        temperature=temperature,
        top_k=args.top_k,
        seed=args.seed,
        threads=args.threads,
    )
    return settings, problems


def run(args: argparse.Namespace) -> int:
    settings, problems = settings_from_args(args)
    problems += settings.problems()
    if problems:
        raise MerinoError("; ".join(problems))
    from merino_pl.generate.api import generate  # torch from here on

    shown = []  # the prompt goes out with the first new text: after the notes, never before an error

    def text(piece: str) -> None:
        if not shown:
            shown.append(True)
            sys.stdout.write(settings.prompt)
        sys.stdout.write(piece)
        sys.stdout.flush()

    def note(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = generate(settings, on_text=text, on_note=note)
    text("\n")
    print(result.summary(), flush=True)
    return 0
