"""The GPU path on one GPU, in one command (issue 23.6): what CPU tests cannot show.

    python bench/gpu.py          # the one command: on one H100, about 5-8 minutes

Prints, and writes to ``runs/bench/gpu.json``:

1. training throughput of MeRino-52M and MeRino-64M as ``merino-pl fit`` trains them on 8 x H100
   (``recipes/fit/pile-8xh100.yaml``): bf16 autocast, ``torch.compile`` of the module's loss,
   fused AdamW with the paper's groups and schedule, clipping at 1.0, the shipped micro-batch of
   32 x 1024 tokens; tokens/s and MFU. MFU = tokens/s x training FLOPs per token / peak, with
   training FLOPs = 3 x forward (= 6 x the parameters as applied per token, shared layers counted
   once per application, LM head included, + attention; ``merino_pl.core.costs.count_flops``),
   against the device's dense bf16 peak (989.4 TFLOP/s on an H100 SXM). Anchors: llm.c GPT-2
   124M ~35 % MFU by 6N, llm-foundry 125M 43-45 %; the target for MeRino-64M is >= 45 %;
2. eager vs compiled loss on the same batch and weights (bf16 autocast): they must agree;
3. GPTQ INT4 (group 128, 128 x 512 calibration windows, the quantize stage's solver) of
   MeRino-64M on the GPU: seconds;
4. the int4 tinygemm kernel (``_weight_int4pack_mm``, what ``QuantLinear`` uses on CUDA) against
   the dequantized weight for each of MeRino-64M's linear shapes: relative error;
5. onnxruntime's CUDA provider (when installed): prefill latency of the exported MeRino-64M graph,
   beside torch's on the same GPU.

Without a CUDA device it says so in one line and exits 2. ``--device cpu --recipes merino-tiny
--seq 64 --micro-batch 2 --steps 2`` runs the same code on a CPU as a smoke test of the script
(its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from merino_pl.core.config import load_recipe  # noqa: E402
from merino_pl.core.costs import count_flops  # noqa: E402
from merino_pl.core.hf import MerinoForCausalLM  # noqa: E402
from merino_pl.fit.callbacks import device_peak_flops  # noqa: E402
from merino_pl.fit.module import MerinoLightningModule  # noqa: E402

H100_BF16 = 989.4e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA data sheet; 1979 is with sparsity)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="merino-52m,merino-64m", help="recipes to time (default: both)")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per step (the shipped config's: 32)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (the shipped config's: 1024)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per recipe (after 5 warm-up)")
    p.add_argument("--quant-recipe", default="merino-64m", help="model of the GPTQ / int4 / ONNX parts")
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows of 512 tokens")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train,equality,gptq,int4,onnx")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to smoke-test this script")
    p.add_argument("--out", default=str(REPO / "runs/bench/gpu.json"))
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(module: MerinoLightningModule, loss_fn: Any, device: torch.device, max_steps: int) -> Any:
    """One optimizer step as fit runs it: autocast bf16, backward, clip 1.0, fused AdamW, schedule."""
    opt, sched = module.build_optimizer(max_steps, fused=device.type == "cuda")
    params = [p for p in module.parameters() if p.requires_grad]

    def step(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train(recipe: str, args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> None:
    torch.manual_seed(0)
    module = MerinoLightningModule(recipe, warmup_steps=2, seed=0).to(device)
    arch = module.recipe.architecture
    loss_fn = torch.compile(module._loss)  # what fit compiles with model.compile: true
    batches = torch.randint(0, arch.vocab_size, (4, args.micro_batch, args.seq + 1), device=device)
    if "equality" not in args.skip:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            eager = float(module._loss(batches[0, :, :-1], batches[0, :, 1:]))
            compiled = float(loss_fn(batches[0, :, :-1], batches[0, :, 1:]))
        rel = abs(compiled - eager) / abs(eager)
        results[f"{recipe}.loss_eager_vs_compiled"] = {"eager": eager, "compiled": compiled, "relative": rel}
        print(
            f"{recipe}: loss eager {eager:.6f}  compiled {compiled:.6f}  relative diff {rel:.2e}  "
            f"{'agree' if rel <= 1e-3 else 'DIFFER'} (<= 1e-3)",
            flush=True,
        )
    step = train_step_fn(module, loss_fn, device, max_steps=10 * args.steps)
    t0 = time.perf_counter()
    for i in range(5):  # warm-up: compiles forward and backward
        step(batches[i % len(batches)])
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(batches[i % len(batches)])
    sync(device)
    seconds = time.perf_counter() - t0
    tps = args.steps * args.micro_batch * args.seq / seconds
    flops_per_token = 3 * count_flops(arch, args.seq, include_lm_head=True) / args.seq
    peak = device_peak_flops(device, "bf16-mixed") or (H100_BF16 if device.type == "cuda" else None)
    mfu = tps * flops_per_token / peak if peak else None
    results[f"{recipe}.train"] = {
        "tokens_per_s": tps,
        "mfu": mfu,
        "peak_flops": peak,
        "flops_per_token": flops_per_token,
        "step_s": seconds / args.steps,
        "warmup_compile_s": warm,
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "loss": float(loss),
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }
    mfu_text = f"MFU {100 * mfu:.1f} % of {peak / 1e12:.0f} TFLOP/s" if mfu else "MFU n/a (no peak for this device)"
    print(
        f"{recipe}: {tps:,.0f} tokens/s  {mfu_text}  ({seconds / args.steps * 1e3:.1f} ms/step, "
        f"warm-up incl. compile {warm:.0f} s)",
        flush=True,
    )


def gptq_int4(args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> None:
    """The quantize stage's GPTQ solver over a model on ``device`` (random init: the time does not
    depend on the values; random calibration ids likewise)."""
    from merino_pl.core.quant.spec import QuantSpec
    from merino_pl.quantize.passes import quantize_model

    torch.manual_seed(0)
    model = MerinoForCausalLM.from_recipe(load_recipe(args.quant_recipe)).to(device).eval()
    calib = torch.randint(0, model.arch.vocab_size, (args.nsamples, 512), device=device)
    sync(device)
    t0 = time.perf_counter()
    _, layers = quantize_model(model, QuantSpec(bits=4, group_size=128), calib, batch_size=8, progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    results["gptq_int4"] = {"recipe": args.quant_recipe, "seconds": seconds, "nsamples": args.nsamples}
    results["gptq_int4"]["layers"] = len(layers)
    print(
        f"GPTQ INT4 g128 of {args.quant_recipe} ({args.nsamples} x 512 calibration) on {device}: {seconds:.1f} s",
        flush=True,
    )


def int4_kernel(args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> None:
    """tinygemm against ``F.linear`` with the dequantized weight, for every linear shape of the model."""
    from merino_pl.core.quant import tinygemm

    model = MerinoForCausalLM.from_recipe(load_recipe(args.quant_recipe))
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    errors = {}
    g = torch.Generator().manual_seed(0)
    for n, k in shapes:
        if not tinygemm.applies(4, k, n, 128):
            continue
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scales = torch.rand(k // 128, n, generator=g) * 0.02 + 0.001
        zeros = torch.randint(0, 16, (k // 128, n), generator=g).float()
        weight = (codes.float() - zeros.repeat_interleave(128, 0).t()) * scales.repeat_interleave(128, 0).t()
        kernel = tinygemm.build(codes.to(device), scales.to(device), zeros.to(device), 128)
        x = torch.randn(64, k, generator=g)
        want = x @ weight.t()
        got = tinygemm.matmul(x.to(device), kernel).float().cpu()
        errors[f"{n}x{k}"] = float((got - want).norm() / want.norm())
    worst = max(errors.values()) if errors else float("nan")
    results["int4_kernel"] = {"relative_error": errors, "worst": worst, "check_limit": tinygemm.CHECK_REL_ERR}
    print(
        f"int4 kernel vs dequantized weight, {len(errors)} shapes: worst relative error {worst:.2e} "
        f"({'within' if worst <= tinygemm.CHECK_REL_ERR else 'OVER'} QuantLinear's check {tinygemm.CHECK_REL_ERR})",
        flush=True,
    )


def onnx_cuda(args: argparse.Namespace, device: torch.device, results: dict[str, Any], tmp: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime: not installed (pip install merino-pl[onnx]); skipped", flush=True)
        return
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(
            f"onnxruntime {ort.__version__}: no CUDAExecutionProvider (onnxruntime-gpu not installed); skipped",
            flush=True,
        )
        return
    from merino_pl.export.onnx import cache_shapes, export_onnx

    torch.manual_seed(0)
    model = MerinoForCausalLM.from_recipe(load_recipe(args.quant_recipe)).eval()
    path = export_onnx(model, tmp / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    seq = 128
    ids = torch.randint(0, model.arch.vocab_size, (1, seq))
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": torch.ones(1, seq, dtype=torch.int64).numpy(),
        "position_ids": torch.arange(seq)[None].numpy(),
    }
    names = [i.name for i in session.get_inputs()][3:]
    empty = [torch.zeros(1, h, 0, d).numpy() for h, d in cache_shapes(model) for _ in range(2)]
    feed.update(dict(zip(names, empty)))
    ort_ms = _mean_ms(lambda: session.run(["logits"], feed))
    model = model.to(device)
    with torch.no_grad():
        torch_ms = _mean_ms(lambda: (model(ids.to(device), use_cache=False), sync(device)))
    results["onnxruntime_cuda"] = {"prefill_tokens": seq, "ort_ms": ort_ms, "torch_ms": torch_ms}
    print(f"prefill {seq} tokens, fp32, batch 1: onnxruntime CUDA {ort_ms:.2f} ms, torch {torch_ms:.2f} ms", flush=True)


def _mean_ms(fn: Any, warmup: int = 5, runs: int = 30) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA device here (torch {torch.__version__}); run it on a GPU node", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as fit does on CUDA (set_float32_matmul_precision high)
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    tmp = Path(args.out).parent / "gpu-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    parts = [
        *[(f"train {r}", lambda r=r: train(r, args, device, results)) for r in args.recipes.split(",") if r],
        ("gptq", lambda: gptq_int4(args, device, results)),
        ("int4", lambda: int4_kernel(args, device, results)),
        ("onnx", lambda: onnx_cuda(args, device, results, tmp)),
    ]
    for name, run in parts:
        if name.split()[0] in args.skip.split(","):
            continue
        t0 = time.perf_counter()
        try:  # one part failing (a missing kernel, an OOM) still leaves the others' figures
            run()
        except Exception as e:  # noqa: BLE001 - reported, then the next part
            results[f"{name}.error"] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            traceback.print_exc(limit=3)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
