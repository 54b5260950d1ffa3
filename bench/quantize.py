"""Quantization benchmark: WikiText-2 perplexity FP32 vs GPTQ / RTN at INT8 / INT4, sizes on disk,
and the quantization time of MeRino-64M on this CPU.

    python bench/quantize.py                 # full: trained bench model + MeRino-64M at 128 x 512
    python bench/quantize.py --quick         # minutes: fewer steps / documents / calibration windows

1. A small MeRino (widths multiples of 128, so group size 128 applies) is trained with a plain
   AdamW loop (``--train-steps``) on the WikiText-2 test articles after the first ``--limit``
   (default 16), and calibrated on the same text; perplexity is scored on those first 16
   articles, which it never saw (``--train-on embedded``: Shakespeare instead, out of domain).
   Perplexity goes through the eval stage's ``perplexity()`` (lm-eval's document-level rule).
2. Each variant is written by ``merino-pl quantize`` and read back by ``load_model``: the figures
   are those of the files a user ships. Sizes are the ``model.safetensors`` files.
3. MeRino-64M (random init: the timing does not depend on the values) is quantized with GPTQ
   INT4 g128 at the calibration size given (default 128 x 512) and RTN; sizes FP32/FP16/INT8/INT4.
   Each run prints where its time went (the report's ``seconds``: stem, forwards through the
   shared blocks, Hessian accumulation, solver, outputs of the quantized blocks; tokenize; the
   rest = loading, held-out check, packing, writing, reload check) and its held-out error;
   ``--timing-true-sequential`` adds GPTQ INT4 ``--true-sequential`` (5 passes per block
   instead of the default's 2).
Writes ``runs/bench/quantize.json``; prints tables and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.cli import main as merino  # noqa: E402
from merino_pl.core.assets import embedded_wikitext2  # noqa: E402
from merino_pl.core.checkpoint import export_pretrained, load_model  # noqa: E402
from merino_pl.core.config import BlockConfig, MerinoConfig, load_recipe  # noqa: E402
from merino_pl.core.hf import MerinoForCausalLM  # noqa: E402
from merino_pl.core.io import atomic_write_text  # noqa: E402
from merino_pl.core.tokenizer import EOS_TOKEN, default_corpus_file, load_tokenizer  # noqa: E402

VARIANTS = [("gptq", 8), ("rtn", 8), ("gptq", 4), ("rtn", 4)]


def bench_arch() -> MerinoConfig:
    """A MeRino-shaped model small enough to train on 2 cores in minutes (4 blocks, shared layers)."""
    blocks = (
        BlockConfig(128, 2, ffn_ratio=2),
        BlockConfig(128, 1, ffn_ratio=2),
        BlockConfig(256, 2, ffn_ratio=2),
        BlockConfig(256, 1, ffn_ratio=2),
    )
    return MerinoConfig(
        blocks=blocks, d_model=128, max_position_embeddings=512
    )  # d: the 50 k-vocab head dominates the cost


def wikitext_train_file(wikitext: str, held_docs: int, work: Path) -> Path:
    """The WikiText-2 test articles after the first ``held_docs`` (those are scored): in-domain
    training / calibration text that never overlaps the perplexity documents."""
    from merino_pl.eval.perplexity import wikitext_pages

    pages = wikitext_pages(Path(wikitext).read_text(encoding="utf-8"))
    if len(pages) <= held_docs:
        raise SystemExit(f"{wikitext}: {len(pages)} articles, need more than --limit {held_docs}")
    out = work / "wikitext2-train-articles.txt"
    atomic_write_text(out, "\n".join(pages[held_docs:]))
    return out


def train(out: Path, steps: int, text: str, seq_len: int = 128, batch: int = 16, seed: int = 0) -> dict:
    """Plain AdamW on random windows of ``text`` (``embedded`` or a file): self-contained, no
    Lightning run to set up. The last 16 windows are held out for a validation loss."""
    torch.manual_seed(seed)
    model = MerinoForCausalLM.from_arch(bench_arch()).train()
    tok = load_tokenizer(None)
    source = default_corpus_file() if text == "embedded" else Path(text)
    ids = torch.tensor(tok.encode(source.read_text(encoding="utf-8")).ids)
    ids = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    ids, held = ids[:-16], ids[-16:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0, g = time.perf_counter(), torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = ids[torch.randint(0, len(ids), (batch,), generator=g)]
        loss = model(x, labels=x, use_cache=False).loss  # labels shift inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"  train step {step:4d}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        val = model(held, labels=held, use_cache=False).loss.item()
    export_pretrained(model, out)
    return {
        "steps": steps,
        "text": str(source),
        "train_windows": len(ids),
        "seconds": time.perf_counter() - t0,
        "val_loss": val,
        "params": sum(p.numel() for p in model.parameters()),
    }


def wikitext_ppl(model_dir: Path, limit: int | None, wikitext: str) -> dict:
    from merino_pl.eval.perplexity import perplexity

    tok = load_tokenizer(None)
    model = load_model(model_dir).model
    t0 = time.perf_counter()
    r = perplexity(
        model, tok, "wikitext2", data_file=wikitext, limit=limit, batch_size=8, eos_id=tok.token_to_id(EOS_TOKEN)
    )
    return {
        "token_ppl": r.token_perplexity,
        "word_ppl": r.word_perplexity,
        "tokens": r.tokens,
        "documents": r.documents,
        "seconds": time.perf_counter() - t0,
    }


def quantize(
    src: Path,
    out: Path,
    method: str,
    bits: int,
    nsamples: int,
    seq_len: int,
    group: int = 128,
    calib: str = "embedded",
    extra: tuple[str, ...] = (),
) -> dict:
    argv = [
        "quantize",
        str(src),
        "--method",
        method,
        "--bits",
        str(bits),
        "--group-size",
        str(group),
        "--calib",
        calib,
        "--nsamples",
        str(nsamples),
        "--seq-len",
        str(seq_len),
        "--holdout",
        "16",
        "--out",
        str(out),
        "--overwrite",
        *extra,
    ]
    if merino(argv) != 0:
        raise SystemExit(f"merino-pl {' '.join(argv)} failed")
    return json.loads((out / "quantize_report.json").read_text())


def fp16_size(model_dir: Path, out: Path) -> int:
    from safetensors.torch import load_file, save_file

    state = {k: v.half() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    save_file(state, str(out))
    size = out.stat().st_size
    out.unlink()
    return size


def accuracy_part(work: Path, args: argparse.Namespace) -> dict:
    float_dir = work / f"bench-fp32-{args.train_on}"
    text = "embedded" if args.train_on == "embedded" else str(wikitext_train_file(args.wikitext, args.limit, work))
    if args.reuse and (float_dir / "model.safetensors").exists():
        training = json.loads((float_dir.parent / f"{float_dir.name}.training.json").read_text())
        print(f"[1/3] reusing the trained bench model in {float_dir}", flush=True)
    else:
        print(f"[1/3] training the bench model on {text} ({args.train_steps} steps) ...", flush=True)
        training = train(float_dir, args.train_steps, text)
        atomic_write_text(float_dir.parent / f"{float_dir.name}.training.json", json.dumps(training))
    rows = {
        "fp32": {
            "method": "-",
            "bits": 32,
            "size": (float_dir / "model.safetensors").stat().st_size,
            "ppl": wikitext_ppl(float_dir, args.limit, args.wikitext),
        }
    }
    rows["fp16"] = {"method": "-", "bits": 16, "size": fp16_size(float_dir, work / "fp16.safetensors"), "ppl": None}
    print(f"  fp32 wikitext-2 token ppl {rows['fp32']['ppl']['token_ppl']:.3f}", flush=True)
    print("[2/3] quantizing the bench model ...", flush=True)
    for method, bits in VARIANTS:
        out = work / f"bench-{method}-int{bits}"
        rep = quantize(float_dir, out, method, bits, args.nsamples, args.seq_len, calib=text)
        rows[f"{method}-int{bits}"] = {
            "method": method,
            "bits": bits,
            "size": (out / "model.safetensors").stat().st_size,
            "quantize_s": rep["seconds"]["quantize"],
            "ppl": wikitext_ppl(out, args.limit, args.wikitext),
            "heldout": rep["heldout"],
        }  # in-domain: held-out windows of the calibration corpus
    base = rows["fp32"]["ppl"]["token_ppl"]
    for r in rows.values():
        if r["ppl"]:
            r["ppl_delta_pct"] = 100 * (r["ppl"]["token_ppl"] / base - 1)
    return {"training": training, "train_on": args.train_on, "arch": bench_arch().to_dict(), "rows": rows}


def timing_part(work: Path, args: argparse.Namespace) -> dict:
    print(
        f"[3/3] {args.timing_recipe}: GPTQ INT4 g128 at {args.timing_nsamples} x {args.seq_len}, sizes ...", flush=True
    )
    torch.manual_seed(0)
    src = export_pretrained(MerinoForCausalLM.from_recipe(load_recipe(args.timing_recipe)), work / "m64-fp32")
    sizes = {"fp32": (src / "model.safetensors").stat().st_size, "fp16": fp16_size(src, work / "m64-fp16.safetensors")}
    runs = {}
    variants = [("rtn", 8, ()), ("rtn", 4, ()), ("gptq", 4, ())] + ([("gptq", 8, ())] if args.timing_int8_gptq else [])
    if args.timing_true_sequential:  # held-out error and time of the 5-pass recipe beside the default's
        variants.append(("gptq", 4, ("--true-sequential",)))
    for method, bits, extra in variants:
        name = f"{method}-int{bits}" + ("-true-seq" if extra else "")
        out = work / f"m64-{name}"
        t0 = time.perf_counter()
        rep = quantize(src, out, method, bits, args.timing_nsamples, args.seq_len, extra=extra)
        wall, sec = time.perf_counter() - t0, rep["seconds"]
        runs[name] = {
            "quantize_s": sec["quantize"],
            "wall_s": wall,
            "heldout": rep["heldout"],
            "size": (out / "model.safetensors").stat().st_size,
            # quantize_model's parts; "rest": loading, the held-out check, packing, writing, the reload check
            "split": {
                **{k.removeprefix("quantize."): v for k, v in sec.items() if k.startswith("quantize.")},
                "tokenize": sec["tokenize"],
                "rest": wall - sec["quantize"] - sec["tokenize"],
            },
        }
        sizes.setdefault(f"int{bits}", runs[name]["size"])
    return {
        "recipe": args.timing_recipe,
        "nsamples": args.timing_nsamples,
        "seq_len": args.seq_len,
        "sizes": sizes,
        "runs": runs,
        "threads": torch.get_num_threads(),
    }


def print_tables(res: dict) -> None:
    if "accuracy" in res:
        rows = res["accuracy"]["rows"]
        docs = next(r["ppl"]["documents"] for r in rows.values() if r["ppl"])
        trained = (
            "the other WikiText-2 articles" if res["accuracy"]["train_on"] == "wikitext" else "the embedded corpus"
        )
        print(
            f"\nWikiText-2 token perplexity ({docs} documents, document-level, the eval stage's perplexity()) "
            f"of the bench model trained and calibrated on {trained}; held-out: windows of the calibration text "
            "not used to calibrate"
        )
        print(f"{'variant':<12} {'size MB':>8} {'wt2 ppl':>10} {'delta %':>8} {'held-out delta %':>17} {'quant s':>8}")
        for name, r in rows.items():
            ppl = r["ppl"]["token_ppl"] if r["ppl"] else float("nan")
            held = (r.get("heldout") or {}).get("ppl_delta_pct", float("nan"))
            print(
                f"{name:<12} {r['size'] / 1e6:8.2f} {ppl:10.3f} {r.get('ppl_delta_pct', float('nan')):8.2f} "
                f"{held:17.2f} "
                f"{r.get('quantize_s', float('nan')):8.1f}"
            )
        for bits in (8, 4):
            g, n = rows[f"gptq-int{bits}"], rows[f"rtn-int{bits}"]
            print(
                f"INT{bits}: GPTQ ppl increase {g['ppl_delta_pct']:+.2f} % vs RTN {n['ppl_delta_pct']:+.2f} % "
                f"(GPTQ/RTN ppl ratio {g['ppl']['token_ppl'] / n['ppl']['token_ppl']:.4f})"
            )
    if "timing" in res:
        t = res["timing"]
        print(f"\n{t['recipe']} on this CPU ({t['threads']} threads), calibration {t['nsamples']} x {t['seq_len']}")
        print("sizes MB: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in t["sizes"].items()))
        for name, r in t["runs"].items():
            h = r["heldout"]
            print(
                f"  {name:<20} quantize {r['quantize_s']:7.1f} s (wall {r['wall_s']:.1f} s), held-out logits rel err "
                f"{h.get('logits_rel_err_pct', float('nan')):.3f} %, "
                f"ppl delta {h.get('ppl_delta_pct', float('nan')):+.3f} %, "
                f"top-1 {h.get('top1_agreement_pct', float('nan')):.2f} %"
            )
            if r["split"].get("forwards"):
                print("    split s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["split"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small version for development")
    p.add_argument("--train-steps", type=int, default=None, help="bench model training steps (default 400; quick 30)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="WikiText-2 documents scored (default 16; quick 8; with --train-on embedded, default all 62)",
    )
    p.add_argument(
        "--train-on",
        choices=("wikitext", "embedded"),
        default="wikitext",
        help="bench model training + calibration text: the WikiText-2 articles after the scored ones (in-domain, "
        "default) or the embedded Shakespeare",
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows for the bench model (default 128)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--timing-recipe", default="merino-64m")
    p.add_argument(
        "--timing-nsamples",
        type=int,
        default=None,
        help="calibration windows for the 64M timing (default 128; quick 8)",
    )
    p.add_argument("--timing-int8-gptq", action="store_true", help="also time GPTQ INT8 on the 64M model")
    p.add_argument(
        "--timing-true-sequential",
        action="store_true",
        help="also GPTQ INT4 with --true-sequential (5 passes per block instead of 2): time and held-out error",
    )
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse the bench model trained by an earlier run in --work")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--work", default=str(REPO / "runs" / "bench" / "quantize"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--wikitext", default=str(embedded_wikitext2()), help="wiki.test.raw (default: the copy shipped in the package)"
    )
    args = p.parse_args()
    args.train_steps = args.train_steps or (30 if args.quick else 400)
    args.limit = args.limit or (8 if args.quick else 16 if args.train_on == "wikitext" else None)
    args.timing_nsamples = args.timing_nsamples or (8 if args.quick else 128)
    if args.quick:
        args.nsamples = min(args.nsamples, 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(args), "torch": torch.__version__}
    if not args.skip_accuracy:
        res["accuracy"] = accuracy_part(work, args)
    if not args.skip_timing:
        res["timing"] = timing_part(work, args)
    print_tables(res)
    out = REPO / "runs" / "bench" / "quantize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=2, default=str) + "\n")
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
