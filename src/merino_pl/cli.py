"""``merino-pl``: one table dispatches to one entry module per stage.

Each stage module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when its command runs, so ``merino-pl info`` does not pay for Lightning or lm-eval.
``fit`` hands its arguments to LightningCLI unchanged.

Bad input raises ``MerinoError`` anywhere below; it is printed here as one line, exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from merino_pl.core.errors import ArgumentParser  # one-line usage errors (study/cli.py imports it from here)

# command -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "info": ("merino_pl.info.cli", "architecture table, parameters, FLOPs, KV cache and entropy of a recipe"),
    "demo": (
        "merino_pl.demo.cli",
        "train the tiny model on the embedded corpus and generate (make demo runs `pipeline`)",
    ),
    "search": ("merino_pl.search.cli", "entropy-driven evolutionary architecture search -> recipe YAML"),
    "prepare": ("merino_pl.data.cli", "tokenize a text source into pre-tokenized shards"),
    "fit": ("merino_pl.fit.cli", "pretrain a recipe (LightningCLI)"),
    "validate": ("merino_pl.fit.cli:validate_main", "held-out loss of a checkpoint (LightningCLI validate)"),
    "test": (
        "merino_pl.fit.cli:test_main",
        "held-out loss of a checkpoint through the test loop (LightningCLI test)",
    ),
    "export": ("merino_pl.export.cli", "export a checkpoint as an HF-loadable directory (or ONNX)"),
    "eval": ("merino_pl.eval.cli", "lm-eval zero-shot tasks and WikiText-2 / PTB perplexity"),
    "quantize": ("merino_pl.quantize.cli", "GPTQ INT8 / INT4 quantization"),
    "generate": ("merino_pl.generate.cli", "decode text from a model with its KV cache, on torch or onnxruntime"),
    "latency": ("merino_pl.latency.cli", "latency report on this device; device latency tables"),
    "study": ("merino_pl.study.cli", "proxy study: train sampled architectures, rank proxies, calibrate the entropy"),
    "slurm": ("merino_pl.slurm.cli", "render / submit SLURM jobs for 8 x H100 nodes"),
    "pipeline": ("merino_pl.pipeline.cli", "search -> fit -> export -> quantize -> eval -> latency"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: merino-pl COMMAND [options]\n\ncommands:")
        for name, (_, help_) in STAGES.items():
            print(f"  {name:<10} {help_}")
        return 0
    if argv[0] in ("-V", "--version"):
        from merino_pl import __version__

        print(f"merino-pl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        sys.stderr.write(f"merino-pl: error: unknown command {name!r} (valid: {', '.join(STAGES)})\n")
        return 2
    module_name, _, entry = STAGES[name][0].partition(":")
    module = importlib.import_module(module_name)
    from merino_pl.core.errors import MerinoError, disk_full, not_permitted

    try:
        if entry or hasattr(module, "main"):  # stages that own their argument parsing (LightningCLI)
            return int(getattr(module, entry or "main")(rest) or 0)
        parser = ArgumentParser(prog=f"merino-pl {name}", description=STAGES[name][1])
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(rest)) or 0)
    except MerinoError as e:
        sys.stderr.write(f"merino-pl {name}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"merino-pl {name}: interrupted\n")
        return 130
    except Exception as e:  # a full disk or a read-only folder under a library's writer (Lightning, torch.save, onnx)
        full = disk_full(e) or not_permitted(e)
        if full is None:
            raise
        sys.stderr.write(f"merino-pl {name}: error: {full}\n")
        return full.exit_code


if __name__ == "__main__":
    sys.exit(main())
