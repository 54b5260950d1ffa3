"""Data-path throughput, side by side, against what one H100 consumes for MeRino-64M.

    python bench/data.py            # full: ~10 M tokens of the shipped real text
    python bench/data.py --quick    # a smaller corpus while developing

Rows: the tokenizer alone in one process (the peer every parallel path is compared to),
``merino-pl prepare`` with 1 and 2 worker processes, and the PileDataModule reading shards and
streaming text with 0 and 2 DataLoader workers (seq_len 1024, batch 8). Each loader row is
divided by the H100's appetite (tokens/s at 40 % MFU) to show how many GPUs one loader feeds.
Writes runs/bench/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.core.config import load_recipe  # noqa: E402
from merino_pl.core.costs import count_flops, count_params, lm_head_flops  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM bf16 dense peak
MFU = 0.40


def h100_tokens_per_s(recipe: str, seq_len: int = 1024) -> dict:
    """Training tokens/s of one H100 at 40 % MFU: peak x MFU / training FLOPs per token.

    Training FLOPs per token = 3 x forward FLOPs per token (forward + 2 x backward), and the
    forward FLOPs per token are ``costs.count_flops(seq_len) / seq_len``: 2 x every *applied*
    non-embedding weight (a block shared L_j times counts L_j times, which 6 x params would miss)
    plus the attention products QK^T and AV. The tied LM head is real compute too; the row
    with it is the figure the GPU actually reaches, the one without it the paper's convention
    (a higher, stricter appetite for the loader). The loader ratio uses the stricter one.
    """
    arch = load_recipe(recipe).architecture
    fwd = count_flops(arch, seq_len) / seq_len
    head = lm_head_flops(arch, seq_len) / seq_len
    return {
        "recipe": recipe,
        "params": count_params(arch),
        "forward_flops_per_token": fwd,
        "lm_head_flops_per_token": head,
        "tokens_per_s": MFU * H100_BF16_DENSE / (3 * fwd),
        "tokens_per_s_with_lm_head": MFU * H100_BF16_DENSE / (3 * (fwd + head)),
    }


def make_corpus(folder: Path, target_mb: float) -> Path:
    """The shipped real text (Shakespeare + WikiText-2 test, shipped in the package),
    repeated to ``target_mb``, as jsonl files of paragraph documents (a repeat index keeps every
    document distinct)."""
    from merino_pl.core.assets import embedded_wikitext2
    from merino_pl.core.tokenizer import default_corpus_file

    texts = [p.read_text() for p in (default_corpus_file(), embedded_wikitext2())]
    paragraphs = [p for t in texts for p in t.split("\n\n") if p.strip()]
    size = sum(len(p) for p in paragraphs)
    repeats = max(1, round(target_mb * 1e6 / size))
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(repeats):
        lines = [json.dumps({"text": f"{p}\n[{r}]"}) for p in paragraphs]
        (folder / f"part-{r:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def bench_tokenizer(corpus: Path) -> dict:
    from merino_pl.core.tokenizer import load_tokenizer

    docs = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl"))[:2] for line in f.open()]
    tok = load_tokenizer(None)
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    return {"tokens": n, "seconds": time.perf_counter() - t0}


def bench_prepare(corpus: Path, out: Path, workers: int) -> dict:
    from merino_pl.cli import main

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rc = main(["prepare", str(corpus), "--out", str(out), "--workers", str(workers), "--shard-tokens", str(2**22)])
    seconds = time.perf_counter() - t0
    assert rc == 0, "prepare failed"
    m = json.loads((out / "manifest.json").read_text())
    return {"tokens": m["tokens"]["train"] + m["tokens"]["val"], "seconds": seconds}


def bench_loader(batches: int, workers: int, **data) -> dict:
    """Tokens/s over ``batches`` batches counted from the first ``iter()``: worker start-up and
    the streaming shuffle blocks (filled before their first batch) are part of the cost."""
    from merino_pl.data import PileDataModule

    dm = PileDataModule(seq_len=1024, batch_size=8, num_workers=workers, val_sequences=0, **data)
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    it = iter(loader)
    n = sum(next(it).numel() for _ in range(batches))
    return {"tokens": n, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 MB corpus, fewer batches")
    parser.add_argument("--corpus-mb", type=float, default=40.0)
    parser.add_argument("--batches", type=int, default=800, help="streaming batches (shards: 4x as many)")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "merino-64m.yaml"))
    args = parser.parse_args()
    mb, batches = (2.5, 150) if args.quick else (args.corpus_mb, args.batches)
    block = 128 if args.quick else 1024  # streaming shuffle block; >= 3 blocks per worker are read
    gpu = h100_tokens_per_s(args.recipe if Path(args.recipe).exists() else "merino-64m")
    tmp = Path(tempfile.mkdtemp(prefix="merino-bench-data-"))
    try:
        corpus = make_corpus(tmp / "corpus", mb)
        rows = {"tokenizer alone, 1 process": bench_tokenizer(corpus)}
        for w in (1, 2):
            rows[f"prepare, {w} worker process(es)"] = bench_prepare(corpus, tmp / "shards", w)
        for w in (0, 2):
            rows[f"loader from shards, {w} workers"] = bench_loader(batches * 4, w, shards=str(tmp / "shards"))
        for w in (0, 2):
            rows[f"loader streaming jsonl, {w} workers"] = bench_loader(
                batches, w, source=str(corpus), val_fraction=0.01, shuffle_windows=block
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, gpu, mb)


def report(rows: dict, gpu: dict, mb: float) -> None:
    base = rows["tokenizer alone, 1 process"]
    base_rate = base["tokens"] / base["seconds"]
    print(
        f"\ncorpus: shipped Shakespeare + WikiText-2 text repeated to {mb:g} MB; "
        f"GPT-NeoX-20B tokenizer; {os.cpu_count()} cores"
    )
    print(f"{'path':38} {'tokens':>12} {'s':>7} {'M tok/s':>8} {'x tokenizer':>11} {'x H100 need':>11}")
    for name, r in rows.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["vs_tokenizer"] = r["tokens_per_s"] / base_rate
        r["vs_h100"] = r["tokens_per_s"] / gpu["tokens_per_s"]
        print(
            f"{name:38} {r['tokens']:>12,} {r['seconds']:>7.2f} {r['tokens_per_s'] / 1e6:>8.2f} "
            f"{r['vs_tokenizer']:>11.2f} {r['vs_h100']:>11.2f}"
        )
    print(
        f"\nH100 appetite, {gpu['recipe']}: tokens/s = {MFU:.0%} x {H100_BF16_DENSE:.3g} FLOP/s "
        "/ (3 x forward FLOPs per token)\n"
        f"  forward FLOPs/token = 2 x applied non-embedding weights + attention QK^T, AV (costs.count_flops / seq_len)"
        f" = {gpu['forward_flops_per_token'] / 1e6:.1f} M -> {gpu['tokens_per_s'] / 1e6:.3f} M tokens/s\n"
        f"  with the tied LM head ({gpu['lm_head_flops_per_token'] / 1e6:.1f} M FLOPs/token more): "
        f"{gpu['tokens_per_s_with_lm_head'] / 1e6:.3f} M tokens/s. 'x H100 need' uses the first (stricter) figure."
    )
    out = REPO / "runs" / "bench" / "data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"corpus_mb": mb, "h100": gpu, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
