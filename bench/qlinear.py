"""Micro-benchmark of the packed torch path (issue 15): fp32 ``nn.Linear`` against ``QuantLinear``
INT8 / INT4 at MeRino-64M's layer shapes, and the fp32 tied head against the row-wise int8 head,
for 1 token (decode) and 128 tokens (prefill), in one process, as ratios.

    python bench/qlinear.py                    # 2 threads, group 128, 7 interleaved repeats
    python bench/qlinear.py --threads 1 --group -1 --repeats 11

Rows per layer shape and token count: fp32 ``nn.Linear``; ``QuantLinear`` called on its own
(dequantize into a fresh tensor + GEMM, the per-call path); the dequantization alone into a
reused workspace (what a block pays once per call when ``stream_blocks`` runs it). The "blocks,
streamed" row weighs them as the model runs them: block j dequantizes its six linears once and
applies them L_j times, so its cost is sum(dequantize) + L_j * sum(GEMM) against L_j * sum(fp32)
(the GEMM on the dequantized weight is fp32's GEMM). Column L: a shape's applications per forward.

Samples are interleaved (every variant of every row once per repeat) and the medians compared:
the machine may be shared. Prints a table; writes runs/bench/qlinear.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.core.config import load_recipe  # noqa: E402
from merino_pl.core.io import write_json  # noqa: E402
from merino_pl.core.quant.packing import pack  # noqa: E402
from merino_pl.core.quant.qembedding import QuantEmbedding  # noqa: E402
from merino_pl.core.quant.qlinear import QuantLinear  # noqa: E402
from merino_pl.core.quant.rtn import rtn_quantize  # noqa: E402

TOKENS = (1, 128)


def layer_shapes(recipe: str) -> list[tuple[int, int, int, int]]:
    """(in, out, linears, applications) of every distinct block-linear shape (q / k / v / o, up,
    down): how many linears have it (each dequantized once per block call) and how many times
    they run in a forward (each ``num_layers`` times)."""
    count: dict[tuple[int, int], tuple[int, int]] = {}
    for b in load_recipe(recipe).architecture.blocks:
        for shape in [(b.embed_dim, b.embed_dim)] * 4 + [(b.embed_dim, b.ffn), (b.ffn, b.embed_dim)]:
            lins, apps = count.get(shape, (0, 0))
            count[shape] = (lins + 1, apps + b.num_layers)
    return [(k, n, lins, apps) for (k, n), (lins, apps) in count.items()]


def quant_linear(lin: torch.nn.Linear, bits: int, group: int) -> QuantLinear:
    q = rtn_quantize(lin.weight.detach(), bits, group, sym=True)
    ql = QuantLinear(lin.in_features, lin.out_features, bits, group, bias=True)
    ql.load_state_dict({**pack(q), "bias": lin.bias.detach()})
    return ql.eval()


def sample(fn: Callable[[], object], min_s: float = 2e-3) -> float:
    """Seconds per call, looping until one sample lasts ``min_s`` (short calls are noisy)."""
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_s:
            return t / n
        n *= 2


def cases(recipe: str, group: int) -> dict[str, Callable[[], object]]:
    """name -> callable, for every (row, tokens, variant)."""
    torch.manual_seed(0)
    out: dict[str, Callable[[], object]] = {}
    for k, n, _, _ in layer_shapes(recipe):
        lin = torch.nn.Linear(k, n).eval()
        qls = {bits: quant_linear(lin, bits, group) for bits in (8, 4)}
        ws = {bits: (torch.empty(k * n), torch.empty(q.scratch_bytes(), dtype=torch.uint8)) for bits, q in qls.items()}
        for t in TOKENS:
            x = torch.randn(1, t, k)
            out[f"{k}x{n}|{t}|fp32"] = lambda lin=lin, x=x: lin(x)
            for bits, q in qls.items():
                out[f"{k}x{n}|{t}|int{bits}"] = lambda q=q, x=x: q(x)
        for bits, q in qls.items():  # no tokens: the block's once-per-call cost
            out[f"{k}x{n}|0|deq{bits}"] = lambda q=q, w=ws[bits]: q.dequantized(out=w[0], scratch=w[1])
    arch = load_recipe(recipe).architecture
    table = torch.randn(arch.vocab_size, arch.d_model) * 0.02
    emb = QuantEmbedding.from_float(torch.nn.Embedding.from_pretrained(table))
    for t in TOKENS:
        h = torch.randn(1, t, arch.d_model)
        out[f"head {arch.vocab_size}x{arch.d_model}|{t}|fp32"] = lambda h=h: F.linear(h, table)
        out[f"head {arch.vocab_size}x{arch.d_model}|{t}|int8"] = lambda h=h: emb.lm_head(h)
    return out


def measure(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per case; one sample of every case per repeat (interleaved)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name].append(sample(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def summarise(med: dict[str, float], recipe: str) -> list[dict]:
    rows = []
    shapes = layer_shapes(recipe)
    for k, n, _, apps in shapes:
        for t in TOKENS:
            fp = med[f"{k}x{n}|{t}|fp32"]
            rows.append(
                {
                    "row": f"{k}x{n}",
                    "applications": apps,
                    "tokens": t,
                    "fp32_ms": fp * 1e3,
                    **{f"int{b}_over_fp32": med[f"{k}x{n}|{t}|int{b}"] / fp for b in (8, 4)},
                    **{f"deq{b}_over_fp32": med[f"{k}x{n}|0|deq{b}"] / fp for b in (8, 4)},
                }
            )
    for t in TOKENS:  # each linear dequantized once per block call, each shape applied `apps` times
        fp = sum(apps * med[f"{k}x{n}|{t}|fp32"] for k, n, _, apps in shapes)
        ratio = {
            b: sum(lins * med[f"{k}x{n}|0|deq{b}"] + apps * med[f"{k}x{n}|{t}|fp32"] for k, n, lins, apps in shapes)
            / fp
            for b in (8, 4)
        }
        rows.append(
            {
                "row": "blocks, streamed",
                "applications": None,
                "tokens": t,
                "fp32_ms": fp * 1e3,
                "int8_over_fp32": ratio[8],
                "int4_over_fp32": ratio[4],
            }
        )
    head = next(name.split("|")[0] for name in med if name.startswith("head"))
    for t in TOKENS:
        fp = med[f"{head}|{t}|fp32"]
        rows.append(
            {
                "row": head,
                "applications": 1,
                "tokens": t,
                "fp32_ms": fp * 1e3,
                "int8_over_fp32": med[f"{head}|{t}|int8"] / fp,
                "int4_over_fp32": None,
            }
        )
    return rows


def print_table(rows: list[dict], threads: int, group: int, repeats: int) -> None:
    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}x"

    print(f"\nQuantLinear vs fp32 nn.Linear: {threads} threads, group {group}, median of {repeats} interleaved samples")
    print("(intN: per-call dequantize + GEMM; deqN: dequantization alone into a reused workspace, over fp32's GEMM)\n")
    heads = " | ".join(f"{h:>6}" for h in ("int8", "int4", "deq8", "deq4"))
    print(f"| {'layer (in x out)':<20} | {'L':>3} | {'tokens':>6} | {'fp32 ms':>8} | {heads} |")
    print(f"|{'-' * 22}|{'-' * 5}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for r in rows:
        apps = "" if r["applications"] is None else r["applications"]
        print(
            f"| {r['row']:<20} | {apps:>3} | {r['tokens']:>6} | {r['fp32_ms']:>8.3f} | {x(r['int8_over_fp32']):>6} | "
            f"{x(r.get('int4_over_fp32')):>6} | {x(r.get('deq8_over_fp32')):>6} | {x(r.get('deq4_over_fp32')):>6} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="merino-64m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group", type=int, default=128, help="GPTQ group size (-1: one group per output channel)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "qlinear.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = summarise(measure(cases(args.recipe, args.group), args.repeats), args.recipe)
    print_table(rows, args.threads, args.group, args.repeats)
    write_json(
        args.out,
        {
            "recipe": args.recipe,
            "threads": args.threads,
            "group_size": args.group,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "seconds": time.time() - t0,
            "rows": rows,
        },
    )
    print(f"\nwrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
