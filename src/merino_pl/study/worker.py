"""One study run in its own process: data proxies at init, ``merino-pl fit``, held-out scoring.

    python -m merino_pl.study.worker OUT RUN_ID THREADS [fit overrides ...]

Started by ``merino-pl study run`` (``merino_pl.study.runs``); not a user command.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from merino_pl.core.io import read_yaml, write_json
from merino_pl.study.runs import RESULT_FORMAT, Run, last_flag


def fit_argv(manifest: dict[str, Any], run: Run, run_dir: Path, extra: list[str]) -> tuple[list[str], int]:
    """The ``merino-pl fit`` arguments of this run, and its step count."""
    overrides = [*manifest["fit_args"], *extra]
    steps = last_flag(overrides, "--trainer.max_steps") or (read_yaml(manifest["fit_config"], "fit config") or {}).get(
        "trainer", {}
    ).get("max_steps")
    steps = int(steps)
    fit_dir = run_dir / "fit"
    argv = [
        "--config",
        manifest["fit_config"],
        *overrides,
        "--model.recipe",
        str(run_dir / "recipe.yaml"),
        "--model.seed",
        str(run.seed),
        "--data.seed",
        str(run.seed),
        "--seed_everything",
        str(run.seed),
        "--data.tokenizer",
        manifest["tokenizer"],
        "--trainer.default_root_dir",
        str(fit_dir),
        "--trainer.logger.init_args.save_dir",
        str(fit_dir),
        "--checkpoint.every_n_train_steps",
        str(max(1, steps // 2)),
        "--checkpoint.save_top_k",
        "-1",
    ]
    if (fit_dir / "checkpoints" / "last.ckpt").exists():  # a killed run resumes exactly where it saved
        argv += ["--ckpt_path", "last"]
    return argv, steps


def training_batches(manifest: dict[str, Any], seed: int, n: int) -> list[torch.Tensor]:
    """The first ``n`` training batches this run sees (same source, tokenizer, seed, shapes)."""
    from merino_pl.data import PileDataModule

    d = manifest["data"]
    dm = PileDataModule(
        source=str(d.get("source", "embedded")),
        text_field=str(d.get("text_field", "text")),
        tokenizer=manifest["tokenizer"],
        seq_len=int(d.get("seq_len", 128)),
        batch_size=int(d.get("batch_size", 8)),
        seed=seed,
        val_fraction=float(d.get("val_fraction", 0.05)),
        val_sequences=0,
        shuffle_windows=int(d.get("shuffle_windows", 256)),
        sample_by=d.get("sample_by", "paragraph"),
        num_workers=0,
    )
    dm.set_rank(0, 1)
    batches = []
    for batch in dm.train_dataset():
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def init_proxies(manifest: dict[str, Any], run: Run, run_dir: Path) -> dict[str, float]:
    """NTK condition number and DSS of the model as ``fit`` initialises it (same seed)."""
    from merino_pl.core.config import load_recipe
    from merino_pl.core.hf import MerinoForCausalLM
    from merino_pl.study.proxies import data_proxies

    cfg = manifest["config"].get("proxies") or {}
    batches = training_batches(manifest, run.seed, int(cfg.get("batches", 4)))
    torch.manual_seed(run.seed)  # as MerinoLightningModule does with model.seed
    model = MerinoForCausalLM.from_recipe(load_recipe(run_dir / "recipe.yaml"))
    return data_proxies(model, batches)


@torch.no_grad()
def heldout_loss(ckpt: Path, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss (nats / token) of a checkpoint over held-out windows."""
    from merino_pl.core.checkpoint import load_model
    from merino_pl.core.model import lm_loss

    model = load_model(ckpt).model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        total += float(lm_loss(model(batch[:, :-1], use_cache=False).logits, batch[:, 1:], reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


def last_train_loss(fit_dir: Path, steps: int) -> float | None:
    """Mean logged training loss over the last 10 % of the steps (from the CSV logs)."""
    values = []
    for path in sorted(fit_dir.rglob("metrics.csv")):
        with open(path, encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss") and int(row.get("step") or 0) >= 0.9 * steps - 1:
                    values.append(float(row["train/loss"]))
    return sum(values) / len(values) if values else None


def main(argv: list[str]) -> int:
    out, run, threads, extra = Path(argv[0]), Run.parse(argv[1]), int(argv[2]), argv[3:]
    arch_index, seed = run.arch_index, run.seed
    torch.set_num_threads(threads)
    manifest = json.loads((out / "study.json").read_text(encoding="utf-8"))
    run_dir = out / "runs" / run.id
    proxies_file = run_dir / "proxies.json"
    if not proxies_file.exists():
        write_json(proxies_file, init_proxies(manifest, run, run_dir))
    args, steps = fit_argv(manifest, run, run_dir, extra)
    from merino_pl.fit.api import fit

    start = time.perf_counter()
    fit(args)
    seconds = time.perf_counter() - start
    ckpts = run_dir / "fit" / "checkpoints"
    half, full = ckpts / f"step-{max(1, steps // 2):08d}.ckpt", ckpts / "last.ckpt"
    heldout = {}
    for name in manifest["heldout"]:
        windows = torch.load(out / f"heldout-{name}.pt", weights_only=True)
        heldout[name] = {"half": heldout_loss(half, windows), "full": heldout_loss(full, windows)}
    result = {
        "format": RESULT_FORMAT,
        "id": run.id,
        "arch_index": arch_index,
        "seed": seed,
        "length": run.length,
        "lr": float(last_flag(args, "--model.lr") or read_yaml(manifest["fit_config"], "fit config")["model"]["lr"]),
        "architecture": manifest["architectures"][arch_index],
        "steps": steps,
        "half_step": max(1, steps // 2),
        "heldout": heldout,
        "train_loss_end": last_train_loss(run_dir / "fit", steps),
        "fit_seconds": round(seconds, 1),
        "threads": threads,
        "proxies": json.loads(proxies_file.read_text(encoding="utf-8")),
        "fit_argv": args,
    }
    write_json(out / "results" / f"{run.id}.json", result)
    for f in ckpts.glob("*.ckpt"):  # the study's own scratch: scored, no longer needed
        f.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
