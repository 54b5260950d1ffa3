"""The info stage's library: ``summarize(recipe, seq_len)`` (everything ``merino-pl info``
reports, as a JSON-able dict) and ``format_table`` (its text table). Other stages (``demo``)
show a recipe through these two."""

from __future__ import annotations

from typing import Any

from merino_pl.core.config import Recipe
from merino_pl.core.costs import PAPER_SEQ_LEN, recipe_summary


def summarize(recipe: Recipe, seq_len: int = PAPER_SEQ_LEN) -> dict[str, Any]:
    """Everything ``info`` reports, as a JSON-able dict, with the entropy under the default
    search config."""
    from merino_pl.search import recipe_entropy

    return recipe_summary(recipe, seq_len, entropy=recipe_entropy(recipe.architecture))


def _fmt(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_table(s: dict[str, Any]) -> str:
    """The per-block table and the totals of a ``summarize`` dict."""
    lines = [
        f"{s['name']}  (vocab {s['vocab_size']}, d_model {s['d_model']}, max positions {s['max_position_embeddings']})",
        "",
    ]
    lines.append(f"{'block':>5} {'E':>6} {'F':>6} {'L':>3} {'heads':>5} {'params':>10} {'GFLOPs':>9}")
    for i, b in enumerate(s["blocks"], 1):
        lines.append(
            f"{i:>5} {b['embed_dim']:>6} {b['ffn']:>6} {b['num_layers']:>3} {b['heads']:>5} "
            f"{_fmt(b['params']):>10} {b['flops'] / 1e9:>9.2f}"
        )
    seq = s["flops_seq_len"]
    lines += [
        "",
        f"parameters               {_fmt(s['params'])}  "
        f"({s['params']:,}; {_fmt(s['params_non_embedding'])} without embeddings)",
        f"FLOPs (paper convention) {_fmt(s['flops'])}  (2 x MACs over {seq} tokens, no embedding / LM head)",
        f"FLOPs with LM head       {_fmt(s['flops_with_lm_head'])}",
        f"KV cache @ {s['kv_cache_tokens']} tokens   {_fmt(s['kv_cache_bytes_fp16'], 'B')} fp16, "
        f"{_fmt(s['kv_cache_bytes_fp32'], 'B')} fp32 (batch 1)",
    ]
    if "entropy" in s:
        e = s["entropy"]
        lines.append(f"entropy (search default) MHSA {e['mhsa']:.1f}  FFN {e['ffn']:.1f}  total {e['total']:.1f}")
    return "\n".join(lines)
