"""``merino-pl demo``: train the demo model on the embedded corpus, then generate from it.

Runs ``merino-pl fit`` with the packaged ``recipes/train/cpu-demo.yaml`` (the tiny recipe,
public-domain Shakespeare, fp32 on the CPU, a few minutes on 2 cores, no network), prints the
loss as it falls, and a sampled generation (top-k 40, temperature 0.8) from the trained
checkpoint. `make demo` runs the whole pipeline instead (``merino-pl pipeline``).
"""

from __future__ import annotations

import argparse
import csv
import time
from importlib import resources
from pathlib import Path

import yaml

from merino_pl.core.config import load_recipe
from merino_pl.core.errors import MerinoError
from merino_pl.info.cli import format_table, summarize


def demo_config() -> Path:
    return Path(str(resources.files("merino_pl").joinpath("recipes", "train", "cpu-demo.yaml")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="fit config (default: the packaged recipes/train/cpu-demo.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    p.add_argument("--out", default="runs/demo", help="parent folder of this run's folder (checkpoints, logs)")
    p.add_argument("--prompt", default="First Citizen:\nBefore we proceed any further,")
    p.add_argument("--max-new-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    from merino_pl.fit.cli import main as fit

    config = Path(args.config) if args.config else demo_config()
    if not config.is_file():
        raise MerinoError(f"--config {config}: no such file")
    if args.max_steps is not None and args.max_steps < 1:
        raise MerinoError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = yaml.safe_load(config.read_text())
    print(format_table(summarize(load_recipe(cfg["model"]["recipe"]))), "\n", flush=True)
    root = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    fit_args = ["--config", str(config), "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
    if args.max_steps is not None:
        warmup = min(int(cfg["model"].get("warmup_steps", 0)), max(1, args.max_steps // 10))
        every = min(int(cfg["trainer"].get("log_every_n_steps", 10)), args.max_steps)
        fit_args += ["--trainer.max_steps", str(args.max_steps), "--model.warmup_steps", str(warmup),
                     "--trainer.log_every_n_steps", str(every)]
    start = time.perf_counter()
    code = fit(fit_args)
    if code:
        return code
    losses = _losses(root)
    if losses:
        (s0, l0), (s1, l1) = losses[0], losses[-1]
        print(f"\ntrained in {time.perf_counter() - start:.0f} s: loss {l0:.3f} (step {s0}) -> {l1:.3f} (step {s1})")
    return _generate(root / "checkpoints" / "last.ckpt", args.prompt, args.max_new_tokens)


def _losses(root: Path) -> list[tuple[int, float]]:
    """(optimizer step, loss) as logged (Lightning's CSV counts steps from 0)."""
    rows = [r for p in sorted(root.glob("logs/version_*/metrics.csv")) for r in csv.DictReader(p.open())]
    return [(int(r["step"]) + 1, float(r["train/loss"])) for r in rows if r.get("train/loss")]


def _generate(ckpt: Path, prompt: str, max_new_tokens: int) -> int:
    import torch

    from merino_pl.core.checkpoint import load_model
    from merino_pl.core.tokenizer import hf_tokenizer

    loaded = load_model(ckpt)
    tok = hf_tokenizer()
    enc = tok(prompt, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():  # sampled: greedy decoding of a minutes-old model repeats "\n" forever
        out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                                    pad_token_id=tok.eos_token_id)
    print(f"\ngeneration from the trained model ({ckpt}; top-k 40, temperature 0.8, seed 0):")
    print(prompt + tok.decode(out[0, enc.input_ids.shape[1]:]))
    print(f"\nexport it for HF / lm-eval: merino-pl export {ckpt} --out {ckpt.parent.parent / 'hf'}")
    return 0
