"""Latency benchmark: the issue-15 acceptance figures on this device, printed as ratios of one run.

    python bench/latency.py --threads 2            # the acceptance run (batch 1, seq 128)
    python bench/latency.py --threads 2 --quick    # 2 runs, short generation: a smoke run

In one process (so every ratio compares rows of the same run):

1. **Paper protocol vs full protocol** for the paper's pairs: MeRino-64M vs OPT-350M (paper: 4.9x
   on a Jetson Nano; target >= 5x) and MeRino-52M vs Pythia-70M (paper: 2.0x; target >= 2x).
   ``paper`` = the authors' latency_test (1 thread, zero ids, timeit(16).mean; MeRino / OPT
   without their LM head, Pythia with it); ``full`` = every model with its head (our plain vs
   their plain, our fast path vs their last-logits prefill), at ``--threads``.
2. **Quantized MeRino-64M**: fp32, INT8 and INT4 (group 128, row-wise int8 embedding / head,
   made by the quantize stage's RTN in its GPTQ format and loaded packed), on torch and on
   onnxruntime (MatMulNBits): resident weight bytes (measured), file bytes, prefill, per-token
   decode and generation tokens/s (128-token prompt + 128 new tokens).
3. **Torch prefill, interleaved**: the report's rows are timed one after the other, so a load
   change between the fp32 and the INT rows moves their ratio. The torch prefill ratios of the
   acceptance (INT8 / INT4 within 1.15x of fp32) are therefore also timed interleaved:
   ``--rounds`` rounds, each calling fp32, INT8 and INT4 (plain and fast path) once in a
   shuffled order; medians and means of the same rounds. On this shared 2-core machine even
   that ratio moved from 0.89 to 1.18 between two builds of the same models in one process, so
   it is measured ``--repeats`` times, each on freshly built models, and every repeat printed
   with their median.

``--deploy`` (run it with ``.venv/executorch/bin/python``: one interpreter with torch, onnxruntime
and executorch): instead, **the deployment runtimes side by side** for MeRino-52M (``--model``):
torch fp32, onnxruntime INT4 (the quantize stage's RTN at group 128 in its GPTQ format, int8
embedding / head, exported as the packed ``MatMulNBits`` graph) and ExecuTorch 8da4w (and, for
reference, onnxruntime and ExecuTorch fp32), all rows of one ``merino-pl latency`` report (same
protocol, same inputs): file size, prefill, per-token decode, generation tokens/s, each as a
speed-up over torch fp32. Writes runs/bench/latency-deploy.json and the report under
runs/bench/latency-deploy/.

Peers have random weights built from their published configs (latency does not depend on the
values). Prints the acceptance table; writes runs/bench/latency.json and each report under
runs/bench/latency/. Timings on a shared machine are noisy: compare the ratios of one run, and
read each report's CV / p90 warnings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

from merino_pl.core.checkpoint import load_model  # noqa: E402
from merino_pl.core.io import write_json  # noqa: E402
from merino_pl.latency.api import LatencySettings, latency  # noqa: E402
from merino_pl.latency.fast import fuse_qkv  # noqa: E402
from merino_pl.latency.measure import quantized_model  # noqa: E402
from merino_pl.latency.options import Options  # noqa: E402
from merino_pl.latency.runners import TorchRunner  # noqa: E402
from merino_pl.latency.timing import synchronizer, time_interleaved  # noqa: E402

PAIRS = [("merino-64m", "opt-350m", 5.0), ("merino-52m", "pythia-70m", 2.0)]  # (ours, peer, target x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 runs, 1 warm-up, 2 decode tokens, 16 generated tokens")
    ap.add_argument("--runs", type=int, default=8, help="timed runs of the full protocol (paper protocol: always 16)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--generate-tokens", type=int, default=128)
    ap.add_argument(
        "--threads", type=int, default=2, help="torch and onnxruntime threads of the full protocol (default: 2)"
    )
    ap.add_argument("--skip-pairs", action="store_true", help="only the quantized MeRino-64M part")
    ap.add_argument("--rounds", type=int, default=16, help="rounds of the interleaved torch prefill timing")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings, each on freshly built models")
    ap.add_argument("--deploy", action="store_true", help="only torch fp32 vs onnxruntime INT4 vs ExecuTorch 8da4w")
    ap.add_argument("--model", default="merino-52m", help="--deploy: the recipe timed (default: merino-52m)")
    ap.add_argument(
        "--out", default=None, help="JSON (default: runs/bench/latency.json, --deploy: latency-deploy.json)"
    )
    args = ap.parse_args()
    args.out = args.out or str(REPO / "runs" / "bench" / ("latency-deploy.json" if args.deploy else "latency.json"))
    if args.deploy:
        return deploy(args)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs, warmup, decode, gen = (2, 1, 2, 16) if args.quick else (args.runs, args.warmup, 4, args.generate_tokens)
    out_dir = Path(args.out).with_suffix("")
    t0 = time.time()
    pairs = []
    if not args.skip_pairs:
        for ours, peer, target in PAIRS:
            opts = Options(
                device=device,
                precisions=("fp32",),
                runs=runs,
                warmup=warmup,
                decode_tokens=decode,
                peers=(peer,),
                protocols=("full", "paper"),
                generate_tokens=0,
            )
            report = latency(LatencySettings(ours, str(out_dir / f"{ours}-vs-{peer}"), opts))
            pairs.append({"ours": ours, "peer": peer, "target": target, "report": report.to_json()})
    opts = Options(
        device=device,
        precisions=("fp32", "int8", "int4"),
        runs=runs,
        warmup=warmup,
        decode_tokens=decode,
        onnx=True,
        runtimes=("torch", "onnxruntime"),
        embedding="int8",
        generate_tokens=gen,
        generate_runs=1,
    )
    quant = latency(LatencySettings("merino-64m", str(out_dir / "merino-64m-quantized"), opts))
    quant = quant.to_json()  # the report as latency.json holds it
    rounds, repeats = (2, 1) if args.quick else (args.rounds, args.repeats)
    interleaved = interleaved_repeats("merino-64m", opts, rounds, repeats)
    summary = {
        "pairs": [pair_summary(p) for p in pairs],
        "quantized": quantized_summary(quant),
        "interleaved_prefill": interleaved,
    }
    device_line = quant["device"]["summary"]
    print_summary(summary, device_line, runs, warmup, time.time() - t0)
    write_json(
        args.out,
        {
            "device": quant["device"],
            "threads": args.threads,
            "runs": runs,
            "warmup": warmup,
            **summary,
            "reports": [str(out_dir / f"{p['ours']}-vs-{p['peer']}" / "latency.json") for p in pairs]
            + [str(out_dir / "merino-64m-quantized" / "latency.json")],
        },
    )
    print(f"wrote {args.out}")
    return 0


# (label, precision, path) of the deployment table; the ratios are over torch fp32 plain (every
# position's logits, as the onnxruntime and ExecuTorch graphs compute them) and its generation
DEPLOY_ROWS = (
    ("torch fp32", "fp32", "plain"),
    ("torch fp32, fast path", "fp32", "fast"),
    ("onnxruntime INT4 (MatMulNBits)", "int4", "onnxruntime"),
    ("ExecuTorch 8da4w", "int4", "executorch"),
    ("onnxruntime fp32", "fp32", "onnxruntime"),
    ("ExecuTorch fp32", "fp32", "executorch"),
)


def deploy(args: argparse.Namespace) -> int:
    """One latency report with the torch, onnxruntime and ExecuTorch rows of fp32 and int4; the
    deployment table of its rows."""
    from merino_pl.latency.options import executorch_problems

    if problems := executorch_problems("cpu", 1):
        print("; ".join(problems) + " (run this bench with .venv/executorch/bin/python)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    runs, warmup, decode, gen = (2, 1, 2, 16) if args.quick else (args.runs, args.warmup, 4, args.generate_tokens)
    opts = Options(
        precisions=("fp32", "int4"),
        runs=runs,
        warmup=warmup,
        decode_tokens=decode,
        onnx=True,
        runtimes=("torch", "onnxruntime", "executorch"),
        embedding="int8",
        generate_tokens=gen,
        generate_runs=1,
    )
    t0 = time.time()
    out_dir = Path(args.out).with_suffix("")
    rep = latency(LatencySettings(args.model, str(out_dir), opts, threads=args.threads)).to_json()
    rows = {(r["precision"], r["path"]): r for r in rep["rows"]}
    gen_rows = {(g["precision"], g["runtime"]): g["tokens_per_s"] for g in rep["generation"]}
    base = rows[("fp32", "plain")]
    base_gen = gen_rows.get(("fp32", "torch"))
    table = []
    for label, precision, path in DEPLOY_ROWS:
        r = rows.get((precision, path))
        if r is None:
            continue
        runtime = "torch" if path in ("plain", "fast") else path
        tps = gen_rows.get((precision, runtime)) if path != "plain" else None
        ms = {k: r[k] for k in ("prefill_ms", "decode_ms_per_token")}
        table.append(
            {
                "row": label,
                "precision": precision,
                "path": path,
                "file_bytes": r["weights_bytes"],
                "prefill_ms": {s: ms["prefill_ms"][s] for s in ("mean", "median", "cv")},
                "decode_ms_per_token": {s: ms["decode_ms_per_token"][s] for s in ("mean", "median", "cv")},
                "generation_tokens_per_s": tps,
                "prefill_speedup": base["prefill_ms"]["mean"] / ms["prefill_ms"]["mean"],
                "prefill_speedup_median": base["prefill_ms"]["median"] / ms["prefill_ms"]["median"],
                "decode_speedup": base["decode_ms_per_token"]["mean"] / ms["decode_ms_per_token"]["mean"],
                "decode_speedup_median": base["decode_ms_per_token"]["median"] / ms["decode_ms_per_token"]["median"],
                "generation_speedup": tps / base_gen if tps and base_gen else None,
                "file_over_fp32": r["weights_bytes"] / base["weights_bytes"],
            }
        )
    print(
        f"\n{args.model} on {rep['device']['summary']}: batch 1, "
        f"prompt {rep['protocol']['seq_len']}, mean / median of {runs} runs after {warmup} warm-up, "
        f"decode {decode} steps, generation {gen} new tokens "
        f"({time.time() - t0:.0f} s)\n"
    )
    print(
        "| runtime | file MiB (/ fp32) | prefill ms mean / median | decode ms/token mean / median "
        "| generation tokens/s | prefill x torch fp32 (mean / median) | decode x | generation x |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in table:
        p, d, g = t["prefill_ms"], t["decode_ms_per_token"], t["generation_tokens_per_s"]
        gx = t["generation_speedup"]
        print(
            f"| {t['row']} | {t['file_bytes'] / 2**20:.1f} ({t['file_over_fp32']:.2f}) | {p['mean']:.2f} / "
            f"{p['median']:.2f} | {d['mean']:.2f} / {d['median']:.2f} | {'-' if g is None else f'{g:.1f}'} | "
            f"{t['prefill_speedup']:.2f} / {t['prefill_speedup_median']:.2f} | "
            f"{t['decode_speedup']:.2f} / {t['decode_speedup_median']:.2f} | {'-' if gx is None else f'{gx:.2f}'} |"
        )
    pte = {p: rows[(p, "executorch")]["weights_bytes"] for p in ("fp32", "int4") if (p, "executorch") in rows}
    pte_ratio = pte["int4"] / pte["fp32"] if len(pte) == 2 else None
    if pte_ratio is not None:
        print(f"\nExecuTorch 8da4w .pte / fp32 .pte: {pte_ratio:.3f} (issue 24: <= 0.35)")
    for line in [c for c in rep["checks"] if not c["match"]]:
        print(f"output check failed: {line['compared']} ({line['precision']})")
    for w in rep["warnings"]:
        print(f"warning: {w}")
    write_json(
        args.out,
        {
            "model": args.model,
            "device": rep["device"],
            "threads": args.threads,
            "runs": runs,
            "warmup": warmup,
            "rows": table,
            "pte_8da4w_over_fp32": pte_ratio,
            "checks_ok": all(c["match"] for c in rep["checks"]),
            "report": str(out_dir / "latency.json"),
        },
    )
    print(f"wrote {args.out}")
    return 0


def pair_summary(p: dict) -> dict:
    rep = p["report"]
    paper = rep["paper_protocol"]["speedups"][0]
    full = {s["paths"]: s for s in rep["speedups"]}
    return {
        "ours": p["ours"],
        "peer": p["peer"],
        "target": p["target"],
        "paper_protocol": paper["speedup"],
        "paper_jetson_nano": paper["paper_jetson_nano"],
        "peer_includes_lm_head": paper["peer_includes_lm_head"],
        "full_plain_prefill": full["plain vs plain"]["prefill"],
        "full_fast_prefill": full["fast vs last-logits"]["prefill"],
        "full_decode": full["plain vs plain"]["decode"],
        "meets_target": paper["speedup"] >= p["target"],
        "paper_rows": rep["paper_protocol"]["rows"],
    }


def quantized_summary(rep: dict) -> dict:
    rows = {(r["precision"], r["path"]): r for r in rep["rows"]}
    gen = {(g["precision"], g["runtime"]): g["tokens_per_s"] for g in rep["generation"]}
    fp32, int4 = rows[("fp32", "plain")], rows[("int4", "plain")]

    def ms(prec: str, path: str, stat: str) -> float:
        return rows[(prec, path)][stat]["mean"]

    out = {
        "int4_resident_over_fp32": int4["weights_in_memory_bytes"] / fp32["weights_in_memory_bytes"],
        "int4_resident_plus_scratch_over_fp32": (int4["weights_in_memory_bytes"] + int4["workspace_bytes"])
        / fp32["weights_in_memory_bytes"],
        "int4_file_over_fp32": int4["weights_bytes"] / fp32["weights_bytes"],
        "int8_resident_over_fp32": rows[("int8", "plain")]["weights_in_memory_bytes"] / fp32["weights_in_memory_bytes"],
        "ort_int4_decode_speedup_vs_torch_fp32": ms("fp32", "fast", "decode_ms_per_token")
        / ms("int4", "onnxruntime", "decode_ms_per_token"),
        "ort_int4_generation_speedup_vs_torch_fp32": gen[("int4", "onnxruntime")] / gen[("fp32", "torch")]
        if gen
        else None,
        "checks_ok": all(c["match"] for c in rep["checks"]),
        "bytes": {
            p: {
                "file": rows[(p, "plain")]["weights_bytes"],
                "resident": rows[(p, "plain")]["weights_in_memory_bytes"],
                "scratch": rows[(p, "plain")]["workspace_bytes"],
            }
            for p in ("fp32", "int8", "int4")
        },
        "generation_tokens_per_s": {f"{p} {r}": v for (p, r), v in gen.items()},
    }
    for p in ("int8", "int4"):
        out[f"ort_{p}_prefill_over_ort_fp32"] = ms(p, "onnxruntime", "prefill_ms") / ms(
            "fp32", "onnxruntime", "prefill_ms"
        )
        out[f"torch_{p}_plain_prefill_over_fp32"] = ms(p, "plain", "prefill_ms") / ms("fp32", "plain", "prefill_ms")
        out[f"torch_{p}_fast_prefill_over_fp32"] = ms(p, "fast", "prefill_ms") / ms("fp32", "fast", "prefill_ms")
    return out


def interleaved_repeats(recipe: str, opts: Options, rounds: int, repeats: int) -> dict:
    """``interleaved_prefill`` ``repeats`` times; each ratio's median over the repeats."""
    runs = [interleaved_prefill(recipe, opts, rounds) for _ in range(repeats)]
    median = {
        k: {st: statistics.median(r["ratios"][k][st] for r in runs) for st in ("median", "mean")}
        for k in runs[0]["ratios"]
    }
    return {"rounds": rounds, "repeats": runs, "ratios": median}


def interleaved_prefill(recipe: str, opts: Options, rounds: int) -> dict:
    """Torch prefill (batch 1, 128 tokens) of fp32, INT8 and INT4 (the report's models: same
    seed, same RTN directories), plain and fast path, timed in ``rounds`` shuffled rounds after
    ``opts.warmup`` warm-up calls each: per variant the median and mean ms, and each INT variant
    over fp32 on the same path."""
    loaded = load_model(recipe, seed=opts.seed)
    fp32 = copy.deepcopy(loaded.model).eval()
    fused = copy.deepcopy(loaded.model).eval()
    fuse_qkv(fused)

    def runner(model: torch.nn.Module, last_logits_only: bool) -> TorchRunner:
        return TorchRunner(model, opts.batch, opts.seq, opts.device, 1, last_logits_only, seed=opts.seed)

    runners = {("fp32", "plain"): runner(fp32, False), ("fp32", "fast"): runner(fused, True)}
    with tempfile.TemporaryDirectory() as tmp:
        for p in ("int8", "int4"):
            q = quantized_model(loaded, p, Path(tmp), opts.embedding).eval()
            runners[(p, "plain")], runners[(p, "fast")] = runner(q, False), runner(q, True)
    samples = time_interleaved(
        {k: r.prefill for k, r in runners.items()}, rounds, opts.warmup, synchronizer(opts.device)
    )
    ms = {
        f"{p} {path}": {"median": statistics.median(v), "mean": statistics.fmean(v)} for (p, path), v in samples.items()
    }
    ratios = {
        f"torch_{p}_{path}_prefill_over_fp32": {
            stat: ms[f"{p} {path}"][stat] / ms[f"fp32 {path}"][stat] for stat in ("median", "mean")
        }
        for p in ("int8", "int4")
        for path in ("plain", "fast")
    }
    return {"rounds": rounds, "warmup": opts.warmup, "ms": ms, "ratios": ratios}


def print_summary(s: dict, device: str, runs: int, warmup: int, seconds: float) -> None:
    print(
        f"\nlatency on {device}: batch 1, seq 128; full protocol mean of {runs} after {warmup} warm-up; paper protocol "
        f"1 thread, timeit(16).mean ({seconds:.0f} s)\n"
    )
    if s["pairs"]:
        print(
            "| ours | peer | paper protocol x | target | paper (Jetson Nano) x | full: plain x "
            "| full: fast vs last-logits x | full: decode x |"
        )
        print("|---|---|---:|---|---:|---:|---:|---:|")
        for p in s["pairs"]:
            ok = "met" if p["meets_target"] else "missed"
            print(
                f"| {p['ours']} | {p['peer']} | {p['paper_protocol']:.2f} | >= {p['target']:.0f}x {ok} "
                f"| {p['paper_jetson_nano']:.1f} | "
                f"{p['full_plain_prefill']:.2f} | {p['full_fast_prefill']:.2f} | {p['full_decode']:.2f} |"
            )
    q = s["quantized"]
    checks = [
        ("INT4 resident weights / fp32", q["int4_resident_over_fp32"], "<= 0.30", q["int4_resident_over_fp32"] <= 0.30),
        ("INT4 resident + dequant scratch / fp32", q["int4_resident_plus_scratch_over_fp32"], "(info)", None),
        ("INT4 file / fp32", q["int4_file_over_fp32"], "<= 0.30", q["int4_file_over_fp32"] <= 0.30),
        (
            "onnxruntime INT4 decode speed-up vs torch fp32",
            q["ort_int4_decode_speedup_vs_torch_fp32"],
            ">= 3",
            q["ort_int4_decode_speedup_vs_torch_fp32"] >= 3,
        ),
    ]
    if q["ort_int4_generation_speedup_vs_torch_fp32"] is not None:
        g = q["ort_int4_generation_speedup_vs_torch_fp32"]
        checks.append(("onnxruntime INT4 generation tokens/s / torch fp32", g, ">= 2", g >= 2))
    for p in ("int8", "int4"):
        checks.append(
            (
                f"onnxruntime {p.upper()} prefill / onnxruntime fp32",
                q[f"ort_{p}_prefill_over_ort_fp32"],
                "<= 1",
                q[f"ort_{p}_prefill_over_ort_fp32"] <= 1,
            )
        )
        checks.append(
            (
                f"torch {p.upper()} prefill / fp32 (plain), report rows (timed one after the other)",
                q[f"torch_{p}_plain_prefill_over_fp32"],
                "(info)",
                None,
            )
        )
        checks.append(
            (f"torch {p.upper()} prefill / fp32 (fast path)", q[f"torch_{p}_fast_prefill_over_fp32"], "(info)", None)
        )
    il = s["interleaved_prefill"]
    for p in ("int8", "int4"):
        for path in ("plain", "fast"):
            key = f"torch_{p}_{path}_prefill_over_fp32"
            r = il["ratios"][key]
            each = ", ".join(f"{x['ratios'][key]['median']:.3f}" for x in il["repeats"])
            checks.append(
                (
                    f"torch {p.upper()} prefill / fp32 ({path}), interleaved: median of {len(il['repeats'])} "
                    f"repeats' medians ({each}; of means {r['mean']:.3f})",
                    r["median"],
                    "<= 1.15" if path == "plain" else "(info: fp32's fast path also fuses Q/K/V)",
                    r["median"] <= 1.15 if path == "plain" else None,
                )
            )
    print("\n| MeRino-64M, quantized | ratio | target | |\n|---|---:|---|---|")
    for name, value, target, ok in checks:
        print(f"| {name} | {value:.3f} | {target} | {'' if ok is None else ('met' if ok else 'missed')} |")
    print("\n| bytes | file | resident | scratch |\n|---|---:|---:|---:|")
    for p, b in q["bytes"].items():
        print(
            f"| {p} | {b['file'] / 2**20:.1f} MiB | {b['resident'] / 2**20:.1f} MiB | {b['scratch'] / 2**20:.1f} MiB |"
        )
    if q["generation_tokens_per_s"]:
        print("\n| generation (128 prompt + new tokens) | tokens/s |\n|---|---:|")
        for k, v in q["generation_tokens_per_s"].items():
            print(f"| {k} | {v:.2f} |")
    for i, rep in enumerate(il["repeats"], 1):
        print(
            f"\ninterleaved torch prefill, repeat {i}, {il['rounds']} rounds, median ms: "
            + ", ".join(f"{k} {v['median']:.1f}" for k, v in rep["ms"].items())
        )
    print(f"\noutput checks all ok: {q['checks_ok']}")


if __name__ == "__main__":
    sys.exit(main())
