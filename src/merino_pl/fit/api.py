"""The fit stage's library: pretraining through LightningCLI (``merino-pl fit`` is
``fit/cli.py``, which hands its arguments to :func:`fit` unchanged).

    merino-pl fit --config recipes/fit/cpu-demo.yaml [--model.recipe R] [--trainer.max_steps N]
                  [--ckpt_path last]

The config has LightningCLI's sections: ``model`` (``MerinoLightningModule``: recipe + optimizer),
``data`` (``PileDataModule``), ``trainer``, ``checkpoint`` (``ModelCheckpoint``, written to
``<default_root_dir>/checkpoints`` with ``last.ckpt``) and ``speed`` (``SpeedMonitor``).
On top of plain LightningCLI it:

* validates the values that would only fail later (or silently train the wrong thing) before
  anything is built, and reports every problem in one line, exit code 2 — parse errors too;
* installs ``AtomicCheckpointIO`` so a kill during a save never corrupts ``last.ckpt``;
* decides W&B's mode up front (offline, with the ``wandb sync`` command, when there is no API
  key: an unset mode would hang on a login prompt) and continues the W&B run whose id the
  resumed checkpoint carries, through ``WandbLogger``'s own arguments (``version``, and
  ``wandb.init``'s ``mode`` / ``resume="allow"``) set in the config before it is instantiated;
* logs the resolved config, the recipe and its parameters / FLOPs / entropy to every logger.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from merino_pl.core.config import load_recipe
from merino_pl.core.errors import MerinoError, disk_full
from merino_pl.core.io import read_yaml
from merino_pl.core.tracking import api_key_available
from merino_pl.fit.argv import config_files
from merino_pl.fit.callbacks import AtomicCheckpointIO, SlurmRequeue, SpeedMonitor, silence_known_warnings
from merino_pl.fit.module import MerinoLightningModule, validate_hparams
from merino_pl.fit.resume import check_ckpt_path, checkpoint_meta, run_dir
from merino_pl.fit.startup import STARTUP, ReleaseStartupLines

SUBCOMMANDS = ("fit", "validate", "test")


def default_precision() -> str:
    """bf16-mixed where the GPU has bf16 units; fp32 elsewhere (bf16 on a CPU is ~11x slower)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class MerinoSaveConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs (one file per run, never overwritten) and logs
    it, with the recipe's summary (parameters, FLOPs, entropy), as every logger's run config."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from merino_pl.info.api import summarize

        config = self.config.as_dict()
        config.pop("config", None)  # the paths of the --config files: not a hyper-parameter
        recipe = pl_module.recipe
        seq_len = _seq_len(config)
        summary = summarize(recipe, seq_len=seq_len)
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "config": config,
                    "recipe": pl_module.recipe.to_dict(),
                    "recipe_summary": summary,
                    "trained_seq_len": seq_len,  # what the checkpoints record as merino.seq_len
                }
            )


def _seq_len(config: dict[str, Any]) -> int:
    return int((config.get("data") or {}).get("init_args", config.get("data") or {}).get("seq_len", 1024))


class MerinoCLI(LightningCLI):
    """LightningCLI with up-front validation, atomic checkpoints and W&B resume (module doc)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step-{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 3,  # the newest three periodic checkpoints (plus last)
                "checkpoint.monitor": "step",
                "checkpoint.mode": "max",
            }
        )
        parser.link_arguments(
            "trainer.default_root_dir",
            "checkpoint.dirpath",
            compute_fn=lambda root: str(Path(root or ".") / "checkpoints"),
        )
        parser.add_lightning_class_args(SpeedMonitor, "speed")
        # None = "not given": derive_seeds fills them from seed_everything (a given value wins)
        parser.set_defaults({"model.seed": None, "data.seed": None})

    def _fit_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _set_seed(self) -> None:
        """LightningCLI's seeding, its "Seed set to N" banner held back until the config is
        valid (a bad value is then the only line printed)."""
        seed_log = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed_log.level
        seed_log.setLevel(logging.WARNING)
        try:
            super()._set_seed()
        finally:
            seed_log.setLevel(level)

    pending: frozenset[str] = frozenset()  # recipe paths an earlier pipeline stage will write

    def _parse_ckpt_path(self) -> None:
        """Not LightningCLI's: it replaces the config's ``model`` section by the checkpoint's saved
        hyper-parameters, so a resume silently ignored ``--model.lr`` and trained the checkpoint's
        recipe whatever ``--model.recipe`` said. Here the config decides; ``check_ckpt_path``
        refuses a checkpoint of another architecture and the module applies the config's
        optimizer settings on resume."""

    run_folders: list[str] = []  # the run's folders once parsed (root, checkpoints): where a full disk is looked for

    def before_instantiate_classes(self) -> None:
        cfg = self._fit_config()
        derive_seeds(cfg)
        root = run_dir(cfg)
        dirpath = (cfg.get("checkpoint") or {}).get("dirpath")
        MerinoCLI.run_folders = [str(d) for d in (root, dirpath) if d]
        root_logger_dirs(cfg)
        for init_args in wandb_init_args(cfg):
            if not init_args.get("name"):  # per run directory, so per recipe
                init_args["name"] = root.name
        problems, ckpt = check_config(cfg, self.pending), cfg.get("ckpt_path")
        if problems and ckpt and str(ckpt) not in ("last", "hpc"):  # a wrong checkpoint FILE is named with them
            try:
                check_ckpt_path(ckpt, cfg, self.subcommand or "fit")
            except MerinoError as e:
                problems.append(str(e))
        if problems:
            raise MerinoError("bad fit config: " + "; ".join(dict.fromkeys(problems)))
        # every form of --ckpt_path (file, file://, URL, last, hpc) checked before anything is written
        resolved = check_ckpt_path(ckpt, cfg, self.subcommand or "fit")
        if ckpt is not None:
            cfg["ckpt_path"] = resolved

    def instantiate_classes(self) -> None:
        cfg = self._fit_config()
        seed = cfg.get("seed_everything")
        if seed not in (None, False):  # the banner _set_seed held back, now that the config is valid
            logging.getLogger("lightning.fabric.utilities.seed").info(f"Seed set to {seed}")
        for init_args in wandb_init_args(cfg):
            # a fit resumed from a checkpoint continues its W&B run; validate / test start their own
            ckpt_path = cfg.get("ckpt_path") if self.subcommand in (None, "fit") else None
            resume = Path(ckpt_path) if ckpt_path else None
            setup_wandb(init_args, resume_from=resume)
        super().instantiate_classes()
        if getattr(self, "trainer", None) is not None:
            self.trainer.callbacks.append(ReleaseStartupLines())

    def before_fit(self) -> None:
        trainer, model, data = self.trainer, self.model, self.datamodule
        if hasattr(data, "check_vocab"):
            data.check_vocab(model.recipe.architecture.vocab_size)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # user-given plugins win
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks):
            trainer.callbacks.append(SlurmRequeue())  # DDP-safe save + requeue on SLURM's SIGUSR1
        if trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls on Ampere+
        elif "bf16" in str(trainer.precision):
            _say("warning: bf16 on this CPU is emulated (~11x slower than fp32); use --trainer.precision 32-true")


ROOT_DIR = "${trainer.default_root_dir}"


def derive_seeds(cfg: Any) -> None:
    """LightningCLI's convention: ``seed_everything`` seeds the run. The weight init
    (``model.seed``) and the data order (``data.seed``) take its value unless given
    explicitly (``--model.seed``, ``--data.seed`` or the config); with ``seed_everything``
    false they keep the classes' default, 1234."""
    seed = cfg.get("seed_everything")
    derived = seed if isinstance(seed, int) and not isinstance(seed, bool) else 1234
    for section in ("model", "data"):
        args = cfg.get(section)
        args = getattr(args, "init_args", args)
        if args is not None and args.get("seed") is None:
            args["seed"] = derived


def root_logger_dirs(cfg: Any) -> None:
    """A logger ``save_dir`` written as ``${trainer.default_root_dir}`` (as the shipped configs
    do) follows ``--trainer.default_root_dir``, so everything a run writes lands under its
    directory; a ``save_dir`` the user sets is kept."""
    trainer = cfg.get("trainer") or {}
    root = str(trainer.get("default_root_dir") or ".")
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = getattr(logger, "init_args", None)
        save_dir = init.get("save_dir") if init is not None else None
        if isinstance(save_dir, str) and ROOT_DIR in save_dir:
            init["save_dir"] = save_dir.replace(ROOT_DIR, root)


class CheckOnlyCLI(MerinoCLI):
    """Parses and checks a ``fit`` command line, builds nothing (``pipeline``'s up-front check)."""

    def instantiate_classes(self) -> None:
        pass


def check_config(cfg: Any, pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems of a parsed ``fit`` config that would otherwise surface late (or never);
    ``pending``: recipe paths not written yet (a pipeline's search output): not checked."""
    problems: list[str] = []
    model, trainer, data = cfg.get("model"), cfg.get("trainer"), cfg.get("data")
    model = getattr(model, "init_args", model) or {}
    data = getattr(data, "init_args", data) or {}
    problems += validate_hparams(
        model.get("lr"),
        model.get("betas"),
        model.get("weight_decay"),
        model.get("eps"),
        model.get("warmup_steps"),
        model.get("min_lr_ratio"),
    )
    arch = None
    try:
        if str(model.get("recipe")) not in pending:
            arch = load_recipe(model.get("recipe")).architecture
    except MerinoError as e:
        problems.append(f"model.recipe: {e}")
    max_steps = trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        problems.append(
            f"trainer.max_steps must be a positive integer (the lr schedule decays to it), got {max_steps!r}"
        )
    elif isinstance(model.get("warmup_steps"), int) and model.get("warmup_steps") > max_steps:
        problems.append(f"model.warmup_steps {model.get('warmup_steps')} exceeds trainer.max_steps {max_steps}")
    accumulate = trainer.get("accumulate_grad_batches")
    if not isinstance(accumulate, int) or accumulate < 1:
        problems.append(f"trainer.accumulate_grad_batches must be an integer >= 1, got {accumulate!r}")
    seq_len = data.get("seq_len")
    if arch is not None and isinstance(seq_len, int) and seq_len > arch.max_position_embeddings:
        problems.append(
            f"data.seq_len {seq_len} exceeds the recipe's max_position_embeddings {arch.max_position_embeddings}"
        )
    every = (cfg.get("checkpoint") or {}).get("every_n_train_steps")
    if every is not None and (not isinstance(every, int) or every < 0):
        problems.append(f"checkpoint.every_n_train_steps must be an integer >= 0, got {every!r}")
    problems += _accelerator_problems(trainer.get("accelerator"))
    return problems


def _accelerator_problems(accelerator: Any) -> list[str]:
    """A GPU accelerator on a machine without one (Lightning finds out only once it builds the
    Trainer, with a traceback)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return [
            f"trainer.accelerator {accelerator!r}: no CUDA device is available here (torch {torch.__version__}); "
            f"use cpu or auto"
        ]
    if accelerator == "mps" and not torch.backends.mps.is_available():
        return ["trainer.accelerator 'mps': MPS is not available here; use cpu or auto"]
    return []


WANDB_LOGGER = "WandbLogger"


def wandb_init_args(cfg: Any) -> list[Any]:
    """The ``init_args`` of every ``WandbLogger`` under ``trainer.logger`` (one or a list)."""
    loggers = (cfg.get("trainer") or {}).get("logger")
    found = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = getattr(logger, "init_args", None)
        if init is not None and str(getattr(logger, "class_path", "")).rsplit(".", 1)[-1] == WANDB_LOGGER:
            found.append(init)
    return found


def setup_wandb(init_args: Any, resume_from: Path | None) -> None:
    """Decide W&B's mode explicitly and continue the run a resumed checkpoint belongs to.

    Only public arguments, written into the logger's ``init_args`` before LightningCLI builds
    it: ``mode`` (``wandb.init``'s; a ``mode`` in the config or ``WANDB_MODE`` wins),
    ``version`` (WandbLogger's run id, "mainly used to resume a previous run") and
    ``resume="allow"`` (LightningCLI passes ``wandb.init``'s keyword arguments, so WandbLogger's
    own ``"allow"`` default would be replaced by ``None``).
    """
    mode = init_args.get("mode") or os.environ.get("WANDB_MODE")
    if not mode:
        if init_args.get("offline") or not api_key_available():
            mode = init_args["mode"] = "offline"
            where = Path(init_args.get("save_dir") or init_args.get("dir") or ".") / "wandb"
            _say(
                "W&B: no API key (WANDB_API_KEY or `wandb login`): logging offline; upload later with\n"
                f"  wandb sync {where}/offline-run-*"
            )
        else:
            mode = init_args["mode"] = "online"
    run_id = checkpoint_wandb_id(resume_from) if resume_from else None
    run_id = run_id or init_args.get("version") or init_args.get("id")
    if run_id is None:
        # W&B's id alphabet; chosen here so it is known before the first checkpoint stores it
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    init_args["version"], init_args["id"] = run_id, None  # WandbLogger: id = version or id
    if init_args.get("resume") is None:
        init_args["resume"] = "allow"  # continue the run with this id if it exists, else create it
    _say(f"W&B run id {run_id} ({mode}; stored in checkpoints: a resume continues it)")


@rank_zero_only
def _say(message: str) -> None:
    """One notice on stderr from rank 0 (not through logging: it must show in every setup); held
    with Lightning's start-up lines until the run starts (``merino_pl.fit.startup``)."""
    STARTUP.say(message)


def checkpoint_wandb_id(path: Path) -> str | None:
    """The W&B run id a checkpoint stores (None: none, or unreadable: Lightning reports that)."""
    return checkpoint_meta(path).get("wandb_run_id")


def build_cli(
    argv: Sequence[str], run: bool = True, cli_class: type[MerinoCLI] = MerinoCLI, subcommand: str = "fit"
) -> MerinoCLI:
    """The LightningCLI behind ``merino-pl fit|validate|test`` (``run=False`` only parses and instantiates)."""
    from merino_pl.data import PileDataModule

    args = [subcommand, *argv] if run else list(argv)
    return cli_class(
        MerinoLightningModule,
        PileDataModule,
        seed_everything_default=1234,
        save_config_callback=MerinoSaveConfig,
        save_config_kwargs={"config_filename": f"fit-config-{time.strftime('%Y%m%d-%H%M%S')}.yaml", "overwrite": True},
        trainer_defaults={
            "precision": default_precision(),
            "gradient_clip_val": 1.0,
            "max_steps": 600_000,
            # default_root_dir: none here; run_dir() makes it runs/<recipe> unless given
        },
        auto_configure_optimizers=False,  # the paper's AdamW + schedule live in the module
        parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in SUBCOMMANDS}},
        args=args,
        run=run,
    )


def fit(argv: Sequence[str], subcommand: str = "fit") -> None:
    """The fit stage's entry function: a LightningCLI command line (``--config FILE ...
    --model.recipe R --trainer.max_steps N [--ckpt_path last]``; its sections are the typed
    signatures of ``MerinoLightningModule``, ``PileDataModule``, the Trainer, ``ModelCheckpoint``
    and ``SpeedMonitor``), checked before anything is built (every problem in one
    ``MerinoError``), then run. ``subcommand``: fit, or validate / test (the held-out loss of
    ``--ckpt_path``)."""
    from jsonargparse import ArgumentError

    argv = list(argv)
    silence_known_warnings()
    # jsonargparse's YAML errors name "<unicode string>", not the file
    for path in config_files(argv):
        read_yaml(path, "fit --config file")
    # --ckpt_path is checked once the config is parsed, before anything is built or written
    # (MerinoCLI.before_instantiate_classes -> merino_pl.fit.resume.check_ckpt_path)
    STARTUP.hold()  # Lightning's banners wait until the run starts: an error is the only line
    MerinoCLI.run_folders = []
    try:
        build_cli(argv, subcommand=subcommand)
    except ArgumentError as e:
        STARTUP.release(emit=False)
        raise MerinoError(_one_line(str(e))) from None
    except MerinoError:
        STARTUP.release(emit=False)
        raise
    except Exception as e:  # a full disk under Lightning's own writers (logs, configs): named where it is
        full = disk_full(e, near=MerinoCLI.run_folders)
        if full is None:
            raise
        raise full from None
    finally:
        STARTUP.release()


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with a ``fit`` command line, for ``pipeline`` before any stage runs: parsed and
    checked as ``fit`` does, nothing built; ``--ckpt_path`` (a resume) is left to ``fit``."""
    from jsonargparse import ArgumentError

    keep = [a for i, a in enumerate(argv) if not (a.startswith("--ckpt_path") or (i and argv[i - 1] == "--ckpt_path"))]
    silence_known_warnings()
    try:
        for path in config_files(keep):
            read_yaml(path, "fit --config file")
        build_cli(keep, run=False, cli_class=type("PipelineCheck", (CheckOnlyCLI,), {"pending": pending}))
    except MerinoError as e:
        return [str(e)]
    except ArgumentError as e:
        return [_one_line(str(e))]
    return []


def _one_line(message: str) -> str:
    """jsonargparse's multi-line error as one line: the key, the problem, the given value and,
    for a choice, the valid ones (its list of per-subtype errors is left out)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    given = next((line for line in lines if line.startswith("Given value:")), None)
    if given is None:
        return " | ".join(lines[:3])
    subtypes = next((line for line in lines if line.startswith("Subtypes:")), "")
    choices = [
        c.strip().strip("'\"") for group in re.findall(r"Literal\[([^\]]*)\]", subtypes) for c in group.split(",")
    ]
    valid = f" (valid: {', '.join(dict.fromkeys(choices))})" if choices else ""
    problem = lines[1] if len(lines) > 1 else "invalid"
    return f"{lines[0]} {given.replace('Given value:', 'got').strip()!s}: {problem}{valid}"
