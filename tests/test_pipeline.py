"""``merino-pl pipeline``: stages run in order through the real CLIs, a failed stage is named and
resumed, a second run skips everything, a changed input re-runs that stage and what reads it.

One end-to-end run on the micro recipe (4 training steps, INT8 only, perplexity on a few
documents, 2 latency runs) keeps this to about a minute on one CPU thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from merino_pl.cli import main as cli_main
from merino_pl.eval.report import EvalModel, EvalReport
from merino_pl.latency.report import LatencyReport
from merino_pl.pipeline.api import PipelineSettings, RunLayout, build_stages
from test_fit import MICRO, fit_config  # noqa: F401  (the fixture is used by name)

STAGES = ["fit", "export", "quantize-int8", "eval-fp32", "eval-int8", "latency-fp32", "latency-int8", "plot"]


def pipeline_config(tmp_path: Path, fit_config: Path, eval_args: list[str]) -> Path:  # noqa: F811
    cfg = {
        "name": "micro-pipe",
        "out_dir": str(tmp_path / "out"),
        "recipe": str(tmp_path / "micro.yaml"),  # written by the fit_config fixture
        "fit": {"config": str(fit_config), "args": ["--trainer.max_steps", "4", "--model.warmup_steps", "1"]},
        "quantize": {
            "bits": [8],
            "args": ["--group-size", "16", "--nsamples", "4", "--seq-len", "32", "--holdout", "2"],
        },
        "eval": {"tasks": "none", "ppl": "wikitext2", "args": eval_args},
        "latency": {
            "precision": "fp32",
            "args": ["--runs", "2", "--warmup", "1", "--seq", "16", "--decode-tokens", "2"],
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def state(tmp_path: Path) -> dict:
    """The stages' entries of the run's state file."""
    return json.loads((tmp_path / "out" / "pipeline-state.json").read_text())["stages"]


def test_pipeline_runs_resumes_after_a_failure_then_skips_everything(tmp_path, fit_config, capsys):  # noqa: F811
    ok_eval = ["--data-files", "wikitext2=embedded", "--limit", "2"]
    # 1. an eval argument wrong only for the trained model (bad options fail up front, see below):
    #    fit, export and quantize finish, eval-fp32 fails and is named
    config = pipeline_config(tmp_path, fit_config, [*ok_eval, "--window", "4096"])
    assert cli_main(["pipeline", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "stage 'eval-fp32' failed" in err and "logs/eval-fp32.log" in err
    st = state(tmp_path)
    assert [st[s]["status"] for s in ("fit", "export", "quantize-int8", "eval-fp32")] == ["done"] * 3 + ["failed"]
    assert "latency-fp32" not in st
    ckpt_bytes = (tmp_path / "out" / "fit" / "checkpoints" / "last.ckpt").read_bytes()

    # 2. fixed: the finished stages are skipped, the rest run, summary.md links every report
    config = pipeline_config(tmp_path, fit_config, ok_eval)
    assert cli_main(["pipeline", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "export", "quantize-int8"):
        assert f"{name:<14} up to date" in out
    st = state(tmp_path)
    assert all(st[s]["status"] == "done" for s in STAGES), st
    assert (tmp_path / "out" / "fit" / "checkpoints" / "last.ckpt").read_bytes() == ckpt_bytes
    summary = (tmp_path / "out" / "summary.md").read_text()
    for link in (
        "eval/fp32/eval.md",
        "eval/int8/eval.md",
        "latency/int8/latency.md",
        "quantized/int8/quantize_report.md",
        "plots/accuracy-vs-latency.png",
        "## Perplexity and latency (paper Table 3 layout",
    ):
        assert link in summary, link
    assert "micro fp32 (ours)" in summary and "micro int8 (ours)" in summary
    # the summary step draws the run's pictures and shows them: no zero-shot task ran (tasks:
    # none), so perplexity-vs-latency stands in for the accuracy chart
    for png in ("training-loss.png", "perplexity-vs-latency.png", "precisions.png"):
        path = tmp_path / "out" / "plots" / png
        assert f"![plots/{png}](plots/{png})" in summary, png
        assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert summary.count("![plots/") == 3  # the paper-only accuracy chart is a link, not a 4th picture
    evals = {lb: json.loads((tmp_path / "out" / "eval" / lb / "eval.json").read_text()) for lb in ("fp32", "int8")}
    assert evals["int8"]["model"]["kind"] == "gptq" and evals["fp32"]["perplexity"]["wikitext2"]["word_perplexity"] > 1

    # the state records every file the run wrote (and nothing else is in the folder); the lock is gone
    files = json.loads((tmp_path / "out" / "pipeline-state.json").read_text())["files"]
    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert set(files) == written - {"pipeline-state.json"} and "fit/checkpoints/last.ckpt" in files
    assert not (tmp_path / ".out.lock").exists()

    # 3. nothing changed: every stage is skipped and summary.md is rewritten
    assert cli_main(["pipeline", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date (inputs unchanged), skipped") == len(STAGES)

    # a file of the user's in a stage folder stops the run (and --force all) before anything is touched
    notes = tmp_path / "out" / "quantized" / "int8" / "notes.txt"
    notes.write_text("mine\n")
    assert cli_main(["pipeline", "--config", str(config), "--force", "all"]) == 2
    err = capsys.readouterr().err
    assert "quantized/int8/notes.txt" in err and err.count("\n") == 1 and notes.read_text() == "mine\n"
    notes.unlink()

    # 4. a changed input: the dry run names that stage and every stage downstream of it
    cfg = yaml.safe_load(fit_config.read_text())
    cfg["model"]["lr"] = 1e-3
    fit_config.write_text(yaml.safe_dump(cfg))
    assert cli_main(["pipeline", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would run") == len(STAGES)
    # ... and --force of one late stage re-runs only that one, beside a folder of the user's
    # (--keep-unknown), which it leaves alone
    fit_config.write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], "lr": 3e-3}}))
    mine = tmp_path / "out" / "mine" / "notes.md"
    mine.parent.mkdir()
    mine.write_text("mine\n")
    assert cli_main(["pipeline", "--config", str(config), "--force", "plot", "--keep-unknown"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(STAGES) - 1 and "[8/8] plot           done" in out
    assert mine.read_text() == "mine\n"


def test_search_stage_feeds_fit(tmp_path):
    (tmp_path / "fit.yaml").write_text("trainer: {}\n")
    config = tmp_path / "p.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "search": {"config": "search/cpu-demo.yaml", "args": ["--iterations", "600"]},
                "fit": {"config": str(tmp_path / "fit.yaml")},
            }
        )
    )
    stages = build_stages(PipelineSettings.load(config, str(tmp_path / "out")))
    assert [s.name for s in stages] == ["search", "fit", "export"]
    recipe = str(tmp_path / "out" / "search" / "recipe.yaml")
    assert stages[0].argv[:3] == ["search", "--out", recipe] and stages[0].argv[-2:] == ["--iterations", "600"]
    fit = stages[1].argv
    assert fit[fit.index("--model.recipe") + 1] == recipe and Path(recipe) in stages[1].inputs
    assert fit[-2:] == ["--ckpt_path", "last"]  # a killed fit resumes from its last checkpoint


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "x", "recipe": "merino-tiny", "fit": {"config": "f.yaml"}, "serach": {}}, "unknown key 'serach'"),
        (
            {"name": "x", "recipe": "merino-tiny", "search": {"config": "s.yaml"}, "fit": {"config": "f.yaml"}},
            "exactly one of 'recipe'",
        ),
        ({"name": "x", "recipe": "merino-tiny"}, "fit.config"),
        (
            {"name": "x", "recipe": "merino-tiny", "fit": {"config": "f.yaml"}, "eval": {"taks": "paper"}},
            "unknown key eval.'taks'",
        ),
        ({"name": "x", "recipe": "merino-tiny", "fit": {"config": "f.yaml", "args": "--x"}}, "fit.args must be a list"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, config, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and str(path) in err


def test_missing_config_and_unknown_force_stage_exit_2(tmp_path, capsys):
    assert cli_main(["pipeline", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    (tmp_path / "f.yaml").write_text("trainer: {}\n")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "recipe": "merino-tiny", "fit": {"config": str(tmp_path / "f.yaml")}}))
    assert cli_main(["pipeline", "--config", str(path), "--out-dir", str(tmp_path / "o"), "--force", "evl"]) == 2
    assert "--force evl: no such stage (stages: fit, export)" in capsys.readouterr().err


def test_shipped_demo_pipeline_parses():
    repo = Path(__file__).resolve().parents[1]
    stages = build_stages(PipelineSettings.load(repo / "recipes" / "pipeline" / "cpu-demo.yaml"))
    assert [s.name for s in stages] == [
        "search",
        "fit",
        "export",
        "quantize-int8",
        "quantize-int4",
        "eval-fp32",
        "eval-int8",
        "eval-int4",
        "latency-fp32",
        "latency-int8",
        "latency-int4",
        "plot",
    ]
    for s in stages:
        assert s.argv[0] in {"search", "fit", "export", "quantize", "eval", "latency"}, s.argv


@pytest.mark.parametrize("dry_run", [True, False])
def test_every_stage_checks_its_arguments_before_the_first_runs(tmp_path, capsys, dry_run):
    """Each stage's own validator runs up front: a bad quantize or latency option fails in
    seconds, not after fit and export (files earlier stages will write are not "missing")."""
    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "recipe": "merino-tiny",
                "out_dir": str(tmp_path / "out"),
                "fit": {"config": str(repo / "recipes" / "fit" / "cpu-demo.yaml"), "args": ["--model.lr", "-1"]},
                "quantize": {"bits": [3]},
                "latency": {"precision": "fp64"},
            }
        )
    )
    assert cli_main(["pipeline", "--config", str(path), *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for part in (
        "quantize-int3: --bits 3 is not supported",
        "latency-fp32: --precision fp64",
        "fit: bad fit config: model.lr",
    ):
        assert part in err, (part, err)
    assert "export" not in err and "not found" not in err  # the checkpoint and model dir are pending
    assert not (tmp_path / "out" / "fit").exists()


# ---- the summary's pictures (OUT/plots) -------------------------------------------------------------
def _reports(out: Path, accuracy: float | None) -> None:
    """An eval and a latency report per precision, as `merino-pl eval` / `latency` write them."""
    for i, label in enumerate(("fp32", "int8")):
        tasks = (
            {"arc_easy": {"status": "ok", "value": accuracy}}
            if accuracy is not None
            else {"arc_easy": {"status": "skipped"}}
        )
        (out / "eval" / label).mkdir(parents=True)
        model = EvalModel("micro", str(out / "model"), "hf-dir", None, 0.5, 0.1, 64, {})
        report = EvalReport(model, tasks, {"wikitext2": {"status": "ok", "word_perplexity": 900.0 + 50 * i}})
        (out / "eval" / label / "eval.json").write_text(json.dumps(report.to_json()))
        rows = [
            {
                "model": "micro",
                "role": "model",
                "precision": label,
                "path": "plain",
                "flops_g": 0.1,
                "prefill_ms": {"mean": 3.0 - i},
            }
        ]
        if label == "fp32":
            rows.append(
                {
                    "model": "pythia-70m",
                    "role": "peer",
                    "precision": "fp32",
                    "path": "plain",
                    "flops_g": 100,
                    "prefill_ms": {"mean": 40.0},
                }
            )
        (out / "latency" / label).mkdir(parents=True)
        latency = LatencyReport(
            model={"name": "micro"},
            device={"summary": "test CPU"},
            torch="",
            transformers="",
            onnxruntime=None,
            precisions=[label],
            protocol={"batch": 1, "seq_len": 16, "runs": 2},
            rows=rows,
            generation=[],
            paper_protocol=None,
            speedups=[],
            fast_path=[],
            checks=[],
            skipped=[],
            warnings=[],
        )
        (out / "latency" / label / "latency.json").write_text(json.dumps(latency.to_json()))
        (out / ("model" if label == "fp32" else f"quantized/{label}")).mkdir(parents=True)
        (out / ("model" if label == "fp32" else f"quantized/{label}") / "model.safetensors").write_bytes(
            b"0" * (4_000_000 >> i)
        )


def _layout(out: Path) -> RunLayout:
    """The layout of a run with fp32 and int8 models, every stage on."""
    return RunLayout(out, {"fp32": out / "model", "int8": out / "quantized" / "int8"}, True, True, True, True)


def test_summary_plots_loss_curve_from_every_csv_version_and_accuracy_when_known(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    from merino_pl.pipeline.plots import loss_history, summary_plots
    from merino_pl.pipeline.reports import load_reports

    out = tmp_path / "out"
    for version, steps in ((0, range(0, 30)), (1, range(20, 40))):  # a resumed fit: two CSV versions
        logger = CSVLogger(out / "fit", name="logs", version=version)
        for step in steps:
            logger.log_metrics({"train/loss": 10.0 - step / 10 + version}, step=step)
        logger.log_metrics({"val/loss": 7.5 + version}, step=steps[-1])
        logger.save()
    train, val = loss_history(out / "fit")
    assert list(train) == list(range(40)) and train[25] == 10.0 - 2.5 + 1  # the later version wins
    assert val == {29: 7.5, 39: 8.5}

    _reports(out, accuracy=0.41)
    layout = _layout(out)
    assert (
        cli_main(
            [
                "latency",
                "plot",
                "--latency",
                str(out / "latency/fp32/latency.json"),
                "--eval",
                str(out / "eval/fp32/eval.json"),
                "--out",
                str(out / "plots/accuracy-vs-latency.png"),
            ]
        )
        == 0
    )
    lines, shown = summary_plots(layout, load_reports(layout))
    text = "\n".join(lines)
    for png in ("training-loss.png", "accuracy-vs-latency.png", "precisions.png"):
        assert f"![plots/{png}](plots/{png})" in text and (out / "plots" / png).stat().st_size > 10_000, png
    assert "perplexity-vs-latency" not in text and not (out / "plots" / "perplexity-vs-latency.png").exists()


def test_summary_plots_perplexity_vs_latency_without_accuracy(tmp_path):
    from merino_pl.pipeline.plots import precision_rows, summary_plots
    from merino_pl.pipeline.reports import load_reports

    out = tmp_path / "out"
    _reports(out, accuracy=None)
    layout = _layout(out)
    reports = load_reports(layout)
    rows = precision_rows(reports)
    assert [(r.label, r.size_mb, r.perplexity, r.latency_ms) for r in rows] == [
        ("fp32", 4.0, 900.0, 3.0),
        ("int8", 2.0, 950.0, 2.0),
    ]
    lines, _ = summary_plots(layout, reports)
    text = "\n".join(lines)
    assert "![plots/perplexity-vs-latency.png]" in text and "no CSVLogger" in text  # no fit logs here
    assert (out / "plots" / "perplexity-vs-latency.png").stat().st_size > 10_000
