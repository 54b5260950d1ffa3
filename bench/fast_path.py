"""The fast path's parts, each measured alone (issue 15: keep only what measures faster, per
device and thread count).

    python bench/fast_path.py                         # merino-52m, merino-64m at 1 and 2 threads
    python bench/fast_path.py --recipes merino-64m --threads 2 --rounds 30

For each recipe and thread count, in one process, calls interleaved in a shuffled order each
round (``timing.time_interleaved``; batch 1, 128-token prompt, decode steps on its cache):

* ``last-logits``: prefill with only the last position's logits vs all positions' (same model);
* ``fused QKV, prefill``: the last-logits prefill with one (3E x E) Q/K/V GEMM vs three;
* ``fused QKV, decode``: one decode step (mean of ``--decode-tokens``) fused vs three GEMMs.

Each ratio is the median over rounds of the round's own ratio (paired: a load change between
rounds cancels). Prefills and decode steps are timed in separate interleaved passes. Prints a
table; writes runs/bench/fast_path.json. ``latency/fast.py`` states which form it applies where,
from these figures.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.core.checkpoint import load_model  # noqa: E402
from merino_pl.core.io import write_json  # noqa: E402
from merino_pl.latency.fast import fuse_qkv  # noqa: E402
from merino_pl.latency.runners import TorchRunner  # noqa: E402
from merino_pl.latency.timing import synchronizer, time_interleaved  # noqa: E402


def measure(recipe: str, threads: int, rounds: int, decode_tokens: int, device: str) -> dict:
    torch.set_num_threads(threads)
    loaded = load_model(recipe)
    plain = copy.deepcopy(loaded.model).eval().to(device)
    fused = copy.deepcopy(loaded.model).eval().to(device)
    fuse_qkv(fused, fuse_prefill=True)  # both phases fused: the comparison, not the default policy
    runners = {
        "all-logits": TorchRunner(plain, 1, 128, device, decode_tokens),
        "separate": TorchRunner(plain, 1, 128, device, decode_tokens, last_logits_only=True),
        "fused": TorchRunner(fused, 1, 128, device, decode_tokens, last_logits_only=True),
    }
    sync = synchronizer(device)
    ms = time_interleaved({k: r.prefill for k, r in runners.items()}, rounds, 2, sync)
    decoders = {k: runners[k] for k in ("separate", "fused")}
    for r in decoders.values():
        r.start_decode()  # each timed call decodes on the same cache (the runner crops it back)
    decode = time_interleaved({f"{k} decode": r.decode_run for k, r in decoders.items()}, rounds, 1, sync)
    for r in decoders.values():
        r.end_decode()
    ms |= {k: [t / decode_tokens for t in v] for k, v in decode.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(ms[a], ms[b]))

    return {
        "recipe": recipe,
        "threads": threads,
        "rounds": rounds,
        "median_ms": {k: statistics.median(v) for k, v in ms.items()},
        "ratios": {
            "last-logits / all-logits prefill": paired("separate", "all-logits"),
            "fused / separate QKV, prefill": paired("fused", "separate"),
            "fused / separate QKV, decode step": paired("fused decode", "separate decode"),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="merino-52m,merino-64m")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "fast_path.json"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [
        measure(r, int(t), args.rounds, args.decode_tokens, device)
        for r in args.recipes.split(",")
        for t in args.threads.split(",")
    ]
    names = list(rows[0]["ratios"])
    print(f"\nfast path parts on {device}: paired median ratio over {args.rounds} interleaved rounds (< 1: faster)\n")
    print("| recipe | threads | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for r in rows:
        print(f"| {r['recipe']} | {r['threads']} | " + " | ".join(f"{r['ratios'][n]:.3f}" for n in names) + " |")
    write_json(args.out, {"device": device, "rows": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
