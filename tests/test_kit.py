"""The device kit: `merino-pl latency kit` writes graphs + manifest + a standalone runner; the
runner times them where neither torch nor merino_pl can be imported; `merino-pl latency import`
turns the results into the table `search --latency-table` reads and the report `latency plot`
reads. Exporting the graphs takes a while on 2 busy cores: those tests are slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_arch
from device_env import device_site
from device_env import run_on_device as on_device
from merino_pl.cli import main as cli
from merino_pl.core.config import Recipe
from merino_pl.core.latency_table import LatencyTable
from merino_pl.latency.report import LatencyReport

# one embed width: every projection a searched architecture holds is in the space's list
SPACE = (
    "num_blocks: 2\nembed_dims: [64]\nffn_dims: [128, 256]\nnum_layers: [1, 2]\n"
    "architecture: {vocab_size: 512, d_model: 96, max_position_embeddings: 128}\n"
)
OK = {"status": "ok", "value": 0.4}


@pytest.fixture(scope="module")
def device_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return device_site(tmp_path_factory.mktemp("device-site"))


def run_on_device(kit: Path, device_path: Path, *args: str) -> subprocess.CompletedProcess:
    return on_device(kit, device_path, *args)


def test_the_runner_is_python_3_8_and_imports_only_numpy_and_onnxruntime() -> None:
    """A Jetson's JetPack ships Python 3.8 at best: the runner parses as 3.8 and imports nothing
    beyond the standard library, numpy and onnxruntime."""
    import ast

    from merino_pl.latency import kit_runner

    tree = ast.parse(Path(kit_runner.__file__).read_text(), feature_version=(3, 8))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - set(sys.stdlib_module_names) == {"numpy", "onnxruntime"}


@pytest.mark.slow
def test_space_kit_runs_without_torch_and_imports_as_the_search_table(tmp_path: Path, device_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    kit = tmp_path / "kit"
    argv = ["--seq", "16", "--runs", "3", "--warmup", "1"]
    assert cli(["latency", "kit", "--space", str(space), *argv, "--out", str(kit)]) == 0
    manifest = json.loads((kit / "manifest.json").read_text())
    assert {g["role"] for g in manifest["graphs"]} == {"layer", "projection", "fixed"} and len(manifest["graphs"]) == 5
    done = run_on_device(kit, device_path, "--providers", "cpu", "--out", str(tmp_path / "results.json"))
    assert done.returncode == 0, done.stderr
    table_path = tmp_path / "table.json"
    assert cli(["latency", "import", str(tmp_path / "results.json"), "--kit", str(kit), "--out", str(table_path)]) == 0
    table = LatencyTable.load(table_path)
    profiled = tmp_path / "profiled.json"  # what `latency profile` measures of the same pieces with torch
    assert cli(["latency", "profile", "--space", str(space), *argv, "--out", str(profiled)]) == 0
    torch_table = LatencyTable.load(profiled)
    assert [(r["embed_dim"], r["ffn_dim"]) for r in table.layers] == [
        (r["embed_dim"], r["ffn_dim"]) for r in torch_table.layers
    ]
    assert [(p["in"], p["out"]) for p in table.projections] == [(p["in"], p["out"]) for p in torch_table.projections]
    ort_profiled = tmp_path / "ort.json"  # the same graphs through onnxruntime, here: what the kit's should match
    on_ort = ["--runtime", "onnxruntime", "--out", str(ort_profiled)]
    assert cli(["latency", "profile", "--space", str(space), *argv, *on_ort]) == 0
    ort_table = LatencyTable.load(ort_profiled)
    assert ort_table.device["runtime"].startswith("onnxruntime ") and "runtime" not in torch_table.device
    assert [(r["embed_dim"], r["ffn_dim"]) for r in ort_table.layers] == [
        (r["embed_dim"], r["ffn_dim"]) for r in table.layers
    ]
    assert table.seq_len == 16 and table.fixed["d_model"] == 96 and all(r["ms"] > 0 for r in table.layers)
    rec = tmp_path / "rec.yaml"
    search = ["search", "--space", str(space), "--budget", "latency=1000ms", "--latency-table", str(table_path)]
    assert cli([*search, "--iterations", "50", "--no-plot", "--out", str(rec)]) == 0


@pytest.mark.slow
def test_model_kit_imports_as_a_latency_report_and_refuses_mixed_up_results(
    tmp_path: Path, device_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tmp_path / "tiny.yaml"
    Recipe("tiny", tiny_arch()).save(recipe)
    kit = tmp_path / "kit"
    argv = ["--seq", "8", "--runs", "2", "--warmup", "1", "--decode-tokens", "2"]
    assert cli(["latency", "kit", str(recipe), *argv, "--out", str(kit)]) == 0
    results = tmp_path / "results.json"
    done = run_on_device(kit, device_path, "--out", str(results))
    assert done.returncode == 0, done.stderr
    assert cli(["latency", "import", str(results), "--kit", str(kit), "--out", str(tmp_path / "report")]) == 0
    report = LatencyReport.read(tmp_path / "report")
    (row,) = report.rows
    assert (row["model"], row["precision"], row["path"]) == ("tiny", "fp32", "onnxruntime")
    assert row["prefill_ms"]["runs"] and row["decode_ms_per_token"]["mean"] > 0
    assert report.device["onnxruntime"] and "CPUExecutionProvider" in report.device["providers"]
    evals = tmp_path / "eval.json"  # `latency plot` reads the kit's report unchanged: its onnxruntime row
    evals.write_text(json.dumps({"format": "merino-eval/1", "model": {"name": "tiny"}, "tasks": {"boolq": OK}}))
    chart = tmp_path / "chart.png"
    assert (
        cli(["latency", "plot", "--latency", str(tmp_path / "report"), "--eval", str(evals), "--out", str(chart)]) == 0
    )
    (point,) = json.loads(chart.with_suffix(".json").read_text())["panels"][0]["points"]
    assert point["model"] == "tiny" and point["latency_ms"] == row["prefill_ms"]["mean"] and point["accuracy"] == 0.4
    capsys.readouterr()

    # results of another kit: one line, exit 2
    other = json.loads(results.read_text()) | {"kit_id": "0" * 64}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert (
        cli(["latency", "import", str(tmp_path / "other.json"), "--kit", str(kit), "--out", str(tmp_path / "x")]) == 2
    )
    err = capsys.readouterr().err
    assert "results of another kit" in err and len(err.strip().splitlines()) == 1

    # a provider this onnxruntime lacks: one line, exit 2, nothing written
    done = run_on_device(kit, device_path, "--providers", "tensorrt", "--out", str(tmp_path / "trt.json"))
    assert done.returncode == 2 and "--providers tensorrt" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "trt.json").exists()

    # a graph changed after the kit was written: the runner refuses it
    graph = kit / "graphs" / "model-fp32.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    done = run_on_device(kit, device_path, "--out", str(tmp_path / "again.json"))
    assert done.returncode == 2 and "SHA-256" in done.stderr


def test_import_of_bad_results_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Not JSON, not kit results, no kit at the path, another kit's results: one line each, exit
    2, no --out folder left behind."""
    kit = tmp_path / "kit"
    kit.mkdir()
    manifest = {"format": "merino-latency-kit/1", "kind": "space", "kit_id": "a" * 64, "graphs": []}
    (kit / "manifest.json").write_text(json.dumps(manifest))
    files = {
        "garbled.json": "{not json",
        "other.json": json.dumps({"format": "merino-eval/1"}),
        "another-kit.json": json.dumps({"format": "merino-latency-kit-results/1", "kit_id": "b" * 64, "graphs": []}),
    }
    expected = {"garbled.json": "malformed JSON", "other.json": "not latency kit results"}
    expected |= {"another-kit.json": "results of another kit", "nokit": "manifest not found"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = [(name, kit) for name in files] + [("another-kit.json", tmp_path / "nokit")]
    for (name, where), key in zip(cases, expected.values()):
        out = tmp_path / "new" / "table.json"
        assert cli(["latency", "import", str(tmp_path / name), "--kit", str(where), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], (name, err)
        assert not (tmp_path / "new").exists()


def test_profile_on_onnxruntime_is_fp32_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["latency", "profile", "--runtime", "onnxruntime", "--precision", "fp16", "--out", str(tmp_path / "t.json")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--runtime onnxruntime" in err and "fp16" in err
    assert not (tmp_path / "t.json").exists()
