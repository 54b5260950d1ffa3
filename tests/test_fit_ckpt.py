"""``--ckpt_path`` of ``fit`` / ``validate`` / ``test`` through its one checker (issues 23.5, 28.1):
URLs refused without running a byte of them, ``last`` resolved to the newest step, another
architecture's checkpoint refused in one line, ``validate --ckpt_path last`` with nothing to
score refused; requeue checkpoints pruned; run directories per recipe."""

from __future__ import annotations

import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from merino_pl.cli import main as cli_main
from merino_pl.core.errors import MerinoError
from merino_pl.fit.callbacks import prune_requeue_checkpoints
from merino_pl.fit.resume import check_ckpt_path
from test_fit import MICRO, fit_config  # noqa: F401 - the fixture

TRAIN = ["--trainer.max_steps", "4", "--model.warmup_steps", "1", "--checkpoint.every_n_train_steps", "2"]


class _Evil:
    """A pickle that runs code when loaded with weights_only=False: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "served" / "evil.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {}, "payload": _Evil(marker)}, path)
    return path, marker


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("merino-pl "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_url_checkpoint_is_refused_and_never_run(fit_config, tmp_path, evil, capsys, command):  # noqa: F811
    path, marker = evil
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(path.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt"
        assert cli_main([command, "--config", str(fit_config), "--ckpt_path", url]) == 2
    finally:
        server.shutdown()
    _one_line_error(capsys, url, "not loaded from URLs")
    assert not marker.exists() and not (tmp_path / "run").exists()
    # the same pickle as a file:// URL or a plain path: read with weights_only=True, refused in one line
    for given in (f"file://{path}", str(path)):
        assert cli_main([command, "--config", str(fit_config), "--ckpt_path", given]) == 2
        _one_line_error(capsys, given, "cannot read checkpoint")
        assert not marker.exists() and not (tmp_path / "run").exists()


def test_last_resolves_to_the_newest_step_not_the_newest_file(fit_config, tmp_path):  # noqa: F811
    assert cli_main(["fit", "--config", str(fit_config), *TRAIN]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    recipe = yaml.safe_load(fit_config.read_text())["model"]["recipe"]
    cfg = {"trainer": {"default_root_dir": str(tmp_path / "run")}, "checkpoint": {"dirpath": str(ckpts)}}
    cfg["model"] = {"recipe": recipe}
    assert check_ckpt_path("last", cfg, "fit") == str(ckpts / "last.ckpt")
    # a crash after the step save, before last.ckpt: an older last.ckpt written later than step 4
    shutil.copy(ckpts / "step-00000002.ckpt", ckpts / "last.ckpt")
    assert check_ckpt_path("last", cfg, "fit") == str(ckpts / "step-00000004.ckpt")
    # a SLURM requeue save further on wins too ("hpc" names only those)
    state = torch.load(ckpts / "step-00000004.ckpt", weights_only=True)
    state["global_step"] = 5
    torch.save(state, tmp_path / "run" / "hpc_ckpt_1.ckpt")
    assert (
        check_ckpt_path("last", cfg, "fit")
        == check_ckpt_path("hpc", cfg, "fit")
        == str(tmp_path / "run" / "hpc_ckpt_1.ckpt")
    )


def test_validate_last_without_a_checkpoint_is_an_error(fit_config, tmp_path, capsys):  # noqa: F811
    for command in ("validate", "test"):
        assert cli_main([command, "--config", str(fit_config), "--ckpt_path", "last"]) == 2
        _one_line_error(capsys, "ckpt_path last: no checkpoint under", str(tmp_path / "run"))
        assert cli_main([command, "--config", str(fit_config)]) == 2
        _one_line_error(capsys, "give --ckpt_path")
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_recipe_is_one_line_naming_both(fit_config, tmp_path, capsys):  # noqa: F811
    assert cli_main(["fit", "--config", str(fit_config), *TRAIN]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    for command in ("fit", "validate"):
        argv = [command, "--config", str(fit_config), "--model.recipe", "merino-tiny", "--ckpt_path", str(last)]
        assert cli_main([*argv, "--trainer.default_root_dir", str(tmp_path / "other")]) == 2
        _one_line_error(capsys, "recipe 'micro'", "model.recipe is merino-tiny", str(last))
        assert not (tmp_path / "other").exists()
    with pytest.raises(MerinoError, match="no merino.recipe"):  # a Lightning checkpoint of something else
        torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
        check_ckpt_path(str(tmp_path / "plain.ckpt"), {"model": {"recipe": "merino-tiny"}}, "fit")


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_help_exit_0(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, "--help"])
    assert exit_.value.code == 0 and "--ckpt_path" in capsys.readouterr().out


def test_requeue_checkpoints_pruned_to_the_newest(tmp_path):
    for n in (1, 2, 3):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    (tmp_path / "hpc_ckpt_notes.txt").write_text("mine")  # not a requeue checkpoint: kept
    prune_requeue_checkpoints(tmp_path, keep=tmp_path / "hpc_ckpt_3.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_3.ckpt", "hpc_ckpt_notes.txt"]


def test_run_directory_and_wandb_name_follow_the_recipe(tmp_path, monkeypatch):
    """The shipped 8 x H100 config pins no run directory: each recipe gets runs/<recipe>."""
    from merino_pl.fit.api import build_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    repo = Path(__file__).resolve().parents[1]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]
    for recipe in ("merino-52m", "merino-64m"):
        cli = build_cli(
            ["--config", str(repo / "recipes/fit/pile-8xh100.yaml"), *cpu, "--model.recipe", recipe], run=False
        )
        trainer = cli.config["trainer"]
        assert trainer["default_root_dir"] == f"runs/{recipe}"
        assert cli.config["checkpoint"]["dirpath"] == f"runs/{recipe}/checkpoints"
        wandb_logger = trainer["logger"][0]["init_args"]
        assert wandb_logger["name"] == recipe and wandb_logger["save_dir"] == f"runs/{recipe}"


def test_resume_trains_at_the_new_lr(fit_config, tmp_path, capsys):  # noqa: F811
    """`fit --ckpt_path last --model.lr 1e-5` (the non-finite guard's advice) trains at 1e-5 x the
    schedule from the restored step, not at the checkpoint's 3e-3."""
    import csv

    assert cli_main(["fit", "--config", str(fit_config), *TRAIN]) == 0
    capsys.readouterr()
    resume = ["--trainer.max_steps", "6", "--model.lr", "1e-5", "--ckpt_path", "last"]
    assert cli_main(["fit", "--config", str(fit_config), *TRAIN[2:], *resume]) == 0
    assert "resume at step 4: model.lr 0.003 -> 1e-05" in capsys.readouterr().out
    lrs = {}
    for path in sorted((tmp_path / "run").glob("logs/version_*/metrics.csv")):
        lrs.update({int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(path.open()) if r.get("train/lr")})
    # warm-up 1, decay to 10 % at step 6: step 4 runs at 1 - 0.9 * 3/5 of the peak
    assert lrs[4] == pytest.approx(1e-5 * 0.46) and lrs[5] == pytest.approx(1e-5 * 0.28), lrs
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["lr_schedulers"][0]["base_lrs"] == [1e-5, 1e-5]


def test_no_banner_before_a_data_error(fit_config, tmp_path, capsys):  # noqa: F811
    """A data source found missing while the datamodule is built is the only line printed: no
    "Seed set to", no device lines, no tip (held until the loop starts, merino_pl.fit.startup)."""
    assert cli_main(["fit", "--config", str(fit_config), "--data.source", str(tmp_path / "nope.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "nope.jsonl" in err and "Traceback" not in err, (out, err)
