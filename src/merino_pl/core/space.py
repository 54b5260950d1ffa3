"""The architecture search space (paper Table 7, FFN as Table 8's ratios), read from ``search/space.yaml``.

A root module (no search imports) so that the latency stage can enumerate the shapes it has
to profile without importing the search package::

    num_blocks: 4
    embed_dims: {start: 64, stop: 1024, step: 64}    # E: an inclusive range or a list
    ffn_ratios: [1, 1.5, 2, 2.5, 3, 3.5, 4]          # F = round(R·E); or `ffn_dims:` (absolute F)
    num_layers: [1, 2, 3, 4]
    architecture: {vocab_size: 50304, d_model: 768, max_position_embeddings: 2048}

Widths never decrease from block to block (the search enforces it; the space lists choices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.assets import asset
from merino_pl.core.config import BlockConfig, MerinoConfig
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_yaml

SPACE_KEYS = ("num_blocks", "embed_dims", "ffn_dims", "ffn_ratios", "num_layers", "architecture")


@dataclass(frozen=True)
class SearchSpace:
    """Choices per block: embed dims E, FFN dims F (or ratios R, F = round(R·E)), depths L."""

    num_blocks: int
    embed_dims: tuple[int, ...]
    num_layers: tuple[int, ...]
    ffn_dims: tuple[int, ...] | None = None
    ffn_ratios: tuple[float, ...] | None = None
    architecture: dict[str, Any] = field(default_factory=dict)  # fixed MerinoConfig fields
    source: str = "<space>"

    @property
    def ffn_choices(self) -> tuple[float, ...]:
        """The FFN gene's values: dims, or ratios when the space is in ratio form."""
        return self.ffn_dims if self.ffn_dims is not None else self.ffn_ratios  # type: ignore[return-value]

    def ffn_dim(self, embed_dim: int, choice: float) -> int:
        """F for an FFN gene value (the same rounding as ``BlockConfig.ffn``)."""
        return int(choice) if self.ffn_dims is not None else int(round(choice * embed_dim))

    def layer_shapes(self) -> list[tuple[int, int]]:
        """Every (E, F) one decoder layer of this space can take, sorted."""
        return sorted({(e, self.ffn_dim(e, c)) for e in self.embed_dims for c in self.ffn_choices})

    def matrix_shapes(self) -> list[tuple[int, int]]:
        """Every weight-matrix shape (rows ≤ cols) whose entropy the search needs."""
        shapes = {(e, e) for e in self.embed_dims}
        shapes |= {(min(e, f), max(e, f)) for e, f in self.layer_shapes()}
        return sorted(shapes)

    def projection_shapes(self) -> list[tuple[int, int]]:
        """Every (in, out) projection: d → E_1, E_j → E_{j+1} (E_j < E_{j+1}), E_N → d."""
        d = int(self.architecture.get("d_model", 768))
        pairs = {(d, e) for e in self.embed_dims} | {(e, d) for e in self.embed_dims}
        pairs |= {(a, b) for a in self.embed_dims for b in self.embed_dims if a < b}
        return sorted((i, o) for i, o in pairs if i != o)

    def block(self, embed_dim: int, ffn_choice: float, num_layers: int) -> BlockConfig:
        """The block as a recipe writes it (``ffn_dim`` or ``ffn_ratio``, as the space is)."""
        if self.ffn_dims is not None:
            return BlockConfig(embed_dim=int(embed_dim), ffn_dim=int(ffn_choice), num_layers=int(num_layers))
        return BlockConfig(embed_dim=int(embed_dim), ffn_ratio=float(ffn_choice), num_layers=int(num_layers))

    def config(self, blocks: Sequence[BlockConfig]) -> MerinoConfig:
        """A full architecture: the given blocks plus the space's fixed parts."""
        return MerinoConfig(blocks=tuple(blocks), **self.architecture)

    def size(self) -> int:
        """Number of architectures (non-decreasing widths), counted without enumerating them."""
        per_width = len(self.ffn_choices) * len(self.num_layers)
        # ways[k] = sequences so far ending at width index k (widths sorted ascending)
        ways = [per_width] * len(self.embed_dims)
        for _ in range(self.num_blocks - 1):
            acc, new = 0, []
            for w in ways:
                acc += w
                new.append(acc * per_width)
            ways = new
        return sum(ways)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"num_blocks": self.num_blocks, "embed_dims": list(self.embed_dims)}
        if self.ffn_dims is not None:
            d["ffn_dims"] = list(self.ffn_dims)
        else:
            d["ffn_ratios"] = list(self.ffn_ratios or ())
        d["num_layers"] = list(self.num_layers)
        d["architecture"] = dict(self.architecture)
        return d


def _choices(value: Any, name: str, number: type, problems: list[str]) -> tuple:
    """An inclusive ``{start, stop, step}`` range or an explicit list, as a sorted tuple."""
    if isinstance(value, dict):
        unknown = set(value) - {"start", "stop", "step"}
        if unknown or not all(k in value for k in ("start", "stop", "step")):
            problems.append(f"{name} must be a list or {{start, stop, step}}, got {value!r}")
            return ()
        start, stop, step = value["start"], value["stop"], value["step"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (start, stop, step)) or step <= 0:
            problems.append(f"{name}: start / stop / step must be numbers with step > 0, got {value!r}")
            return ()
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        value = [start + i * step for i in range(max(count, 0))]
    if not isinstance(value, list):
        problems.append(f"{name} must be a list or {{start, stop, step}}, got {value!r}")
        return ()
    bad = [
        v
        for v in value
        if not isinstance(v, (int, float))
        or isinstance(v, bool)
        or v <= 0
        or (number is int and v != int(v))
        or not math.isfinite(v)
    ]
    if bad:
        problems.append(f"{name} must hold positive {'integers' if number is int else 'numbers'}, got {bad!r}")
        return ()
    if not value:
        problems.append(f"{name} is empty: the space has no choice for it")
        return ()
    return tuple(sorted({number(v) for v in value}))


def space_from_dict(data: Any, source: str = "<space>") -> SearchSpace:
    """Build and check a space; raises ``MerinoError`` listing every problem at once."""
    if not isinstance(data, dict):
        raise MerinoError(f"{source}: a search space must be a mapping, got {type(data).__name__}")
    problems = [f"unknown key {k!r} (valid: {', '.join(SPACE_KEYS)})" for k in data if k not in SPACE_KEYS]
    num_blocks = data.get("num_blocks", 4)
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        problems.append(f"num_blocks must be a positive integer, got {num_blocks!r}")
    embed = _choices(data.get("embed_dims"), "embed_dims", int, problems)
    layers = _choices(data.get("num_layers"), "num_layers", int, problems)
    ffn_dims = ffn_ratios = None
    if ("ffn_dims" in data) == ("ffn_ratios" in data):
        problems.append("give exactly one of ffn_dims / ffn_ratios")
    elif "ffn_dims" in data:
        ffn_dims = _choices(data["ffn_dims"], "ffn_dims", int, problems)
    else:
        ffn_ratios = _choices(data["ffn_ratios"], "ffn_ratios", float, problems)
    arch = data.get("architecture") or {}
    if not isinstance(arch, dict) or "blocks" in arch:
        problems.append(f"architecture must be a mapping of fixed MerinoConfig fields (no blocks), got {arch!r}")
        arch = {}
    if not problems:
        space = SearchSpace(num_blocks, embed, layers, ffn_dims, ffn_ratios, dict(arch), source)
        problems += _check_buildable(space)
    if problems:
        raise MerinoError(f"{source}: " + "; ".join(problems))
    return space


def _check_buildable(space: SearchSpace) -> list[str]:
    """Contradictions only visible when building a model: widths vs head_dim, bad fixed fields."""
    head = space.architecture.get("head_dim", 64)
    bad = [e for e in space.embed_dims if isinstance(head, int) and head > 0 and e % head]
    problems = [f"embed_dims {list(bad)} are not multiples of head_dim {head}"] if bad else []
    ok = [e for e in space.embed_dims if e not in bad] or [space.embed_dims[0]]
    try:
        space.config([space.block(ok[0], space.ffn_choices[0], space.num_layers[0])])
    except (TypeError, ValueError) as e:
        problems.append(f"architecture: {e}")
    tiny = [(e, f) for e, f in space.layer_shapes() if f < 1]
    if tiny:
        problems.append(f"ffn_ratios give an FFN width < 1 for (E, F) {tiny[:3]}")
    return problems


def default_space_path() -> Path:
    """The shipped default space (a byte-identical copy of ``search/space.yaml`` inside the package)."""
    return asset("search", "space.yaml")


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Load ``search/space.yaml`` (or any space file); ``None`` = the shipped default."""
    path = default_space_path() if path is None else Path(path)
    return space_from_dict(read_yaml(path, "search space"), source=str(path))
