"""``checkpoint: PATH`` starts a pipeline from a model trained elsewhere: a ``.ckpt`` (export
runs on it) or an exported directory (no export); search and fit never run. A bad value is one
line before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from merino_pl.cli import main as cli_main
from merino_pl.pipeline.api import PipelineSettings, build_stages
from test_fit import fit_config  # noqa: F401  (the fixture is used by name)


def write(tmp_path: Path, **cfg) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "out_dir": str(tmp_path / "out"), **cfg}))
    return path


def test_a_ckpt_start_exports_it_and_a_directory_start_is_the_float_model(tmp_path, fit_config, capsys):  # noqa: F811
    run = tmp_path / "run"
    args = ["--trainer.max_steps", "2", "--trainer.default_root_dir", str(run)]
    assert cli_main(["fit", "--config", str(fit_config), *args, "--trainer.logger.init_args.save_dir", str(run)]) == 0
    ckpt = next(run.rglob("last.ckpt"))
    config = write(tmp_path, checkpoint=str(ckpt), quantize={"bits": [8]}, eval={"tasks": "none"})
    assert [s.name for s in build_stages(PipelineSettings.load(config))] == [
        "export",
        "quantize-int8",
        "eval-fp32",
        "eval-int8",
    ]
    config = write(tmp_path, checkpoint=str(ckpt))  # export only: seconds
    assert cli_main(["pipeline", "--config", str(config)]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "merino"
    assert not (out / "fit").exists() and not (out / "search").exists()
    stages = json.loads((out / "pipeline-state.json").read_text())["stages"]
    assert list(stages) == ["export"] and stages["export"]["argv"][1] == str(ckpt)
    assert "started from a trained checkpoint" in (out / "summary.md").read_text()
    capsys.readouterr()

    model = tmp_path / "exported"
    (out / "model").rename(model)
    config = write(tmp_path, checkpoint=str(model), quantize={"bits": [8]}, latency={"precision": "fp32"})
    stages = build_stages(PipelineSettings.load(config))
    assert [s.name for s in stages] == ["quantize-int8", "latency-fp32", "latency-int8", "plot"]
    assert stages[0].argv[1] == str(model) and stages[1].argv[1] == str(model)
    assert stages[0].inputs == [model]


@pytest.mark.parametrize(
    ("start", "message"),
    [
        ("missing.ckpt", "missing.ckpt: not found"),
        ("notes.txt", "expected a `merino-pl fit` .ckpt"),
        ("fake.ckpt", "expected a `merino-pl fit` .ckpt"),  # not a torch zip file
        ("empty-dir", "not an exported model directory (no config.json, model.safetensors)"),
        ("gptq-dir", "a quantized (GPTQ) directory"),
    ],
)
def test_a_bad_checkpoint_start_is_one_line_before_anything_runs(tmp_path, capsys, start, message):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "gptq-dir").mkdir()
    (tmp_path / "gptq-dir" / "quantize_config.json").write_text("{}")
    config = write(tmp_path, checkpoint=str(tmp_path / start), eval={"tasks": "none"})
    assert cli_main(["pipeline", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(config) in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"recipe": "merino-tiny"}, "exactly one of 'recipe'"),
        ({"fit": {"config": "f.yaml"}}, "'fit' is not used when starting from a checkpoint"),
    ],
)
def test_a_checkpoint_start_excludes_training(tmp_path, capsys, extra, message):
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_text("{}")
    config = write(tmp_path, checkpoint=str(tmp_path / "model"), **extra)
    assert cli_main(["pipeline", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
