"""Architecture config and recipes.

``MerinoConfig`` is the one description of an architecture: the model's only constructor
argument. A *recipe* is that config as YAML plus provenance (the paper, or a search with its
budget, entropy and seed). Search writes recipes; training, eval, quantize and latency read
them unchanged.

    name: merino-52m
    architecture:
      vocab_size: 50304
      blocks:
        - {embed_dim: 512, ffn_ratio: 1.0, num_layers: 2}
        ...
    provenance: {source: paper, ...}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_write_text, read_yaml

NORMS = ("layernorm", "rmsnorm")
# activation name -> the torch.nn module the FFN builds (core.model looks it up by name)
ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU"}


@dataclass(frozen=True)
class BlockConfig:
    """One block: a single transformer layer of width ``embed_dim`` applied ``num_layers`` times.

    The FFN width is given either as ``ffn_dim`` or as ``ffn_ratio`` (× ``embed_dim``), never
    both; whichever was given is what a saved recipe keeps, so recipes round-trip exactly.
    """

    embed_dim: int
    num_layers: int
    ffn_dim: int | None = None
    ffn_ratio: float | None = None

    @property
    def ffn(self) -> int:
        """FFN hidden width F_j."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        return int(round(self.ffn_ratio * self.embed_dim))  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"embed_dim": self.embed_dim}
        if self.ffn_dim is not None:
            d["ffn_dim"] = self.ffn_dim
        else:
            d["ffn_ratio"] = self.ffn_ratio
        d["num_layers"] = self.num_layers
        return d


@dataclass(frozen=True)
class MerinoConfig:
    """An adaptive block-wise shared decoder (paper Table 8; docs/architecture.md)."""

    blocks: tuple[BlockConfig, ...]
    vocab_size: int = 50304
    d_model: int = 768  # token embedding / projection dimension, tied with the LM head
    max_position_embeddings: int = 2048
    head_dim: int = 64
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "relu"
    dropout: float = 0.0
    bias: bool = True  # biases of the attention / FFN linears (projections never have one)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))

    # ---- derived values ----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_layer_applications(self) -> int:
        """Total decoder layer applications (Σ L_j): the number of KV-cache entries."""
        return sum(b.num_layers for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks"] = [b.to_dict() for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MerinoConfig:
        """Build from a mapping; raises ``ValueError`` listing every problem at once."""
        problems = _unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, "architecture")
        blocks_raw = data.get("blocks")
        if not isinstance(blocks_raw, list) or not blocks_raw:
            problems.append(f"architecture.blocks must be a non-empty list, got {blocks_raw!r}")
            raise ValueError("; ".join(problems))
        blocks = []
        block_keys = {f.name for f in dataclasses.fields(BlockConfig)}
        for i, b in enumerate(blocks_raw):
            if not isinstance(b, dict):
                problems.append(f"blocks[{i}] must be a mapping, got {b!r}")
                continue
            problems += _unknown_keys(b, block_keys, f"blocks[{i}]")
            missing = [k for k in ("embed_dim", "num_layers") if k not in b]
            if missing:
                problems.append(f"blocks[{i}] is missing {', '.join(missing)}")
                continue
            blocks.append(BlockConfig(**{k: v for k, v in b.items() if k in block_keys}))
        if problems:
            raise ValueError("; ".join(problems))
        kwargs = {k: v for k, v in data.items() if k != "blocks"}
        return cls(blocks=tuple(blocks), **kwargs)


def _unknown_keys(data: dict[str, Any], known: set[str], where: str) -> list[str]:
    return [f"unknown key {where}.{k!r} (valid: {', '.join(sorted(known))})" for k in data if k not in known]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(cfg: MerinoConfig) -> list[str]:
    """Every problem of an architecture, as messages naming the bad value."""
    p: list[str] = []
    for name in ("vocab_size", "d_model", "max_position_embeddings", "head_dim"):
        v = getattr(cfg, name)
        if not _is_int(v) or v <= 0:
            p.append(f"{name} must be a positive integer, got {v!r}")
    if cfg.norm not in NORMS:
        p.append(f"norm {cfg.norm!r} is not one of {', '.join(NORMS)}")
    if cfg.activation not in ACTIVATIONS:
        p.append(f"activation {cfg.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if not isinstance(cfg.dropout, (int, float)) or not 0 <= cfg.dropout < 1:
        p.append(f"dropout must be in [0, 1), got {cfg.dropout!r}")
    if not isinstance(cfg.norm_eps, (int, float)) or cfg.norm_eps <= 0:
        p.append(f"norm_eps must be positive, got {cfg.norm_eps!r}")
    if not isinstance(cfg.init_std, (int, float)) or cfg.init_std <= 0:
        p.append(f"init_std must be positive, got {cfg.init_std!r}")
    head = cfg.head_dim if _is_int(cfg.head_dim) and cfg.head_dim > 0 else 64
    prev = 0
    for i, b in enumerate(cfg.blocks):
        if not _is_int(b.embed_dim) or b.embed_dim <= 0 or b.embed_dim % head:
            p.append(f"blocks[{i}].embed_dim must be a positive multiple of head_dim {head}, got {b.embed_dim!r}")
        elif b.embed_dim < prev:
            p.append(
                f"blocks[{i}].embed_dim {b.embed_dim} is smaller than blocks[{i - 1}]'s {prev}: "
                f"widths must not decrease"
            )
        else:
            prev = b.embed_dim
        if not _is_int(b.num_layers) or b.num_layers <= 0:
            p.append(f"blocks[{i}].num_layers must be a positive integer, got {b.num_layers!r}")
        if (b.ffn_dim is None) == (b.ffn_ratio is None):
            p.append(
                f"blocks[{i}] needs exactly one of ffn_dim / ffn_ratio, "
                f"got ffn_dim={b.ffn_dim!r} ffn_ratio={b.ffn_ratio!r}"
            )
        elif b.ffn_dim is not None and (not _is_int(b.ffn_dim) or b.ffn_dim <= 0):
            p.append(f"blocks[{i}].ffn_dim must be a positive integer, got {b.ffn_dim!r}")
        elif b.ffn_ratio is not None and (
            not isinstance(b.ffn_ratio, (int, float))
            or isinstance(b.ffn_ratio, bool)
            or not math.isfinite(b.ffn_ratio)
            or b.ffn_ratio <= 0
        ):
            p.append(f"blocks[{i}].ffn_ratio must be a positive number, got {b.ffn_ratio!r}")
    return p


# ---- recipes ---------------------------------------------------------------------------------
@dataclass
class Recipe:
    """An architecture plus where it came from (``provenance``: free-form, kept verbatim)."""

    name: str
    architecture: MerinoConfig
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture.to_dict(), "provenance": self.provenance}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<recipe>") -> Recipe:
        if not isinstance(data, dict):
            raise MerinoError(
                f"{source}: a recipe must be a mapping with 'name' and 'architecture', got {type(data).__name__}"
            )
        problems = _unknown_keys(data, {"name", "architecture", "provenance"}, "recipe")
        if "architecture" not in data or not isinstance(data["architecture"], dict):
            problems.append("missing mapping 'architecture'")
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, dict):
            problems.append(f"provenance must be a mapping, got {provenance!r}")
        if problems:
            raise MerinoError(f"{source}: " + "; ".join(problems))
        try:
            arch = MerinoConfig.from_dict(data["architecture"])
        except (ValueError, TypeError) as e:
            raise MerinoError(f"{source}: {e}") from None
        name = str(data.get("name") or Path(source).stem)
        return cls(name=name, architecture=arch, provenance=provenance)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash never leaves a half-written recipe."""
        path = Path(path)
        atomic_write_text(path, self.to_yaml())
        return path


def builtin_recipe_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("merino_pl").joinpath("recipes").iterdir() if p.name.endswith(".yaml")
    )


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a YAML path, or a built-in one by name (e.g. ``merino-52m``)."""
    path = Path(path_or_name)
    if not path.exists():
        name = str(path_or_name)
        if name in builtin_recipe_names():
            path = Path(str(resources.files("merino_pl").joinpath("recipes", f"{name}.yaml")))
        else:
            raise MerinoError(
                f"recipe not found: {name!r} is neither a file nor a built-in recipe "
                f"({', '.join(builtin_recipe_names())})"
            )
    if path.is_dir():
        raise MerinoError(f"{path}: is a directory, expected a recipe YAML file")
    return Recipe.from_dict(read_yaml(path, "recipe"), source=str(path))


def model_source_problems(source: str | Path) -> list[str]:
    """A model argument (a ``.ckpt``, a model directory, a recipe YAML or a built-in recipe name)
    that names nothing, found without torch so a stage can refuse it before its heavy imports;
    what an existing file holds is checked when it is read (``core.checkpoint.load_model``)."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        return [f"{path}: not a model directory (no config.json)"]
    if path.exists() or str(source) in builtin_recipe_names():
        return []
    if path.suffix == ".ckpt":
        return [f"checkpoint not found: {path}"]
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return [f"{path}: no such file or directory (expected a .ckpt, a model directory or a recipe YAML)"]
    names = ", ".join(builtin_recipe_names())
    return [f"recipe not found: {str(source)!r} is neither a file nor a built-in recipe ({names})"]
