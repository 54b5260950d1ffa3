"""ExecuTorch 8da4w vs fp32: teacher-forced next-token agreement and program size, on a trained model.

    .venv/executorch/bin/python bench/executorch_agreement.py CKPT [--windows 32] [--schemes default,head8]

The issue's acceptance: the 8da4w ``.pte`` agrees with the fp32 ``.pte`` on >= 90 % of next tokens
(teacher-forced) and is <= 0.35x its size. On an untrained model top logits are near ties, so the
figure only means something for a trained one: ``CKPT`` is a ``.ckpt`` from ``merino-pl fit`` (or
an exported directory), e.g. the demo's ``runs/cpu-demo/checkpoints/last.ckpt``.

Both programs are written by the export stage (``export_pte``, with a KV cache of one window) and
run by its ``PteRunner``; the text is the in-domain held-out paragraphs of the model's training
source (``--source``, default the embedded corpus, at fit's 5 % hold-out: never trained on),
tokenized with the model's own tokenizer, cut into ``--windows`` windows of ``--window`` tokens
(default: the trained context).
Per scheme: agreement of the 8da4w argmax with the fp32 program's at every position, each one's
accuracy on the true next token, and the size ratio. The fp32 program is also checked against
eager torch (its argmax must be the same). ``--schemes`` also tries other 8da4w variants
(``export.executorch.Scheme``; ``default`` is what the export writes: the LM head at 8 bit):
``all4`` (the head and the tables at 4 bit too), ``head8``, ``emb8`` (the tables at 8 bit, the
head at 4), ``head8emb8``, ``fp32head`` (the LM head left fp32), ``g64`` / ``g128`` (coarser groups).
Prints a table; writes runs/bench/executorch_agreement.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.core.checkpoint import load_model, trained_context  # noqa: E402
from merino_pl.core.io import write_json  # noqa: E402
from merino_pl.core.tokenizer import default_corpus_file, model_tokenizer  # noqa: E402
from merino_pl.data.packing import is_heldout  # noqa: E402
from merino_pl.eval.intrinsic import heldout_texts, token_stream  # noqa: E402
from merino_pl.export.executorch import PteRunner, Scheme, export_pte  # noqa: E402

SCHEMES = {
    "default": Scheme(),  # what `export --executorch 8da4w` writes
    "all4": Scheme(head_bits=4, embedding_bits=4),
    "head8": Scheme(head_bits=8, embedding_bits=4),
    "emb8": Scheme(head_bits=4, embedding_bits=8),
    "head8emb8": Scheme(head_bits=8, embedding_bits=8),
    "fp32head": Scheme(head_bits=0, embedding_bits=4),
    "g64": Scheme(group=64),
    "g128": Scheme(group=128),
}


def heldout(source: str) -> list[str]:
    """The paragraphs ``fit`` held out of ``source``. The embedded corpus is split here as the
    ``datasets`` text reader splits it (blank-line paragraphs: the same list), since the
    ExecuTorch environment has no ``datasets``."""
    if source == "embedded":
        text = default_corpus_file().read_text(encoding="utf-8")
        return [p for p in text.split("\n\n") if p and is_heldout(p, 0.05)]
    return heldout_texts("indomain", source)


def windows(ckpt: str, source: str, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length`` + 1 tokens (inputs and the true next tokens) of held-out text."""
    ids, _, _ = token_stream(heldout(source), model_tokenizer(ckpt))
    n = min(n, (len(ids) - 1) // length)
    return torch.stack([ids[i * length : i * length + length + 1] for i in range(n)])


def argmax_per_window(runner: PteRunner, data: torch.Tensor) -> torch.Tensor:
    return torch.stack([runner.logits(w[:-1]).argmax(-1) for w in data])


def agreement(ckpt: str, source: str, n_windows: int, window: int | None, schemes: list[str]) -> dict:
    loaded = load_model(ckpt)
    model = loaded.model.float().eval()
    length = window or trained_context(loaded) or 128
    data = windows(ckpt, source, n_windows, length)
    truth = data[:, 1:]
    out: dict = {"checkpoint": ckpt, "recipe": loaded.recipe.name, "windows": len(data), "window": length}
    with tempfile.TemporaryDirectory(prefix="et-agreement-") as tmp:
        t0 = time.time()
        fp32_path = export_pte(model, Path(tmp) / "fp32.pte", "fp32", max_len=length)
        fp32 = argmax_per_window(PteRunner(fp32_path), data)
        with torch.no_grad():
            eager = torch.stack([model(w[None, :-1]).logits[0].argmax(-1) for w in data])
        out["fp32"] = {
            "bytes": fp32_path.stat().st_size,
            "accuracy": float((fp32 == truth).float().mean()),
            "same_as_eager_torch": float((fp32 == eager).float().mean()),
            "seconds": round(time.time() - t0, 1),
        }
        print(
            f"fp32 .pte: {out['fp32']['bytes'] / 2**20:.2f} MiB, accuracy {100 * out['fp32']['accuracy']:.1f} %, "
            f"= eager torch on {100 * out['fp32']['same_as_eager_torch']:.1f} %",
            flush=True,
        )
        out["schemes"] = []
        for name in schemes:
            t0 = time.time()
            path = export_pte(model, Path(tmp) / f"{name}.pte", "8da4w", max_len=length, scheme=SCHEMES[name])
            q = argmax_per_window(PteRunner(path), data)
            out["schemes"].append(
                {
                    "scheme": name,
                    "what": SCHEMES[name].name(),
                    "bytes": path.stat().st_size,
                    "size_over_fp32": path.stat().st_size / out["fp32"]["bytes"],
                    "agreement_with_fp32": float((q == fp32).float().mean()),
                    "accuracy": float((q == truth).float().mean()),
                    "seconds": round(time.time() - t0, 1),
                }
            )
            s = out["schemes"][-1]
            print(
                f"{name}: size / fp32 {s['size_over_fp32']:.3f}, agreement {100 * s['agreement_with_fp32']:.1f} %",
                flush=True,
            )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a trained .ckpt (merino-pl fit) or an exported directory")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows (default: 32)")
    ap.add_argument("--window", type=int, default=None, help="tokens per window (default: the trained context)")
    ap.add_argument("--schemes", default="default", help=f"comma-separated, of {','.join(SCHEMES)} (default: default)")
    ap.add_argument("--source", default="embedded", help="the model's training source (its held-out paragraphs)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "executorch_agreement.json"))
    args = ap.parse_args()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if bad := [s for s in schemes if s not in SCHEMES]:
        print(f"--schemes {','.join(bad)}: not one of {','.join(SCHEMES)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    r = agreement(args.checkpoint, args.source, args.windows, args.window, schemes)
    f = r["fp32"]
    print(
        f"\n{r['recipe']} ({r['checkpoint']}): {r['windows']} held-out windows x {r['window']} tokens, teacher-forced\n"
        f"fp32 .pte: {f['bytes'] / 2**20:.2f} MiB, next-token accuracy {100 * f['accuracy']:.1f} %, "
        f"argmax = eager torch's on {100 * f['same_as_eager_torch']:.1f} %\n"
    )
    print("| scheme | what | .pte MiB | size / fp32 (<= 0.35) | agrees with fp32 (>= 90 %) | accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    for s in r["schemes"]:
        print(
            f"| {s['scheme']} | {s['what']} | {s['bytes'] / 2**20:.2f} | {s['size_over_fp32']:.3f} | "
            f"{100 * s['agreement_with_fp32']:.1f} % | {100 * s['accuracy']:.1f} % |"
        )
    write_json(args.out, r)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
