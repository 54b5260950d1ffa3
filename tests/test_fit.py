"""Training stage: schedule, optimizer groups, config checks, exact resume after kill -9,
atomic checkpoints under a kill mid-save, the non-finite guard, 2-process DDP, export.

All runs use a micro recipe (d_model 32; the vocabulary stays the shipped tokenizer's 50 304)
on the embedded corpus, fp32, one thread. Runs that need a fresh process (kill -9, DDP) go
through the real ``python -m merino_pl.cli fit``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from merino_pl.cli import main as cli_main
from merino_pl.core.checkpoint import load_model
from merino_pl.core.errors import MerinoError
from merino_pl.fit.callbacks import AtomicCheckpointIO, format_duration
from merino_pl.fit.module import MerinoLightningModule, NonFiniteLossError, lr_factor, param_groups

REPO = Path(__file__).resolve().parents[1]
MICRO = {
    "name": "micro",
    "architecture": {
        "vocab_size": 50304,
        "d_model": 32,
        "max_position_embeddings": 64,
        "head_dim": 16,
        "blocks": [
            {"embed_dim": 32, "ffn_ratio": 2, "num_layers": 2},
            {"embed_dim": 32, "ffn_ratio": 2, "num_layers": 1},
            {"embed_dim": 48, "ffn_ratio": 2, "num_layers": 1},
            {"embed_dim": 48, "ffn_ratio": 2, "num_layers": 1},
        ],
    },
    "provenance": {"source": "test"},
}


def micro_fit_config(tmp_path: Path, run: Path) -> dict:
    """A complete ``fit`` config as a dict: the micro recipe (written to ``tmp_path``), embedded
    corpus, CSV losses every step and a checkpoint every 4 steps under ``run``."""
    recipe = tmp_path / "micro.yaml"
    recipe.write_text(yaml.safe_dump(MICRO))
    return {
        "seed_everything": 7,
        "model": {"recipe": str(recipe), "lr": 3e-3, "warmup_steps": 2},
        "data": {
            "source": "embedded",
            "seq_len": 32,
            "batch_size": 4,
            "num_workers": 0,
            "val_sequences": 0,
            "shuffle_windows": 64,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": 10,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "logs"},
            },
        },
        "checkpoint": {"every_n_train_steps": 4},
    }


@pytest.fixture
def fit_config(tmp_path: Path) -> Path:
    """A complete ``fit`` config file (``micro_fit_config``) running under ``tmp_path / "run"``."""
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(micro_fit_config(tmp_path, tmp_path / "run")))
    return path


def run_dir_args(root: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


def fit_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "merino_pl.cli", "fit", "--config", str(config), *extra]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def step_losses(root: Path) -> dict[int, str]:
    """{logged step: loss as written} from every CSV log under ``root`` (exact text: bitwise)."""
    out: dict[int, str] = {}
    for path in sorted(root.glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = row["train/loss"]
    return out


# ---- units -------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays_linearly_to_ten_percent():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert f[60] == pytest.approx(1 - 0.9 * 0.5)
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_weight_decay_on_matrices_only(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(MICRO))
    module = MerinoLightningModule(str(tmp_path / "m.yaml"))
    decay, no_decay = param_groups(module.model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))
    assert any(p is module.model.model.embed_tokens.weight for p in decay["params"])  # tied head, once


def test_durations_in_progress_lines():
    assert [format_duration(x) for x in (0, 59.6, 3725, 10 * 86400 + 47288)] == [
        "0:00:00",
        "0:01:00",
        "1:02:05",
        "10d 13:08:08",
    ]


def test_module_rejects_bad_hyperparameters():
    with pytest.raises(MerinoError, match=r"model.lr .*model.betas"):
        MerinoLightningModule("merino-tiny", lr=-1.0, betas=(0.9, 1.5))


# ---- the fit CLI -------------------------------------------------------------------------------
def test_fit_reports_every_bad_value_in_one_line_before_work(fit_config, tmp_path, capsys):
    code = cli_main(
        [
            "fit",
            "--config",
            str(fit_config),
            "--model.lr",
            "-1",
            "--model.warmup_steps",
            "50",
            "--data.seq_len",
            "4096",
            "--model.recipe",
            "no-such-recipe",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for part in ("model.lr", "warmup_steps 50 exceeds trainer.max_steps 10", "model.recipe", "no-such-recipe"):
        assert part in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fit_parse_errors_are_one_line(fit_config, capsys):
    code = cli_main(["fit", "--config", str(fit_config), "--model.lr", "abc"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model.lr" in err, err
    assert "Traceback" not in err


def test_fit_writes_loadable_exportable_checkpoints(fit_config, tmp_path, capsys):
    assert cli_main(["fit", "--config", str(fit_config), "--trainer.max_steps", "4", "--model.warmup_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "step       4/4  loss" in out
    # one plain line per log interval (readable in a SLURM log): step rate, elapsed, ETA
    progress = re.findall(
        r"^step +(\d+)/4  .* (?:steps/s|s/step)  elapsed \d+:\d\d:\d\d  ETA (\d+:\d\d:\d\d)$", out, re.M
    )
    assert [int(step) for step, _ in progress] == [1, 2, 3, 4], out
    assert progress[-1][1] == "0:00:00"
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert {p.name for p in ckpt_dir.iterdir()} == {"last.ckpt", "step-00000004.ckpt"}
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)  # what load_model / export use
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["merino"]["recipe"]["name"] == "micro" and ckpt["merino"]["tokens_seen"] == 4 * 4 * 32
    assert ckpt["merino"]["seq_len"] == 32  # the trained context: eval / latency default to it
    assert {"torch", "numpy", "python"} <= set(ckpt["merino"]["rng"])
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"], "data position missing"
    loaded = load_model(ckpt_dir / "last.ckpt")
    assert torch.equal(loaded.model.model.embed_tokens.weight, ckpt["state_dict"]["model.model.embed_tokens.weight"])
    assert cli_main(["export", str(ckpt_dir / "last.ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["trained_seq_len"] == 32


def test_streaming_resume_on_other_workers_is_one_line_exit_2(fit_config, tmp_path, capsys):
    """A streamed source cannot resume exactly with another reader layout: one line, exit 2."""
    assert cli_main(["fit", "--config", str(fit_config), "--trainer.max_steps", "2", "--model.warmup_steps", "1"]) == 0
    capsys.readouterr()
    argv = ["fit", "--config", str(fit_config), "--trainer.max_steps", "4", "--model.warmup_steps", "1"]
    assert cli_main([*argv, "--data.num_workers", "1", "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err  # (after Lightning's "checkpoint directory not empty" of every resume)
    assert (
        err.endswith("\n") and err.splitlines()[-1].startswith("merino-pl fit: error: ") and "Traceback" not in err
    ), err
    err = err.splitlines()[-1]
    assert "num_workers: 0 -> 1" in err and "--data.shards" in err and "--data.resume false" in err


def test_shipped_fit_configs_parse(tmp_path):
    """Both shipped configs parse and instantiate (the paper's with CPU overrides)."""
    from merino_pl.fit.api import build_cli

    cpu = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    demo = build_cli(["--config", str(REPO / "recipes/fit/cpu-demo.yaml"), *cpu], run=False)
    assert demo.model.recipe.name == "merino-demo" and demo.datamodule.hparams.source == "embedded"
    assert demo.model.recipe.architecture.vocab_size == demo.datamodule.tok.get_vocab_size() == 2048
    pile = yaml.safe_load((REPO / "recipes/fit/pile-8xh100.yaml").read_text())
    t, d = pile["trainer"], pile["data"]
    assert t["max_steps"] == 600_000 and t["precision"] == "bf16-mixed" and t["strategy"] == "ddp"
    assert t["devices"] * d["batch_size"] * t["accumulate_grad_batches"] == 1024 and d["seq_len"] == 1024
    pile_cli = build_cli(
        [
            "--config",
            str(REPO / "recipes/fit/pile-8xh100.yaml"),
            *cpu,
            "--model.recipe",
            "merino-tiny",
            "--data.seq_len",
            "128",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert pile_cli.datamodule.hparams.source == "EleutherAI/the_pile_deduplicated"


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--trainer.accelerator", "gpu"], ["trainer.accelerator 'gpu'", "no CUDA device"]),
        (["--trainer.accelerator", "cuda"], ["trainer.accelerator 'cuda'", "no CUDA device"]),
        (["--ckpt_path", "MISSING"], ["ckpt_path", "missing.ckpt: file not found"]),
        (["--ckpt_path", "TRUNCATED"], ["ckpt_path", "truncated.ckpt: not a readable checkpoint"]),
        (["--trainer.precision", "fp64"], ["trainer.precision", "fp64", "valid:", "32-true"]),
    ],
    ids=["gpu", "cuda", "ckpt-missing", "ckpt-truncated", "precision"],
)
def test_fit_bad_environment_is_one_line_before_anything_is_written(fit_config, tmp_path, capsys, extra, needles):
    if "accelerator" in extra[0] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not the whole archive")
    extra = [a.replace("MISSING", str(tmp_path / "missing.ckpt")).replace("TRUNCATED", str(truncated)) for a in extra]
    assert cli_main(["fit", "--config", str(fit_config), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "run").exists(), "nothing written before the check"


def test_fit_yaml_error_names_the_file(fit_config, tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  lr: [1,\n")
    assert cli_main(["fit", "--config", str(fit_config), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: line 3" in err, err


def _first_run_state(fit_config, *extra):
    """(seeds, first weight, first training batch) of the run ``fit`` would start."""
    from merino_pl.fit.api import build_cli

    cli = build_cli(["--config", str(fit_config), *extra], run=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    weight = cli.model.model.model.embed_tokens.weight.detach().clone()
    return (cli.model.hparams.seed, cli.datamodule.hparams.seed), weight, batch


def test_seed_everything_seeds_the_init_and_the_data_order(fit_config):
    """`--seed_everything N` changes the run (LightningCLI's convention); a given seed wins."""
    seeds1, w1, b1 = _first_run_state(fit_config, "--seed_everything", "1")
    seeds2, w2, b2 = _first_run_state(fit_config, "--seed_everything", "2")
    assert seeds1 == (1, 1) and seeds2 == (2, 2)
    assert not torch.equal(w1, w2) and not torch.equal(b1, b2)
    seeds3, w3, b3 = _first_run_state(fit_config, "--seed_everything", "2", "--model.seed", "1", "--data.seed", "1")
    assert seeds3 == (1, 1) and torch.equal(w3, w1) and torch.equal(b3, b1)


def test_logs_follow_default_root_dir(tmp_path):
    """The shipped config's logger writes under --trainer.default_root_dir, not ./runs/cpu-demo."""
    from merino_pl.fit.api import build_cli

    root = tmp_path / "elsewhere"
    cli = build_cli(
        ["--config", str(REPO / "recipes/fit/cpu-demo.yaml"), "--trainer.default_root_dir", str(root)], run=False
    )
    assert [Path(lg.save_dir) for lg in cli.trainer.loggers] == [root]
    assert Path(cli.trainer.checkpoint_callback.dirpath) == root / "checkpoints"
    mine = tmp_path / "logs-here"
    cli = build_cli(
        [
            "--config",
            str(REPO / "recipes/fit/cpu-demo.yaml"),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(mine),
        ],
        run=False,
    )
    assert [Path(lg.save_dir) for lg in cli.trainer.loggers] == [mine]


# ---- guards ------------------------------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(fit_config, tmp_path):
    import lightning as L

    from merino_pl.fit.api import build_cli

    class PoisonAt(L.Callback):  # the test's fault injection: a weight turns NaN before step 6
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                with torch.no_grad():
                    pl_module.model.model.embed_tokens.weight[0, 0] = float("nan")

    cli = build_cli(["--config", str(fit_config), "--model.warmup_steps", "1"], run=False)
    cli.trainer.callbacks.append(PoisonAt())
    cli.before_fit()
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 5"):
        cli.trainer.fit(cli.model, cli.datamodule)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


SLOW_SAVE = textwrap.dedent(
    """
    import pathlib, sys, time, torch
    from merino_pl.fit.callbacks import AtomicCheckpointIO, format_duration

    class Slow:  # pickled inside torch.save: signals, then stalls mid-save
        def __reduce__(self):
            pathlib.Path(sys.argv[2]).touch()
            time.sleep(600)
            return (int, ())

    ckpt = torch.load(sys.argv[1], weights_only=True)
    ckpt["stall"] = Slow()
    AtomicCheckpointIO().save_checkpoint(ckpt, sys.argv[1])
    """
)


def test_kill_during_checkpoint_save_keeps_previous_last(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(MICRO))
    module = MerinoLightningModule(str(tmp_path / "m.yaml"))
    good = {"state_dict": module.state_dict(), "merino": {"recipe": module.recipe.to_dict()}, "global_step": 4}
    AtomicCheckpointIO().save_checkpoint(good, last)
    before = last.read_bytes()
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(last), str(marker)], env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the saver never reached the save"
            time.sleep(0.02)
        assert list(last.parent.glob(".last.ckpt.*.tmp")), "the new checkpoint is written beside last.ckpt"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert last.read_bytes() == before
    assert load_model(last).recipe.name == "micro"
    AtomicCheckpointIO().save_checkpoint(good, last)  # the next save clears the dead temp file
    assert not list(last.parent.glob(".last.ckpt.*.tmp"))


# ---- exact resume and DDP (fresh processes) ---------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_continues_with_identical_losses(fit_config, tmp_path):
    env = subprocess_env()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(fit_cmd(fit_config, *run_dir_args(straight)), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        fit_cmd(fit_config, *run_dir_args(killed)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint before the kill"
    resumed_from = torch.load(last, weights_only=True)["global_step"]
    assert resumed_from < 10, "the run finished before it was killed: nothing to resume"
    subprocess.run(
        fit_cmd(fit_config, *run_dir_args(killed), "--ckpt_path", "last"),
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    want, got = step_losses(straight), step_losses(killed)
    assert sorted(want) == list(range(10))
    assert {s: got[s] for s in range(resumed_from, 10)} == {s: want[s] for s in range(resumed_from, 10)}


@pytest.mark.slow
def test_two_process_ddp_on_cpu_with_accumulation(fit_config, tmp_path):
    root = tmp_path / "ddp"
    proc = subprocess.run(
        fit_cmd(
            fit_config,
            *run_dir_args(root),
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "3",
            "--trainer.accumulate_grad_batches",
            "2",
            "--model.warmup_steps",
            "1",
            "--checkpoint.every_n_train_steps",
            "3",
        ),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["merino"]["tokens_seen"] == 3 * 2 * 2 * 4 * 32  # steps x accumulated x ranks x batch x seq_len
    loader = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["world_size"] == 2 and len(loader["ranks"]) == 2


RECORDER = """
import json
import lightning as L


class Record(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(f"{self.path}.{trainer.global_rank}", "a") as f:
            f.write(json.dumps([trainer.global_step, batch.tolist()]) + "\\n")
"""


def seen_windows(path: Path, before: int | None = None) -> list[tuple[int, ...]]:
    """The windows the Record callback logged (all ranks), of steps < ``before`` if given."""
    out = []
    for log in path.parent.glob(path.name + ".*"):
        for line in log.read_text().splitlines():
            step, batch = json.loads(line)
            if before is None or step < before:
                out.extend(map(tuple, batch))
    return out


@pytest.mark.slow
def test_ddp_kill_resumes_on_one_process_exactly(fit_config, tmp_path):
    """Elastic exact resume: a 2-process DDP fit from shards, kill -9 after a checkpoint,
    resumed on 1 process with 0 workers: every window of the epoch seen exactly once."""
    from collections import Counter

    import numpy as np

    corpus = tmp_path / "corpus.txt"
    words = (" ".join(f"w{(i * 7 + j * 13) % 101}" for j in range(i % 9 + 3)) for i in range(120))
    corpus.write_text("\n\n".join(f"paragraph {i}: {w}" for i, w in enumerate(words)))
    assert (
        cli_main(["prepare", str(corpus), "--out", str(tmp_path / "shards"), "--val-fraction", "0", "--workers", "1"])
        == 0
    )
    (tmp_path / "record.py").write_text(RECORDER)
    cfg = yaml.safe_load(fit_config.read_text())
    cfg["data"].update(shards=str(tmp_path / "shards"), seq_len=15, batch_size=2, num_workers=2, epochs=1)
    cfg["trainer"].update(
        max_steps=1000,
        max_epochs=1,
        callbacks=[{"class_path": "record.Record", "init_args": {"path": str(tmp_path / "seen")}}],
    )
    cfg["checkpoint"]["every_n_train_steps"] = 2
    fit_config.write_text(yaml.safe_dump(cfg))
    env = subprocess_env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    root = tmp_path / "run"
    proc = subprocess.Popen(
        fit_cmd(fit_config, *run_dir_args(root), "--trainer.devices", "2", "--trainer.strategy", "ddp"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its DDP worker process
    proc.wait()
    assert last.exists(), "no checkpoint before the kill"
    ckpt = torch.load(last, weights_only=True)
    loader = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["world_size"] == 2 and loader["cursor"] == ckpt["global_step"] * 2 * 2
    before = seen_windows(tmp_path / "seen", before=ckpt["global_step"])
    (tmp_path / "seen.0").rename(tmp_path / "killed.0")
    (tmp_path / "seen.1").rename(tmp_path / "killed.1")
    resumed = subprocess.run(
        fit_cmd(fit_config, *run_dir_args(root), "--data.num_workers", "0", "--ckpt_path", "last"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = seen_windows(tmp_path / "seen")
    assert before and after and not list(tmp_path.glob("seen.1")), "run 1 on two ranks, run 2 on one"
    tokens = np.fromfile(next((tmp_path / "shards").glob("train-*.bin")), dtype=np.uint16).astype(np.int64)
    n = -(-len(tokens) // 16)
    epoch = Counter(
        map(tuple, np.concatenate([tokens, np.zeros(n * 16 - len(tokens), np.int64)]).reshape(n, 16).tolist())
    )
    assert Counter(before + after) == epoch


# ---- W&B, demo, packaged configs --------------------------------------------------------------
def test_wandb_without_key_goes_offline_and_says_how_to_sync(tmp_path, monkeypatch, capsys):
    from merino_pl.fit.api import setup_wandb

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    init_args = {"save_dir": str(tmp_path), "offline": False, "version": None, "id": None, "mode": None, "resume": None}
    setup_wandb(init_args, resume_from=None)
    assert init_args["mode"] == "offline" and init_args["version"] and init_args["resume"] == "allow"
    assert "WANDB_MODE" not in os.environ  # wandb.init's own argument, no process-wide side effect
    assert f"wandb sync {tmp_path}/wandb/offline-run-*" in capsys.readouterr().err


def test_wandb_run_id_is_stored_and_a_resume_continues_that_run(fit_config, tmp_path, capsys):
    """A resume continues the checkpoint's W&B run through WandbLogger's public arguments:
    ``version`` = the stored run id and ``resume="allow"``, recorded in the saved config."""
    import wandb

    logger = [
        "--trainer.logger",
        "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "run"),
    ]
    common = [
        "fit",
        "--config",
        str(fit_config),
        "--model.warmup_steps",
        "1",
        "--checkpoint.every_n_train_steps",
        "2",
        *logger,
    ]
    assert cli_main([*common, "--trainer.max_steps", "2"]) == 0
    wandb.finish()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_id = torch.load(last, weights_only=True)["merino"]["wandb_run_id"]
    assert f"W&B run id {run_id} (offline" in capsys.readouterr().err
    time.sleep(1.1)  # the saved config's name carries the second it was written
    assert cli_main([*common, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
    wandb.finish()
    assert f"W&B run id {run_id} (offline" in capsys.readouterr().err
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["merino"]["wandb_run_id"] == run_id
    runs = sorted(p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs
    saved = sorted((tmp_path / "run").rglob("fit-config-*.yaml"))
    assert len(saved) == 2, saved
    init_args = yaml.safe_load(saved[-1].read_text())["trainer"]["logger"]["init_args"]
    assert (init_args["version"], init_args["resume"]) == (run_id, "allow")


def test_packaged_fit_configs_are_the_recipes_folder():
    packaged = REPO / "src" / "merino_pl" / "recipes" / "fit"
    names = sorted(p.name for p in (REPO / "recipes" / "fit").glob("*.yaml"))
    assert names == ["cpu-demo.yaml", "pile-8xh100.yaml", "study-cpu.yaml"]
    for name in names:
        assert (packaged / name).read_bytes() == (REPO / "recipes" / "fit" / name).read_bytes(), name


def test_demo_trains_then_generates(tmp_path, capsys):
    assert cli_main(["demo", "--max-steps", "2", "--out", str(tmp_path), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "step       2/2  loss" in out and "generation from the trained model" in out
    assert list(tmp_path.glob("*/checkpoints/last.ckpt"))


def test_validate_and_test_print_the_held_out_loss_of_a_checkpoint(fit_config, tmp_path, capsys):
    """`merino-pl validate|test` score a checkpoint through the same LightningCLI config as fit."""
    held = ["--data.val_sequences", "4", "--data.val_fraction", "0.05"]
    assert cli_main(["fit", "--config", str(fit_config), "--trainer.max_steps", "2", *held]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    for command, key in (("validate", "val/loss"), ("test", "test/loss")):
        assert cli_main([command, "--config", str(fit_config), *held, "--ckpt_path", str(ckpt)]) == 0
        out = capsys.readouterr().out
        assert key in out
        if command == "validate":  # our line too, without fit's "step N" (validate restores no step)
            assert re.search(r"^validate  val loss \d+\.\d{4}  val ppl \d", out, re.M), out
    assert cli_main(["validate", "--config", str(fit_config), *held]) == 2
    assert "give --ckpt_path" in capsys.readouterr().err
