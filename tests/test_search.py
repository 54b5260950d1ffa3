"""Search stage: space, latency table, entropy (fast vs exact), evolutionary search, CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from merino_pl.core.config import load_recipe
from merino_pl.core.errors import MerinoError
from merino_pl.core.latency_table import LatencyTable
from merino_pl.core.space import default_space_path, load_space, space_from_dict


# ---- search space ------------------------------------------------------------------------------
def test_shipped_space_is_ratio_form_and_matches_package_copy() -> None:
    space = load_space(REPO / "search" / "space.yaml")
    assert space.embed_dims == tuple(range(64, 1025, 64)) and space.ffn_dims is None
    assert space.ffn_ratios == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)  # paper Alg. 2 / Table 8; F ≤ 4096 as Table 7
    assert space.num_layers == (1, 2, 3, 4) and space.num_blocks == 4
    assert (REPO / "search" / "space.yaml").read_text() == default_space_path().read_text()
    assert len(space.layer_shapes()) == 16 * 7 and max(f for _, f in space.layer_shapes()) == 4096
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
        (
            {"embed_dims": {"start": 64, "stop": 32, "step": 64}, "ffn_dims": [128], "num_layers": [1]},
            "embed_dims is empty",
        ),
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
    layers = [
        {"embed_dim": e, "ffn_dim": f, "ms": 0.001 * e + 0.0005 * f} for e in (64, 128, 256) for f in (128, 256, 512)
    ]
    projections = [
        {"in": i, "out": o, "ms": 1e-5 * i * o / 64} for i in (64, 128, 256, 768) for o in (64, 128, 256, 768) if i != o
    ]
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
    arch = space.config(
        [space.block(64, 128, 2), space.block(64, 256, 1), space.block(128, 128, 1), space.block(128, 256, 2)]
    )
    want = (
        1.0
        + 2 * 0.128
        + 0.192
        + 0.192
        + 2 * 0.256
        + sum(1e-5 * i * o / 64 for i, o in ((768, 64), (64, 128), (128, 768)))
    )
    assert loaded.estimate_ms(arch) == pytest.approx(want)


def test_latency_table_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(MerinoError, match="not a latency table"):
        LatencyTable.load(bad)
    with pytest.raises(MerinoError, match="not found"):
        LatencyTable.load(tmp_path / "missing.json")


# ---- entropy -----------------------------------------------------------------------------------
import numpy as np  # noqa: E402

from merino_pl.cli import main  # noqa: E402
from merino_pl.core.costs import count_flops, count_params  # noqa: E402
from merino_pl.search import entropy as ent  # noqa: E402
from merino_pl.search.api import SearchPlan, decode, run_search  # noqa: E402
from merino_pl.search.budget import Genes, cost_tables, min_cost, parse_budget  # noqa: E402
from merino_pl.search.evolution import EvolutionConfig  # noqa: E402

SPACE = load_space(REPO / "search" / "space.yaml")
PAPER = {"flops-60g": "merino-52m", "flops-110g": "merino-61m", "flops-160g": "merino-64m"}


def _rel_errors(shapes: list[tuple[int, int]], rel_se: float) -> np.ndarray:
    """|fast − exact| / exact, the exact value from a fresh Monte-Carlo run (another seed)."""
    errs = []
    for n, m in shapes:
        exact, se = ent.matrix_entropy_exact(n, m, rel_se=rel_se, seed=12345)
        assert se <= 1.1 * rel_se * exact
        errs.append(abs(ent.matrix_entropy(n, m) - exact) / exact)
    return np.array(errs)


@pytest.mark.slow
def test_fast_entropy_matches_exact_svd_on_50_random_shapes() -> None:
    """Paper Fig. 2: table / closed form vs Monte-Carlo over 50 random shapes of the space."""
    shapes = SPACE.matrix_shapes()
    rng = np.random.default_rng(2025)
    picked = [shapes[i] for i in rng.choice(len(shapes), size=50, replace=False)]
    errs = _rel_errors(picked, rel_se=1e-4)
    assert errs.mean() <= 3e-4 and errs.max() <= 1e-3, (errs.mean(), errs.max())


def test_fast_entropy_small_shapes_and_symmetry() -> None:
    errs = _rel_errors([(64, 128), (64, 64), (128, 384)], rel_se=1e-4)
    assert errs.max() <= 1e-3
    assert ent.matrix_entropy(128, 384) == ent.matrix_entropy(384, 128)
    # the closed form alone is within 1e-5 on rectangular shapes (where the table adds nothing)
    exact, _ = ent.matrix_entropy_exact(192, 256, rel_se=1e-5, seed=7)
    assert abs(ent.matrix_entropy_closed_form(192, 256) - exact) / exact <= 2e-5


def test_shipped_table_covers_the_space_squares() -> None:
    table = ent.shipped_table()
    assert table is not None and table.matches(ent.DEFAULT)
    assert {(e, e) for e in SPACE.embed_dims} <= set(table.values)
    assert ent.default_table_path().stat().st_size < 1_000_000


def test_recipe_entropy_terms_and_effectiveness() -> None:
    arch = load_recipe("merino-52m").architecture
    e = ent.recipe_entropy(arch)
    assert e["total"] == pytest.approx(e["mhsa"] + e["ffn"]) and e["mhsa"] > e["ffn"] > 0
    # paper Table 1: γ = 0.008 for L = 1, E = 256 and 0.25 for L = 24, E = 64 (β = 1/16, log2)
    assert 1 - ent.effectiveness(1, 256, 1 / 16) == pytest.approx(0.0078, abs=1e-4)
    assert 1 - ent.effectiveness(24, 64, 1 / 16) == pytest.approx(0.25)
    cfg = ent.EntropyConfig(alpha_mhsa=0.5, alpha_ffn=2.0)
    w = ent.arch_entropy(arch, cfg)
    assert w["total"] == pytest.approx(0.5 * e["mhsa"] + 2.0 * e["ffn"])


def test_entropy_config_rejects_bad_values() -> None:
    with pytest.raises(MerinoError, match=r"entropy.init 'xavier'.*entropy.eps must be a positive"):
        ent.EntropyConfig.from_dict({"init": "xavier", "eps": 0})


# ---- costs as tables ---------------------------------------------------------------------------
def _random_codes(space, n: int, seed: int = 0) -> np.ndarray:
    from merino_pl.search.api import build_problem
    from merino_pl.search.evolution import _random_population

    s = SearchPlan([parse_budget("flops=1T")], space)
    return _random_population(build_problem(s), n, np.random.default_rng(seed))


def test_cost_tables_match_reference_counts() -> None:
    genes = Genes.of(SPACE)
    codes = _random_codes(SPACE, 40)
    latency = _latency_table_for(SPACE)
    for name, ref in (("params", count_params), ("flops", count_flops), ("latency", latency.estimate_ms)):
        tables = cost_tables(name, SPACE, genes, latency)
        got = tables.evaluate(codes, genes.embed_idx[codes])
        want = [ref(decode(SPACE, genes, c)) for c in codes]
        np.testing.assert_allclose(got, want, rtol=1e-12)


def _latency_table_for(space) -> LatencyTable:
    dims = sorted(set(space.embed_dims) | {768})
    layers = [{"embed_dim": e, "ffn_dim": f, "ms": 1e-6 * e * (e + f)} for e, f in space.layer_shapes()]
    projections = [{"in": i, "out": o, "ms": 1e-7 * i * o} for i in dims for o in dims if i != o]
    return LatencyTable(fixed={"d_model": 768, "vocab_size": 50304, "ms": 2.0}, layers=layers, projections=projections)


def test_min_cost_dp_is_the_brute_force_minimum() -> None:
    space = space_from_dict(
        {"num_blocks": 3, "embed_dims": [64, 128, 768, 832], "ffn_dims": [128, 256], "num_layers": [1, 2]}
    )
    genes = Genes.of(space)
    tables = cost_tables("params", space, genes)
    grid = np.stack(np.meshgrid(*[np.arange(len(genes.embed_idx))] * 3, indexing="ij"), -1).reshape(-1, 3)
    ei = genes.embed_idx[grid]
    ok = (np.diff(ei, axis=1) >= 0).all(axis=1)
    brute = tables.evaluate(grid[ok], ei[ok]).min()
    cost, codes = min_cost(tables)
    assert cost == brute == count_params(decode(space, genes, np.array(codes)))


@pytest.mark.parametrize(
    "text, cost, limit",
    [
        ("flops=60G", "flops", 60e9),
        ("params<=60M", "params", 60e6),
        ("latency=50ms", "latency", 50.0),
        ("latency=0.5s", "latency", 500.0),
    ],
)
def test_parse_budget(text: str, cost: str, limit: float) -> None:
    b = parse_budget(text)
    assert (b.cost, b.limit) == (cost, limit)


# ---- evolutionary search -----------------------------------------------------------------------
def _settings(budgets: list[str], proxy: str = "entropy", iterations: int = 20000, seed: int = 0) -> SearchPlan:
    return SearchPlan(
        [parse_budget(b) for b in budgets],
        SPACE,
        proxy=proxy,
        seed=seed,
        evolution=EvolutionConfig(iterations=iterations),
    )


def _check_population(problem, result, budgets: dict[str, float]) -> None:
    for codes in result.codes:
        arch = decode(SPACE, problem.genes, codes)  # MerinoConfig validates non-decreasing widths
        widths = [b.embed_dim for b in arch.blocks]
        assert widths == sorted(widths)
        costs = {"flops": count_flops(arch), "params": count_params(arch)}
        assert all(costs[k] <= v for k, v in budgets.items())


@pytest.mark.parametrize("config", PAPER)
def test_search_beats_the_paper_recipe_at_its_cost(config: str) -> None:
    """At the paper recipe's own FLOPs, the searched recipe has at least its entropy."""
    paper = load_recipe(PAPER[config]).architecture
    flops = count_flops(paper)
    s = _settings([f"flops={flops}"])
    problem, result = run_search(s, progress=False)
    best = decode(SPACE, problem.genes, result.codes[0])
    assert ent.recipe_entropy(best)["total"] >= ent.recipe_entropy(paper)["total"]
    assert result.scores[0] == pytest.approx(ent.recipe_entropy(best)["total"])
    assert len(result.codes) == len(np.unique(result.codes, axis=0)) >= 2
    _check_population(problem, result, {"flops": flops})


def test_search_is_deterministic_and_respects_several_budgets() -> None:
    s = _settings(["flops=60G", "params=44M"], iterations=5000, seed=3)
    (p1, r1), (_, r2) = run_search(s, progress=False), run_search(s, progress=False)
    np.testing.assert_array_equal(r1.codes, r2.codes)
    assert r1.history == r2.history and r1.candidates == 5000
    _check_population(p1, r1, {"flops": 60e9, "params": 44e6})
    _, r3 = run_search(_settings(["flops=60G", "params=44M"], iterations=5000, seed=4), progress=False)
    assert not np.array_equal(r1.codes, r3.codes)


def test_baseline_proxies() -> None:
    p, params = run_search(_settings(["flops=60G"], proxy="params", iterations=5000), progress=False)
    best = decode(SPACE, p.genes, params.codes[0])
    assert params.scores[0] == count_params(best) - (50304 + 2048) * 768  # decoder parameters (LTS)
    _check_population(p, params, {"flops": 60e9})
    p, naive = run_search(_settings(["flops=60G"], proxy="naive"), progress=False)
    uniform = decode(SPACE, p.genes, naive.codes[0])
    assert len({(b.embed_dim, b.ffn, b.num_layers) for b in uniform.blocks}) == 1
    assert uniform.blocks[0].ffn in (4 * uniform.blocks[0].embed_dim, 4096)
    assert count_flops(uniform) <= 60e9
    e = ent.recipe_entropy
    _, entropy = run_search(_settings(["flops=60G"], iterations=5000), progress=False)
    assert e(decode(SPACE, p.genes, entropy.codes[0]))["total"] > max(e(best)["total"], e(uniform)["total"])


# ---- CLI ---------------------------------------------------------------------------------------
def test_search_cli_writes_recipe_plot_population(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "recipes" / "found.yaml"
    argv = [
        "search",
        "--config",
        str(REPO / "search" / "flops-60g.yaml"),
        "--budget",
        "flops=60G",
        "--budget",
        "params=50M",
        "--iterations",
        "3000",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    recipe = load_recipe(out)
    prov = recipe.provenance
    assert prov["budgets"] == ["flops=60G", "params=50M"] and prov["proxy"] == "entropy" and prov["seed"] == 1
    assert prov["entropy_config"]["eps"] == 1e-3 and prov["evolution"]["population"] == 512
    assert prov["evolution"]["iterations"] == 3000 and prov["space"]["num_blocks"] == 4
    assert prov["entropy"]["total"] == pytest.approx(ent.recipe_entropy(recipe.architecture)["total"], abs=1e-2)
    assert prov["costs"]["flops"] <= 60e9 and prov["costs"]["params"] <= 50e6
    # two budgets whose tightest admits ~5.8e8 pairs: too many to certify in passing, and it says so
    assert (
        prov["search"]["optimum"].startswith("not computed: several budgets")
        and "run --exhaustive" in prov["search"]["optimum"]
    )
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    pop = json.loads(out.with_suffix(".population.json").read_text())
    assert pop["population"][0]["score"] == pytest.approx(prov["proxy_score"], abs=1e-3)
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entropy"]["total"] == pytest.approx(prov["entropy"]["total"], abs=1e-2)
    from merino_pl.core.checkpoint import load_model

    model = load_model(out).model
    assert sum(p.numel() for p in model.parameters()) == prov["costs"]["params"]


def test_search_out_files_are_one_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """recipe + population + PNG: the recipe records its companions' SHA-256; a failure while
    writing leaves the previous run's three files untouched (and no temp file); a kill between
    the renames leaves a recipe whose hashes say the files do not belong together."""
    import hashlib
    import os

    from merino_pl.core import io
    from merino_pl.search import api as search_cli

    out = tmp_path / "r.yaml"
    files = [out, out.with_suffix(".population.json"), out.with_suffix(".png")]
    argv = [
        "search",
        "--budget",
        "params=60M",
        "--iterations",
        "300",
        "--population",
        "64",
        "--parents",
        "8",
        "--out",
        str(out),
    ]

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert main([*argv, "--seed", "1"]) == 0
    first = {p: p.read_bytes() for p in files}
    assert load_recipe(out).provenance["outputs"] == {p.name: digest(p) for p in files[1:]}

    def broken_plot(*_):  # the second run fails after its population JSON is written
        raise OSError("disk full")

    monkeypatch.setattr(search_cli, "plot", broken_plot)
    with pytest.raises(OSError):
        main([*argv, "--seed", "2", "--overwrite"])
    assert {p: p.read_bytes() for p in files} == first and sorted(tmp_path.iterdir()) == sorted(files)
    monkeypatch.undo()

    real_replace = os.replace

    def killed_after_the_png(src, dst):  # the renames go PNG, population, recipe: die between
        if Path(dst) == files[1]:
            raise RuntimeError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", killed_after_the_png)
    with pytest.raises(RuntimeError, match="killed"):
        main([*argv, "--seed", "3", "--overwrite"])
    monkeypatch.undo()
    assert out.read_bytes() == first[out] and files[2].read_bytes() != first[files[2]], "the PNG is the new run's"
    recorded = load_recipe(out).provenance["outputs"]
    sha = {p.name: digest(p) for p in files[1:]}
    assert recorded[files[1].name] == sha[files[1].name] and recorded[files[2].name] != sha[files[2].name]


def test_search_with_latency_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = _latency_table_for(SPACE).save(tmp_path / "dev.json")
    out = tmp_path / "lat.yaml"
    assert (
        main(
            [
                "search",
                "--budget",
                "latency=30ms",
                "--latency-table",
                str(table),
                "--iterations",
                "2000",
                "--no-plot",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    prov = load_recipe(out).provenance
    assert prov["costs"]["latency_ms"] <= 30 and prov["latency_table"]["file"] == str(table)


def test_shipped_search_configs_load() -> None:
    import argparse

    from merino_pl.search.api import resolve_plan
    from merino_pl.search.cli import add_arguments, settings

    for name in PAPER:
        p = argparse.ArgumentParser()
        add_arguments(p)
        s = resolve_plan(settings(p.parse_args(["--config", str(REPO / "search" / f"{name}.yaml")])))
        nominal = float(name.split("-")[1][:-1]) * 1e9  # the paper's printed budget
        assert nominal <= s.budgets[0].limit <= 1.02 * nominal
        assert s.evolution == EvolutionConfig() and s.entropy == ent.DEFAULT and s.space == SPACE


def _bad_space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


BAD = {
    "unmeetable": (["--budget", "flops=1G"], "flops=1G cannot be met"),
    "unknown-cost": (["--budget", "energy=3J"], "unknown cost 'energy'"),
    "no-budget": ([], "no budget"),
    "latency-without-table": (["--budget", "latency=5ms"], "needs --latency-table"),
    "bad-out": (["--budget", "flops=60G", "--out", "x.txt"], "must be a .yaml"),
    "empty-space": (["--budget", "flops=60G", "--space", "EMPTY"], "embed_dims is empty"),
    "contradictory-space": (["--budget", "flops=60G", "--space", "BOTH"], "exactly one of ffn_dims"),
    "two-problems": (["--budget", "flops=1x", "--budget", "energy=1"], "unit 'x'"),
    "parents-vs-population": (["--budget", "flops=60G", "--population", "32"], "must be smaller than population"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, needle = BAD[case]
    spaces = {
        "EMPTY": "embed_dims: []\nffn_dims: [128]\nnum_layers: [1]\n",
        "BOTH": "embed_dims: [64]\nffn_dims: [128]\nffn_ratios: [1]\nnum_layers: [1]\n",
    }
    argv = [_bad_space(tmp_path, spaces[a]) if a in spaces else a for a in argv]
    assert main(["search", *argv, "--iterations", "100"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    if case == "two-problems":
        assert "unknown cost 'energy'" in err  # every problem at once


def test_vectorised_entropy_equals_scalar_path() -> None:
    g = Genes.of(SPACE)
    rows = np.random.default_rng(0).choice(len(g.embed_dim), 50, replace=False)
    e, f, L = g.embed_dim[rows], g.ffn_dim[rows], g.num_layers[rows]
    mhsa, ffn = ent.block_entropies(e, f, L)
    want = [ent.block_entropy(int(a), int(b), int(c)) for a, b, c in zip(e, f, L)]
    np.testing.assert_allclose(np.stack([mhsa, ffn], 1), want, rtol=1e-12)


# ---- space and budgets hold the paper's recipes ------------------------------------------------
def _encode(space, arch) -> np.ndarray:
    """A recipe's blocks as the search's block codes (KeyError / ValueError if not in the space)."""
    ei = [space.embed_dims.index(b.embed_dim) for b in arch.blocks]
    fi = [space.ffn_choices.index(b.ffn_ratio if space.ffn_dims is None else b.ffn) for b in arch.blocks]
    li = [space.num_layers.index(b.num_layers) for b in arch.blocks]
    return Genes.encode(space, np.array(ei), np.array(fi), np.array(li))


@pytest.mark.parametrize("config", PAPER)
def test_paper_recipe_is_in_the_default_space_and_meets_its_budget(config: str) -> None:
    from merino_pl.search.api import build_problem

    arch = load_recipe(PAPER[config]).architecture
    space = load_space()  # the shipped default, as `merino-pl search` uses it
    assert space.to_dict() == SPACE.to_dict()
    codes = _encode(space, arch)
    assert decode(space, Genes.of(space), codes) == arch
    budget = yaml.safe_load((REPO / "search" / f"{config}.yaml").read_text())["budgets"][0]
    assert count_flops(arch) <= parse_budget(budget).limit
    score, _, ok = build_problem(SearchPlan([parse_budget(budget)], space)).evaluate(codes[None])
    assert ok[0] and score[0] == pytest.approx(ent.recipe_entropy(arch)["total"])


# ---- exhaustive search -------------------------------------------------------------------------
from merino_pl.core.costs import embedding_params  # noqa: E402
from merino_pl.search import exhaustive  # noqa: E402

TINY = {
    "num_blocks": 4,
    "embed_dims": [64, 128, 192],
    "ffn_ratios": [1, 2],
    "num_layers": [1, 2],
    "architecture": {"vocab_size": 512, "d_model": 128, "max_position_embeddings": 256},
}


def _brute_force(space) -> list[tuple[tuple[int, ...], dict[str, float]]]:
    """Every architecture of ``space`` with its proxies and costs, from the reference functions."""
    genes = Genes.of(space)
    rows = []
    for codes in itertools.product(range(len(genes.embed_idx)), repeat=space.num_blocks):
        widths = genes.embed_dim[list(codes)]
        if (np.diff(widths) < 0).any():
            continue
        arch = decode(space, genes, np.array(codes))
        rows.append(
            (
                codes,
                {
                    "entropy": ent.arch_entropy(arch)["total"],
                    "params_proxy": count_params(arch) - embedding_params(arch),
                    "flops": count_flops(arch),
                    "params": count_params(arch),
                },
            )
        )
    return rows


@pytest.mark.parametrize("proxy", ["entropy", "params"])
@pytest.mark.parametrize("two_budgets", [False, True], ids=["flops", "flops+params"])
def test_exhaustive_equals_brute_force_on_a_tiny_space(proxy: str, two_budgets: bool) -> None:
    from merino_pl.search.api import build_problem

    space = space_from_dict(TINY)
    rows = _brute_force(space)
    assert len(rows) == space.size()
    budgets = [f"flops={np.median([r['flops'] for _, r in rows])}"]
    if two_budgets:  # a params budget that cuts into the FLOPs-feasible set
        budgets.append(f"params={np.quantile([r['params'] for _, r in rows], 0.4)}")
    limits = {b.cost: b.limit for b in map(parse_budget, budgets)}
    key = "entropy" if proxy == "entropy" else "params_proxy"
    feasible = [(c, r[key]) for c, r in rows if all(r[k] <= v for k, v in limits.items())]
    best = max(v for _, v in feasible)
    problem = build_problem(SearchPlan([parse_budget(b) for b in budgets], space, proxy=proxy))
    opt = exhaustive.optimum(problem)
    assert opt.n_feasible == len(feasible) == exhaustive.count_feasible(problem)
    assert opt.score == pytest.approx(best, rel=1e-12)
    assert dict(feasible)[tuple(int(c) for c in opt.codes)] == pytest.approx(best, rel=1e-12)
    median = float(np.median([v for _, v in feasible]))  # rank = 1 + designs strictly better
    assert exhaustive.count_better(problem, median) == sum(v > median * (1 + 1e-9) for _, v in feasible)


@pytest.mark.parametrize("num_blocks", [1, 3, 5])
def test_exhaustive_any_number_of_blocks(num_blocks: int) -> None:
    from merino_pl.search.api import build_problem

    space = space_from_dict({**TINY, "num_blocks": num_blocks})
    n = len(Genes.of(space).embed_idx)
    grid = np.array(list(itertools.product(range(n), repeat=num_blocks)))
    problem = build_problem(SearchPlan([parse_budget("flops=1T")], space))
    cost = problem.evaluate(grid)[1][:, 0]
    problem = build_problem(SearchPlan([parse_budget(f"flops={np.median(cost)}")], space))
    score, _, ok = problem.evaluate(grid)
    opt = exhaustive.optimum(problem)
    assert opt.n_feasible == ok.sum() and opt.score == pytest.approx(score[ok].max(), rel=1e-12)


def test_exhaustive_cli_and_certified_evolution(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "opt.yaml"
    assert main(["search", "--config", str(REPO / "search" / "flops-60g.yaml"), "--exhaustive", "--out", str(out)]) == 0
    prov = load_recipe(out).provenance
    assert prov["search"]["method"] == "exhaustive" and prov["search"]["feasible"] > 10**8 and "evolution" not in prov
    assert "global optimum of" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".population.json").read_text())["population"][0]["score"] == pytest.approx(
        prov["proxy_score"]
    )
    ea = tmp_path / "ea.yaml"
    assert (
        main(
            [
                "search",
                "--config",
                str(REPO / "search" / "flops-60g.yaml"),
                "--iterations",
                "20000",
                "--no-plot",
                "--out",
                str(ea),
            ]
        )
        == 0
    )
    search = load_recipe(ea).provenance["search"]
    assert search["method"] == "evolution" and search["optimum"]["feasible"] == prov["search"]["feasible"]
    assert search["optimum"]["score"] == pytest.approx(prov["proxy_score"])
    assert search["optimum"]["fraction"] == pytest.approx(
        load_recipe(ea).provenance["proxy_score"] / prov["proxy_score"]
    )
    assert "of the global optimum" in capsys.readouterr().out


BAD_EXHAUSTIVE = {
    "with-iterations": (
        ["--budget", "flops=60G", "--exhaustive", "--iterations", "100"],
        "--exhaustive does not evolve: drop --iterations",
    ),
    "too-large": (
        ["--budget", "flops=1T", "--exhaustive", "--space", "HUGE"],
        "block sequences to enumerate in half of the space",
    ),
    "too-many-pairs": (
        ["--budget", "flops=1T", "--budget", "params=1T", "--exhaustive"],
        "give one budget or a smaller space",
    ),
    "unmeetable": (["--budget", "flops=1G", "--exhaustive"], "flops=1G cannot be met"),
}


@pytest.mark.parametrize("case", BAD_EXHAUSTIVE, ids=list(BAD_EXHAUSTIVE))
def test_exhaustive_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, needle = BAD_EXHAUSTIVE[case]
    huge = "num_blocks: 12\nembed_dims: {start: 64, stop: 1024, step: 64}\nffn_ratios: [1]\nnum_layers: [1, 2, 3, 4]\n"
    argv = [_bad_space(tmp_path, huge) if a == "HUGE" else a for a in argv]
    assert main(["search", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


# ---- the registry: proxies and budget kinds as plugins -----------------------------------------
PLUGIN = '''
import numpy as np

from merino_pl.search.api import register_budget, register_proxy
from merino_pl.search.budget import CostTables


@register_proxy("custom", arch=lambda arch, entropy: -float(sum(b.embed_dim for b in arch.blocks)))
def custom(plan, genes):
    """the narrowest blocks win"""
    return -genes.embed_dim.astype(float)


def layers(space, genes, latency):  # an entry point naming a function: registered under its name
    block = np.repeat(genes.num_layers[None, :].astype(float), space.num_blocks, axis=0)
    return CostTables("layers", 0.0, block, np.zeros((len(space.embed_dims),) * 2))
'''


def _plugin_dist(root: Path) -> Path:
    """A throwaway installed package: its module and a dist-info whose entry_points.txt names it
    in merino-pl's groups (what `pip install` of a package declaring them writes)."""
    root.mkdir()
    (root / "merino_custom_plugin.py").write_text(PLUGIN)
    info = root / "merino_custom_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: merino-custom-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[merino_pl.proxies]\ncustom = merino_custom_plugin\n\n"
        "[merino_pl.budgets]\nlayers = merino_custom_plugin:layers\n"
    )
    return root


def _search(argv: list[str], pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pythonpath or ""), str(REPO / "src")]))}
    cmd = [sys.executable, "-m", "merino_pl.cli", "search", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_plugin_proxy_and_budget_through_entry_points(tmp_path: Path) -> None:
    """Another package adds a proxy and a budget kind without editing merino-pl: the search
    finds them through the entry-point groups and uses them."""
    plugin = _plugin_dist(tmp_path / "site")
    out = tmp_path / "narrow.yaml"
    run = _search(["--budget", "layers=8", "--proxy", "custom", "--exhaustive", "--no-plot", "--out", str(out)], plugin)
    assert run.returncode == 0, run.stderr
    recipe = load_recipe(out)
    assert recipe.provenance["proxy"] == "custom" and recipe.provenance["budgets"] == ["layers=8"]
    widths = [b.embed_dim for b in recipe.architecture.blocks]
    assert widths == [SPACE.embed_dims[0]] * SPACE.num_blocks  # the custom objective's optimum
    assert sum(b.num_layers for b in recipe.architecture.blocks) <= 8
    assert recipe.provenance["proxy_score"] == -sum(widths)
    # without the plugin on the path the names are unknown, and the message lists the registered ones
    bad = _search(["--budget", "flops=60G", "--proxy", "custom", "--out", str(tmp_path / "x.yaml")])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "unknown proxy 'custom' (registered: entropy, params, naive, flops, layer_applications)" in bad.stderr
    bad = _search(["--budget", "layers=8", "--out", str(tmp_path / "x.yaml")])
    assert bad.returncode == 2 and "unknown cost 'layers' in budget 'layers=8' (valid: flops, params, latency)" in (
        bad.stderr
    )
    assert not (tmp_path / "x.yaml").exists()


def test_a_broken_plugin_is_one_line(tmp_path: Path) -> None:
    plugin = _plugin_dist(tmp_path / "site")
    (plugin / "merino_custom_plugin.py").write_text("raise ImportError('needs torch-nightly')\n")
    run = _search(["--budget", "flops=60G", "--proxy", "custom"], plugin)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "entry point custom = merino_custom_plugin (merino_pl.proxies): ImportError: needs torch-nightly" in (
        run.stderr
    )


@pytest.fixture
def registered_depth():
    """A proxy registered in this process by the decorator, removed afterwards."""
    from merino_pl.search import registry

    @registry.register_proxy("test-depth", arch=lambda arch, entropy: float(arch.num_layer_applications))
    def depth(plan, genes):
        return genes.num_layers.astype(float)

    yield depth
    del registry._REGISTRY[registry.PROXY_GROUP]["test-depth"]


def test_shipped_proxies_come_from_the_registry(registered_depth) -> None:
    """The search, its CLI check and the proxy study all read one registry: the shipped proxies
    and budget kinds are registered there like a plugin's, and one registered by the decorator
    is searched with and studied at once."""
    from merino_pl.search import budget, proxies, registry
    from merino_pl.study.proxies import analytic_proxies

    shipped = {n: p for n, p in registry.proxies().items() if n != "test-depth"}
    assert list(shipped) == ["entropy", "params", "naive", "flops", "layer_applications"]
    assert all(p.table is getattr(proxies, n) for n, p in shipped.items())
    assert {n: k.tables for n, k in registry.budget_kinds().items()} == {
        "flops": budget.flops_tables,
        "params": budget.params_tables,
        "latency": budget.latency_tables,
    }
    p, result = run_search(_settings(["params=50M"], proxy="test-depth", iterations=2000), progress=False)
    best = decode(SPACE, p.genes, result.codes[0])
    assert result.scores[0] == best.num_layer_applications == registered_depth(None, p.genes).max() * SPACE.num_blocks
    studied = analytic_proxies(best, {"paper": ent.DEFAULT})
    assert list(studied) == ["entropy:paper", "decoder_params", "flops", "layer_applications", "test-depth"]
    assert studied["test-depth"] == studied["layer_applications"] == best.num_layer_applications
    with pytest.raises(MerinoError, match="'test-depth' is registered twice"):
        registry.register_proxy("test-depth")(lambda plan, genes: genes.num_layers)


def test_search_refuses_an_existing_out_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe, and the PNG / population JSON never named on the command line: each is the
    user's until --overwrite says otherwise (byte-identical after a refusal)."""
    out = tmp_path / "r.yaml"
    argv = ["search", "--budget", "params=60M", "--iterations", "300", "--population", "64", "--parents", "8"]
    for existing in (out, out.with_suffix(".png"), out.with_suffix(".population.json")):
        existing.write_bytes(b"the user's own file\n")
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and f"{existing} already exists" in err, err
        assert "--overwrite" in err and sorted(tmp_path.iterdir()) == [existing]
        assert existing.read_bytes() == b"the user's own file\n"
        existing.unlink()
    out.with_suffix(".png").write_bytes(b"not ours\n")  # --no-plot writes no PNG: that one is no obstacle
    assert main([*argv, "--no-plot", "--out", str(out)]) == 0
    assert out.with_suffix(".png").read_bytes() == b"not ours\n"
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
