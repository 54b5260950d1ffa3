"""Batched log-likelihood of token continuations: the one scoring loop behind every metric.

Both the lm-eval backend (``loglikelihood``, ``loglikelihood_rolling``) and the perplexity
windows call :func:`score`, so a WikiText-2 figure from ``merino-pl eval --ppl`` and one from
lm-eval's ``wikitext`` task are the same arithmetic on the same tokens.

Why this is hand-written rather than lm-eval's ``HFLM._loglikelihood_tokens``: HFLM projects
every position of every padded row through the LM head (B × T × 50 304 floats: 3.3 GB for a
batch of eight 2048-token windows). Here the tied head is applied only to the positions that
are scored, and only for real (unpadded) tokens; the decoder runs once per batch as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.model import lm_loss

# (context tokens, continuation tokens) -> (sum of log-probs of the continuation, all greedy?)
Request = tuple[Sequence[int], Sequence[int]]


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """Model input for one request and the number of scored positions.

    The input is ``(context + continuation)[:-1]`` left-truncated to ``max_length`` tokens,
    exactly as lm-eval's HFLM does; the last ``len(continuation)`` positions are scored.
    """
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    if len(continuation) > max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens exceeds the context of {max_length}")
    whole = list(context) + list(continuation)
    return whole[-(max_length + 1) :][:-1], len(continuation)


@torch.no_grad()
def score(
    model: MerinoForCausalLM,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    progress: str | None = None,
) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether greedy decoding reproduces it, per request.

    Requests are run longest first (so each batch pads little, and a batch that runs out of
    memory does so at once), right-padded: causal attention makes padding after the real
    tokens invisible to them, so no attention mask is needed.
    """
    max_length = max_length or model.config.max_position_embeddings
    device = next(model.parameters()).device
    prepared = [truncate(c, x, max_length) for c, x in requests]
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    targets = [list(x)[-n:] for (c, x), (_, n) in zip(requests, prepared)]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
    bar = tqdm(total=len(order), desc=progress, disable=progress is None, unit="req")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(prepared[idx[0]][0])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(prepared[i][0])] = torch.tensor(prepared[i][0])
        ids = ids.to(device)
        positions = torch.arange(width, device=device).unsqueeze(0)
        hidden = model.model(ids, positions)  # (B, T, d): the decoder once for the whole batch
        for row, i in enumerate(idx):
            inp, n = prepared[i]
            h = hidden[row, len(inp) - n : len(inp)]  # (n, d): only the scored positions
            logits = model.model.logits(h).float()  # (n, V)
            target = torch.tensor(targets[i], device=device)
            nll = lm_loss(logits, target, reduction="none")  # (n,): -log p of each continuation token
            results[i] = (-float(nll.sum()), bool((logits.argmax(-1) == target).all()))
        bar.update(len(idx))
    bar.close()
    return results
