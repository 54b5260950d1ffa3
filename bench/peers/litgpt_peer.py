"""LitGPT as the peer trainer of ``bench/time_to_quality.py`` (its system (c) ``litgpt``).

Run with LitGPT's own environment (``make litgpt-env``), never merino-pl's:

    .venv/litgpt/bin/python bench/peers/litgpt_peer.py --data DIR --out DIR --max-tokens N [--deadline T]

``--data`` is what the bench wrote with merino-pl's own split code: ``train.jsonl`` (the training
paragraphs of the corpus, held-out ones excluded, in source order), ``heldout.json`` (the held-out
paragraphs as merino-pl's token stream: ids, the characters and bytes they cover, the window) and
``tokenizer/`` (the shipped BPE's ``tokenizer.json`` and the ``tokenizer_config.json`` LitGPT's
``Tokenizer`` reads for its end-of-text token). Nothing is downloaded.

Training is LitGPT's: ``litgpt.pretrain.setup`` (its Fabric loop, ``torch.compile``, weight init,
AdamW, linear warm-up + cosine schedule to ``min_lr``, gradient clipping, tied embeddings) with
the settings of its GPT-2 recipe (``config_hub/pretrain/nano_gpt.yaml``: AdamW lr 6e-4, betas
0.9 / 0.95, weight decay 0.1, clip 1.0, min_lr 6e-5, tied embeddings), scaled only where a
1.5 M-parameter model trained for minutes on one thread needs it:

* the model: ``nano_gpt.yaml``'s GPT-2 shape (LayerNorm, GELU MLP of 4x, LitGPT's RoPE in place of
  learned positions, which LitGPT does not have) at the size of the bench's ``gpt`` recipe: width
  128, 2 heads of 64, the same layer count, biases and a sequential residual like it, the 2048-id
  BPE (already a multiple of LitGPT's 512 padding), block_size 128;
* batch 8 sequences (no accumulation), as merino-pl's fit: the recipe's 480 x 1024 tokens per step
  would leave a handful of steps in a few minutes;
* warm-up ``--warmup-steps`` (the bench gives min(60, steps / 10), fit's rule): the recipe's 2 000
  steps are longer than the whole run;
* fp32 (``32-true``) like fit: the recipe's ``bf16-mixed`` is a GPU setting;
* ``max_tokens`` from the bench's probe run, and a hard stop at ``--deadline`` (LitGPT's pretrain
  has no ``max_time``): the training data ends there, which ends LitGPT's loop.

After training it scores ``heldout.json`` exactly as ``merino_pl.eval.intrinsic`` does: the id
stream cut into windows of ``window`` + 1 tokens overlapping by one, every token but the first
predicted once, summed float32 cross-entropy; the bench divides by the same character count.
Writes ``result.json`` in ``--out``; LitGPT's own output (its progress lines) goes to stdout.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

for key, value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TORCHINDUCTOR_COMPILE_THREADS": "1",  # torch.compile's workers: one thread, like the rest
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from litgpt import pretrain  # noqa: E402
from litgpt.args import EvalArgs, TrainArgs  # noqa: E402
from litgpt.config import Config  # noqa: E402
from litgpt.data import DataModule  # noqa: E402
from litgpt.model import GPT  # noqa: E402
from litgpt.tokenizer import Tokenizer  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

DONE_LINE = "litgpt_peer: training done"


class Windows(IterableDataset):
    """Batches ``(B, block + 1)`` of packed windows, reshuffled every pass; none after ``deadline``.

    Ending the data is how the run stops at the deadline: LitGPT's ``CycleIterator`` restarts an
    ended pass once, gets nothing again, and its training loop ends; then LitGPT saves the model."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int, deadline: float | None) -> None:
        self.windows, self.batch_size, self.seed, self.deadline = windows, batch_size, seed, deadline
        self.epoch = 0

    def __iter__(self):
        order = torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
            if self.deadline is not None and time.time() >= self.deadline:
                return
            yield self.windows[order[i : i + self.batch_size]]


class Loader(DataLoader):
    """A DataLoader Fabric saves as a small dict (its pass number), not as a pickled object."""

    def state_dict(self) -> dict:
        return {"epoch": getattr(self.dataset, "epoch", 0)}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.epoch = state["epoch"]


class MerinoText(DataModule):
    """The bench's training paragraphs, tokenized by LitGPT's ``Tokenizer`` (each followed by its
    end-of-text token, as merino-pl packs them), packed into non-overlapping ``block + 1`` windows."""

    def __init__(self, folder: Path, seed: int, deadline: float | None) -> None:
        super().__init__()
        self.folder, self.seed, self.deadline = folder, seed, deadline

    def connect(self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int | None = None):
        self.tokenizer, self.batch_size, self.block = tokenizer, batch_size, max_seq_length

    def setup(self, stage: str = "") -> None:
        lines = (self.folder / "train.jsonl").read_text(encoding="utf-8").splitlines()
        ids: list[int] = []
        for line in lines:
            ids += self.tokenizer.encode(json.loads(line)["text"], bos=False, eos=True).tolist()
        meta = json.loads((self.folder / "train_meta.json").read_text())
        if len(ids) != meta["tokens"]:
            sys.exit(f"litgpt_peer: LitGPT's tokenizer gives {len(ids)} training tokens, merino-pl's {meta['tokens']}")
        self.train_tokens = len(ids)
        self.train = self._windows(ids)
        heldout = json.loads((self.folder / "heldout.json").read_text())
        self.val = self._windows(heldout["ids"])[: 2 * self.batch_size]  # LitGPT's 2-batch sanity check only

    def _windows(self, ids: list[int]) -> torch.Tensor:
        size = self.block + 1
        n = len(ids) // size
        return torch.tensor(ids[: n * size], dtype=torch.long).view(n, size)

    def train_dataloader(self) -> DataLoader:
        return Loader(Windows(self.train, self.batch_size, self.seed, self.deadline), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return Loader(Windows(self.val, self.batch_size, self.seed, None), batch_size=None)


def model_config(layers: int, width: int, head_size: int, vocab: int, block: int) -> Config:
    return Config(
        name=f"gpt-{layers}x{width}",
        block_size=block,
        vocab_size=vocab,
        padding_multiple=512,
        n_layer=layers,
        n_embd=width,
        n_head=width // head_size,
        head_size=head_size,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        intermediate_size=4 * width,
        bias=True,
        lm_head_bias=False,
        parallel_residual=False,
    )


@torch.no_grad()
def heldout_nats(model: GPT, ids: list[int], window: int, batch_size: int = 16) -> tuple[float, int]:
    """Summed next-token loss over the stream, and the tokens predicted (``intrinsic``'s windows)."""
    stream = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(stream) - 1, window))
    model.eval()
    nats = 0.0
    for i in range(0, len(starts), batch_size):
        group = [stream[s : s + window + 1] for s in starts[i : i + batch_size]]
        for length in sorted({len(g) for g in group}):  # the stream's last window may be shorter
            batch = torch.stack([g for g in group if len(g) == length])
            logits = model(batch[:, :-1])
            nats += float(F.cross_entropy(logits.flatten(0, -2).float(), batch[:, 1:].flatten(), reduction="sum"))
    return nats, len(stream) - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="train.jsonl, heldout.json, tokenizer/ (the bench's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-tokens", type=int, required=True, help="LitGPT's train.max_tokens")
    p.add_argument("--deadline", type=float, default=None, help="Unix time at which training data ends")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--lr", type=float, default=6e-4, help="nano_gpt.yaml's")
    p.add_argument("--min-lr", type=float, default=6e-5, help="nano_gpt.yaml's")
    p.add_argument("--seed", type=int, default=42, help="LitGPT's default")
    args = p.parse_args()
    for name in ("train.jsonl", "train_meta.json", "heldout.json", "tokenizer/tokenizer.json"):
        if not (args.data / name).is_file():
            sys.exit(f"litgpt_peer: {args.data / name} is missing (bench/time_to_quality.py writes it)")
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    tokenizer_dir = (args.data / "tokenizer").resolve()
    vocab = Tokenizer(tokenizer_dir).vocab_size
    config = model_config(args.layers, args.width, args.head_size, vocab, args.block)
    data = MerinoText(args.data, args.seed, args.deadline)
    # LitGPT's checkpoint saver re-parses sys.argv as `litgpt pretrain`'s command line (to write
    # hyperparameters.yaml): give it that command's one required argument, not this script's options
    argv, sys.argv = sys.argv, [sys.argv[0], config.name]
    try:
        pretrain.setup(
            model_name=config.name,
            model_config=config,
            out_dir=args.out.resolve(),
            precision="32-true",
            data=data,
            train=TrainArgs(
                save_interval=None,
                log_interval=args.log_interval,
                global_batch_size=args.batch,
                micro_batch_size=args.batch,
                lr_warmup_steps=args.warmup_steps,
                max_tokens=args.max_tokens,
                max_seq_length=args.block,
                tie_embeddings=True,
                max_norm=1.0,
                min_lr=args.min_lr,
            ),
            eval=EvalArgs(interval=10**9, max_iters=2, initial_validation=False, final_validation=False),
            optimizer={
                "class_path": "torch.optim.AdamW",
                "init_args": {"lr": args.lr, "weight_decay": 0.1, "betas": (0.9, 0.95)},
            },
            devices=1,
            num_nodes=1,
            tokenizer_dir=tokenizer_dir,
            logger_name="csv",
            seed=args.seed,
        )
    finally:
        sys.argv = argv
    train_s = time.time() - T_START
    print(DONE_LINE, flush=True)

    state = torch.load(args.out / "final" / "lit_model.pth", map_location="cpu", weights_only=True)
    model = GPT(config)
    model.transformer.wte.weight = model.lm_head.weight  # tied, as pretrain ties them
    model.load_state_dict(state["model"])
    heldout = json.loads((args.data / "heldout.json").read_text())
    nats, tokens = heldout_nats(model, heldout["ids"], int(heldout["window"]))
    result = {
        "train_s": train_s,
        "iters": int(state["iter_num"]),
        "steps": int(state["step_count"]),
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens": data.train_tokens,
        "nats": nats,
        "tokens": tokens,
        "window": int(heldout["window"]),
        "config": {k: getattr(config, k) for k in ("n_layer", "n_embd", "n_head", "head_size", "padded_vocab_size")},
        "torch": torch.__version__,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"litgpt_peer: held-out {nats / tokens:.4f} nats / token over {tokens} tokens", flush=True)


if __name__ == "__main__":
    main()
