"""A latency table holds exactly the pieces `latency profile` / `latency kit` time (every layer shape
and every projection a searched architecture can hold); `merino-pl search --budget latency=...`
over a space with several embed widths must ask it for nothing else (widths never decrease, so no
E_a -> E_b projection with E_a > E_b is ever part of an architecture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from merino_pl.cli import main as cli
from merino_pl.core.latency_table import LatencyTable
from merino_pl.core.space import load_space


@pytest.mark.parametrize("d_model", [96, 256])  # between the widths, and above them all
def test_search_with_a_table_of_exactly_the_profiled_shapes(tmp_path: Path, d_model: int) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_blocks: 3\nembed_dims: [64, 128, 192]\nffn_dims: [128, 256]\nnum_layers: [1, 2]\n"
        f"architecture: {{vocab_size: 512, d_model: {d_model}, max_position_embeddings: 128}}\n"
    )
    s = load_space(str(space))
    table = LatencyTable(
        fixed={"d_model": d_model, "vocab_size": 512, "ms": 1.0},
        layers=[{"embed_dim": e, "ffn_dim": f, "ms": 0.001 * e + 0.0001 * f} for e, f in s.layer_shapes()],
        projections=[{"in": i, "out": o, "ms": 1e-5 * i * o / 64} for i, o in s.projection_shapes()],
    )
    table.save(tmp_path / "table.json")
    search = [
        "search",
        "--space",
        str(space),
        "--budget",
        "latency=2ms",
        "--latency-table",
        str(tmp_path / "table.json"),
    ]
    for engine in (["--iterations", "30", "--population", "8", "--parents", "4"], ["--exhaustive"]):
        out = tmp_path / f"{engine[0].strip('-')}.yaml"
        assert cli([*search, *engine, "--no-plot", "--out", str(out)]) == 0, engine
