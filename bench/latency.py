"""Latency benchmark: the paper's Table 3 speed-ups on this device, and our fast path vs plain.

    python bench/latency.py            # fp32, batch 1, seq 128, mean of 16 (+ fp16 on a GPU)
    python bench/latency.py --quick    # 4 runs, 1 warm-up: a smoke run while developing

In one process: MeRino-64M vs OPT-350M (paper: 4.9x on a Jetson Nano; target here >= 5x) and
MeRino-52M vs Pythia-70M (paper: 2.0x; target >= 2x), each on the plain path (what the paper
times: a forward over 128 tokens), plus our fast path and its gain. Peers have random weights
built from their published configs (latency does not depend on the values). Prints a table,
writes runs/bench/latency.json (+ each pair's full report under runs/bench/latency/).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.io import write_json  # noqa: E402
from merino_pl.latency.report import Options, build_report, write_report  # noqa: E402

PAIRS = [("merino-64m", "opt-350m", 5.0), ("merino-52m", "pythia-70m", 2.0)]  # (ours, peer, target x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 runs, 1 warm-up, 2 decode tokens")
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "latency.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = ("fp32", "fp16") if device == "cuda" else ("fp32",)
    runs, warmup, decode = (4, 1, 2) if args.quick else (args.runs, args.warmup, 8)
    out_dir = Path(args.out).with_suffix("")
    results, t0 = [], time.time()
    for ours, peer, target in PAIRS:
        opts = Options(device=device, precisions=precisions, runs=runs, warmup=warmup, decode_tokens=decode, peers=(peer,))
        report = build_report(ours, opts, out_dir / ours)
        write_report(out_dir / ours, report)
        results.append({"ours": ours, "peer": peer, "target": target, "report": report})
    summary = summarize(results)
    print_table(summary, results[0]["report"]["device"]["summary"], runs, warmup, time.time() - t0)
    write_json(args.out, {"device": results[0]["report"]["device"], "protocol": results[0]["report"]["protocol"],
                          "speedups": summary[0], "fast_path": summary[1], "reports": [str(out_dir / r["ours"] / "latency.json") for r in results]})
    print(f"wrote {args.out}")
    return 0


def summarize(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """(speed-up rows: each pair, precision and comparison; fast-path rows: plain vs fast)."""
    pairs, fast = [], []
    for r in results:
        rep = r["report"]
        by = {(x["model"], x["precision"], x["path"]): x for x in rep["rows"]}
        for s in rep["speedups"]:
            mine, theirs = s["paths"].split(" vs ")
            me, peer = by[(r["ours"], s["precision"], mine)], by[(r["peer"], s["precision"], theirs)]
            pairs.append({
                "precision": s["precision"], "ours": r["ours"], "peer": r["peer"], "paths": s["paths"],
                "ours_prefill_ms": me["prefill_ms"]["mean"], "peer_prefill_ms": peer["prefill_ms"]["mean"],
                "ours_decode_ms": me["decode_ms_per_token"]["mean"], "peer_decode_ms": peer["decode_ms_per_token"]["mean"],
                "speedup_prefill": s["prefill"], "speedup_decode": s["decode"], "paper": s["paper_jetson_nano"],
                "target": r["target"], "meets_target": s["prefill"] >= r["target"],
            })
        for g in rep["fast_path"]:
            plain, other = by[(r["ours"], g["precision"], "plain")], by[(r["ours"], g["precision"], g["path"])]
            fast.append({
                "precision": g["precision"], "model": r["ours"], "path": g["path"],
                "plain_prefill_ms": plain["prefill_ms"]["mean"], "prefill_ms": other["prefill_ms"]["mean"],
                "plain_decode_ms": plain["decode_ms_per_token"]["mean"], "decode_ms": other["decode_ms_per_token"]["mean"],
                "gain_prefill": g["prefill"], "gain_decode": g["decode"],
                "outputs_match": all(c["match"] for c in rep["checks"] if c["precision"] == g["precision"]),
            })
    return pairs, fast


def print_table(summary: tuple[list[dict], list[dict]], device: str, runs: int, warmup: int, seconds: float) -> None:
    pairs, fast = summary
    print(f"\nlatency on {device}: batch 1, seq 128, mean of {runs} after {warmup} warm-up ({seconds:.0f} s)\n")
    print("| prec | ours | peer | paths | ours prefill ms | peer prefill ms | speed-up | paper (Nano) | target | ours decode ms/tok | peer decode ms/tok | decode speed-up |")
    print("|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in pairs:
        ok = "met" if r["meets_target"] else "missed"
        print(f"| {r['precision']} | {r['ours']} | {r['peer']} | {r['paths']} | {r['ours_prefill_ms']:.1f} | {r['peer_prefill_ms']:.1f} | "
              f"{r['speedup_prefill']:.2f}x | {r['paper']:.1f}x | >= {r['target']:.0f}x {ok} | "
              f"{r['ours_decode_ms']:.2f} | {r['peer_decode_ms']:.2f} | {r['speedup_decode']:.2f}x |")
    print("\n| prec | model | path | plain prefill ms | prefill ms | prefill gain | plain decode ms/tok | decode ms/tok | decode gain | outputs equal |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in fast:
        print(f"| {r['precision']} | {r['model']} | {r['path']} | {r['plain_prefill_ms']:.1f} | {r['prefill_ms']:.1f} | {r['gain_prefill']:.2f}x | "
              f"{r['plain_decode_ms']:.2f} | {r['decode_ms']:.2f} | {r['gain_decode']:.2f}x | {r['outputs_match']} |")


if __name__ == "__main__":
    sys.exit(main())
