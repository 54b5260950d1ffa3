"""``merino-pl latency kit``: what a device needs to time a model or a search space, and nothing it
cannot install; ``merino-pl latency import``: its results back as a report or a latency table.

A kit folder holds ONNX graphs, ``manifest.json`` (each graph's role, shapes and SHA-256, the
protocol, and ``kit_id``: the hash of all of it) and ``run_kit.py`` (``kit_runner.py``: numpy +
onnxruntime only). For a model: its decoder graph with KV cache per precision (fp32, fp16; a GPTQ
directory: the packed ``MatMulNBits`` graph at its own bits). For a space: the pieces ``latency
profile`` times with torch (one graph per layer shape, per projection, and the fixed part), with
the protocol's static batch x sequence shapes. The import checks the results name this kit and
its graphs' hashes, so results of another kit (or of a graph changed since) are refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_dir, read_json, sha256_file, write_json
from merino_pl.latency.options import Timing

KIT_FORMAT, RESULTS_FORMAT = "merino-latency-kit/1", "merino-latency-kit-results/1"
MANIFEST, RUNNER = "manifest.json", "run_kit.py"
KIT_PRECISIONS = ("fp32", "fp16")  # a GPTQ directory: its own bits


@dataclass(kw_only=True)
class KitSettings(Timing):
    """One kit: of a model (``source``) or of a search space (``space``), into ``out``, its graphs
    timed on the device as ``Timing`` says (the same fields and checks as a report's ``Options``)."""

    out: str
    source: str | None = None  # anything `merino-pl latency` times
    space: str | None = None  # a search-space YAML
    precisions: tuple[str, ...] = ("fp32",)
    overwrite: bool = False  # replace an existing kit folder at ``out``

    def problems(self) -> list[str]:
        from merino_pl.core.io import check_out

        p = []
        if (self.source is None) == (self.space is None):
            p.append("give MODEL or --space SPACE (one of them)")
        if self.space is not None and not Path(self.space).is_file():
            p.append(f"--space {self.space}: no such file")
        bad = [x for x in self.precisions if x not in KIT_PRECISIONS]
        if bad or not self.precisions:
            p.append(f"--precision {','.join(bad) or '(empty)'} is not valid (choose from {','.join(KIT_PRECISIONS)})")
        return p + self.timing_problems() + check_out(self.out, overwrite=self.overwrite)

    def protocol(self) -> dict[str, Any]:
        """What the manifest records (and ``kit_id`` hashes): ``Timing``'s fields and the input seed."""
        return {**{f.name: getattr(self, f.name) for f in fields(Timing)}, "seed": 0}


def build_kit(settings: KitSettings) -> dict[str, Any]:
    """Write the kit folder (atomically: all of it or nothing); returns its manifest."""
    problems = settings.problems()
    if problems:
        raise MerinoError("; ".join(problems))
    with atomic_dir(Path(settings.out)) as tmp:
        (tmp / "graphs").mkdir()
        if settings.space is not None:
            graphs, about = _space_graphs(settings, tmp)
        else:
            graphs, about = _model_graphs(settings, tmp)
        for g in graphs:
            g["sha256"], g["bytes"] = sha256_file(tmp / g["file"]), (tmp / g["file"]).stat().st_size
        manifest = {"format": KIT_FORMAT, "kind": "space" if settings.space else "model", **about}
        manifest |= {"protocol": settings.protocol(), "graphs": graphs}
        manifest["kit_id"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        write_json(tmp / MANIFEST, manifest)
        shutil.copy(Path(__file__).with_name("kit_runner.py"), tmp / RUNNER)
    return manifest


def _model_graphs(s: KitSettings, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The model's decoder graph (KV cache) per precision; a GPTQ directory's at its own bits."""
    import copy

    import torch

    from merino_pl.core.checkpoint import load_model
    from merino_pl.export.onnx import export_onnx
    from merino_pl.latency.api import model_info

    loaded = load_model(s.source)
    if loaded.kind == "gptq":
        precisions = (f"int{int(loaded.model.config.quantization_config['bits'])}",)
    else:
        precisions = s.precisions
    graphs = []
    for p in precisions:
        model = loaded.model if p.startswith("int") else copy.deepcopy(loaded.model).to(getattr(torch, _TORCH[p]))
        name = f"graphs/model-{p}.onnx"
        export_onnx(model, tmp / name)
        params = sum(t.numel() for t in loaded.model.parameters())
        graphs.append({"file": name, "role": "decoder", "precision": p, "params": params})
    return graphs, {"model": model_info(loaded, s.seq)}


_TORCH = {"fp32": "float32", "fp16": "float16"}


def _space_graphs(s: KitSettings, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every piece ``latency profile`` times (profile.pieces), exported with static shapes."""
    from merino_pl.core.space import load_space
    from merino_pl.latency.profile import export_piece, pieces

    space = load_space(s.space)
    graphs = []
    for entry, module, example in pieces(space, s.batch, s.seq):
        name = f"graphs/{_piece_name(entry)}.onnx"
        export_piece(module, example, tmp / name)
        graphs.append({"file": name, **entry})
    return graphs, {"space": str(s.space), "precision": "fp32"}


def _piece_name(entry: dict[str, Any]) -> str:
    if entry["role"] == "layer":
        return f"layer-E{entry['embed_dim']}-F{entry['ffn_dim']}"
    return f"projection-{entry['in']}x{entry['out']}" if entry["role"] == "projection" else "fixed"


# ---- import -------------------------------------------------------------------------------------
def read_results(results: str | Path, kit: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, manifest), checked to belong together: a ``MerinoError`` naming the mismatch."""
    data = read_json(results, "latency kit results")
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise MerinoError(f"{results}: not latency kit results (format {got!r}; expected {RESULTS_FORMAT!r})")
    manifest = read_json(Path(kit) / MANIFEST, "latency kit manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != KIT_FORMAT:
        raise MerinoError(f"{kit}: not a latency kit (no {MANIFEST} of format {KIT_FORMAT!r})")
    if data.get("kit_id") != manifest["kit_id"]:
        raise MerinoError(
            f"{results}: results of another kit (kit_id {str(data.get('kit_id'))[:12]}..., "
            f"{kit} is {manifest['kit_id'][:12]}...)"
        )
    expected = {g["file"]: g["sha256"] for g in manifest["graphs"]}
    got = {g["file"]: g["sha256"] for g in data["graphs"]}
    if got != expected:
        bad = sorted(set(expected.items()) ^ set(got.items()))
        raise MerinoError(f"{results}: graphs differ from {kit}'s manifest ({bad[0][0]}, {len(bad)} differences)")
    return data, manifest


def device_of(results: dict[str, Any]) -> dict[str, Any]:
    """The device as the runner described it, with the keys a report's ``device`` has."""
    d = results["device"]
    jetson = None
    if d.get("nv_tegra_release"):
        from merino_pl.latency.device import parse_tegra_release

        jetson = parse_tegra_release(d["nv_tegra_release"])
    gpu = d.get("gpu")
    summary = f"{d['cpu']} ({d['cpu_count']} cores)" + (f", {gpu}" if gpu else "") + (", Jetson" if jetson else "")
    return {
        **d,
        "device": ",".join(p.replace("ExecutionProvider", "") for p in d["providers"]),
        "torch_threads": d.get("threads") or "default",  # onnxruntime's intra-op threads: no torch there
        "gpu": {"name": gpu, "cuda_runtime": "–", "driver": "–"} if gpu else None,
        "jetson": jetson,
        "summary": f"{summary} [onnxruntime {d['onnxruntime']}]",
    }


def import_results(results: str | Path, kit: str | Path, out: str | Path) -> Path:
    """``merino-pl latency import``: a space kit's results as the latency table ``out`` (what
    ``search --latency-table`` reads), a model kit's as a latency report in the folder ``out``."""
    from merino_pl.latency.api import new_folders_undone

    data, manifest = read_results(results, kit)
    timed = {g["file"]: g for g in data["graphs"]}
    with new_folders_undone(Path(out).parent), new_folders_undone(out, contents=True):  # a failed write: gone
        if manifest["kind"] == "space":
            return _table(data, manifest, timed, Path(out))
        return _report(data, manifest, timed, Path(out))


def _table(data: dict[str, Any], manifest: dict[str, Any], timed: dict[str, Any], out: Path) -> Path:
    from merino_pl.core.latency_table import LatencyTable

    layers, projections, fixed = [], [], {}
    for g in manifest["graphs"]:
        entry = {k: v for k, v in g.items() if k not in ("file", "sha256", "role", "bytes")} | {
            "ms": timed[g["file"]]["ms"]["mean"]
        }
        if g["role"] == "fixed":
            fixed = entry
        else:
            (layers if g["role"] == "layer" else projections).append(entry)
    p = data["protocol"]
    table = LatencyTable(fixed, layers, projections, device_of(data), "", manifest["precision"], p["batch"], p["seq"])
    table.save(out)
    return out


def _report(data: dict[str, Any], manifest: dict[str, Any], timed: dict[str, Any], out: Path) -> Path:
    from merino_pl.latency.report import LatencyReport

    p, rows = data["protocol"], []
    for g in manifest["graphs"]:
        t = timed[g["file"]]
        rows.append(
            {
                "model": manifest["model"]["name"],
                "role": "model",
                "precision": g["precision"],
                "path": "onnxruntime",
                "runtime": "onnxruntime",
                "params": g["params"],
                "flops_g": manifest["model"]["flops_g"],
                "weights_bytes": g["bytes"],  # the graph file
                "weights_in_memory_bytes": None,  # held by onnxruntime on the device: not measured
                "workspace_bytes": None,
                "prefill_ms": t["prefill_ms"],
                "decode_ms_per_token": t["decode_ms_per_token"],
                "peak_memory_bytes": None,
                "peak_memory_method": "not measured on the device (the kit's runner times only)",
                "onnx_file": g["file"],
                "providers": t["providers"],
            }
        )
    from merino_pl.latency.ratios import fast_path_gains, spread_warnings

    report = LatencyReport(
        model=manifest["model"],
        device=device_of(data),
        torch="– (timed without torch)",
        transformers="–",
        onnxruntime=data["device"]["onnxruntime"],
        precisions=[g["precision"] for g in manifest["graphs"]],
        protocol={
            "protocols": ["kit"],
            "paper": None,
            "generation": None,
            "batch": p["batch"],
            "seq_len": p["seq"],
            "runs": p["runs"],
            "warmup": p["warmup"],
            "decode_tokens": p["decode_tokens"],
            "statistic": "mean (paper), median, p90 of the runs",
            "timing": "the device kit's run_kit.py: warm-up, then each run timed alone with time.perf_counter",
            "inputs": f"random token ids (seed {p.get('seed', 0)})",
            "decode": f"{p['decode_tokens']} one-token steps on a {p['seq']}-token KV cache, per token",
            "kit_id": manifest["kit_id"],
        },
        rows=rows,
        generation=[],
        paper_protocol=None,
        speedups=[],
        fast_path=fast_path_gains(rows),
        checks=[],
        skipped=[],
        warnings=data.get("warnings", []) or spread_warnings(rows),
    )
    report.write(out)
    return out
