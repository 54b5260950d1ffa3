"""``MerinoLightningModule``: the paper's pretraining recipe around ``MerinoForCausalLM``.

    batch (B, T+1) ─► inputs [:, :-1], targets [:, 1:] ─► logits (B, T, V) ─► cross-entropy
    AdamW(lr 6e-4, betas 0.9/0.95, weight decay 0.1 on 2-D weights) ─► warm-up 1000 steps,
    then linear decay to 10 % of the peak at ``trainer.max_steps`` (Pythia's schedule)

Checkpoint layout (what ``merino_pl.core.checkpoint.load_model`` reads): the model's weights under
``state_dict["model.*"]``, the recipe under ``checkpoint["merino"]["recipe"]``, the context it
trains at under ``checkpoint["merino"]["seq_len"]``, its tokenizer (unless the default) under
``checkpoint["merino"]["tokenizer"]``, plus what exact resume needs beyond Lightning's own state
(tokens seen, RNG states, the W&B run id). Everything in it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics.aggregation import MeanMetric

from merino_pl.core.config import Recipe, load_recipe
from merino_pl.core.costs import count_flops
from merino_pl.core.errors import MerinoError
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.model import lm_loss


class NonFiniteLossError(MerinoError):
    """The loss became NaN/inf: training stops before the optimizer step applies it."""

    exit_code = 3


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Linear warm-up to 1 over ``warmup_steps`` (step 0 already trains, at 1/warmup of the peak),
    then linear decay reaching ``min_lr_ratio`` at ``max_steps`` and staying there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay every parameter with >= 2 dimensions (linear weights and the tied token / position
    embeddings, as nanoGPT and GPT-NeoX/Pythia do); never biases nor norm weights (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():  # the tied LM head is the embedding: listed once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MerinoLightningModule(L.LightningModule):
    """Next-token pretraining of a MeRino recipe (paper "Implementation Details").

    Args:
        recipe: recipe YAML path or built-in name (``merino-64m``, ``merino-tiny``, ...).
        lr: peak learning rate of AdamW.
        betas: AdamW betas.
        weight_decay: decoupled weight decay of the 2-D weights (see ``param_groups``).
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warm-up.
        min_lr_ratio: the lr at ``trainer.max_steps``, as a fraction of the peak.
        compile: ``torch.compile`` the loss computation (opt-in: ~1 min cold start).
        seed: seed of the weight initialisation (the data order has its own seed); ``merino-pl
            fit`` sets both from ``seed_everything`` unless they are given.
    """

    def __init__(
        self,
        recipe: str = "merino-tiny",
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        eps: float = 1e-8,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        problems = validate_hparams(lr, betas, weight_decay, eps, warmup_steps, min_lr_ratio)
        if problems:
            raise MerinoError("; ".join(problems))
        self.save_hyperparameters()
        self.recipe: Recipe = load_recipe(recipe)
        with torch.random.fork_rng(devices=[]):  # the init must not shift the global RNG stream
            torch.manual_seed(seed)
            self.model = MerinoForCausalLM.from_recipe(self.recipe)
        self.val_nll = MeanMetric()  # token-weighted mean NLL over all ranks -> val/ppl = exp
        self.tokens_seen = 0  # over all ranks; restored from the checkpoint
        self.seq_len = 0  # of the last training batch: sets flops_per_token
        self.flops_per_token = 0.0  # training FLOPs per token: 3 x forward (fwd + 2 x bwd)
        self._loss_fn = self._loss
        self._nonfinite = torch.zeros((), dtype=torch.bool)
        self._rng_to_restore: dict[str, Any] | None = None

    # ---- model and loss ---------------------------------------------------------------
    def _forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token including the LM head (MFU counts all matmul work)."""
        arch = self.recipe.architecture
        return count_flops(arch, seq_len, include_lm_head=True) / seq_len

    def configure_model(self) -> None:
        if self.hparams.compile and self._loss_fn == self._loss:
            self._loss_fn = torch.compile(self._loss)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs, use_cache=False).logits  # (B, T, V)
        return lm_loss(logits, targets)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a (B, T+1) batch of token ids."""
        return self._loss_fn(batch[:, :-1], batch[:, 1:])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # Exact resume: Lightning prefetches one batch, so the loader is one batch ahead when a
        # checkpoint is saved; PileDataModule's loader saves the position of the batch this step
        # used (its ConsumedBatches callback), and the RNG states are restored before the step.
        loss = self(batch)
        # flag a NaN/inf without a host sync; checked once per optimizer step
        self._nonfinite = self._nonfinite.to(loss.device) | ~torch.isfinite(loss.detach())
        self.tokens_seen += batch[:, 1:].numel() * self.trainer.world_size
        if batch.shape[1] - 1 != self.seq_len:
            self.seq_len = batch.shape[1] - 1
            self.flops_per_token = 3 * self._forward_flops_per_token(self.seq_len)
        n = batch.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=50)), batch_size=n)
        self.log("train/tokens_seen", float(self.tokens_seen), batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if bool(self._nonfinite):
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step}: training stopped before the update; "
                "the last checkpoint is kept (lower model.lr or check the data, then resume with --ckpt_path last)"
            )
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self(batch)
        self.val_nll.update(loss, weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_heldout("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_heldout("test")

    def _log_heldout(self, prefix: str) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        self.log(f"{prefix}/loss", nll, sync_dist=False)  # MeanMetric already reduced over ranks
        self.log(f"{prefix}/ppl", torch.exp(nll.clamp(max=50)))

    # ---- optimizer and schedule -------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise MerinoError(f"trainer.max_steps must be set (the lr schedule decays to it), got {max_steps}")
        opt, sched = self.build_optimizer(max_steps, fused=self.device.type == "cuda")  # fused: one kernel on GPUs
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def build_optimizer(self, max_steps: int, fused: bool = False) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over the paper's groups (decay on matrices only) + the warm-up / linear-decay schedule."""
        hp = self.hparams
        opt = torch.optim.AdamW(
            param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused
        )
        warmup, ratio = hp.warmup_steps, hp.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, max_steps, ratio))
        return opt, sched

    # ---- checkpoint extras ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta: dict[str, Any] = {
            "recipe": self.recipe.to_dict(),
            "tokens_seen": self.tokens_seen,
            "rng": rng_states(),
        }
        seq_len = self.trained_seq_len()
        if seq_len:  # the context eval / latency default to (merino_pl.core.checkpoint.trained_context)
            meta["seq_len"] = seq_len
        tokenizer = self.trained_tokenizer()
        if tokenizer:  # what export, quantize and generate use with it (merino_pl.core.checkpoint.trained_tokenizer)
            meta["tokenizer"] = tokenizer
        run_id = wandb_run_id(self)
        if run_id:
            meta["wandb_run_id"] = run_id
        checkpoint["merino"] = meta

    def trained_seq_len(self) -> int | None:
        """The context this run trains at: the datamodule's ``seq_len`` (known before the first
        batch), else that of the last training batch."""
        trainer = self._trainer
        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", None) if trainer is not None else None
        seq_len = hparams.get("seq_len") if hparams is not None else None
        return int(seq_len) if isinstance(seq_len, int) and seq_len > 0 else (self.seq_len or None)

    def trained_tokenizer(self) -> str | None:
        """The datamodule's tokenizer (None: the default GPT-NeoX-20B): a shipped name as given, a
        file as an absolute path, so that a stage run from another folder finds it."""
        trainer = self._trainer
        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", None) if trainer is not None else None
        tokenizer = hparams.get("tokenizer") if hparams is not None else None
        if not isinstance(tokenizer, str) or not tokenizer:
            return None
        return str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else tokenizer

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:
            self.apply_optimizer_settings()

    def apply_optimizer_settings(self) -> None:
        """On resume, the config's ``lr`` / ``betas`` / ``eps`` / ``weight_decay`` replace the ones
        restored with the optimizer and schedule state (Lightning restores the checkpoint's), so
        ``--ckpt_path last --model.lr 1e-5`` (the non-finite guard's advice) trains at the new peak,
        the schedule continuing from the restored step; a change is said in one line."""
        hp = self.hparams
        optimizer, schedulers = self.trainer.optimizers[0], self.trainer.lr_scheduler_configs
        scheduler = schedulers[0].scheduler if schedulers else None
        before = optimizer.param_groups[0]
        was = {"lr": before.get("initial_lr", before["lr"]), "betas": tuple(before["betas"]), "eps": before["eps"]}
        was["weight_decay"] = before["weight_decay"]
        now = {"lr": hp.lr, "betas": tuple(hp.betas), "eps": hp.eps, "weight_decay": hp.weight_decay}
        step = scheduler.last_epoch if scheduler is not None else self.trainer.global_step
        factor = lr_factor(step, hp.warmup_steps, self.trainer.max_steps, hp.min_lr_ratio)
        for i, group in enumerate(optimizer.param_groups):
            group.update(initial_lr=hp.lr, lr=hp.lr * factor, betas=tuple(hp.betas), eps=hp.eps)
            group["weight_decay"] = hp.weight_decay if i == 0 else 0.0  # param_groups: decayed group first
        if scheduler is not None:
            scheduler.base_lrs = [hp.lr] * len(optimizer.param_groups)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
        changed = [f"model.{k} {was[k]} -> {now[k]}" for k in now if was[k] != now[k]]
        if changed and self.trainer.is_global_zero:
            print(f"resume at step {step}: {', '.join(changed)} (the config's values)", flush=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("merino") or {}
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self._rng_to_restore = meta.get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore the RNG streams where the interrupted run stood when it saved: just before
        # this step (nothing between a save and the next step draws from them).
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def rng_states() -> dict[str, Any]:
    """torch / CUDA / numpy / Python RNG states as tensors and ints only, so the checkpoint still
    loads with ``torch.load(weights_only=True)`` (Lightning's helper keeps numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(x: Any) -> Any:
    """``random.setstate`` needs tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def wandb_run_id(module: L.LightningModule) -> str | None:
    """The id of the W&B run this module logs to, if any (stored in checkpoints for resume)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in module.loggers:
        if isinstance(logger, WandbLogger) and logger.version:
            return str(logger.version)
    return None


def validate_hparams(
    lr: float, betas: Any, weight_decay: float, eps: float, warmup_steps: int, min_lr_ratio: float
) -> list[str]:
    """Every problem of the optimizer hyper-parameters, as messages naming the value."""
    p = []
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        p.append(f"model.lr must be a positive number, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        p.append(f"model.betas must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        p.append(f"model.weight_decay must be >= 0, got {weight_decay!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        p.append(f"model.eps must be positive, got {eps!r}")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        p.append(f"model.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not (isinstance(min_lr_ratio, (int, float)) and 0 <= min_lr_ratio <= 1):
        p.append(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    return p
