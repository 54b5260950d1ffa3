"""What the latency stage times: one model on one runtime, behind the ``timing.Runner`` calls.

``TorchRunner`` runs any transformers causal LM (ours or a peer); ``OrtRunner`` runs the graph
``export.onnx`` wrote, through the export stage's ``DecoderSession`` (the same feeds and cache
``merino-pl generate --runtime onnxruntime`` uses); ``ExecuTorchRunner`` runs a ``.pte`` program
``export.executorch`` wrote, through its ``PteRunner`` (what ``generate --runtime executorch``
decodes with). All draw the same random token ids from the same seed, so their rows time the same
inputs and their logits can be compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from merino_pl.core.hf import CACHE_FIELD  # `cache` (transformers >= 5) or `past_key_values`


def random_ids(vocab: int, batch: int, seq: int, decode_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt (batch, seq) and the decode steps' tokens (batch, decode_tokens), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(
        0, vocab, (batch, decode_tokens), generator=g
    )


class TorchRunner:
    """Any transformers causal LM (ours or a peer) on random token ids, under inference_mode.

    ``last_logits_only`` is the generation-time prefill: only the last position's logits (what
    ``generate`` needs) instead of ``seq × vocab`` of them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: int,
        seq: int,
        device: str,
        decode_tokens: int,
        last_logits_only: bool = False,
        vocab_size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.seq, self.decode_tokens = model, seq, decode_tokens
        self.keep = 1 if last_logits_only else 0
        vocab = vocab_size or model.config.vocab_size
        ids, next_ids = random_ids(vocab, batch, seq, decode_tokens, seed)
        self.ids, self.next_ids = ids.to(device), next_ids.to(device)
        self.cache: Any = None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        return self.model(self.ids, use_cache=True, logits_to_keep=self.keep).logits

    @torch.inference_mode()
    def start_decode(self) -> None:
        self.cache = self.model(self.ids, use_cache=True, logits_to_keep=1)[CACHE_FIELD]

    @torch.inference_mode()
    def decode_run(self) -> torch.Tensor:
        logits = None
        for i in range(self.decode_tokens):
            out = self.model(self.next_ids[:, i : i + 1], use_cache=True, **{CACHE_FIELD: self.cache})
            logits = out.logits
        self.cache.crop(-self.decode_tokens)  # back to seq tokens: every run decodes on the same cache
        return logits

    def end_decode(self) -> None:
        self.cache = None

    @torch.inference_mode()
    def generate(self, new_tokens: int) -> torch.Tensor:
        """Greedy generation after the ``seq``-token prompt: last-position prefill, then one
        token at a time on the KV cache (what ``generate`` does, without its bookkeeping)."""
        out = self.model(self.ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        new = [tok]
        for _ in range(new_tokens - 1):
            out = self.model(tok, use_cache=True, **{CACHE_FIELD: out[CACHE_FIELD]})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(tok)
        return torch.cat(new, dim=1)


class OrtRunner:
    """The exported graph at ``path`` on onnxruntime, with ``TorchRunner``'s inputs (same seed),
    and ``threads`` intra-op threads (None: torch's, so its rows compare with torch's)."""

    def __init__(
        self,
        path: str | Path,
        vocab: int,
        batch: int,
        seq: int,
        decode_tokens: int,
        device: str = "cpu",
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        from merino_pl.export.session import DecoderSession

        self.graph = DecoderSession(path, threads or torch.get_num_threads(), device)
        self.seq, self.decode_tokens = seq, decode_tokens
        ids, next_ids = random_ids(vocab, batch, seq, decode_tokens, seed)
        self.ids, self.next_ids = ids.numpy(), next_ids.numpy()
        self.empty = self.graph.empty_past(batch)
        self.past: list[Any] = []

    def prefill(self) -> Any:
        return self.graph.run(self.ids, 0, self.empty)[0]

    def start_decode(self) -> None:
        self.past = self.graph.run(self.ids, 0, self.empty)[1]

    def decode_run(self) -> Any:
        past, logits = self.past, None  # each run starts again from the same seq-token cache
        for i in range(self.decode_tokens):
            logits, past = self.graph.run(self.next_ids[:, i : i + 1], self.seq + i, past)
        return logits

    def end_decode(self) -> None:
        self.past = []

    def generate(self, new_tokens: int) -> Any:
        """Greedy generation after the prompt, as ``TorchRunner.generate`` (the full graph's
        prefill returns every position's logits: onnxruntime has no logits_to_keep here)."""
        logits, past = self.graph.run(self.ids, 0, self.empty)
        tok = logits[:, -1:].argmax(-1)
        new = [tok]
        for i in range(new_tokens - 1):
            logits, past = self.graph.run(tok, self.seq + i, past)
            tok = logits[:, -1:].argmax(-1)
            new.append(tok)
        return new


class ExecuTorchRunner:
    """A ``.pte`` program (``export.executorch.export_pte``) on ExecuTorch's runtime, batch 1, with
    ``TorchRunner``'s inputs (same seed). The program's KV cache is slots addressed by position:
    every decode run starts again at position ``seq``, overwriting the same slots, so each run sees
    the same ``seq``-token cache (no cropping needed). ``threads``: XNNPACK's thread pool (None:
    torch's, so its rows compare with torch's)."""

    def __init__(
        self, path: str | Path, vocab: int, seq: int, decode_tokens: int, seed: int = 0, threads: int | None = None
    ) -> None:
        from merino_pl.export.executorch import PteRunner, set_threads

        set_threads(threads or torch.get_num_threads())
        self.program = PteRunner(path)
        self.seq, self.decode_tokens = seq, decode_tokens
        ids, next_ids = random_ids(vocab, 1, seq, decode_tokens, seed)
        self.ids, self.next_ids = ids[0], next_ids[0].tolist()

    def prefill(self) -> torch.Tensor:
        return self.program.logits(self.ids)[None]  # (1, seq, vocab): every position's, as OrtRunner's

    def start_decode(self) -> None:
        self.program.prefill(self.ids)

    def decode_run(self) -> torch.Tensor:
        self.program.pos = self.seq  # back to the prompt's cache: the slots after it are written again
        for token in self.next_ids:
            logits = self.program.step(token)
        return logits[None, None]  # (1, 1, vocab)

    def end_decode(self) -> None:
        pass

    def generate(self, new_tokens: int) -> list[int]:
        """Greedy generation after the prompt, as ``TorchRunner.generate`` (the program's prefill
        computes every position's logits: the exported graph has no logits_to_keep)."""
        return self.program.generate(self.ids, new_tokens)
