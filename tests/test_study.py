"""The proxy study: uniform sampling, statistics, resumable runs, report, calibrate -> search."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from merino_pl.core.space import space_from_dict
from merino_pl.search.budget import Genes, parse_budget
from merino_pl.study.calibrate import cross_validate
from merino_pl.study.sample import draw, feasible, sample_codes, width_sequences
from merino_pl.study.stats import correlate

ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = {
    "num_blocks": 2,
    "embed_dims": [64, 128],
    "ffn_ratios": [1, 2],
    "num_layers": [1, 2],
    "architecture": {"vocab_size": 512, "d_model": 64, "max_position_embeddings": 64},
}


def _all_feasible(space, budgets) -> set[tuple[int, ...]]:
    genes = Genes.of(space)
    rows = [
        c
        for c in itertools.product(range(len(genes.embed_idx)), repeat=space.num_blocks)
        if all(genes.embed_idx[a] <= genes.embed_idx[b] for a, b in zip(c, c[1:]))
    ]
    codes = np.array(rows)
    return {tuple(r) for r in codes[feasible(space, genes, budgets, codes)].tolist()}


def test_sampling_is_the_feasible_set_reproducibly():
    space = space_from_dict(TINY_SPACE)
    budgets = [parse_budget("flops=1.6G")]
    every = _all_feasible(space, budgets)
    assert 4 < len(every) < space.size()  # the budget excludes some designs
    sample = sample_codes(space, budgets, len(every), seed=3)
    assert {tuple(r) for r in sample.tolist()} == every  # distinct, feasible, complete
    assert np.array_equal(sample, sample_codes(space, budgets, len(every), seed=3))
    assert not np.array_equal(sample, sample_codes(space, budgets, len(every), seed=4))
    assert np.array_equal(sample_codes(space, budgets, 5, seed=3), sample[:5])  # a larger study extends a smaller one


def test_draws_are_uniform_over_the_feasible_set():
    space = space_from_dict(TINY_SPACE)
    budgets = [parse_budget("flops=1.6G")]
    genes = Genes.of(space)
    codes = draw(space, width_sequences(space), np.random.default_rng(0), 200_000)
    kept = codes[feasible(space, genes, budgets, codes)]
    _, counts = np.unique(kept, axis=0, return_counts=True)
    assert len(counts) == len(_all_feasible(space, budgets))
    assert stats.chisquare(counts).pvalue > 1e-3


def test_rank_correlations_equal_a_hand_computed_case():
    x, y = np.array([1, 2, 3, 4, 5]), np.array([2, 1, 4, 3, 5])
    c = correlate(x, y, resamples=200)
    assert c.spearman == pytest.approx(1 - 6 * 4 / (5 * 24))  # d = 1,1,1,1,0
    assert c.kendall == pytest.approx((8 - 2) / 10)  # 8 concordant, 2 discordant pairs
    assert c.spearman_ci[0] <= c.spearman <= c.spearman_ci[1] + 1e-9


def test_cross_validation_picks_the_informative_setting():
    rng = np.random.default_rng(0)
    target = rng.normal(size=24)
    scores = np.stack([rng.normal(size=24), target + 0.1 * rng.normal(size=24), rng.normal(size=24)])
    cv = cross_validate(scores, target, folds=4, repeats=5)
    assert cv["most_chosen"] == 1 and cv["cv_rho_mean"] > 0.8


def _tiny_study(tmp_path: Path, architectures: int = 4) -> Path:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    fit = yaml.safe_load((ROOT / "recipes/fit/study-cpu.yaml").read_text())
    fit["trainer"]["max_steps"], fit["model"]["warmup_steps"] = 4, 1
    fit["data"]["seq_len"], fit["data"]["batch_size"] = 32, 2
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    study = {
        "name": "tiny",
        "space": "space.yaml",
        "budgets": ["flops=1.6G"],
        "architectures": architectures,
        "seed": 1,
        "noise_ceiling": {"architectures": 0, "seed": 2},
        "fit": {"config": "fit.yaml"},
        "tokenizer": {"vocab_size": 300},
        "heldout": {"sequences": 8, "cross_domain": "wikitext2"},
        "proxies": {"batches": 1, "batch_size": 2, "entropy": {"paper": {"beta": 0.0625}, "beta1": {"beta": 1.0}}},
        "head_to_head": {
            "searches": {"paper": {"proxy": "entropy"}, "params": {"proxy": "params"}},
            "uniform": True,
            "seeds": [5],
            "args": ["--trainer.max_steps", "6"],
        },
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return tmp_path / "study.yaml"


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "merino_pl.cli", *args], capture_output=True, text=True, env=env, **kw)


@pytest.mark.slow
def test_study_runs_resumes_reports_and_calibrates_for_search(tmp_path):
    config, out = _tiny_study(tmp_path), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "merino_pl.cli",
            "study",
            "run",
            "--config",
            str(config),
            "--out",
            str(out),
            "--no-report",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not list((out / "results").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # kill the study and its worker mid-way
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert done, "no run finished before the kill"
    r = _cli("study", "run", "--config", str(config), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(done)} of 4 runs finished" in r.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert len(after) == 4 and all(after[k] == v for k, v in done.items())  # nothing finished was re-trained
    report = json.loads((out / "report.json").read_text())
    assert {
        "entropy:paper",
        "entropy:beta1",
        "decoder_params",
        "flops",
        "layer_applications",
        "ntk_cond",
        "dss",
    } <= set(report["correlations"])
    assert (out / "proxies.png").is_file() and (out / "report.md").is_file()
    r = _cli("study", "run", "--config", str(config), "--out", str(out), "--no-report")
    assert r.returncode == 0 and "4 of 4 runs finished, 0 to train" in r.stdout
    # calibrate -> an entropy config that search reads and records
    cal = tmp_path / "entropy.yaml"
    r = _cli("study", "calibrate", str(out / "report.json"), "--out", str(cal), "--folds", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    best = yaml.safe_load(cal.read_text())["entropy"]
    before = cal.read_bytes()  # an existing --out is replaced only with --overwrite
    r = _cli("study", "calibrate", str(out / "report.json"), "--out", str(cal), "--folds", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert cal.read_bytes() == before
    r = _cli("study", "calibrate", str(out / "report.json"), "--out", str(cal), "--folds", "2", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    recipe = tmp_path / "r.yaml"
    r = _cli("search", "--config", str(cal), "--budget", "flops=60G", "--out", str(recipe), "--no-plot")
    assert r.returncode == 0, r.stderr[-2000:]
    recorded = yaml.safe_load(recipe.read_text())["provenance"]["entropy_config"]
    assert {k: recorded[k] for k in best} == best


def test_study_bad_inputs_are_one_line(tmp_path):
    config = _tiny_study(tmp_path)
    data = yaml.safe_load(config.read_text())
    data.update(architectures=2, budgets=["flops=1k"], bogus=1)
    config.write_text(yaml.safe_dump(data))
    r = _cli("study", "run", "--config", str(config), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "bogus" in r.stderr and "architectures must be an integer >= 4" in r.stderr
    r = _cli("study", "report", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not a study directory" in r.stderr
    r = _cli("study", "run", "--config", str(config), "--out", str(tmp_path / "o"), "--jobs", "0")
    assert r.returncode == 2


def test_shipped_study_config_loads():
    from merino_pl.study.config import load_study_config
    from merino_pl.study.runs import plan_runs

    cfg = load_study_config(ROOT / "search" / "study-cpu.yaml")
    runs = plan_runs(cfg, base_lr=2e-3)  # the fit config's lr: the grid's 2e-3 runs are the study's own
    main = [r for r in runs if r.length == 1 and r.lr is None]
    assert len(main) == cfg.architectures + cfg.ceiling_architectures >= 24 + 8
    assert len(runs) == len(main) + 8 + 8 * 2 + 8  # 4x, the two other lrs, the 4x seed re-runs
    assert len({r.id for r in runs}) == len(runs)
    assert cfg.vocab_size <= cfg.space.architecture["vocab_size"]


@pytest.mark.slow
def test_compare_trains_each_distinct_recipe_once_per_seed_and_resumes(tmp_path):
    from merino_pl.core.costs import count_flops
    from merino_pl.study.compare import contenders
    from merino_pl.study.config import load_study_config

    config = _tiny_study(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["head_to_head"]["searches"]["paper_again"] = {"proxy": "entropy", "entropy": {"beta": 0.0625}}
    data["head_to_head"]["seeds"] = [5, 6]
    data["head_to_head"]["args"] += ["--trainer.log_every_n_steps", "2"]
    config.write_text(yaml.safe_dump(data))
    cfg = load_study_config(config)
    archs = contenders(cfg)
    assert (
        list(archs)[0] == "uniform"
        and set(archs) == {"uniform", "paper", "params", "paper_again"}
        and archs["paper_again"] == archs["paper"]
    )
    uniform = archs["uniform"].blocks
    assert len({(b.embed_dim, b.ffn, b.num_layers) for b in uniform}) == 1
    assert count_flops(archs["uniform"]) <= cfg.budgets[0].limit
    distinct = len({json.dumps(a.to_dict(), sort_keys=True) for a in archs.values()})
    out = tmp_path / "h2h"
    r = _cli("study", "compare", "--config", str(config), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "paper_again finds the same recipe as paper" in r.stdout
    assert len(list((out / "results").glob("*.json"))) == 2 * distinct  # duplicates trained once per seed
    table = json.loads((out / "compare.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    assert set(rows) == set(archs)
    for name, row in rows.items():  # every setting that found the same recipe is named beside it
        assert set(row["same_as"]) == {n for n, a in archs.items() if a == archs[name] and n != name}
    for row in rows.values():
        assert sorted(row["seeds"]) == [5, 6] and row["indomain"]["loss_sd"] >= 0
        assert np.isfinite(row["indomain"]["ppl_mean"]) and np.isfinite(row["wikitext2"]["ppl_mean"])
    assert rows["paper"]["indomain"] == rows["paper_again"]["indomain"]
    assert table["baseline"] == "uniform" and "vs" not in rows["uniform"]
    for name, row in rows.items():  # paired by seed against the uniform decoder
        if archs[name] != archs["uniform"]:
            vs = row["vs"]["indomain"]
            assert (
                vs["seeds"] == 2
                and 0 <= vs["wins"] <= 2
                and vs["delta_mean"]
                == pytest.approx(row["indomain"]["loss_mean"] - rows["uniform"]["indomain"]["loss_mean"], abs=2e-4)
            )
    assert "| paper_again (= " in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 10_000
    curves = json.loads((out / "curves.json").read_text())  # training loss kept beside the results
    assert set(curves) == {p.stem for p in (out / "results").glob("*.json")}
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    r = _cli("study", "compare", "--config", str(config), "--out", str(out))
    assert r.returncode == 0 and f"{2 * distinct} of {2 * distinct} runs finished, 0 to train" in r.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}


def _synthetic_regime_study(tmp_path: Path) -> Path:
    """The shipped CPU study's first 8 architectures (manifest + both seeds' 1x results), with 4x and
    lr-grid results made up so that the answer is known: at 4x held-out loss falls with decoder
    parameters exactly; at lr 1e-3 every architecture is worse than at 2e-3 except a000 and a001."""
    from merino_pl.study.regime import decoder_params

    src, out = ROOT / "docs/study/cpu", tmp_path / "study"
    (out / "results").mkdir(parents=True)
    manifest = json.loads((src / "study.json").read_text())
    manifest["fit_config"] = str(ROOT / "recipes/fit/study-cpu.yaml")  # the main runs' lr (2e-3) is read there
    (out / "study.json").write_text(json.dumps(manifest))
    for i in range(8):
        for seed in (1, 2):
            r = json.loads((src / "results" / f"a{i:03d}-s{seed}.json").read_text())
            (out / "results" / f"{r['id']}.json").write_text(json.dumps(r))
            p = decoder_params(r["architecture"])
            x4 = {**r, "id": f"{r['id']}-x4", "steps": 4 * r["steps"], "half_step": 4 * r["half_step"]}
            x4["heldout"] = {h: {"half": 5 - p / 1e7, "full": 4 - p / 1e7 + 1e-3 * seed} for h in r["heldout"]}
            (out / "results" / f"{x4['id']}.json").write_text(json.dumps(x4))
            if seed == 1:
                for lr, delta in ((0.001, -0.1 if i < 2 else 0.1), (0.004, 0.2)):
                    v = {**r, "id": f"{r['id']}-lr{lr:g}", "lr": lr}
                    v["heldout"] = {h: {k: x + delta for k, x in d.items()} for h, d in r["heldout"].items()}
                    (out / "results" / f"{v['id']}.json").write_text(json.dumps(v))
    return out


def test_a_moved_fit_config_is_found_through_the_study_config(tmp_path, monkeypatch):
    """study.json records the fit config's path; where that file has moved since (recipes/train/ to
    recipes/fit/), the one the study config names now stands in, but only with the recorded data."""
    from merino_pl.study.runs import fit_config_of

    monkeypatch.chdir(ROOT)  # the shipped study ran here: its config_file is search/study-cpu.yaml
    manifest = json.loads((ROOT / "docs/study/cpu/study.json").read_text())
    manifest["fit_config"] = str(tmp_path / "moved" / "study-cpu.yaml")
    assert fit_config_of(manifest).resolve() == ROOT / "recipes/fit/study-cpu.yaml"
    assert fit_config_of({**manifest, "data": {**manifest["data"], "val_fraction": 0.5}}) is None
    assert fit_config_of({**manifest, "config_file": str(tmp_path / "gone.yaml")}) is None
    here = tmp_path / "fit.yaml"
    here.write_text("model: {lr: 1.0e-3}\n")
    assert fit_config_of({**manifest, "fit_config": str(here)}) == here


def test_regime_report_ranks_per_length_and_picks_each_best_lr(tmp_path):
    study = _synthetic_regime_study(tmp_path)
    r = _cli("study", "regime", str(study), "--bootstrap", "200")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((study / "regime.json").read_text())
    pts = report["points"]
    assert [(p["length"], p["checkpoint"]) for p in pts] == [(1, "half"), (1, "full"), (4, "half"), (4, "full")]
    assert [p["tokens"] for p in pts] == [600 * 1024, 1200 * 1024, 2400 * 1024, 4800 * 1024]
    assert pts[0]["tokens_per_decoder_param"] < pts[-1]["tokens_per_decoder_param"]
    x4 = pts[-1]["heldout"]["indomain"]
    assert x4["correlations"]["decoder_params"]["spearman"] == pytest.approx(1.0)
    assert x4["noise_ceiling"]["spearman"] == pytest.approx(1.0) and x4["noise_ceiling"]["n"] == 8
    one = pts[1]["heldout"]["indomain"]  # the real 1x study: decoder params rank backwards there
    assert one["correlations"]["decoder_params"]["spearman"] < 0 and one["noise_ceiling"]["n"] == 8
    grid = report["lr_grid"]["heldout"]["indomain"]
    assert report["lr_grid"]["lrs"] == [0.001, 0.002, 0.004]
    assert {i: row["best_lr"] for i, row in grid["rows"].items()} == {
        str(i): 0.001 if i < 2 else 0.002 for i in range(8)
    }
    assert set(grid["correlations"]["decoder_params"]) == {"fixed_lr", "best_lr"}
    from merino_pl.core.evidence import judge, load_evidence

    ev = load_evidence(study / "proxy-evidence.json")  # what `search --tokens` reads: the decayed points only
    assert [p["tokens"] for p in ev["points"]] == [1200 * 1024, 4800 * 1024]
    at4x = judge(ev, "params", "decoder_params", pts[-1]["tokens_per_decoder_param"] * 1.2)
    assert at4x.status == "measured" and at4x.rho == pytest.approx(1.0) and "ranks forwards" in at4x.line()
    far = judge(ev, "params", "decoder_params", 1000.0)
    assert far.status == "unvalidated" and "unvalidated" in far.line()
    md = (study / "regime.md").read_text()
    assert "| 4.92 M |" in md and "best lr" in md and (study / "regime.png").stat().st_size > 20_000


def test_study_lengths_and_lr_grid_are_checked_and_planned(tmp_path):
    from merino_pl.study.config import load_study_config
    from merino_pl.study.runs import Run, plan_runs

    config = _tiny_study(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["lengths"] = {"multiples": [2], "architectures": 4, "ceiling": 2}
    data["lr_grid"] = {"lrs": [1e-3, 2e-3, 4e-3], "architectures": 2}
    config.write_text(yaml.safe_dump(data))
    cfg = load_study_config(config)
    ids = [r.id for r in plan_runs(cfg, base_lr=2e-3)]
    assert ids[4:] == [
        *[f"a{i:03d}-s1-x2" for i in range(4)],
        "a000-s1-lr0.001", "a000-s1-lr0.004", "a001-s1-lr0.001", "a001-s1-lr0.004",
        "a000-s2-x2", "a001-s2-x2",
    ]  # fmt: skip
    assert all(Run.parse(i).id == i for i in ids)
    assert Run.parse("a001-s1-x2").args(4) == ["--trainer.max_steps", "8"]
    assert Run.parse("a001-s1-lr0.004").args(4) == ["--model.lr", "0.004"]
    for key, bad, named in [
        ("lengths", {"multiples": [0, 2]}, "lengths.multiples"),
        ("lengths", {"multiples": [2, 2]}, "lengths.multiples"),
        ("lengths", {"multiples": ["4x"]}, "'4x'"),
        ("lengths", {"multiples": [4], "architectures": 9}, "lengths.architectures 9"),
        ("lengths", {"multiples": [4], "ceiling": 5, "architectures": 4}, "lengths.ceiling 5"),
        ("lr_grid", {"lrs": [1e-3]}, "lr_grid.lrs"),
        ("lr_grid", {"lrs": [1e-3, -1]}, "-1"),
        ("lr_grid", {"lrs": [1e-3, 2e-3], "bogus": 1}, "lr_grid.bogus"),
    ]:
        config.write_text(yaml.safe_dump({**data, key: bad}))
        r = _cli("study", "run", "--config", str(config), "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and named in r.stderr, (bad, r.stderr)
    assert not (tmp_path / "o").exists()


def test_study_damaged_results_and_options_are_one_line(tmp_path):
    study = _synthetic_regime_study(tmp_path)
    r = _cli("study", "report", str(study), "--bootstrap", "0")
    assert r.returncode == 2 and "--bootstrap must be >= 100" in r.stderr and not (study / "report.json").exists()
    bad = study / "results" / "a003-s1.json"
    bad.write_text(bad.read_text()[:200])  # truncated
    r = _cli("study", "report", str(study))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr
    from merino_pl.study.runs import read_result

    assert read_result(study, "a003-s1") is None and read_result(study, "a004-s1") is not None  # re-trained by `run`
    config = _tiny_study(tmp_path)
    data = yaml.safe_load(config.read_text())
    for seeds in ([], [5, 5], "5"):
        data["head_to_head"]["seeds"] = seeds
        config.write_text(yaml.safe_dump(data))
        r = _cli("study", "compare", "--config", str(config), "--out", str(tmp_path / "h2h"))
        assert r.returncode == 2 and "head_to_head.seeds" in r.stderr and repr(seeds) in r.stderr


@pytest.mark.slow
def test_a_two_length_study_with_an_lr_grid_trains_and_reports_each(tmp_path):
    """Real runs: the 1x study, the same 4 designs at 2x the steps, and at a second lr; `study run`
    writes the regime report (rho per length) and picks each design's best lr from the losses."""
    config, out = _tiny_study(tmp_path), tmp_path / "out"
    data = yaml.safe_load(config.read_text())
    data["lengths"] = {"multiples": [2], "architectures": 4}
    data["lr_grid"] = {"lrs": [2e-3, 4e-3], "architectures": 4}  # 2e-3 is the fit config's: the 1x runs
    config.write_text(yaml.safe_dump(data))
    r = _cli("study", "run", "--config", str(config), "--out", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert set(results) == {f"a{i:03d}-s1{t}" for i in range(4) for t in ("", "-x2", "-lr0.004")}
    assert {results[f"a000-s1{t}"]["steps"] for t in ("", "-lr0.004")} == {4} and results["a000-s1-x2"]["steps"] == 8
    assert results["a001-s1-lr0.004"]["lr"] == 0.004 and results["a001-s1"]["lr"] == 0.002
    regime = json.loads((out / "regime.json").read_text())
    assert [(p["length"], p["checkpoint"], p["steps"]) for p in regime["points"]] == [
        (1, "half", 2), (1, "full", 4), (2, "half", 4), (2, "full", 8)
    ]  # fmt: skip
    assert all("decoder_params" in p["heldout"]["indomain"]["correlations"] for p in regime["points"])
    rows = regime["lr_grid"]["heldout"]["indomain"]["rows"]
    for i, row in rows.items():
        losses = {0.002: results[f"a{int(i):03d}-s1"], 0.004: results[f"a{int(i):03d}-s1-lr0.004"]}
        best = min(losses, key=lambda lr: losses[lr]["heldout"]["indomain"]["full"])
        assert row["best_lr"] == best
    assert (out / "regime.png").is_file() and (out / "proxy-evidence.json").is_file()
