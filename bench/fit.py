"""Training throughput: MerinoLightningModule + Lightning Trainer vs a bare PyTorch loop.

Both train the same model (same init) on the same pre-tokenized batches with the same work per
step (AdamW with the paper's groups, the lr schedule, clipping at 1.0). Prints tokens/s, the
ratio Lightning / bare (target >= 0.97) and MFU:

* CPU: fp32; MFU against this machine's measured fp32 GEMM peak (no published peak exists).
* GPU (when ``torch.cuda.is_available()``): MeRino-64M, bf16-mixed, ``torch.compile``; MFU
  against the device's dense bf16 peak (989 TFLOPS on an H100 SXM). Target >= 45 %.

    python bench/fit.py            # CPU: merino-tiny, seq 128, batch 8; + GPU rows if present
    python bench/fit.py --quick    # a few steps, while developing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from merino_pl.data import PileDataModule  # noqa: E402
from merino_pl.fit.callbacks import device_peak_flops, silence_known_warnings  # noqa: E402
from merino_pl.fit.module import MerinoLightningModule  # noqa: E402


def make_batches(n: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """``n`` real batches from the embedded corpus (the same list feeds both loops)."""
    dm = PileDataModule(source="embedded", seq_len=seq_len, batch_size=batch, num_workers=0, val_sequences=0)
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


class StepTimes(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def tokens_per_sec(times: list[float], warmup: int, tokens_per_step: int) -> float:
    """Steady-state rate: steps after ``warmup`` (compilation, allocator, caches excluded)."""
    return (len(times) - 1 - warmup) * tokens_per_step / (times[-1] - times[warmup])


def run_lightning(args, batches, precision: str, device: str) -> float:
    module = MerinoLightningModule(args.recipe, warmup_steps=2, compile=args.compile, seed=0)
    timer = StepTimes()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=device == "gpu")
    trainer.fit(module, train_dataloaders=loader)
    return tokens_per_sec(timer.times, args.warmup, batches[0][:, 1:].numel())


def run_bare(args, batches, precision: str, device: str) -> float:
    """The loop a careful engineer would write by hand (nanoGPT style), same work per step."""
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    module = MerinoLightningModule(args.recipe, warmup_steps=2, compile=False, seed=0).to(dev)
    loss_fn = torch.compile(module._loss) if args.compile else module._loss
    opt, sched = _optimizer(module, len(batches), dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    times = []
    for batch in batches:
        batch = batch.to(dev, non_blocking=True)
        with autocast:
            loss = loss_fn(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return tokens_per_sec(times, args.warmup, batches[0][:, 1:].numel())


def _optimizer(module: MerinoLightningModule, max_steps: int, dev: torch.device):
    return module.build_optimizer(max_steps, fused=dev.type == "cuda")  # the same recipe as training


def cpu_gemm_peak(n: int = 1024, reps: int = 20) -> float:
    """Measured fp32 GEMM FLOP/s of this CPU at the current thread count (the MFU denominator)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def measure(args, device: str, precision: str) -> dict:
    batches = make_batches(args.steps, args.batch, args.seq_len)
    module = MerinoLightningModule(args.recipe)
    flops_per_token = 3 * module._forward_flops_per_token(args.seq_len)
    bare, lit = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        bare.append(run_bare(args, batches, precision, device))
        lit.append(run_lightning(args, batches, precision, device))
    bare_tps, lit_tps = statistics.median(bare), statistics.median(lit)
    if device == "gpu":
        peak = device_peak_flops(torch.device("cuda", 0), precision)
        peak_src = torch.cuda.get_device_name(0)
    else:
        peak, peak_src = cpu_gemm_peak(), f"measured fp32 GEMM, {torch.get_num_threads()} thread(s)"
    row = {
        "device": device,
        "recipe": args.recipe,
        "precision": precision,
        "compile": args.compile,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "bare_tokens_per_sec": bare_tps,
        "lightning_tokens_per_sec": lit_tps,
        "ratio": lit_tps / bare_tps,
        "bare_runs": bare,
        "lightning_runs": lit,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "peak_source": peak_src,
    }
    if peak:
        row["mfu_lightning"] = lit_tps * flops_per_token / peak
        row["mfu_bare"] = bare_tps * flops_per_token / peak
    return row


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'device':<6} {'recipe':<11} {'prec':<10} {'B x T':>9} {'bare tok/s':>12} "
        f"{'Lightning tok/s':>16} {'ratio':>6} {'MFU':>7}  peak"
    )
    for r in rows:
        mfu = f"{100 * r['mfu_lightning']:.1f} %" if "mfu_lightning" in r else "n/a"
        print(
            f"{r['device']:<6} {r['recipe']:<11} {r['precision']:<10} {r['batch']:>4}x{r['seq_len']:<4} "
            f"{r['bare_tokens_per_sec']:>12,.0f} {r['lightning_tokens_per_sec']:>16,.0f} {r['ratio']:>6.3f} {mfu:>7}  "
            f"{(r['peak_flops'] or 0) / 1e12:.3g} TFLOP/s ({r['peak_source']})"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps, one repeat (development)")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU rows even when a GPU is present")
    p.add_argument("--out", default="runs/bench/fit.json")
    args = p.parse_args()
    silence_known_warnings()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    L.seed_everything(0, verbose=False)
    rows = []
    cpu = argparse.Namespace(
        recipe="merino-tiny",
        batch=8,
        seq_len=128,
        compile=False,
        steps=8 if args.quick else 40,
        warmup=2 if args.quick else 5,
        repeats=1 if args.quick else 3,
    )
    rows.append(measure(cpu, "cpu", "32-true"))
    if torch.cuda.is_available() and not args.cpu_only:
        torch.set_float32_matmul_precision("high")
        gpu = argparse.Namespace(
            recipe="merino-64m",
            batch=32,
            seq_len=1024,
            compile=True,
            steps=20 if args.quick else 60,
            warmup=8 if args.quick else 15,
            repeats=1 if args.quick else 2,
        )
        rows.append(measure(gpu, "gpu", "bf16-mixed"))
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from merino_pl.core.io import write_json

    write_json(out, {"torch": torch.__version__, "lightning": L.__version__, "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
