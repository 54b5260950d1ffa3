"""Latency stage: device description, protocol, reports, peers, fast path, ONNX, tables, plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_arch

from merino_pl.checkpoint import load_model
from merino_pl.cli import main as cli
from merino_pl.config import Recipe
from merino_pl.latency.device import describe_device, jetson_info, parse_tegra_release
from merino_pl.latency.fast import fuse_qkv
from merino_pl.latency.harness import Stats, TorchRunner, weight_bytes_in_memory
from merino_pl.latency.peers import PAPER, PEER_CONFIGS, build_peer, peer_config
from merino_pl.latency.report import Options, build_report, render_markdown
from merino_pl.latency_table import LatencyTable
from merino_pl.model import MerinoForCausalLM

NANO = "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n"
TINY_PEER = {"pythia-70m": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=512)}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    Recipe("tiny", tiny_arch()).save(path)
    return path


@pytest.fixture(scope="module")
def report(recipe_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    opts = Options(precisions=("fp32", "int8"), batch=1, seq=8, runs=2, warmup=1, decode_tokens=2, peers=("pythia-70m",))
    out = tmp_path_factory.mktemp("report")
    return build_report(recipe_file, opts, out, peer_factory=lambda n: build_peer(n, **TINY_PEER[n]))


# ---- device --------------------------------------------------------------------------------------
def test_jetson_detected_from_a_faked_nv_tegra_release(tmp_path: Path) -> None:
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text(NANO)
    model.write_bytes(b"NVIDIA Jetson Nano Developer Kit\x00")
    info = jetson_info(release, model)
    assert info["l4t"] == "32.7.1" and info["board"] == "t210ref" and info["model"] == "NVIDIA Jetson Nano Developer Kit"
    desc = describe_device("cpu", tegra_release=release)
    assert desc["jetson"]["l4t"] == "32.7.1" and "L4T 32.7.1" in desc["summary"]


def test_no_jetson_when_the_file_is_missing_or_foreign(tmp_path: Path) -> None:
    assert jetson_info(tmp_path / "absent") is None
    assert parse_tegra_release("Debian GNU/Linux 12\n") is None
    desc = describe_device("cpu", tegra_release=tmp_path / "absent")
    assert desc["jetson"] is None and desc["cpu"] and desc["torch_threads"] >= 1 and desc["torch"] == torch.__version__


# ---- protocol ------------------------------------------------------------------------------------
def test_stats_mean_median_p90() -> None:
    s = Stats.from_samples([float(x) for x in range(1, 11)])  # 1..10
    assert (s.mean, s.median, s.min, s.max) == (5.5, 5.5, 1.0, 10.0)
    assert s.p90 == pytest.approx(9.1)  # numpy's linear interpolation
    assert s.runs == [float(x) for x in range(1, 11)]


# ---- report --------------------------------------------------------------------------------------
def test_report_has_every_field(report: dict) -> None:
    assert report["format"] == "merino-latency-report/1"
    assert report["torch"] == torch.__version__ and report["transformers"]
    dev = report["device"]
    for key in ("cpu", "cpu_count", "torch_threads", "gpu", "jetson", "summary"):
        assert key in dev
    proto = report["protocol"]
    assert (proto["batch"], proto["seq_len"], proto["runs"], proto["warmup"], proto["decode_tokens"]) == (1, 8, 2, 1, 2)
    model = report["model"]
    assert model["name"] == "tiny" and model["kind"] == "recipe" and model["params"] > 0 and model["flops_g"] > 0
    assert "size_on_disk_bytes" in model
    paths = {(r["model"], r["precision"], r["path"]) for r in report["rows"]}
    assert paths == {("tiny", "fp32", "plain"), ("tiny", "fp32", "fast"), ("pythia-70m", "fp32", "plain"),
                     ("pythia-70m", "fp32", "last-logits"), ("tiny", "int8", "plain"), ("tiny", "int8", "fast")}
    for row in report["rows"]:
        for stat in ("prefill_ms", "decode_ms_per_token"):
            assert set(row[stat]) >= {"mean", "median", "p90", "runs"} and len(row[stat]["runs"]) == 2
            assert row[stat]["mean"] > 0
        assert row["peak_memory_bytes"] is not None and "peak" in row["peak_memory_method"]
        assert row["weights_bytes"] > 0 and row["params"] > 0
    assert [(s["peer"], s["paths"]) for s in report["speedups"]] == [("pythia-70m", "plain vs plain"), ("pythia-70m", "fast vs last-logits")]
    assert report["speedups"][0]["prefill"] > 0
    assert report["fast_path"][0]["path"] == "fast"
    assert report["checks"] and all(c["match"] for c in report["checks"])
    rows = {(r["precision"], r["path"]): r for r in report["rows"] if r["model"] == "tiny"}
    # int8 through the quantize stage's RTN + GPTQ format: the packed file is smaller than fp32's
    assert rows[("int8", "plain")]["weights_bytes"] < rows[("fp32", "plain")]["weights_bytes"]


def test_fast_path_keeps_outputs_and_copies_no_weights() -> None:
    model = MerinoForCausalLM.from_arch(tiny_arch()).eval()
    before = weight_bytes_in_memory(model)
    plain = TorchRunner(model, 1, 12, "cpu", decode_tokens=3)
    ref = plain.prefill()
    plain.start_decode()
    ref_decode = plain.decode_run()
    assert fuse_qkv(model) == 4 and fuse_qkv(model) == 4  # one per block, idempotent
    assert weight_bytes_in_memory(model) == before  # Q/K/V are views into the fused tensor
    attn = model.model.blocks[0].layer.attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused_qkv[0].untyped_storage().data_ptr()
    fast = TorchRunner(model, 1, 12, "cpu", decode_tokens=3, last_logits_only=True)
    got = fast.prefill()
    assert got.shape[1] == 1
    torch.testing.assert_close(got[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)
    fast.start_decode()
    torch.testing.assert_close(fast.decode_run(), ref_decode, atol=1e-5, rtol=1e-5)


def test_markdown_names_device_protocol_and_rows(report: dict) -> None:
    md = render_markdown(report)
    for text in ("AMD" if "AMD" in report["device"]["cpu"] else report["device"]["cpu"], "sequence 8", "pythia-70m", "fast", "p90", "int8"):
        assert text in md


def test_cli_report_from_an_exported_dir(tmp_path: Path, recipe_file: Path) -> None:
    assert cli(["export", str(recipe_file), "--out", str(tmp_path / "m")]) == 0
    out = tmp_path / "r"
    args = ["latency", str(tmp_path / "m"), "--seq", "8", "--runs", "1", "--warmup", "0", "--decode-tokens", "1", "--out", str(out)]
    assert cli(args) == 0
    rep = json.loads((out / "latency.json").read_text())
    assert rep["model"]["kind"] == "hf-dir" and rep["model"]["size_on_disk_bytes"] > 0 and rep["model"]["weights_sha256"]
    assert (out / "latency.md").read_text().startswith("# Latency: ")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--precision", "fp8,fp32", "--runs", "0", "--peers", "llama"], ["fp8", "--runs", "llama"]),
        (["--device", "tpu"], ["tpu"]),
        (["--seq", "4000"], ["--seq 4000"]),
    ],
)
def test_bad_input_exits_2_naming_every_problem(tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture, args: list[str], words: list[str]) -> None:
    assert cli(["latency", str(recipe_file), *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words)


def test_bad_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["latency", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


# ---- peers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PEER_CONFIGS))
def test_peer_configs_give_the_published_sizes(name: str) -> None:
    import transformers

    with torch.device("meta"):  # shapes only: no memory, no init
        model = transformers.AutoModelForCausalLM.from_config(peer_config(name))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PAPER[name].params_m, rel=0.02)


# ---- ONNX ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_onnx_logits_match_pytorch_for_prefill_and_decode(tmp_path: Path, recipe_file: Path) -> None:
    import onnxruntime as ort

    from merino_pl.latency.onnx_export import cache_shapes, io_names

    assert cli(["export", str(recipe_file), "--out", str(tmp_path / "m"), "--onnx"]) == 0
    model = load_model(tmp_path / "m").model
    session = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = io_names(model)
    ids = torch.randint(0, model.arch.vocab_size, (1, 9))
    empty = [np.zeros((1, h, 0, d), np.float32) for h, d in cache_shapes(model) for _ in range(2)]
    feed = {"input_ids": ids.numpy(), "position_ids": np.arange(9)[None]} | dict(zip(inputs[2:], empty))
    logits, *present = session.run(None, feed)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4, rtol=0)
    nxt = torch.tensor([[7]])
    feed = {"input_ids": nxt.numpy(), "position_ids": np.array([[9]])} | dict(zip(inputs[2:], present))
    step, *_ = session.run(None, feed)
    with torch.no_grad():
        ref = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits
    np.testing.assert_allclose(step, ref.numpy(), atol=1e-4, rtol=0)
    assert outputs[0] == "logits" and len(present) == 2 * model.arch.num_layer_applications


# ---- device latency table ------------------------------------------------------------------------
def test_profile_writes_a_table_the_search_reads(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_blocks: 2\nembed_dims: [64, 128]\nffn_dims: [128, 256]\nnum_layers: [1, 2]\n"
        "architecture: {vocab_size: 512, d_model: 96, max_position_embeddings: 128}\n"
    )
    out = tmp_path / "table.json"
    assert cli(["latency", "profile", "--space", str(space), "--seq", "8", "--runs", "1", "--warmup", "0", "--out", str(out)]) == 0
    table = LatencyTable.load(out)
    assert {(r["embed_dim"], r["ffn_dim"]) for r in table.layers} == {(64, 128), (64, 256), (128, 128), (128, 256)}
    assert {(p["in"], p["out"]) for p in table.projections} == {(96, 64), (96, 128), (64, 96), (128, 96), (64, 128)}
    assert table.seq_len == 8 and table.device["summary"] and table.fixed["d_model"] == 96
    arch = tiny_arch().__class__.from_dict({"vocab_size": 512, "d_model": 96, "max_position_embeddings": 128,
                                            "blocks": [{"embed_dim": 64, "ffn_dim": 192, "num_layers": 2}, {"embed_dim": 128, "ffn_dim": 128, "num_layers": 1}]})
    assert table.estimate_ms(arch) > table.fixed["ms"]  # F=192 is interpolated


def test_profile_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["latency", "profile", "--space", str(tmp_path / "none.yaml"), "--precision", "int4", "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "none.yaml" in err and "int4" in err


# ---- plot ----------------------------------------------------------------------------------------
def test_plot_from_eval_and_latency_reports(tmp_path: Path, report: dict) -> None:
    from merino_pl.io import write_json

    write_json(tmp_path / "lat.json", report)
    tasks = {"hellaswag": {"status": "ok", "value": 0.3}, "boolq": {"status": "ok", "value": 0.4}, "wic": {"status": "skipped"}}
    write_json(tmp_path / "eval.json", {"format": "merino-eval/1", "model": {"name": "tiny"}, "tasks": tasks})
    out = tmp_path / "chart.png"
    assert cli(["latency", "plot", "--latency", str(tmp_path / "lat.json"), "--eval", str(tmp_path / "eval.json"), "--paper", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = json.loads(out.with_suffix(".json").read_text())["panels"]
    measured = {p["model"]: p for p in panels[0]["points"]}
    assert measured["tiny"]["accuracy"] == pytest.approx(0.35) and measured["tiny"]["accuracy_from"] == "eval report"
    assert measured["pythia-70m"]["accuracy_from"] == "paper Table 2"
    assert len(panels[1]["points"]) == len(PAPER)


def test_plot_places_a_model_whose_tasks_were_all_skipped_among_no_accuracy(tmp_path: Path, report: dict) -> None:
    from merino_pl.io import write_json

    write_json(tmp_path / "lat.json", report)
    write_json(tmp_path / "eval.json", {"format": "merino-eval/1", "model": {"name": "tiny"},
                                        "tasks": {"hellaswag": {"status": "skipped", "reason": "offline"}}})
    out = tmp_path / "chart.png"
    assert cli(["latency", "plot", "--latency", str(tmp_path / "lat.json"), "--eval", str(tmp_path / "eval.json"), "--paper", "--out", str(out)]) == 0
    points = json.loads(out.with_suffix(".json").read_text())
    assert "tiny" in points["no_accuracy"] and "tiny" not in {p["model"] for p in points["panels"][0]["points"]}


def test_plot_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["latency", "plot", "--out", str(tmp_path / "c.png")]) == 2
    assert cli(["latency", "plot", "--latency", str(tmp_path / "none.json"), "--out", str(tmp_path / "c.png")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_noisy_timings_are_flagged_and_ratios_come_from_medians_too() -> None:
    """A loaded machine (p90 = 7x the median) gets a warning naming the row; every ratio is
    given of the means (paper) and of the medians (which one outlier cannot move)."""
    from merino_pl.latency.report import speedups, spread_warnings

    def row(model: str, role: str, ms: list[float]) -> dict:
        s = Stats.from_samples(ms).to_dict()
        return {"model": model, "role": role, "precision": "fp32", "path": "plain", "prefill_ms": s, "decode_ms_per_token": s}

    quiet = row("pythia-70m", "peer", [10.0, 10.1, 9.9, 10.0, 10.05, 9.95, 10.0, 10.0, 10.1, 9.9])
    noisy = row("merino-tiny", "model", [2.0, 2.0, 2.1, 1.9, 2.0, 2.0, 2.0, 2.0, 14.0, 14.0])
    assert noisy["prefill_ms"]["p90_over_median"] > 5 and noisy["prefill_ms"]["cv"] > 0.5
    warnings = spread_warnings([quiet, noisy])
    assert len(warnings) == 1 and "merino-tiny fp32 plain" in warnings[0] and "p90/median" in warnings[0]
    (s,) = speedups([quiet, noisy], "merino-tiny")
    assert s["prefill_median"] == pytest.approx(10.0 / 2.0) and s["prefill"] == pytest.approx(10.0 / 4.4, rel=1e-3)
