"""Measure a device latency table over a search space (``merino-pl latency profile``).

Times, on the device at hand and with the report's protocol, every piece the search's estimate
adds up (``merino_pl.core.latency_table``: fixed + Σ projections + Σ_j L_j · layer(E_j, F_j)):

* ``layers``: ONE application of a decoder layer for every (E, F) of the space, over a
  ``batch × seq_len`` prefill (no KV cache), with the model's own ``DecoderLayer``;
* ``projections``: every ``in → out`` linear a searched architecture can hold;
* ``fixed``: token + position embeddings, a final norm of width ``d_model`` and the tied LM head
  over all ``seq_len`` positions (what the paper's prefill computes).

The paper's full space is 512 layer shapes and 152 projections; at 16 runs that is minutes on a
laptop CPU and longer on a Jetson, hence ``--runs`` and the progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from merino_pl.core.config import BlockConfig, MerinoConfig
from merino_pl.core.errors import MerinoError
from merino_pl.core.latency_table import LatencyTable
from merino_pl.core.model import DecoderLayer, make_norm
from merino_pl.core.quant.format import FLOAT_DTYPES
from merino_pl.core.space import SearchSpace
from merino_pl.latency.device import describe_device
from merino_pl.latency.timing import Stats, synchronizer, time_calls


def _mean_ms(fn: Callable[[], Any], device: str, runs: int, warmup: int) -> float:
    with torch.inference_mode():
        return Stats.from_samples(time_calls(fn, runs, warmup, synchronizer(device))).mean


def _layer_config(space: SearchSpace, embed_dim: int, ffn_dim: int) -> MerinoConfig:
    """A one-block architecture with the space's fixed parts (norm, activation, bias, ...)."""
    return space.config([BlockConfig(embed_dim=embed_dim, ffn_dim=ffn_dim, num_layers=1)])


def profile_space(
    space: SearchSpace,
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = 1,
    seq: int = 128,
    runs: int = 16,
    warmup: int = 2,
    progress: bool = True,
) -> LatencyTable:
    """Measure every layer shape, projection and the fixed part of ``space`` on ``device``."""
    max_pos = int(space.architecture.get("max_position_embeddings", 2048))
    if seq > max_pos:
        raise MerinoError(f"--seq {seq} exceeds the space's max_position_embeddings {max_pos}")
    opts: dict[str, Any] = dict(device=device, dtype=FLOAT_DTYPES[precision])
    shapes, projections = space.layer_shapes(), space.projection_shapes()
    bar = tqdm(
        total=len(shapes) + len(projections) + 1, desc="profile", unit="shape", disable=not progress, dynamic_ncols=True
    )
    layers = []
    for e, f in shapes:
        cfg = _layer_config(space, e, f)
        layer = DecoderLayer(cfg, e, f).to(**opts).eval()
        x = torch.randn(batch, seq, e, **opts)
        layers.append(
            {
                "embed_dim": e,
                "ffn_dim": f,
                "ms": _mean_ms(lambda layer=layer, x=x: layer(x, None, None, 0), device, runs, warmup),
            }
        )
        bar.set_postfix_str(f"E={e} F={f}")
        bar.update(1)
    projs = []
    for i, o in projections:
        weight = torch.randn(o, i, **opts) * i**-0.5
        x = torch.randn(batch, seq, i, **opts)
        projs.append(
            {"in": i, "out": o, "ms": _mean_ms(lambda x=x, weight=weight: F.linear(x, weight), device, runs, warmup)}
        )
        bar.update(1)
    fixed = _profile_fixed(space, opts, batch, seq, runs, warmup)
    bar.update(1)
    bar.close()
    dev = describe_device(device)
    return LatencyTable(
        fixed=fixed,
        layers=layers,
        projections=projs,
        device=dev,
        torch=torch.__version__,
        precision=precision,
        batch=batch,
        seq_len=seq,
    )


def _profile_fixed(
    space: SearchSpace, opts: dict[str, Any], batch: int, seq: int, runs: int, warmup: int
) -> dict[str, Any]:
    """Embeddings + final norm + tied LM head over all positions, at the space's d_model / vocab."""
    cfg = _layer_config(space, space.embed_dims[0], space.ffn_dim(space.embed_dims[0], space.ffn_choices[0]))
    tokens = torch.nn.Embedding(cfg.vocab_size, cfg.d_model).to(**opts)
    positions = torch.nn.Embedding(cfg.max_position_embeddings, cfg.d_model).to(**opts)
    # the final norm is applied at E_N; at d_model it costs the same order (a few µs)
    norm = make_norm(cfg, cfg.d_model).to(**opts)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=opts["device"])
    pos = torch.arange(seq, device=opts["device"])[None]

    def fixed() -> torch.Tensor:
        h = norm(tokens(ids) + positions(pos))
        return F.linear(h, tokens.weight)  # (B, T, V): the tied LM head

    ms = _mean_ms(fixed, opts["device"], runs, warmup)
    return {"d_model": cfg.d_model, "vocab_size": cfg.vocab_size, "ms": ms}
