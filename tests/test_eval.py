"""Evaluation: the real lm-eval ``simple_evaluate`` offline on local task YAMLs, both backends,
perplexity against lm-eval's ``wikitext`` arithmetic, and ``merino-pl eval`` end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_arch
from merino_pl.cli import main
from merino_pl.core.checkpoint import export_pretrained, load_model
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.io import sha256_file

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from merino_pl.core.tokenizer import load_tokenizer  # noqa: E402
from merino_pl.eval.harness import MerinoLM, hf_lm  # noqa: E402
from merino_pl.eval.perplexity import perplexity, wikitext_pages, windows  # noqa: E402
from merino_pl.eval.tasks import paper_baselines, paper_tasks  # noqa: E402

ARC = [
    ("Which of these is a planet?", ["Mars", "the Moon", "a comet", "the Sun"], "A"),
    ("What do plants need to make food?", ["sunlight", "darkness", "plastic"], "A"),
    ("Water freezes at what temperature in Celsius?", ["100", "0", "50", "-40"], "B"),
    ("Which animal can fly?", ["a dog", "a fish", "a sparrow"], "C"),
]
PPL_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 12,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Language models assign probabilities to sequences of words; perplexity measures how well. " * 5,
]
PPL_TASK = """task: ppl_local
dataset_path: json
dataset_kwargs: {data_files: {test: %s}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
metadata: {version: 1.0}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model over the real GPT-NeoX vocabulary (context 128), exported like `merino-pl export`."""
    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=50304))
    return export_pretrained(model, tmp_path_factory.mktemp("eval") / "tiny")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The shipped eval/tasks YAMLs pointed at small local jsonl files, plus a rolling-ppl task."""
    d = tmp_path_factory.mktemp("tasks")
    for f in (REPO / "eval" / "tasks").iterdir():
        shutil.copy(f, d / f.name)
    arc = d / "arc.jsonl"
    arc.write_text(
        "".join(
            json.dumps(
                {"id": f"q{i}", "question": q, "answerKey": a, "choices": {"text": c, "label": list("ABCD"[: len(c)])}}
            )
            + "\n"
            for i, (q, c, a) in enumerate(ARC)
        )
    )
    cfg = d / "arc_easy_local.yaml"
    cfg.write_text(cfg.read_text().replace("/data/eval/arc_easy_test.jsonl", str(arc)))
    texts = d / "ppl.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in PPL_TEXTS))
    (d / "ppl_local.yaml").write_text(PPL_TASK % texts)
    return d


def _per_sample(results: dict, task: str) -> list[float]:
    return [
        float(r[0]) if isinstance(r, (list, tuple)) else float(r)
        for s in results["samples"][task]
        for r in s["filtered_resps"]
    ]


def test_backends_agree_on_every_loglikelihood(model_dir: Path, tasks_dir: Path) -> None:
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    tasks = ["arc_easy_local", "ppl_local"]
    ours = simple_evaluate(
        model="merino",
        model_args=f"pretrained={model_dir},batch_size=3",
        tasks=tasks,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,
    )
    stock = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},device=cpu",
        batch_size=2,
        tasks=tasks,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,
    )
    for task in tasks:
        a, b = _per_sample(ours, task), _per_sample(stock, task)
        assert len(a) == len(b) == {"arc_easy_local": sum(len(c) for _, c, _ in ARC), "ppl_local": 3}[task]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, task
    assert ours["results"]["arc_easy_local"]["acc,none"] == stock["results"]["arc_easy_local"]["acc,none"]
    assert ours["results"]["ppl_local"]["word_perplexity,none"] == pytest.approx(
        stock["results"]["ppl_local"]["word_perplexity,none"], rel=1e-5
    )


def test_generate_until_matches_hf_generate(model_dir: Path) -> None:
    from lm_eval.api.instance import Instance

    loaded = load_model(model_dir)
    reqs = [
        Instance("generate_until", {}, (p, {"until": ["\n", "."], "max_gen_toks": 8}), i)
        for i, p in enumerate(["Once upon a time", "The capital of France is"])
    ]
    ours = MerinoLM(loaded, batch_size=2).generate_until(reqs, disable_tqdm=True)
    stock = hf_lm(loaded, batch_size=2).generate_until(reqs, disable_tqdm=True)
    assert ours == stock and all(isinstance(t, str) and t for t in ours)


def test_wikitext_pages_split_like_the_hub_dataset(wikitext_raw: Path) -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if shared.exists():  # the shipped copy is the shared one, byte for byte
        assert wikitext_raw.read_bytes() == shared.read_bytes()
    raw = wikitext_raw.read_text(encoding="utf-8")
    pages = wikitext_pages(raw)
    assert len(pages) == 62  # EleutherAI/wikitext_document_level wikitext-2-raw-v1 test
    assert "\n".join(pages) == raw
    assert pages[0].startswith(" = Robert Boulter = ")
    assert all(p.lstrip("\n").startswith(" = ") and not p.lstrip("\n").startswith(" = = ") for p in pages)


def test_word_perplexity_equals_lm_eval_wikitext(model_dir: Path, tasks_dir: Path, wikitext_raw: Path) -> None:
    raw = wikitext_raw
    loaded = load_model(model_dir)
    ours = perplexity(loaded.model, load_tokenizer(str(model_dir)), "wikitext2", data_file=str(raw), limit=1)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False, metadata={"data_file": str(raw)})
    theirs = simple_evaluate(
        model=hf_lm(loaded), tasks=["wikitext_local"], task_manager=tm, limit=1, bootstrap_iters=0
    )["results"]["wikitext_local"]
    assert ours.protocol["mode"] == "document" and ours.protocol["stride"] == ours.protocol["window"] == 128
    assert ours.word_perplexity == pytest.approx(theirs["word_perplexity,none"], rel=5e-3)
    assert ours.bits_per_byte == pytest.approx(theirs["bits_per_byte,none"], rel=5e-3)
    assert math.exp(ours.nll / ours.tokens) == pytest.approx(ours.token_perplexity)


@pytest.mark.parametrize("n,window,stride", [(1, 4, 4), (10, 4, 4), (10, 4, 1), (11, 5, 2), (3, 8, 3)])
def test_windows_predict_every_token_once(n: int, window: int, stride: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    reqs = windows(tokens, 0, window, stride)
    assert [t for _, cont in reqs for t in cont] == tokens
    for ctx, cont in reqs:
        seq = [0, *tokens]
        whole = ctx + cont
        assert len(whole) - 1 <= window and whole == seq[seq.index(whole[0]) :][: len(whole)]
    if stride == window:  # lm-eval's disjoint rolling windows, exactly
        assert reqs == [
            tuple(map(list, make_disjoint_window(w))) for w in get_rolling_token_windows(tokens, 0, window, 1)
        ]


def test_paper_data_transcribed_and_shipped() -> None:
    for name in ("paper-tasks.yaml", "paper-baselines.yaml"):
        shipped = REPO / "src" / "merino_pl" / "eval" / "paper" / name
        assert shipped.read_text() == (REPO / "eval" / name).read_text(), f"eval/{name} differs from the packaged copy"
    tasks = paper_tasks()
    assert [t.task for t in tasks] == [
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
        "boolq",
        "wic",
        "cb",
        "wsc",
        "rte",
        "pubmedqa",
        "logiqa",
    ]
    base = paper_baselines()
    assert base["table2"]["columns"] == [t.column for t in tasks]
    for row in base["table2"]["rows"]:  # the paper's own Avg. column, to its rounding (OPT-125M is 0.0013 off)
        assert len(row["scores"]) == 12 and abs(sum(row["scores"]) / 12 - row["avg"]) < 0.0015, row["model"]
    merino = {r["model"]: r for r in base["table3"]["rows"]}
    assert (merino["MeRino-64M"]["wikitext2"], merino["MeRino-64M"]["ptb"]) == (22.47, 27.06)
    assert len(base["table3"]["rows"]) == len(base["table2"]["rows"]) == 9


def test_cli_offline_report(model_dir: Path, tasks_dir: Path, wikitext_raw: Path, tmp_path: Path) -> None:
    """A hub task offline is skipped with its reason; the local task and perplexity still run.

    lm-eval's own ARC folder is passed as an include path so that its real hub task is found
    without indexing all 14 000 built-in tasks (a minute on a busy 2-core machine)."""
    out = tmp_path / "report"
    arc_dir = Path(lm_eval.__file__).parent / "tasks" / "arc"
    rc = main(
        [
            "eval",
            str(model_dir),
            "--tasks",
            "arc_easy_local,arc_easy",
            "--include-path",
            str(tasks_dir),
            "--include-path",
            str(arc_dir),
            "--ppl",
            "wikitext2,ptb",
            "--data-files",
            f"wikitext2={wikitext_raw}",
            "--limit",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["model"]["weights_sha256"] == sha256_file(model_dir / "model.safetensors")
    assert report["tasks"]["arc_easy_local"]["status"] == "ok"
    assert report["tasks"]["arc_easy_local"]["version"] == 1.0
    assert report["tasks"]["arc_easy"]["status"] == "skipped"
    assert "Offline" in report["tasks"]["arc_easy"]["reason"] or "Connection" in report["tasks"]["arc_easy"]["reason"]
    wt = report["perplexity"]["wikitext2"]
    assert wt["status"] == "ok" and wt["protocol"]["sha256"].startswith("4f3e427e")
    assert wt["protocol"]["mode"] == "document" and wt["documents"] == 1
    assert (
        report["perplexity"]["ptb"]["status"] == "skipped"
        and "--data-files ptb=" in report["perplexity"]["ptb"]["reason"]
    )
    md = (out / "eval.md").read_text()
    assert "| MeRino-64M (paper) | 64 M |" in md and "(ours)" in md and "arc_easy_local" in md and "## Skipped" in md


def test_report_schema_round_trips_and_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    """``EvalReport``: the JSON keys of ``merino-eval/1`` plus ``format_version``; a report from
    before the field reads as version 1; another format or a newer version is a one-line error."""
    from merino_pl.core.errors import MerinoError
    from merino_pl.eval.report import EvalModel, EvalReport, markdown, write

    model = EvalModel("tiny", "m/", "hf-dir", None, 1.5, 0.25, 64, {"d_model": 8})
    ok = {"status": "ok", "value": 0.5, "metric": "acc", "stderr": 0.1, "version": 1, "metrics": {"acc": 0.5}}
    report = EvalReport(model, {"arc_easy": ok}, {"ptb": {"status": "skipped", "reason": "offline"}}, limit=2)
    write(report, tmp_path)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert list(data) == [
        "format", "format_version", "created", "arguments", "model", "backend", "lm_eval_version", "limit", "tasks",
        "perplexity",
    ]  # fmt: skip
    assert EvalReport.read(tmp_path / "eval.json") == report
    assert markdown(EvalReport.from_json(data)) == (tmp_path / "eval.md").read_text()
    del data["format_version"]
    assert EvalReport.from_json(data).format_version == 1
    for bad, message in (({**data, "format": "x"}, "not an eval report"), ({**data, "format_version": 2}, "2")):
        with pytest.raises(MerinoError, match=message):
            EvalReport.from_json(bad, "r.json")
    with pytest.raises(MerinoError, match="model.gflops"):
        EvalReport.from_json({**data, "model": {"name": "tiny"}}, "r.json")


def test_cli_lightning_checkpoint(tmp_path: Path, model_dir: Path) -> None:
    """A `.ckpt` in the layout `merino-pl fit` writes: its SHA-256 is what the report records."""
    loaded = load_model(model_dir)
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in loaded.model.state_dict().items()},
            "merino": {"recipe": loaded.recipe.to_dict()},
        },
        ckpt,
    )
    out = tmp_path / "r"
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "--tasks",
                "none",
                "--ppl",
                "ptb",
                "--limit",
                "20",
                "--data-files",
                f"ptb={_ptb_file(tmp_path)}",
                "--stride",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "eval.json").read_text())
    assert report["model"]["kind"] == "lightning-ckpt" and report["model"]["weights_sha256"] == sha256_file(ckpt)
    ptb = report["perplexity"]["ptb"]
    assert ptb["protocol"]["mode"] == "concatenated" and ptb["protocol"]["stride"] == 64
    assert ptb["documents"] == 20 and ptb["word_perplexity"] > 1


def _ptb_file(tmp_path: Path) -> Path:
    """PTB's format (Mikolov): one lower-cased sentence per line, <unk> and N tokens."""
    path = tmp_path / "ptb.test.txt"
    path.write_text("".join(f" the <unk> company said N shares rose {i} points in the quarter \n" for i in range(30)))
    return path


def test_cli_bad_input_exits_2(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "o")
    assert main(["eval", str(tmp_path / "missing.ckpt"), "--tasks", "none", "--ppl", "wikitext2", "--out", out]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    # every argument problem in one message, before any model is loaded
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--tasks",
                "none",
                "--ppl",
                "wikitext3",
                "--data-files",
                "ptb=/nope",
                "--batch-size",
                "0",
                "--out",
                out,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "wikitext3" in err and "/nope" in err and "--batch-size 0" in err and err.count("\n") == 1
    # a checkpoint whose weights are another architecture than its recipe
    other = MerinoForCausalLM.from_arch(dataclasses.replace(tiny_arch(vocab_size=50304), d_model=64))
    bad = tmp_path / "bad.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in other.state_dict().items()},
            "merino": {"recipe": load_model(model_dir).recipe.to_dict()},
        },
        bad,
    )
    assert main(["eval", str(bad), "--tasks", "none", "--ppl", "wikitext2", "--out", out]) == 2
    assert "do not match its recipe" in capsys.readouterr().err


@pytest.mark.slow  # indexes lm-eval's 14 000 built-in tasks to know a name is unknown (~20 s CPU)
def test_cli_unknown_task_lists_valid_ones(tasks_dir: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(
        [
            "eval",
            str(model_dir),
            "--tasks",
            "hellaswagg,arc_easy_local",
            "--include-path",
            str(tasks_dir),
            "--ppl",
            "none",
            "--out",
            "/tmp/unused",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "'hellaswagg'" in err and "closest: hellaswag" in err
    assert "paper tasks: hellaswag, winogrande" in err and "arc_easy_local" in err


def test_shipped_task_list_yaml_runs_as_tasks_argument() -> None:
    from merino_pl.eval.tasks import resolve_tasks

    specs, fewshot = resolve_tasks(str(REPO / "eval" / "paper-tasks.yaml"))
    assert specs == paper_tasks() and fewshot == 0
