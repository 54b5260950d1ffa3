"""Device latency tables: per-layer and per-projection times measured on one device.

The latency stage writes one with ``merino-pl latency profile``; the search reads it with
``--latency-table FILE`` and estimates an architecture's latency without running it::

    {"format": "merino-latency-table/1", "device": {...}, "torch": "2.13.0",
     "precision": "fp32", "batch": 1, "seq_len": 128, "unit": "ms",
     "fixed": {"d_model": 768, "vocab_size": 50304, "ms": 1.23},
     "layers": [{"embed_dim": 64, "ffn_dim": 128, "ms": 0.08}, ...],
     "projections": [{"in": 768, "out": 64, "ms": 0.01}, ...]}

latency = fixed (embeddings + final norm + LM head) + Σ projections + Σ_j L_j · layer(E_j, F_j).
A shape missing from the table is interpolated (linear over F within the two measured E rows
around E, then linear over E; for projections: over ``out``, then ``in``) inside the measured
range, and is a ``MerinoError`` naming the shape outside it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.config import MerinoConfig
from merino_pl.core.costs import projection_dims
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_json, write_json

FORMAT = "merino-latency-table/1"


def _interp(rows: dict[int, dict[int, float]], x: int, y: int, what: str) -> float:
    """Linear over ``y`` inside each measured row bracketing ``x``, then linear over ``x``."""
    xs = sorted(rows)
    if not xs or not xs[0] <= x <= xs[-1]:
        raise MerinoError(
            f"{what} is outside the latency table's measured range ({xs[0] if xs else '-'}..{xs[-1] if xs else '-'})"
        )
    hi = bisect.bisect_left(xs, x)
    x0, x1 = (x, x) if xs[hi] == x else (xs[hi - 1], xs[hi])

    def along_y(row_x: int) -> float:
        row = rows[row_x]
        ys = sorted(row)
        if not ys[0] <= y <= ys[-1]:
            raise MerinoError(f"{what} is outside the latency table's measured range (row {row_x}: {ys[0]}..{ys[-1]})")
        j = bisect.bisect_left(ys, y)
        if ys[j] == y:
            return row[y]
        y0, y1 = ys[j - 1], ys[j]
        return row[y0] + (row[y1] - row[y0]) * (y - y0) / (y1 - y0)

    v0 = along_y(x0)
    return v0 if x0 == x1 else v0 + (along_y(x1) - v0) * (x - x0) / (x1 - x0)


@dataclass
class LatencyTable:
    """Measured times (``unit`` ms) of one layer application and of each projection."""

    fixed: dict[str, Any]
    layers: list[dict[str, Any]]
    projections: list[dict[str, Any]] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    torch: str = ""
    precision: str = "fp32"
    batch: int = 1
    seq_len: int = 128
    unit: str = "ms"
    source: str = "<latency table>"

    def __post_init__(self) -> None:
        self._layers = self._rows(self.layers, "embed_dim", "ffn_dim", "layers")
        self._proj = self._rows(self.projections, "in", "out", "projections")

    def _rows(self, entries: list[dict[str, Any]], kx: str, ky: str, name: str) -> dict[int, dict[int, float]]:
        rows: dict[int, dict[int, float]] = {}
        for i, e in enumerate(entries):
            try:
                rows.setdefault(int(e[kx]), {})[int(e[ky])] = float(e["ms"])
            except (KeyError, TypeError, ValueError):
                raise MerinoError(
                    f"{self.source}: {name}[{i}] must have integer {kx!r}, {ky!r} and a number 'ms', got {e!r}"
                ) from None
        return rows

    # ---- estimates -------------------------------------------------------------------------
    def layer_ms(self, embed_dim: int, ffn_dim: int) -> float:
        """One application of a decoder layer of width ``embed_dim`` and FFN ``ffn_dim``."""
        return _interp(self._layers, embed_dim, ffn_dim, f"{self.source}: layer shape (E={embed_dim}, F={ffn_dim})")

    def projection_ms(self, d_in: int, d_out: int) -> float:
        """One ``d_in → d_out`` projection (0 when the widths are equal: no projection exists)."""
        if d_in == d_out:
            return 0.0
        return _interp(self._proj, d_in, d_out, f"{self.source}: projection shape ({d_in} -> {d_out})")

    def check_fixed(self, d_model: int, vocab_size: int) -> None:
        """The fixed part was measured for one embedding size: refuse another."""
        want = (int(self.fixed.get("d_model", -1)), int(self.fixed.get("vocab_size", -1)))
        if want != (d_model, vocab_size):
            raise MerinoError(
                f"{self.source}: measured for d_model={want[0]}, vocab_size={want[1]}, "
                f"but the architecture has d_model={d_model}, vocab_size={vocab_size}"
            )

    def estimate_ms(self, arch: MerinoConfig) -> float:
        """Estimated latency of ``arch`` (batch ``batch``, ``seq_len`` tokens) on the device."""
        self.check_fixed(arch.d_model, arch.vocab_size)
        ms = float(self.fixed["ms"])
        ms += sum(self.projection_ms(i, o) for i, o in projection_dims(arch))
        ms += sum(b.num_layers * self.layer_ms(b.embed_dim, b.ffn) for b in arch.blocks)
        return ms

    # ---- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "device": self.device,
            "torch": self.torch,
            "precision": self.precision,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "unit": self.unit,
            "fixed": self.fixed,
            "layers": self.layers,
            "projections": self.projections,
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (JSON)."""
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<latency table>") -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise MerinoError(f"{source}: not a latency table (format must be {FORMAT!r}, got {got!r})")
        problems = []
        if data.get("unit", "ms") != "ms":
            problems.append(f"unit must be 'ms', got {data.get('unit')!r}")
        fixed = data.get("fixed")
        if not isinstance(fixed, dict) or not {"d_model", "vocab_size", "ms"} <= set(fixed):
            problems.append(f"fixed must be a mapping with d_model, vocab_size, ms, got {fixed!r}")
        for key in ("layers", "projections"):
            if not isinstance(data.get(key, []), list):
                problems.append(f"{key} must be a list, got {type(data.get(key)).__name__}")
        if not data.get("layers"):
            problems.append("layers is empty: nothing was measured")
        if problems:
            raise MerinoError(f"{source}: " + "; ".join(problems))
        keys = ("device", "torch", "precision", "batch", "seq_len", "unit")
        return cls(
            fixed=fixed,
            layers=data["layers"],
            projections=data.get("projections", []),
            source=source,
            **{k: data[k] for k in keys if k in data},
        )

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls.from_dict(read_json(path, "latency table"), source=str(path))
