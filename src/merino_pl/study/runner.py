"""``merino-pl study run``: sample, train every architecture through ``fit``, score held-out loss.

Layout of ``--out DIR`` (the study owns it; a re-run continues it)::

    study.json              config, sampled architectures, tokenizer, held-out sets (checked on resume)
    tokenizer.json          the BPE trained on the training split (unless the config names one)
    heldout-*.pt            held-out token windows (in-domain hold-out, cross-domain WikiText-2)
    results/RUN.json        one per finished run: costs, data proxies, held-out loss at half and full length
    runs/RUN/               the run's recipe, fit log and Lightning logs (checkpoints removed once scored)

A run is ``aNNN-sSEED`` (architecture NNN of the sample, training seed SEED). Each run is one
worker process (``python -m merino_pl.study.worker``) that computes the data proxies at init,
calls ``merino-pl fit``'s entry point and scores the half-length and final checkpoints; its result
file is written atomically last, so a kill loses at most the runs in flight (and those resume
from their newest checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merino_pl.core.config import Recipe
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import write_json
from merino_pl.study.config import StudyConfig
from merino_pl.study.sample import sample_architectures

FORMAT = "merino-study/1"
RESULT_FORMAT = "merino-study-run/1"


@dataclass(frozen=True)
class Run:
    arch_index: int
    seed: int

    @property
    def id(self) -> str:
        return f"a{self.arch_index:03d}-s{self.seed}"


def plan_runs(cfg: StudyConfig) -> list[Run]:
    """Every run, the noise-ceiling reruns interleaved (one after every third architecture) so a
    study stopped early still has both a ranking and a ceiling to show."""
    runs, reruns = [], [Run(i, cfg.ceiling_seed) for i in range(cfg.ceiling_architectures)]
    for i in range(cfg.architectures):
        runs.append(Run(i, cfg.seed))
        if i % 3 == 2 and reruns and reruns[0].arch_index <= i:
            runs.append(reruns.pop(0))
    return runs + reruns


def read_fit_data(cfg: StudyConfig) -> dict[str, Any]:
    """The ``data`` section of the study's fit config (what the held-out sets must match)."""
    from merino_pl.core.io import read_yaml

    data = (read_yaml(cfg.fit_config, "fit config") or {}).get("data") or {}
    return data.get("init_args", data) if isinstance(data, dict) else {}


def train_tokenizer(source: str, val_fraction: float, vocab_size: int, out: Path) -> Path:
    """A byte-level BPE trained on the training split only (held-out documents excluded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from merino_pl.core.io import atomic_path
    from merino_pl.core.tokenizer import EOS_TOKEN
    from merino_pl.data import is_heldout
    from merino_pl.data.sources import open_stream, resolve_source

    src = resolve_source(source)
    stream = open_stream(src)

    def texts():
        for docs in stream.iter(batch_size=1024):
            yield [t for t in docs[src.field("text")] if t and not is_heldout(t, val_fraction)]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    return out


def heldout_sets(cfg: StudyConfig, tokenizer: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Held-out windows (n, seq_len + 1): the fit data's hash hold-out, and WikiText-2."""
    import torch

    from merino_pl.core.assets import embedded_wikitext2
    from merino_pl.core.tokenizer import find_eos, load_tokenizer
    from merino_pl.data import DocumentTokenizer, PileDataModule

    seq_len = int(data.get("seq_len", 128))
    dm = PileDataModule(
        source=str(data.get("source", "embedded")),
        text_field=str(data.get("text_field", "text")),
        tokenizer=str(tokenizer),
        seq_len=seq_len,
        val_fraction=float(data.get("val_fraction", 0.05)),
        val_sequences=cfg.heldout_sequences,
        sample_by=data.get("sample_by", "paragraph"),
        num_workers=0,
    )
    sets = {"indomain": dm.validation_windows()}
    if cfg.cross_domain == "wikitext2":
        text = embedded_wikitext2().read_text(encoding="utf-8")
        docs = [p for p in text.split("\n \n") if p.strip()]
        tokens = DocumentTokenizer(str(tokenizer), find_eos(load_tokenizer(str(tokenizer)), str(tokenizer)))(docs)
        n = min(cfg.heldout_sequences, len(tokens) // (seq_len + 1))
        sets["wikitext2"] = torch.from_numpy(tokens[: n * (seq_len + 1)].astype("int64").reshape(n, seq_len + 1))
    for name, windows in sets.items():
        if windows is None or len(windows) < 2:
            raise MerinoError(
                f"held-out set {name!r} has fewer than 2 windows of {seq_len + 1} tokens: "
                "raise data.val_fraction in the fit config or lower heldout.sequences"
            )
    return sets


def prepare(cfg: StudyConfig, out: Path, architectures: list | None = None) -> dict[str, Any]:
    """Write (or check, on resume) ``study.json``, the tokenizer and the held-out sets.

    ``architectures``: train these instead of a uniform sample (the head-to-head).
    """
    import torch

    archs = architectures or sample_architectures(cfg.space, cfg.budgets, cfg.architectures, cfg.sample_seed)
    data = read_fit_data(cfg)
    manifest = {
        "format": FORMAT,
        "name": cfg.name,
        "config": cfg.raw,
        "config_file": cfg.source,
        "fit_config": str(cfg.fit_config),
        "fit_args": cfg.fit_args,
        "space": cfg.space.to_dict(),
        "budgets": [b.text for b in cfg.budgets],
        "sample_seed": cfg.sample_seed,
        "architectures": [a.to_dict() for a in archs],
        "data": data,
    }
    path = out / "study.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        same = (
            old.get("architectures", [])[: len(archs)] == manifest["architectures"][: len(old.get("architectures", []))]
        )
        if not same or old.get("data") != data or old.get("fit_args") != cfg.fit_args:
            raise MerinoError(f"{out} holds a study with other architectures, data or fit settings: use another --out")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = cfg.tokenizer_file or out / "tokenizer.json"
    if not tokenizer.exists():
        print(f"study: training a {cfg.vocab_size}-id BPE on the training split of {data.get('source')}", flush=True)
        train_tokenizer(
            str(data.get("source", "embedded")), float(data.get("val_fraction", 0.05)), cfg.vocab_size, tokenizer
        )
    manifest["tokenizer"] = str(tokenizer)
    for name, windows in heldout_sets(cfg, tokenizer, data).items():
        torch.save(windows, out / f"heldout-{name}.pt")
        manifest.setdefault("heldout", {})[name] = {"sequences": len(windows), "tokens_per_sequence": windows.shape[1]}
    write_json(path, manifest)
    return manifest


def write_recipe(manifest: dict[str, Any], run: Run, run_dir: Path) -> Path:
    from merino_pl.core.config import MerinoConfig

    arch = MerinoConfig.from_dict(manifest["architectures"][run.arch_index])
    recipe = Recipe(
        f"{manifest['name']}-{run.id}",
        arch,
        {"source": "study", "study": manifest["name"], "arch_index": run.arch_index, "seed": run.seed},
    )
    return recipe.save(run_dir / "recipe.yaml")


def _launch(out: Path, run: Run, threads: int, extra: list[str]) -> tuple[Run, int, float]:
    run_dir = out / "runs" / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(run_dir / "worker.log", "a", encoding="utf-8") as log:
        rc = subprocess.call(
            [
                sys.executable,
                "-m",
                "merino_pl.study.worker",
                str(out),
                str(run.arch_index),
                str(run.seed),
                str(threads),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return run, rc, time.perf_counter() - start


def run_study(
    cfg: StudyConfig, out: Path, jobs: int = 1, threads: int = 1, extra: list[str] | None = None, progress: bool = True
) -> list[Path]:
    """Train every run of the study not yet finished, ``jobs`` at a time; returns the result files."""
    manifest = prepare(cfg, out)
    runs = plan_runs(cfg)
    print(
        f"study {cfg.name}: {len(runs)} runs ({cfg.architectures} architectures + {cfg.ceiling_architectures} "
        f"reruns), {jobs} at a time",
        flush=True,
    )
    return execute(manifest, out, runs, jobs, threads, extra, progress)


def execute(
    manifest: dict[str, Any],
    out: Path,
    runs: list[Run],
    jobs: int = 1,
    threads: int = 1,
    extra: list[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Train ``runs`` (skipping finished ones) with the worker, ``jobs`` processes at a time."""
    from tqdm.auto import tqdm

    todo = [r for r in runs if not (out / "results" / f"{r.id}.json").exists()]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished, {len(todo)} to train", flush=True)
    for run in todo:
        write_recipe(manifest, run, out / "runs" / run.id)
    failed, finished = [], 0
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: set[Future] = set()
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                pending.add(pool.submit(_launch, out, queue.pop(0), threads, list(extra or [])))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                run, rc, seconds = fut.result()
                if rc != 0:
                    failed.append(run.id)
                    log = out / "runs" / run.id / "worker.log"
                    last = (log.read_text(encoding="utf-8", errors="replace").strip().splitlines() or [""])[-1]
                    tqdm.write(f"  {run.id}: FAILED (exit {rc}): {last[:300]} (log: {log})")
                    if not finished and len(failed) >= jobs:  # the same error every run: stop, do not burn hours
                        queue.clear()
                else:
                    finished += 1
                    res = json.loads((out / "results" / f"{run.id}.json").read_text(encoding="utf-8"))
                    tqdm.write(f"  {run.id}: held-out loss {res['heldout']['indomain']['full']:.4f} in {seconds:.0f} s")
                bar.update(1)
    bar.close()
    if failed:
        raise MerinoError(
            f"{len(failed)} run(s) failed: {', '.join(failed)} (logs in {out / 'runs'}); run again to retry them"
        )
    return sorted((out / "results").glob("*.json"))
