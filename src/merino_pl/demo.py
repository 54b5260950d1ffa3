"""``merino-pl demo``: the main job on the embedded default (CPU, tiny recipe, no network).

For now: build the tiny recipe's model, print its summary and a short greedy generation.
Later stages extend this into the whole pipeline (search -> fit -> eval -> quantize -> latency).
"""

from __future__ import annotations

import argparse

import torch

from merino_pl.checkpoint import load_model
from merino_pl.info import format_table, summarize
from merino_pl.tokenizer import hf_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="merino-tiny", help="recipe path or built-in name")
    p.add_argument("--prompt", default="First Citizen:\nBefore we proceed any further,")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    loaded = load_model(args.recipe, seed=args.seed)
    print(format_table(summarize(loaded.recipe)))
    tok = hf_tokenizer()
    enc = tok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"\ngeneration ({loaded.kind}: untrained weights, so expect noise):")
    print(args.prompt + tok.decode(out[0, enc.input_ids.shape[1]:]))
    return 0
