from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_arch
from merino_pl.core.config import MerinoConfig, Recipe, builtin_recipe_names, load_recipe
from merino_pl.core.errors import MerinoError


def all_recipe_files() -> list[Path]:
    return sorted(p for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", all_recipe_files(), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    out = recipe.save(tmp_path / "r.yaml")
    again = load_recipe(out)
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()


def test_builtin_names_match_recipes_folder() -> None:
    names = set(builtin_recipe_names())
    assert {"merino-52m", "merino-61m", "merino-64m", "merino-tiny"} <= names
    assert load_recipe("merino-52m") == load_recipe(REPO / "recipes" / "merino-52m.yaml")


def test_round_trip_keeps_ffn_form_and_provenance(tmp_path: Path) -> None:
    r = Recipe("x", tiny_arch(), {"source": "search", "budget": {"flops": 6e10}, "seed": 3})
    again = load_recipe(r.save(tmp_path / "x.yaml"))
    assert again == r
    assert again.architecture.blocks[1].ffn_dim == 96 and again.architecture.blocks[1].ffn_ratio is None
    assert again.architecture.blocks[0].ffn == 128


def _write(tmp_path: Path, mutate) -> Path:
    data = load_recipe("merino-tiny").to_dict()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BAD = {
    "unknown-key": (lambda d: d["architecture"].update(n_embd=5), "n_embd"),
    "unknown-block-key": (lambda d: d["architecture"]["blocks"][0].update(width=64), "width"),
    "not-multiple-of-64": (lambda d: d["architecture"]["blocks"][0].update(embed_dim=100), "100"),
    "decreasing": (lambda d: d["architecture"]["blocks"][3].update(embed_dim=64), "must not decrease"),
    "zero-depth": (lambda d: d["architecture"]["blocks"][2].update(num_layers=0), "num_layers"),
    "negative-depth": (lambda d: d["architecture"]["blocks"][2].update(num_layers=-1), "-1"),
    "both-ffn-forms": (lambda d: d["architecture"]["blocks"][0].update(ffn_dim=128), "exactly one"),
    "bad-activation": (lambda d: d["architecture"].update(activation="swish"), "swish"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipes_name_file_and_value(case: str, tmp_path: Path) -> None:
    mutate, needle = BAD[case]
    path = _write(tmp_path, mutate)
    with pytest.raises(MerinoError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\narchitecture: {blocks: [\n")
    with pytest.raises(MerinoError, match="broken.yaml.*malformed YAML"):
        load_recipe(bad)
    with pytest.raises(MerinoError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MerinoError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_config_rejects_bad_values_directly() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        MerinoConfig(blocks=tiny_arch().blocks, vocab_size=0)


def test_packaged_recipes_are_the_recipes_folder() -> None:
    """The built-in recipes ship inside the package (pip installs have no repo): they must be
    byte-identical to the ones users read and edit in `recipes/`."""
    packaged = REPO / "src" / "merino_pl" / "recipes"
    for p in sorted(packaged.glob("*.yaml")):
        assert p.read_bytes() == (REPO / "recipes" / p.name).read_bytes(), p.name
