"""core/tracking: a finished report logged to W&B, offline-safe, linked to the training run.

A real ``merino-pl eval --wandb merino-pl`` of the tiny recipe on a local copy of lm-eval's
ARC-Easy format (named ``arc_easy``, so the report draws its accuracy figure) with no API key and
no ``WANDB_MODE``: offline is chosen and the offline run directory holds the figure and the
report. ``log_report`` of that report for a model in the chain layout records the training run
id read from RUN/checkpoints/last.ckpt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import wandb

from merino_pl.cli import main
from merino_pl.core.errors import MerinoError
from merino_pl.core.tracking import log_report, training_checkpoint, training_run_id, wandb_mode

REPO = Path(__file__).resolve().parents[1]
ARC = [
    ("Which is a liquid at room temperature?", ["water", "iron", "salt"], "A"),
    ("What do plants need to make food?", ["darkness", "sunlight", "plastic"], "B"),
]


NO_KEY = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_GROUP", "NETRC")


@pytest.fixture(scope="module")
def eval_out(tmp_path_factory) -> Path:
    """`merino-pl eval merino-tiny --wandb merino-pl` on a 2-question local `arc_easy`, no W&B key:
    eval.json, eval.md, accuracy.png and the offline W&B run in wandb/."""
    root = tmp_path_factory.mktemp("tracking")
    data = root / "arc.jsonl"
    rows = [
        {"id": f"q{i}", "question": q, "answerKey": a, "choices": {"text": c, "label": list("ABC")}}
        for i, (q, c, a) in enumerate(ARC)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    yaml = (REPO / "eval" / "tasks" / "arc_easy_local.yaml").read_text()
    yaml = yaml.replace("task: arc_easy_local", "task: arc_easy").replace("/data/eval/arc_easy_test.jsonl", str(data))
    (tasks / "arc_easy.yaml").write_text(yaml)
    out = root / "run" / "eval" / "fp32"
    argv = ["eval", "merino-tiny", "--tasks", "arc_easy", "--include-path", str(tasks), "--ppl", "none"]
    with pytest.MonkeyPatch.context() as mp:
        for name in NO_KEY:
            mp.delenv(name, raising=False)
        mp.setenv("HOME", str(root / "home"))  # no netrc: no key anywhere
        assert main([*argv, "--limit", "2", "--device", "cpu", "--wandb", "merino-pl", "--out", str(out)]) == 0
    assert (out / "accuracy.png").is_file()
    return out


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No API key anywhere (no WANDB_API_KEY, an empty HOME: no netrc) and no WANDB_MODE."""
    for name in NO_KEY:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_eval_with_wandb_writes_an_offline_run_holding_the_report(eval_out):
    where = sorted((eval_out / "wandb").glob("offline-run-*"))[0]  # the eval's own (the next test adds one)
    files = where / "files"
    assert len(list((files / "media" / "images").rglob("accuracy*.png"))) == 1  # the report's figure
    assert (files / "eval.json").read_bytes() == (eval_out / "eval.json").read_bytes()
    assert (files / "eval.md").read_bytes() == (eval_out / "eval.md").read_bytes()


def test_a_report_is_linked_to_the_training_run(eval_out, offline_env):
    run_dir = eval_out.parents[1]
    (run_dir / "checkpoints").mkdir()
    torch.save({"merino": {"wandb_run_id": "train123"}}, run_dir / "checkpoints" / "last.ckpt")
    assert wandb_mode() == "offline"  # decided here: no key -> offline, never the login prompt
    assert training_checkpoint(run_dir / "model") == run_dir / "checkpoints" / "last.ckpt"
    assert training_run_id(run_dir / "quantized" / "int4") == "train123"

    where = log_report("merino-pl", eval_out / "eval.json", run_dir / "model", "eval")
    assert where is not None and where.parent == eval_out / "wandb" and where.name.startswith("offline-run-")
    assert len(list((where / "files" / "media" / "images").rglob("accuracy*.png"))) == 1
    wandb.teardown()  # ends W&B's service process, which writes the run's log file asynchronously
    record = next(where.glob("run-*.wandb")).read_bytes()  # wandb's own binary log of the run
    assert b"train123" in record and b"merino-pl" in record  # group / config: the training run


def test_no_project_or_disabled_logs_nothing(eval_out, offline_env, monkeypatch):
    before = sorted(eval_out.rglob("*"))
    assert log_report(None, eval_out / "eval.json", "merino-tiny", "eval") is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_report("merino-pl", eval_out / "eval.json", "merino-tiny", "eval") is None
    assert sorted(eval_out.rglob("*")) == before
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(MerinoError, match="WANDB_MODE='sometimes'"):
        wandb_mode()
