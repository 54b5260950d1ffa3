"""Search stage: space, latency table, entropy (fast vs exact), evolutionary search, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from merino_pl.config import load_recipe
from merino_pl.errors import MerinoError
from merino_pl.latency_table import LatencyTable
from merino_pl.space import default_space_path, load_space, space_from_dict

from conftest import REPO


# ---- search space ------------------------------------------------------------------------------
def test_shipped_space_is_table_7_and_matches_package_copy() -> None:
    space = load_space(REPO / "search" / "space.yaml")
    assert space.embed_dims == tuple(range(64, 1025, 64)) and space.ffn_dims == tuple(range(128, 4097, 128))
    assert space.num_layers == (1, 2, 3, 4) and space.num_blocks == 4
    assert (REPO / "search" / "space.yaml").read_text() == default_space_path().read_text()
    assert len(space.layer_shapes()) == 16 * 32
    assert all(r <= c for r, c in space.matrix_shapes())


def test_space_ratio_form_and_size() -> None:
    space = space_from_dict({"num_blocks": 2, "embed_dims": [64, 128], "ffn_ratios": [1, 1.5], "num_layers": [1]})
    assert space.layer_shapes() == [(64, 64), (64, 96), (128, 128), (128, 192)]
    # non-decreasing pairs of widths: (64,64), (64,128), (128,128) × 2 ratios per block squared
    assert space.size() == 3 * 4
    assert space.block(128, 1.5, 1).ffn == 192


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"embed_dims": [], "ffn_dims": [128], "num_layers": [1]}, "embed_dims is empty"),
        ({"embed_dims": [64], "ffn_dims": [128], "ffn_ratios": [1], "num_layers": [1]}, "exactly one of ffn_dims"),
        ({"embed_dims": {"start": 64, "stop": 32, "step": 64}, "ffn_dims": [128], "num_layers": [1]}, "embed_dims is empty"),
        ({"embed_dims": [100], "ffn_dims": [128], "num_layers": [1]}, "multiples of head_dim"),
        ({"embed_dims": [64], "ffn_dims": [128], "num_layers": [0]}, "num_layers must hold positive"),
        ({"embed_dims": [64], "ffn_dims": [128], "num_layers": [1], "depth": 3}, "unknown key 'depth'"),
    ],
)
def test_bad_space_is_one_merino_error(data: dict, needle: str) -> None:
    with pytest.raises(MerinoError, match=needle):
        space_from_dict(data)


# ---- latency table -----------------------------------------------------------------------------
def _latency_table() -> LatencyTable:
    layers = [{"embed_dim": e, "ffn_dim": f, "ms": 0.001 * e + 0.0005 * f} for e in (64, 128, 256) for f in (128, 256, 512)]
    projections = [{"in": i, "out": o, "ms": 1e-5 * i * o / 64} for i in (64, 128, 256, 768) for o in (64, 128, 256, 768) if i != o]
    return LatencyTable(fixed={"d_model": 768, "vocab_size": 50304, "ms": 1.0}, layers=layers, projections=projections)


def test_latency_table_roundtrip_interpolation_and_range(tmp_path: Path) -> None:
    table = _latency_table()
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert loaded.layer_ms(128, 256) == pytest.approx(0.128 + 0.128)
    assert loaded.layer_ms(192, 384) == pytest.approx(0.001 * 192 + 0.0005 * 384)  # linear data: exact
    with pytest.raises(MerinoError, match=r"E=512, F=256"):
        loaded.layer_ms(512, 256)
    space = space_from_dict({"embed_dims": [64, 128], "ffn_dims": [128, 256], "num_layers": [1, 2]})
    arch = space.config([space.block(64, 128, 2), space.block(64, 256, 1), space.block(128, 128, 1), space.block(128, 256, 2)])
    want = 1.0 + 2 * 0.128 + 0.192 + 0.192 + 2 * 0.256 + sum(1e-5 * i * o / 64 for i, o in ((768, 64), (64, 128), (128, 768)))
    assert loaded.estimate_ms(arch) == pytest.approx(want)


def test_latency_table_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(MerinoError, match="not a latency table"):
        LatencyTable.load(bad)
    with pytest.raises(MerinoError, match="not found"):
        LatencyTable.load(tmp_path / "missing.json")
