"""The demo's library: ``demo(DemoSettings())`` trains the demo model on the embedded corpus,
then generates from it (``merino-pl demo`` is ``demo/cli.py``).

It runs the fit stage's entry (``merino_pl.fit.api.fit``) with the packaged
``recipes/fit/cpu-demo.yaml`` (recipe merino-demo: the demo search's 0.8 M-parameter design with
the shipped 2048-id BPE; public-domain Shakespeare, fp32 on the CPU, a few minutes on 2 cores, no
network), prints the recipe through ``merino_pl.info.api``, the loss
as it falls, and a sampled generation (top-k 40, temperature 0.8) from the trained checkpoint.
`make demo` runs the whole pipeline instead (``merino-pl pipeline``).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from merino_pl.core.config import load_recipe
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_yaml
from merino_pl.info.api import format_table, summarize

DEFAULT_PROMPT = "First Citizen:\nBefore we proceed any further,"


@dataclass
class DemoSettings:
    """One demo run, as ``merino-pl demo``'s flags give it (same names, same defaults)."""

    config: str | None = None  # fit config; None: the packaged recipes/fit/cpu-demo.yaml
    max_steps: int | None = None  # overrides the config's trainer.max_steps
    out: str = "runs/demo"  # parent folder of this run's folder (checkpoints, logs)
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 32


def demo_config() -> Path:
    return Path(str(resources.files("merino_pl").joinpath("recipes", "fit", "cpu-demo.yaml")))


def _fit_argv(config: Path, root: Path, cfg: dict, max_steps: int | None) -> list[str]:
    """The fit command line: the run under ``root``, a shorter schedule when ``max_steps`` is given."""
    argv = ["--config", str(config), "--trainer.default_root_dir", str(root)]
    argv += ["--trainer.logger.init_args.save_dir", str(root)]
    if max_steps is not None:
        warmup = min(int(cfg["model"].get("warmup_steps", 0)), max(1, max_steps // 10))
        every = min(int(cfg["trainer"].get("log_every_n_steps", 10)), max_steps)
        argv += ["--trainer.max_steps", str(max_steps), "--model.warmup_steps", str(warmup)]
        argv += ["--trainer.log_every_n_steps", str(every)]
    return argv


def demo(settings: DemoSettings) -> Path:
    """Train (through ``fit.api.fit``), report the loss, generate; returns the last checkpoint.
    Bad settings: one ``MerinoError`` before anything is trained."""
    config = Path(settings.config) if settings.config else demo_config()
    if not config.is_file():
        raise MerinoError(f"--config {config}: no such file")
    if settings.max_steps is not None and settings.max_steps < 1:
        raise MerinoError(f"--max-steps must be >= 1, got {settings.max_steps}")
    cfg = read_yaml(config, "fit config")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("model", "trainer")):
        raise MerinoError(f"--config {config}: not a fit config (mappings model: and trainer: expected)")
    recipe = load_recipe(cfg["model"].get("recipe") or "merino-tiny")
    root = Path(settings.out) / time.strftime("%Y%m%d-%H%M%S")
    from merino_pl.fit.api import fit, validate_argv  # Lightning: once the settings are checked

    argv = _fit_argv(config, root, cfg, settings.max_steps)
    if problems := validate_argv(argv):  # the whole config, before the table: an error is the only line
        raise MerinoError("; ".join(problems))
    print(format_table(summarize(recipe)), "\n", flush=True)
    start = time.perf_counter()
    fit(argv)
    losses = _losses(root)
    if losses:
        (s0, l0), (s1, l1) = losses[0], losses[-1]
        print(f"\ntrained in {time.perf_counter() - start:.0f} s: loss {l0:.3f} (step {s0}) -> {l1:.3f} (step {s1})")
    ckpt = root / "checkpoints" / "last.ckpt"
    _generate(ckpt, settings.prompt, settings.max_new_tokens)
    return ckpt


def _losses(root: Path) -> list[tuple[int, float]]:
    """(optimizer step, loss) as logged (Lightning's CSV counts steps from 0)."""
    rows = [r for p in sorted(root.glob("logs/version_*/metrics.csv")) for r in csv.DictReader(p.open())]
    return [(int(r["step"]) + 1, float(r["train/loss"])) for r in rows if r.get("train/loss")]


def _generate(ckpt: Path, prompt: str, max_new_tokens: int) -> None:
    import torch

    from merino_pl.core.checkpoint import load_model, trained_tokenizer
    from merino_pl.core.tokenizer import hf_tokenizer

    loaded = load_model(ckpt)
    tok = hf_tokenizer(trained_tokenizer(ckpt))  # the one it was trained with (the config's data.tokenizer)
    enc = tok(prompt, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():  # sampled: greedy decoding of a minutes-old model repeats "\n" forever
        out = loaded.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            pad_token_id=tok.eos_token_id,
        )
    print(f"\ngeneration from the trained model ({ckpt}; top-k 40, temperature 0.8, seed 0):")
    print(prompt + tok.decode(out[0, enc.input_ids.shape[1] :]))
    print(f"\nexport it for HF / lm-eval: merino-pl export {ckpt} --out {ckpt.parent.parent / 'hf'}")
