"""Throughput of the two lm-eval paths on the same requests: our `merino` backend vs lm-eval's HFLM.

    python bench/eval.py                      # merino-tiny, 2 WikiText-2 articles, batch 8
    python bench/eval.py --recipe merino-52m --docs 4 --batch-size 8

Both score lm-eval's rolling windows of the same documents (loglikelihood_rolling); the table
shows tokens/s and the speed-up over HFLM. Writes runs/bench/eval.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="merino-tiny")
    p.add_argument("--docs", type=int, default=2, help="WikiText-2 test articles to score")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default=None, help="wiki.test.raw (default: the copy shipped in the package)")
    args = p.parse_args()
    if args.data is None:
        from merino_pl.core.assets import embedded_wikitext2

        args.data = str(embedded_wikitext2())

    from lm_eval.api.instance import Instance

    from merino_pl.core.checkpoint import load_model
    from merino_pl.eval.harness import MerinoLM, hf_lm
    from merino_pl.eval.perplexity import wikitext_pages

    pages = wikitext_pages(Path(args.data).read_text(encoding="utf-8"))[: args.docs]
    reqs = [Instance("loglikelihood_rolling", {}, (p,), i) for i, p in enumerate(pages)]
    loaded = load_model(args.recipe)
    backends = {
        "merino": MerinoLM(loaded, batch_size=args.batch_size, device="cpu"),
        "hf (HFLM)": hf_lm(loaded, batch_size=args.batch_size, device="cpu"),
    }
    tokens = sum(len(backends["merino"].tok_encode(p)) for p in pages)
    rows, values = [], {}
    for name, lm in backends.items():
        t0 = time.perf_counter()
        values[name] = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
        seconds = time.perf_counter() - t0
        rows.append({"backend": name, "seconds": seconds, "tokens_per_s": tokens / seconds})
    base = rows[1]["seconds"]
    print(
        f"{args.recipe}, {len(pages)} docs, {tokens} tokens, batch {args.batch_size}, threads {torch.get_num_threads()}"
    )
    print(f"{'backend':<12} {'s':>8} {'tok/s':>10} {'speed-up vs HFLM':>18}")
    for r in rows:
        r["speedup_vs_hflm"] = base / r["seconds"]
        print(f"{r['backend']:<12} {r['seconds']:8.2f} {r['tokens_per_s']:10.0f} {r['speedup_vs_hflm']:17.2f}x")
    diff = max(abs(a - b) for a, b in zip(values["merino"], values["hf (HFLM)"]))
    print(f"max |loglikelihood difference| = {diff:.2e}")
    out = REPO / "runs" / "bench" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "recipe": args.recipe,
                "docs": len(pages),
                "tokens": tokens,
                "batch_size": args.batch_size,
                "rows": rows,
                "max_abs_diff": diff,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
