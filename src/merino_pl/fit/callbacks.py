"""What ``merino-pl fit`` adds to Lightning: throughput / MFU, and crash-safe checkpoint files.

* ``SpeedMonitor`` logs tokens/s and MFU every ``log_every_n_steps`` optimizer steps and prints
  one line per log interval with the step, its rate, the time elapsed and an ETA (readable in
  SLURM logs, where a carriage-return progress bar is noise). Lightning's
  ``ThroughputMonitor`` synchronizes the GPU after every micro-batch and knows no Jetson peak
  nor a user-given one; this one syncs once per log interval.
* ``AtomicCheckpointIO`` writes each checkpoint to a temporary file beside the target, fsyncs it
  and renames it into place: a ``kill -9`` (or a node crash) during a save leaves the previous
  ``last.ckpt`` intact. Lightning's default buffers the whole checkpoint in memory and relies on
  an fsspec transaction without fsync.
* ``SlurmRequeue`` replaces Lightning's SLURM auto-requeue (see its docstring for why).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from merino_pl.core.io import atomic_path
from merino_pl.fit.resume import requeue_checkpoints


def silence_known_warnings() -> None:
    """Hide warnings about choices made on purpose here, and library noise we cannot fix."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # cli.main passes args
    for noise in ("The `srun` command is available", "'set_vital' is deprecated", ".*LeafSpec"):
        warnings.filterwarnings("ignore", message=noise)


# Dense peak FLOP/s of devices Lightning's table (get_available_flops) does not know.
# Jetson Nano: 128 Maxwell cores, 472 GFLOPS FP16 / 236 FP32 (NVIDIA Jetson Nano data sheet);
# Jetson AGX Orin 64GB: 5.3 TFLOPS FP32 CUDA cores, 42.5 dense FP16/BF16 tensor (technical brief);
# H200: the H100 SXM's tensor cores (989 TFLOPS dense BF16; Lightning lists only SXM1/NVL names).
_EXTRA_PEAKS: dict[str, dict[str, float]] = {
    "tegra x1": {"16": 472e9, "32": 236e9},
    "orin": {"16": 42.5e12, "32": 5.3e12},
    "h200": {"16": 989.4e12, "32": 66.9e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device`` at the Trainer's ``precision``; None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    half = "16" in str(precision)
    name = torch.cuda.get_device_name(device).lower()
    for key, peaks in _EXTRA_PEAKS.items():
        if key in name:
            return peaks["16" if half else "32"]
    # fp32 training on Ampere+ runs matmuls in TF32 when allowed (the CLI allows it)
    dtype: Any = torch.bfloat16 if half else ("tfloat32" if torch.backends.cuda.matmul.allow_tf32 else torch.float32)
    flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


class SpeedMonitor(L.Callback):
    """Logs ``train/tokens_per_sec`` (all devices), ``train/mfu`` and prints a line per interval:

        step     500/600000  loss 4.1234  lr 6.00e-04  812,345 tok/s  MFU 41.2 %  1.52 s/step
            elapsed 0:12:40  ETA 10d 13:08:12  (printed as one line)

    The step rate (and so the ETA) is the average over the wall time since this process started
    training, so the time spent in validation and checkpoint saves is part of the estimate.

    MFU = tokens/s × training FLOPs per token (3 × forward, LM head included; ``merino_pl.core.costs``)
    / (peak FLOP/s × devices). The peak comes from ``peak_flops`` when given, else from the
    device (H100 / H200 / A100 / Jetson ...); on CPUs give ``peak_flops`` to get an MFU.

    Args:
        peak_flops: dense peak FLOP/s of ONE device (overrides the built-in table).
        print_metrics: print ``step loss lr tokens/s MFU rate elapsed ETA`` lines (rank 0).
    """

    def __init__(self, peak_flops: float | None = None, print_metrics: bool = True) -> None:
        super().__init__()
        self.peak_flops = peak_flops
        self.print_metrics = print_metrics
        self._peak: float | None = None
        self._t0 = 0.0
        self._tokens0 = 0
        self._last_step = -1
        self._paused: float | None = None
        self._start = 0.0  # wall clock and step when this process started training (a resume counts from there)
        self._start_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._peak = self.peak_flops or device_peak_flops(trainer.strategy.root_device, str(trainer.precision))
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        self._restart(pl_module)

    def _restart(self, pl_module: L.LightningModule) -> None:
        self._t0, self._tokens0 = time.perf_counter(), pl_module.tokens_seen

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused is not None:  # validation time is not training time
            self._t0 += time.perf_counter() - self._paused
            self._paused = None
        if self.print_metrics and not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            m = trainer.callback_metrics
            # `merino-pl validate` restores the weights, not the step counter: no "step 0" there
            where = (
                f"step {trainer.global_step:>7}" if trainer.state.fn == TrainerFn.FITTING else trainer.state.fn.value
            )
            _print(f"{where}  val loss {float(m['val/loss']):.4f}  val ppl {float(m['val/ppl']):.2f}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or trainer.log_every_n_steps <= 0 or step % trainer.log_every_n_steps:
            return  # accumulating, or not a logging step (same rule as Lightning's loggers)
        self._last_step = step
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        tokens = pl_module.tokens_seen - self._tokens0
        if elapsed <= 0 or tokens <= 0:
            return
        tps = tokens / elapsed
        metrics = {"train/tokens_per_sec": tps, "train/tokens_per_sec_per_device": tps / trainer.world_size}
        if self._peak:
            metrics["train/mfu"] = tps * pl_module.flops_per_token / (self._peak * trainer.world_size)
        pl_module.log_dict(metrics, rank_zero_only=True, batch_size=1)
        if self.print_metrics:
            self._print_line(trainer, metrics)
        self._restart(pl_module)

    @rank_zero_only
    def _print_line(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        m = trainer.callback_metrics
        total = total_steps(trainer)
        parts = [f"step {trainer.global_step:>7}" + (f"/{total}" if total is not None else "")]
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if "train/lr" in m:
            parts.append(f"lr {float(m['train/lr']):.2e}")
        parts.append(f"{metrics['train/tokens_per_sec']:,.0f} tok/s")
        if "train/mfu" in metrics:
            parts.append(f"MFU {100 * metrics['train/mfu']:.1f} %")
        parts += self._progress(trainer, total)
        _print("  ".join(parts))

    def _progress(self, trainer: L.Trainer, total: int | None) -> list[str]:
        """``rate  elapsed  ETA`` from the average step rate since training started here."""
        elapsed = time.perf_counter() - self._start
        done = trainer.global_step - self._start_step
        if done <= 0 or elapsed <= 0:
            return []
        rate = done / elapsed  # optimizer steps per second
        parts = [
            f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step",
            f"elapsed {format_duration(elapsed)}",
        ]
        if total is not None:
            parts.append(f"ETA {format_duration(max(total - trainer.global_step, 0) / rate)}")
        return parts


def total_steps(trainer: L.Trainer) -> int | None:
    """The optimizer step training ends at: ``max_steps``, else Lightning's estimate (epochs)."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    try:
        estimate = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - an iterable dataset without a length: no estimate
        return None
    return int(estimate) if estimate != float("inf") else None


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``Nd H:MM:SS`` past a day): sortable and unambiguous in log files."""
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def _print(line: str) -> None:
    print(line, flush=True)


class SlurmRequeue(L.Callback):
    """Checkpoint and ``scontrol requeue`` on SLURM's warning signal (``--signal=SIGUSR1@90``),
    safely under DDP.

    Lightning's own auto-requeue saves the checkpoint inside the signal handler. Each rank runs
    that handler wherever the signal finds it, so one rank's save (a barrier) can pair with
    another rank's gradient all-reduce: the job hangs until its time limit kills it, and the
    steps since the last periodic save are lost (seen with 2 gloo ranks on a local cluster).
    Here the handler only records the signal; every ``every_n_steps`` optimizer steps the ranks
    agree on it with one all-reduce of a flag (a single process needs none, and saves at its next
    accumulation boundary), then all of them
    save ``hpc_ckpt_N.ckpt`` together (Lightning's name, which the job script resumes from),
    rank 0 removes the older ``hpc_ckpt_*.ckpt`` and runs ``scontrol requeue``, and the fit
    stops. Outside SLURM, or with ``SLURMEnvironment(auto_requeue=False)``, it does nothing.
    """

    def __init__(self, every_n_steps: int = 5) -> None:
        self.every_n_steps = every_n_steps
        self._signum: int | None = None
        self._previous: Any = None
        self._received = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        if env.requeue_signal is None:  # Windows: no SIGUSR1
            return
        env.auto_requeue = False  # Lightning registers no handler of its own; this one instead
        self._signum, self._received = int(env.requeue_signal), False
        self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._received = True  # nothing else here: the save happens between steps, on all ranks

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._signum is None or trainer.should_stop:
            return
        if trainer.world_size > 1:
            # every rank must reach the same collective at the same step: decide by step count
            step = trainer.global_step
            if step % self.every_n_steps or trainer.fit_loop.epoch_loop._should_accumulate():
                return
            if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
                return
        elif not self._received or trainer.fit_loop.epoch_loop._should_accumulate():
            return  # one process: save at the next accumulation boundary (no half-accumulated step)
        path = _CheckpointConnector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path, weights_only=False)  # full state: the requeued run resumes it
        if trainer.is_global_zero:
            prune_requeue_checkpoints(trainer.default_root_dir, keep=Path(path))
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
            rc = subprocess.call(["scontrol", "requeue", job])
            done = f"Requeued SLURM job {job}" if rc == 0 else f"warning: scontrol requeue {job} failed (exit {rc})"
            _print(f"SLURM requeue signal: saved {path} at step {trainer.global_step}. {done}")
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signum is not None:
            signal.signal(self._signum, self._previous)
            self._signum = None


def prune_requeue_checkpoints(root: str | Path, keep: Path) -> None:
    """Remove the run's older ``hpc_ckpt_N.ckpt`` once ``keep`` (the newest) is saved: each is a
    full training state (~0.8 GB for MeRino-64M) and a resume reads only the newest."""
    for old in requeue_checkpoints(root):
        if old.resolve() != keep.resolve():
            old.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable on local file systems.

    Remote URLs (``s3://`` ...) keep Lightning's fsspec path. Temporary files left by a process
    killed mid-save (``.last.ckpt.XXXX.tmp``) are removed the next time that file is saved.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
