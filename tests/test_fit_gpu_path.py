"""The GPU training path, exercised as far as a CPU allows (issue 23.6): ``torch.compile`` of the
training step, bf16-mixed training, and the shipped 8 x H100 config instantiated as shipped for
two optimizer steps of MeRino-64M at 1024 tokens. None of these needs a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from merino_pl.cli import main as cli_main
from merino_pl.fit.module import MerinoLightningModule
from test_fit import REPO, fit_config, step_losses  # noqa: F401 - the fixture

SHORT = ["--trainer.max_steps", "3", "--model.warmup_steps", "1"]


def test_compiled_training_step_has_no_graph_breaks_and_trains_like_eager(fit_config, tmp_path):  # noqa: F811
    """No graph break in the model's forward and loss: ``torch._dynamo.explain`` of the function
    ``fit`` compiles (``MerinoLightningModule._loss``: forward + ``lm_loss``) finds one graph and
    zero breaks. Then ``fit --model.compile true`` (inductor, the one cold compile of the suite,
    ~50 s here) trains three steps with the eager run's losses."""
    recipe = yaml.safe_load(fit_config.read_text())["model"]["recipe"]
    module = MerinoLightningModule(recipe=recipe)
    batch = torch.randint(0, module.recipe.architecture.vocab_size, (2, 33))
    explained = torch._dynamo.explain(module._loss)(batch[:, :-1], batch[:, 1:])
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    roots = {"eager": tmp_path / "eager", "compiled": tmp_path / "compiled"}
    for name, root in roots.items():
        flags = ["--model.compile", "true"] if name == "compiled" else []
        argv = ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
        assert cli_main(["fit", "--config", str(fit_config), *SHORT, *argv, *flags]) == 0
    eager, compiled = (step_losses(r) for r in roots.values())
    assert sorted(eager) == sorted(compiled) == [0, 1, 2]
    for step in eager:
        assert float(compiled[step]) == pytest.approx(float(eager[step]), rel=1e-4), (step, eager, compiled)


def test_bf16_mixed_training_on_cpu(fit_config, tmp_path):  # noqa: F811
    """bf16-mixed (the 8 x H100 config's precision) trains on CPU: finite losses within a few
    per cent of fp32's, fp32 master weights in the checkpoint."""
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        root = tmp_path / precision
        argv = ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
        assert cli_main(["fit", "--config", str(fit_config), *SHORT, *argv, "--trainer.precision", precision]) == 0
        losses[precision] = {k: float(v) for k, v in step_losses(root).items()}
    assert sorted(losses["bf16-mixed"]) == [0, 1, 2]
    for step, loss in losses["bf16-mixed"].items():
        assert torch.isfinite(torch.tensor(loss)) and loss == pytest.approx(losses["32-true"][step], rel=0.03)
    state = torch.load(tmp_path / "bf16-mixed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.slow  # 8 micro-batches of MeRino-64M x 1024 tokens on one CPU thread: 12 min on the loaded 2-core machine
def test_shipped_8xh100_config_trains_two_steps_of_merino_64m_on_cpu(tmp_path, monkeypatch):
    """``recipes/fit/pile-8xh100.yaml`` as shipped (MeRino-64M, seq 1024, bf16-mixed, DDP,
    4 accumulated micro-batches, clipping, W&B + CSV loggers), with only these overrides:

    * trainer.accelerator cpu, trainer.devices 1, trainer.max_steps 2 (and model.warmup_steps 1:
      the config's 1000 warm-up steps must not exceed max_steps) - what the test is about;
    * data.source embedded: the Pile streams from the hub, and tests are offline;
    * data.batch_size 1: the config's 32 sequences x 1024 tokens per micro-batch are ~45 s of
      CPU each here; 1 keeps the micro-batch, accumulation and step logic at ~2 s;
    * data.num_workers 0, data.val_sequences 0: 6 tokenizing workers and 1024 held-out
      sequences are for 8 GPUs; this machine has 2 cores and the first validation is at step 5000;
    * model.compile false: the compiled step is covered by the one compile test (a second cold
      compile, of the 64M model, would add ~1 min);
    * the run directory: under tmp_path (the config's default is runs/<recipe> in the cwd).
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    overrides = {
        "trainer.accelerator": "cpu",
        "trainer.devices": "1",
        "trainer.max_steps": "2",
        "model.warmup_steps": "1",
        "data.source": "embedded",
        "data.batch_size": "1",
        "data.num_workers": "0",
        "data.val_sequences": "0",
        "model.compile": "false",
    }
    argv = [a for k, v in overrides.items() for a in (f"--{k}", v)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    assert cli_main(["fit", "--config", str(REPO / "recipes/fit/pile-8xh100.yaml"), *argv]) == 0
    ckpt = torch.load(tmp_path / "runs/merino-64m/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["merino"]["recipe"]["name"] == "merino-64m"
    assert ckpt["merino"]["seq_len"] == 1024 and ckpt["merino"]["tokens_seen"] == 2 * 4 * 1024
    saved = yaml.safe_load(next(Path(tmp_path / "runs/merino-64m").rglob("fit-config-*.yaml")).read_text())
    trainer = saved["trainer"]
    assert (trainer["precision"], trainer["strategy"], trainer["accumulate_grad_batches"]) == ("bf16-mixed", "ddp", 4)
    assert (tmp_path / "runs/merino-64m/wandb").is_dir()
