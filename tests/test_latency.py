"""Latency stage: device description, protocol, reports, peers, fast path, ONNX, tables, plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import quantize_argv, tiny_arch
from merino_pl.cli import main as cli
from merino_pl.core.checkpoint import load_model
from merino_pl.core.config import Recipe
from merino_pl.core.hf import MerinoForCausalLM
from merino_pl.core.latency_table import LatencyTable
from merino_pl.latency.api import LatencySettings, latency
from merino_pl.latency.device import describe_device, jetson_info, parse_tegra_release
from merino_pl.latency.fast import fuse_qkv
from merino_pl.latency.options import Options
from merino_pl.latency.peers import PAPER, PEER_CONFIGS, build_peer, peer_config
from merino_pl.latency.report import LatencyReport, render_markdown
from merino_pl.latency.runners import TorchRunner
from merino_pl.latency.timing import Stats, time_interleaved, weight_bytes_in_memory

NANO = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
    "DATE: Sat Feb 19 17:05:08 UTC 2022\n"
)
TINY_PEER = {
    "pythia-70m": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=512
    ),
    "pythia-160m": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=512
    ),
    "opt-125m": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128, word_embed_proj_dim=64, vocab_size=512
    ),
    "opt-350m": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128, word_embed_proj_dim=32, vocab_size=512
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=2, vocab_size=512),
    "cerebras-111m": dict(n_embd=64, n_layer=2, n_head=2, n_inner=128, vocab_size=512),
}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    Recipe("tiny", tiny_arch()).save(path)
    return path


@pytest.fixture(scope="module")
def report(recipe_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    opts = Options(
        precisions=("fp32", "int8"),
        batch=1,
        seq=8,
        runs=2,
        warmup=1,
        decode_tokens=2,
        peers=("pythia-70m",),
        generate_tokens=3,
        generate_runs=1,
    )
    out = tmp_path_factory.mktemp("report")
    return _report(recipe_file, opts, out).to_json()


def _report(source: Path, opts: Options, out: Path) -> LatencyReport:
    """The stage's entry with the tiny peers (the flags never build a peer this small)."""
    return latency(LatencySettings(str(source), str(out), opts), peer_factory=lambda n: build_peer(n, **TINY_PEER[n]))


# ---- device --------------------------------------------------------------------------------------
def test_jetson_detected_from_a_faked_nv_tegra_release(tmp_path: Path) -> None:
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text(NANO)
    model.write_bytes(b"NVIDIA Jetson Nano Developer Kit\x00")
    info = jetson_info(release, model)
    assert (
        info["l4t"] == "32.7.1" and info["board"] == "t210ref" and info["model"] == "NVIDIA Jetson Nano Developer Kit"
    )
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
    assert paths == {
        ("tiny", "fp32", "plain"),
        ("tiny", "fp32", "fast"),
        ("pythia-70m", "fp32", "plain"),
        ("pythia-70m", "fp32", "last-logits"),
        ("tiny", "int8", "plain"),
        ("tiny", "int8", "fast"),
    }
    for row in report["rows"]:
        for stat in ("prefill_ms", "decode_ms_per_token"):
            assert set(row[stat]) >= {"mean", "median", "p90", "runs"} and len(row[stat]["runs"]) == 2
            assert row[stat]["mean"] > 0
        assert row["peak_memory_bytes"] is not None and "peak" in row["peak_memory_method"]
        assert row["weights_bytes"] > 0 and row["params"] > 0
    assert [(s["peer"], s["paths"]) for s in report["speedups"]] == [
        ("pythia-70m", "plain vs plain"),
        ("pythia-70m", "fast vs last-logits"),
    ]
    assert report["speedups"][0]["prefill"] > 0
    assert report["fast_path"][0]["path"] == "fast"
    assert report["checks"] and all(c["match"] for c in report["checks"])
    rows = {(r["precision"], r["path"]): r for r in report["rows"] if r["model"] == "tiny"}
    # int8 through the quantize stage's RTN + GPTQ format: the packed file is smaller than fp32's
    assert rows[("int8", "plain")]["weights_bytes"] < rows[("fp32", "plain")]["weights_bytes"]


def test_time_interleaved_calls_each_variant_once_per_shuffled_round() -> None:
    calls: list[str] = []
    ms = time_interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, rounds=6, warmup=2, sync=lambda: None)
    assert {k: len(v) for k, v in ms.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(t >= 0 for v in ms.values() for t in v)
    assert calls[:6] == list("aabbcc")  # warm-up first, each variant on its own
    rounds = [calls[6 + 3 * i : 9 + 3 * i] for i in range(6)]
    assert all(sorted(r) == list("abc") for r in rounds) and len({tuple(r) for r in rounds}) > 1  # shuffled


@pytest.mark.parametrize("fuse_prefill", [None, True])
def test_fast_path_keeps_outputs_and_copies_no_weights(fuse_prefill) -> None:
    """Same logits, no weight copied; decode steps take the fused Q/K/V GEMM, a prompt only when
    asked (the CPU default, ``None``, keeps the three GEMMs there: they measured faster)."""
    model = MerinoForCausalLM.from_arch(tiny_arch()).eval()
    before = weight_bytes_in_memory(model)
    plain = TorchRunner(model, 1, 12, "cpu", decode_tokens=3)
    ref = plain.prefill()
    plain.start_decode()
    ref_decode = plain.decode_run()
    assert fuse_qkv(model, fuse_prefill) == 4 and fuse_qkv(model, fuse_prefill) == 4  # one per block, idempotent
    assert weight_bytes_in_memory(model) == before  # Q/K/V are views into the fused tensor
    attn = model.model.blocks[0].layer.attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused_qkv[0].untyped_storage().data_ptr()
    separate = []
    attn.q_proj.register_forward_hook(lambda _m, a, _o: separate.append(a[0].shape[-2]))
    fast = TorchRunner(model, 1, 12, "cpu", decode_tokens=3, last_logits_only=True)
    got = fast.prefill()
    assert got.shape[1] == 1
    torch.testing.assert_close(got[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)
    assert bool(separate) != bool(fuse_prefill) and all(t == 12 for t in separate)
    fast.start_decode()
    separate.clear()
    torch.testing.assert_close(fast.decode_run(), ref_decode, atol=1e-5, rtol=1e-5)
    assert separate == []  # every decode step: the fused GEMM


def test_decode_and_generate_reuse_the_cache_without_deprecation_warnings() -> None:
    import warnings

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    peer = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ).eval()
    for model in (MerinoForCausalLM.from_arch(tiny_arch()).eval(), peer):  # ours and a transformers peer
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = TorchRunner(model, 1, 8, "cpu", decode_tokens=3)
            runner.start_decode()
            runner.decode_run()
            assert runner.cache.get_seq_length() == 8  # cropped back: every run decodes on the same prompt
            new = runner.generate(4)
        assert new.shape == (1, 4)
        assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]


def test_markdown_names_device_protocol_and_rows(report: dict) -> None:
    md = render_markdown(report)
    for text in (
        "AMD" if "AMD" in report["device"]["cpu"] else report["device"]["cpu"],
        "sequence 8",
        "pythia-70m",
        "fast",
        "p90",
        "int8",
    ):
        assert text in md


def test_cli_report_from_an_exported_dir(tmp_path: Path, recipe_file: Path) -> None:
    assert cli(["export", str(recipe_file), "--out", str(tmp_path / "m")]) == 0
    out = tmp_path / "r"
    args = [
        "latency",
        str(tmp_path / "m"),
        "--seq",
        "8",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--decode-tokens",
        "1",
        "--out",
        str(out),
    ]
    assert cli(args) == 0
    rep = json.loads((out / "latency.json").read_text())
    assert (
        rep["model"]["kind"] == "hf-dir" and rep["model"]["size_on_disk_bytes"] > 0 and rep["model"]["weights_sha256"]
    )
    assert (out / "latency.md").read_text().startswith("# Latency: ")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--precision", "fp8,fp32", "--runs", "0", "--peers", "llama"], ["fp8", "--runs", "llama"]),
        (["--device", "tpu"], ["tpu"]),
        (["--seq", "4000"], ["--seq 4000"]),
        (["--protocol", "jetson", "--runtime", "tensorrt", "--embedding", "int3"], ["jetson", "tensorrt", "int3"]),
    ],
)
def test_bad_input_exits_2_naming_every_problem(
    tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture, args: list[str], words: list[str]
) -> None:
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


# ---- the authors' protocol -----------------------------------------------------------------------
def test_paper_protocol_excludes_exactly_the_heads_the_authors_code_excludes() -> None:
    """kennethzhao24/latency_test inference_test.py: OPTModel (decoder, no head) for every opt-*
    config, MeRino's included; GPTNeoXForCausalLM / GPT2LMHeadModel (with head) for Pythia,
    GPT-2 and Cerebras-GPT. The timed callable's output says which: hidden states or logits."""
    from merino_pl.latency.peers import PAPER_TIMES_HEAD, paper_forward

    assert {n for n, head in PAPER_TIMES_HEAD.items() if head} == {"pythia-70m", "pythia-160m", "gpt2", "cerebras-111m"}
    assert {n for n, head in PAPER_TIMES_HEAD.items() if not head} == {"opt-125m", "opt-350m"}
    assert set(PAPER_TIMES_HEAD) == set(PEER_CONFIGS)  # every peer has a rule
    ids = torch.zeros(1, 5, dtype=torch.long)
    ours = MerinoForCausalLM.from_arch(tiny_arch()).eval()
    fn, head = paper_forward("tiny", ours)
    with torch.no_grad():
        assert not head and fn(ids).shape == (1, 5, ours.arch.d_model)  # decoder output: no vocab logits
        for name in PEER_CONFIGS:
            model = build_peer(name, **TINY_PEER[name])
            fn, head = paper_forward(name, model)
            out = fn(ids)
            assert head == PAPER_TIMES_HEAD[name]
            assert out.shape[-1] == (512 if head else model.config.word_embed_proj_dim), name
    with pytest.raises(KeyError, match="llama"):
        paper_forward("llama", build_peer("gpt2", **TINY_PEER["gpt2"]))


@pytest.mark.slow
def test_report_with_both_protocols_onnxruntime_int_rows_and_generation(recipe_file: Path, tmp_path: Path) -> None:
    opts = Options(
        precisions=("fp32", "int4"),
        seq=8,
        runs=2,
        warmup=1,
        decode_tokens=2,
        peers=("pythia-70m", "opt-350m"),
        onnx=True,
        protocols=("full", "paper"),
        generate_tokens=4,
        generate_runs=1,
        embedding="int8",
        paper_runs=2,
    )
    rep = _report(recipe_file, opts, tmp_path).to_json()
    rows = {(r["model"], r["precision"], r["path"]): r for r in rep["rows"]}
    fp32, int4 = rows[("tiny", "fp32", "plain")], rows[("tiny", "int4", "plain")]
    assert (
        rows[("tiny", "int4", "onnxruntime")]["runtime"] == "onnxruntime" and (tmp_path / "model-int4.onnx").is_file()
    )
    assert (
        int4["weights_in_memory_bytes"] < 0.45 * fp32["weights_in_memory_bytes"]
    )  # packed linears + int8 table, measured
    assert int4["workspace_bytes"] > 0 and fp32["workspace_bytes"] == 0
    assert {(g["precision"], g["runtime"]) for g in rep["generation"]} == {
        (p, r) for p in ("fp32", "int4") for r in ("torch", "onnxruntime")
    }
    assert all(g["tokens_per_s"] > 0 and g["new_tokens"] == 4 for g in rep["generation"])
    assert all(c["match"] for c in rep["checks"]) and any(
        c["compared"].startswith("onnxruntime vs PyTorch")
        and c["precision"] == "int4"
        and c["tolerance_on"] == "rel_logit_err"
        for c in rep["checks"]
    )
    paper = {r["model"]: r for r in rep["paper_protocol"]["rows"]}
    assert {m: r["includes_lm_head"] for m, r in paper.items()} == {
        "tiny": False,
        "pythia-70m": True,
        "opt-350m": False,
    }
    assert all(r["threads"] == 1 and r["runs"] == 2 and r["mean_ms"] > 0 for r in paper.values())
    assert {s["peer"] for s in rep["paper_protocol"]["speedups"]} == {"pythia-70m", "opt-350m"}
    md = render_markdown(rep)
    assert "Paper protocol" in md and "Generation" in md and "resident weights" in md
    assert rep["protocol"]["protocols"] == ["full", "paper"] and "latency_test" in rep["protocol"]["paper"]


# ---- ONNX ----------------------------------------------------------------------------------------
def _onnx_prefill_and_step(model, onnx_path: Path, T: int = 9, batch: int = 1, rel: float | None = None) -> None:
    """ONNX logits == PyTorch's for a prefill of T tokens and one decode step on its cache
    (within 1e-4 absolute; or, ``rel`` given, that relative error and the same top-1 token)."""
    import onnxruntime as ort

    from merino_pl.export.onnx import FIXED_INPUTS, cache_shapes, io_names

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs, outputs = io_names(model)
    assert [i.name for i in session.get_inputs()] == inputs and [o.name for o in session.get_outputs()] == outputs
    ids = torch.randint(0, model.arch.vocab_size, (batch, T))
    empty = [np.zeros((batch, h, 0, d), np.float32) for h, d in cache_shapes(model) for _ in range(2)]
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((batch, T), np.int64),
        "position_ids": np.arange(T)[None].repeat(batch, 0),
    }
    logits, *present = session.run(None, feed | dict(zip(inputs[len(FIXED_INPUTS) :], empty)))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    _close(logits, out.logits.numpy(), rel)
    nxt = torch.tensor([[7]] * batch)
    feed = {
        "input_ids": nxt.numpy(),
        "attention_mask": np.ones((batch, T + 1), np.int64),
        "position_ids": np.array([[T]] * batch),
    }
    step, *_ = session.run(None, feed | dict(zip(inputs[len(FIXED_INPUTS) :], present)))
    with torch.no_grad():
        ref = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits
    _close(step, ref.numpy(), rel)
    assert len(present) == 2 * model.arch.num_layer_applications


def _close(got: np.ndarray, ref: np.ndarray, rel: float | None) -> None:
    if rel is None:
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    else:
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < rel
        assert (got[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all()


@pytest.mark.slow
def test_export_onnx_logits_match_pytorch_for_prefill_and_decode(tmp_path: Path, recipe_file: Path) -> None:
    assert cli(["export", str(recipe_file), "--out", str(tmp_path / "m"), "--onnx"]) == 0
    model = load_model(tmp_path / "m").model
    _onnx_prefill_and_step(model, tmp_path / "m" / "model.onnx")
    from merino_pl.export.onnx import io_names

    inputs, outputs = io_names(model)  # optimum's convention
    assert inputs[:5] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    from merino_pl.export.session import DecoderSession  # what latency's and generate's decoders run on

    graph = DecoderSession(tmp_path / "m" / "model.onnx")
    assert graph.past_names == inputs[3:] and graph.present_names == outputs[1:]
    assert graph.layers == model.arch.num_layer_applications and graph.vocab == model.arch.vocab_size
    ids = np.array([[3, 1, 4, 1, 5]], dtype=np.int64)
    logits, past = graph.run(ids, 0, graph.empty_past())
    step, present = graph.run(np.array([[9]], dtype=np.int64), 5, past)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), use_cache=True)
        ref = model(torch.tensor([[9]]), past_key_values=out.past_key_values, use_cache=True).logits
    _close(logits, out.logits.numpy(), None)
    _close(step, ref.numpy(), None)
    assert present[0].shape[2] == 6  # the cache grew by the step's token


def test_onnx_left_padding_matches_pytorch(tmp_path: Path) -> None:
    """attention_mask: a left-padded row's logits at its real tokens equal the unpadded ones."""
    import onnxruntime as ort

    from merino_pl.export.onnx import FIXED_INPUTS, cache_shapes, export_onnx, io_names

    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=256)).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, _ = io_names(model)
    ids = torch.randint(0, 256, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int64)
    empty = [np.zeros((1, h, 0, d), np.float32) for h, d in cache_shapes(model) for _ in range(2)]
    feed = {
        "input_ids": padded.numpy(),
        "attention_mask": mask,
        "position_ids": np.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]]),
    }
    logits = session.run(None, feed | dict(zip(inputs[len(FIXED_INPUTS) :], empty)))[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.numpy()
    np.testing.assert_allclose(logits[:, 3:], ref, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "bits,desc_act,embedding", [(4, False, "int8"), (8, False, "fp16"), (4, True, "int8"), (8, True, "int8")]
)
def test_quantized_onnx_is_matmulnbits_and_matches_the_packed_torch_path(
    tmp_path: Path, bits: int, desc_act: bool, embedding: str
) -> None:
    """export GPTQ_DIR --onnx: every quantized linear is one MatMulNBits (act-order rows permuted),
    the int8 table one uint8 initializer shared by the lookup and the head. Logits vs the torch
    packed path, prefill and decode: at accuracy_level 0 (fp32 arithmetic) within 1e-4 absolute
    (logits ~0.1-1); at the shipped level 4 (int8 activations) within 3 % relative, same top-1."""
    import onnx

    from merino_pl.core.quant.qlinear import QuantLinear
    from merino_pl.export.onnx import export_onnx
    from merino_pl.latency.measure import REL_TOLERANCE_INT8_ACTIVATIONS

    torch.manual_seed(0)
    model = MerinoForCausalLM.from_arch(tiny_arch(vocab_size=50304))  # the shipped tokenizer's ids fit
    src = tmp_path / "float"
    model.save_pretrained(src)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    q = tmp_path / "q"
    assert (
        cli(
            quantize_argv(
                src,
                q,
                bits=bits,
                group_size=32,
                nsamples=4,
                seq_len=32,
                holdout=0,
                embedding=embedding,
                calib=tmp_path / "calib.txt",
                float_dtype="float32",
                desc_act=desc_act,
            )
        )
        == 0
    )
    assert cli(["export", str(q), "--onnx", "--out", str(tmp_path / "x")]) == 0
    packed = load_model(tmp_path / "x").model  # the copied directory loads as the GPTQ model
    graph = onnx.load(str(tmp_path / "x" / "model.onnx"))
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    qlins = sum(isinstance(m, QuantLinear) for m in packed.modules())
    head = embedding == "int8"
    assert all(n.domain == "com.microsoft" for n in nbits)
    assert (
        len(nbits) == qlins // packed.arch.num_blocks * packed.arch.num_layer_applications + head
    )  # one node per application...
    assert len({n.input[1] for n in nbits}) == qlins + head  # ...all applications of a shared layer read one packed B
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == (
        {bits, 8} if embedding == "int8" else {bits}
    )
    table = [i for i in graph.graph.initializer if np.prod(i.dims) >= 50304 * 96 // 2]
    expected = onnx.TensorProto.UINT8 if embedding == "int8" else onnx.TensorProto.FLOAT
    assert [i.data_type for i in table] == [expected]  # ONE table, read by the lookup and the tied head
    _onnx_prefill_and_step(packed, tmp_path / "x" / "model.onnx", batch=2, rel=REL_TOLERANCE_INT8_ACTIVATIONS)
    levels = {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    exact = tmp_path / "exact.onnx"
    if (bits, desc_act, embedding) == (4, False, "int8"):  # the API's level, through a second export
        export_onnx(load_model(q).model, exact, accuracy_level=0)
        levels = {a.i for n in onnx.load(str(exact)).graph.node for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {0}
    else:  # the same graph at level 0: the level is only the nodes' attribute (saves a 20 s export)
        for n in nbits:
            next(a for a in n.attribute if a.name == "accuracy_level").i = 0
        onnx.save(graph, str(exact))
    _onnx_prefill_and_step(packed, exact, batch=2)


# ---- device latency table ------------------------------------------------------------------------
def test_profile_writes_a_table_the_search_reads(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_blocks: 2\nembed_dims: [64, 128]\nffn_dims: [128, 256]\nnum_layers: [1, 2]\n"
        "architecture: {vocab_size: 512, d_model: 96, max_position_embeddings: 128}\n"
    )
    out = tmp_path / "table.json"
    assert (
        cli(
            [
                "latency",
                "profile",
                "--space",
                str(space),
                "--seq",
                "8",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = LatencyTable.load(out)
    assert {(r["embed_dim"], r["ffn_dim"]) for r in table.layers} == {(64, 128), (64, 256), (128, 128), (128, 256)}
    assert {(p["in"], p["out"]) for p in table.projections} == {(96, 64), (96, 128), (64, 96), (128, 96), (64, 128)}
    assert table.seq_len == 8 and table.device["summary"] and table.fixed["d_model"] == 96
    arch = tiny_arch().__class__.from_dict(
        {
            "vocab_size": 512,
            "d_model": 96,
            "max_position_embeddings": 128,
            "blocks": [
                {"embed_dim": 64, "ffn_dim": 192, "num_layers": 2},
                {"embed_dim": 128, "ffn_dim": 128, "num_layers": 1},
            ],
        }
    )
    assert table.estimate_ms(arch) > table.fixed["ms"]  # F=192 is interpolated


def test_profile_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        cli(
            [
                "latency",
                "profile",
                "--space",
                str(tmp_path / "none.yaml"),
                "--precision",
                "int4",
                "--out",
                str(tmp_path / "t.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "none.yaml" in err and "int4" in err


# ---- plot ----------------------------------------------------------------------------------------


def _plot_with_paper(tmp_path: Path, report: dict, tasks: dict) -> Path:
    """``latency plot --paper`` of ``report`` beside an eval report of model "tiny" with ``tasks``."""
    from merino_pl.core.io import write_json

    write_json(tmp_path / "lat.json", report)
    write_json(tmp_path / "eval.json", {"format": "merino-eval/1", "model": {"name": "tiny"}, "tasks": tasks})
    out = tmp_path / "chart.png"
    args = ["--latency", str(tmp_path / "lat.json"), "--eval", str(tmp_path / "eval.json"), "--paper"]
    assert cli(["latency", "plot", *args, "--out", str(out)]) == 0
    return out


def test_plot_from_eval_and_latency_reports(tmp_path: Path, report: dict) -> None:
    tasks = {
        "hellaswag": {"status": "ok", "value": 0.3},
        "boolq": {"status": "ok", "value": 0.4},
        "wic": {"status": "skipped"},
    }
    out = _plot_with_paper(tmp_path, report, tasks)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = json.loads(out.with_suffix(".json").read_text())["panels"]
    measured = {p["model"]: p for p in panels[0]["points"]}
    assert measured["tiny"]["accuracy"] == pytest.approx(0.35) and measured["tiny"]["accuracy_from"] == "eval report"
    assert measured["pythia-70m"]["accuracy_from"] == "paper Table 2"
    assert len(panels[1]["points"]) == len(PAPER)


def test_plot_places_a_model_whose_tasks_were_all_skipped_among_no_accuracy(tmp_path: Path, report: dict) -> None:
    out = _plot_with_paper(tmp_path, report, {"hellaswag": {"status": "skipped", "reason": "offline"}})
    points = json.loads(out.with_suffix(".json").read_text())
    assert "tiny" in points["no_accuracy"] and "tiny" not in {p["model"] for p in points["panels"][0]["points"]}


def test_plot_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["latency", "plot", "--out", str(tmp_path / "c.png")]) == 2
    assert cli(["latency", "plot", "--latency", str(tmp_path / "none.json"), "--out", str(tmp_path / "c.png")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_noisy_timings_are_flagged_and_ratios_come_from_medians_too() -> None:
    """A loaded machine (p90 = 7x the median) gets a warning naming the row; every ratio is
    given of the means (paper) and of the medians (which one outlier cannot move)."""
    from merino_pl.latency.ratios import speedups, spread_warnings

    def row(model: str, role: str, ms: list[float]) -> dict:
        s = Stats.from_samples(ms).to_dict()
        return {
            "model": model,
            "role": role,
            "precision": "fp32",
            "path": "plain",
            "prefill_ms": s,
            "decode_ms_per_token": s,
        }

    quiet = row("pythia-70m", "peer", [10.0, 10.1, 9.9, 10.0, 10.05, 9.95, 10.0, 10.0, 10.1, 9.9])
    noisy = row("merino-tiny", "model", [2.0, 2.0, 2.1, 1.9, 2.0, 2.0, 2.0, 2.0, 14.0, 14.0])
    assert noisy["prefill_ms"]["p90_over_median"] > 5 and noisy["prefill_ms"]["cv"] > 0.5
    warnings = spread_warnings([quiet, noisy])
    assert len(warnings) == 1 and "merino-tiny fp32 plain" in warnings[0] and "p90/median" in warnings[0]
    (s,) = speedups([quiet, noisy], "merino-tiny")
    assert s["prefill_median"] == pytest.approx(10.0 / 2.0) and s["prefill"] == pytest.approx(10.0 / 4.4, rel=1e-3)


def test_the_report_schema_and_the_plot_import_no_torch() -> None:
    """Reading and drawing reports is cheap: the pipeline's summary and `latency plot` load no torch."""
    import subprocess
    import sys

    code = (
        "import sys, merino_pl.latency.report, merino_pl.latency.plot, merino_pl.latency.ratios; "
        "print([m for m in ('torch', 'merino_pl.latency.measure') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_report_schema_round_trips_and_refuses_other_files(report: dict, tmp_path: Path) -> None:
    """latency.json is LatencyReport.to_json(): read back it is the same report; another file is
    a one-line MerinoError naming it."""
    from merino_pl.core.errors import MerinoError
    from merino_pl.latency.report import FORMAT_VERSION

    assert report["format_version"] == FORMAT_VERSION
    LatencyReport.from_json(report).write(tmp_path)
    assert LatencyReport.read(tmp_path).to_json() == json.loads((tmp_path / "latency.json").read_text())
    assert (tmp_path / "latency.md").read_text() == render_markdown(report)
    (tmp_path / "eval.json").write_text(json.dumps({"format": "merino-eval/1"}))
    with pytest.raises(MerinoError, match="eval.json: not a latency report"):
        LatencyReport.read(tmp_path / "eval.json")
