"""``merino-pl study run``: sample, train every architecture through ``fit``, score held-out loss.

Layout of ``--out DIR`` (the study owns it; a re-run continues it)::

    study.json              config, sampled architectures, tokenizer, held-out sets (checked on resume)
    tokenizer.json          the BPE trained on the training split (unless the config names one)
    heldout-*.pt            held-out token windows (in-domain hold-out, cross-domain WikiText-2)
    results/RUN.json        one per finished run: costs, data proxies, held-out loss at half and full length
    runs/RUN/               the run's recipe, fit log and Lightning logs (checkpoints removed once scored)

A run is ``aNNN-sSEED`` (architecture NNN of the sample, training seed SEED), with ``-xM`` when
it trains M times the main study's steps (``lengths``) and ``-lrLR`` when it overrides the
learning rate (``lr_grid``); every run of every length and lr shares the tokenizer and the
held-out windows, so their losses compare directly. Each run is one
worker process (``python -m merino_pl.study.worker``) that computes the data proxies at init,
calls ``merino-pl fit``'s entry point and scores the half-length and final checkpoints; its result
file is written atomically last, so a kill loses at most the runs in flight (and those resume
from their newest checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.config import Recipe
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import write_json
from merino_pl.study.config import StudyConfig
from merino_pl.study.sample import sample_architectures

FORMAT = "merino-study/1"
RESULT_FORMAT = "merino-study-run/1"


@dataclass
class StudySettings:
    """What ``study run`` and ``study compare`` take: the study config, its folder, and how runs go."""

    config: StudyConfig
    out: Path
    jobs: int = 1  # runs trained at once
    threads: int = 1  # torch threads per run
    extra: list[str] = field(default_factory=list)  # `merino-pl fit` options passed to every run
    progress: bool = True  # the progress bar


@dataclass(frozen=True)
class Run:
    arch_index: int
    seed: int
    length: int = 1  # times the main study's max_steps
    lr: float | None = None  # None: the fit config's

    @property
    def id(self) -> str:
        tail = (f"-x{self.length}" if self.length != 1 else "") + (f"-lr{self.lr:g}" if self.lr is not None else "")
        return f"a{self.arch_index:03d}-s{self.seed}{tail}"

    @classmethod
    def parse(cls, run_id: str) -> Run:
        """The run an id names (``a003-s1-x4``, ``a003-s1-lr0.004``)."""
        parts = run_id.split("-")
        if len(parts) < 2 or not parts[0].startswith("a") or not parts[1].startswith("s"):
            raise MerinoError(f"not a study run id: {run_id!r} (e.g. a003-s1, a003-s1-x4, a003-s1-lr0.004)")
        run = cls(int(parts[0][1:]), int(parts[1][1:]))
        for p in parts[2:]:
            if p.startswith("x"):
                run = cls(run.arch_index, run.seed, int(p[1:]), run.lr)
            elif p.startswith("lr"):
                run = cls(run.arch_index, run.seed, run.length, float(p[2:]))
        return run

    def args(self, base_steps: int) -> list[str]:
        """The fit overrides that make this run's length and lr (after the study's own, so they win)."""
        out = ["--trainer.max_steps", str(base_steps * self.length)] if self.length != 1 else []
        return out + (["--model.lr", f"{self.lr:g}"] if self.lr is not None else [])


def read_result(out: Path, run_id: str) -> dict[str, Any] | None:
    """A finished run's result, or None when it has none yet. A result that cannot be read (truncated,
    edited, another format) counts as not finished: the run trains again and replaces it."""
    path = out / "results" / f"{run_id}.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(result, dict) and result.get("format") == RESULT_FORMAT and result.get("id") == run_id
    return result if ok and isinstance(result.get("heldout"), dict) else None


def plan_runs(cfg: StudyConfig, base_lr: float | None = None) -> list[Run]:
    """Every run, the noise-ceiling reruns interleaved (one after every third architecture) so a
    study stopped early still has both a ranking and a ceiling to show; then the longer lengths
    (architecture by architecture), the lr grid (every lr of one architecture before the next;
    an lr equal to the fit config's is the main run itself), and last the longer lengths' reruns."""
    runs, reruns = [], [Run(i, cfg.ceiling_seed) for i in range(cfg.ceiling_architectures)]
    for i in range(cfg.architectures):
        runs.append(Run(i, cfg.seed))
        if i % 3 == 2 and reruns and reruns[0].arch_index <= i:
            runs.append(reruns.pop(0))
    runs += reruns
    runs += [Run(i, cfg.seed, m) for m in cfg.lengths for i in range(cfg.length_architectures)]
    lrs = [lr for lr in cfg.lrs if base_lr is None or not math.isclose(lr, base_lr, rel_tol=1e-9)]
    runs += [Run(i, cfg.seed, 1, lr) for i in range(cfg.lr_architectures) for lr in lrs]
    runs += [Run(i, cfg.ceiling_seed, m) for m in cfg.lengths for i in range(cfg.length_ceiling)]
    return runs


def fit_setting(cfg: StudyConfig, section: str, key: str, extra: list[str] | None = None) -> Any:
    """A fit setting as the main study's runs see it: the fit config, then ``fit.args``, then the
    command line's pass-through options (the last one given wins, as in LightningCLI)."""
    from merino_pl.core.io import read_yaml

    given = last_flag([*cfg.fit_args, *(extra or [])], f"--{section}.{key}")
    return given if given is not None else ((read_yaml(cfg.fit_config, "fit config") or {}).get(section) or {}).get(key)


def fit_config_of(manifest: dict[str, Any]) -> Path | None:
    """The fit config a study was trained with: the path its ``study.json`` records, or, where that
    file has moved since (``recipes/train/`` became ``recipes/fit/``), the one its study config
    (``config_file``) names now, taken only when its ``data`` section is the one recorded (the
    check a resume makes). None when neither is found."""
    from merino_pl.core.io import read_yaml

    recorded = Path(manifest.get("fit_config") or "")
    if recorded.is_file():
        return recorded
    source = Path(manifest.get("config_file") or "")
    if not source.is_file():
        return None
    fit = ((read_yaml(source, "study config") or {}).get("fit") or {}).get("config")
    path = source.parent / str(fit) if fit else None
    if path is None or not path.is_file():
        return None
    data = (read_yaml(path, "fit config") or {}).get("data") or {}
    data = data.get("init_args", data) if isinstance(data, dict) else {}
    return path if data == manifest.get("data") else None


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


def last_flag(argv: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag v`` or ``--flag=v``) in a LightningCLI argv."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def write_recipe(manifest: dict[str, Any], run: Run, run_dir: Path) -> Path:
    from merino_pl.core.config import MerinoConfig

    arch = MerinoConfig.from_dict(manifest["architectures"][run.arch_index])
    recipe = Recipe(
        f"{manifest['name']}-{run.id}",
        arch,
        {"source": "study", "study": manifest["name"], "arch_index": run.arch_index, "seed": run.seed},
    )
    return recipe.save(run_dir / "recipe.yaml")


def _launch(out: Path, run: Run, threads: int, extra: list[str], base_steps: int) -> tuple[Run, int, float]:
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
                run.id,
                str(threads),
                *extra,
                *run.args(base_steps),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return run, rc, time.perf_counter() - start


def run_study(settings: StudySettings) -> list[Path]:
    """Train every run of the study not yet finished, ``settings.jobs`` at a time; returns the result files."""
    cfg, out, jobs = settings.config, settings.out, settings.jobs
    manifest = prepare(cfg, out)
    lr = fit_setting(cfg, "model", "lr", settings.extra)
    runs = plan_runs(cfg, float(lr) if lr is not None else None)
    variants = len(runs) - cfg.architectures - cfg.ceiling_architectures
    print(
        f"study {cfg.name}: {len(runs)} runs ({cfg.architectures} architectures + {cfg.ceiling_architectures} "
        f"reruns" + (f" + {variants} at other lengths / lrs" if variants else "") + f"), {jobs} at a time",
        flush=True,
    )
    return execute(manifest, runs, settings)


def execute(manifest: dict[str, Any], runs: list[Run], settings: StudySettings) -> list[Path]:
    """Train ``runs`` (skipping finished ones) with the worker, ``settings.jobs`` processes at a time
    into ``settings.out``."""
    from tqdm.auto import tqdm

    from merino_pl.core.io import read_yaml

    out, jobs, threads, extra = settings.out, settings.jobs, settings.threads, settings.extra
    todo = [r for r in runs if read_result(out, r.id) is None]
    base_steps = last_flag([*manifest["fit_args"], *(extra or [])], "--trainer.max_steps")
    base_steps = int(base_steps or (read_yaml(manifest["fit_config"], "fit config") or {})["trainer"]["max_steps"])
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished, {len(todo)} to train", flush=True)
    for run in todo:
        write_recipe(manifest, run, out / "runs" / run.id)
    failed, finished = [], 0
    bar = tqdm(
        total=len(runs), initial=len(runs) - len(todo), unit="run", disable=not settings.progress, dynamic_ncols=True
    )
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: set[Future] = set()
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                pending.add(pool.submit(_launch, out, queue.pop(0), threads, list(extra or []), base_steps))
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
