"""Device kit vs ``latency profile`` on this CPU: the same pieces timed both ways, with the noise.

    python bench/latency_kit.py [--space SPACE] [--repeats 3] [--runs 16] [--threads 1]

For a small search space (default: two embed widths, two FFN widths, d_model 128, sequence 128),
``merino-pl latency kit --space`` writes the pieces' ONNX graphs and ``run_kit.py``; the runner
times them ``--repeats`` times in an interpreter where neither torch nor merino_pl can be
imported (the base Python with ``-I -S`` and a path holding only numpy and onnxruntime, as on a
device), and ``merino-pl latency profile --runtime onnxruntime`` times the same graphs here, in
merino-pl's own process, ``--repeats`` times; ``latency profile`` (torch: the modules, not the
graphs) is timed too, for reference. Per entry (layer shape, projection, fixed part): each one's
ms (median of the repeats' means, the statistic the table keeps), the noise (the spread of the
repeats' means, (max - min) / median, and the kit's within-run CV), and kit / profile with
whether it lies within the noise: |ln(kit / profile)| <= ln(1 + kit spread) + ln(1 + profile
spread). Runs alternate kit and profiles, so a load change hits all. The kit and the onnxruntime
profile time one runtime and should agree; the torch profile times another (the table a kit
brings back describes the deployed runtime, not torch).
Prints the table; writes runs/bench/latency_kit.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # device_env: the device's environment, shared with tests/test_kit.py

from device_env import device_site, run_on_device  # noqa: E402
from merino_pl.cli import main as merino  # noqa: E402
from merino_pl.core.io import write_json  # noqa: E402
from merino_pl.core.latency_table import LatencyTable  # noqa: E402

SPACE = (
    "num_blocks: 2\nembed_dims: [64, 128]\nffn_dims: [128, 256]\nnum_layers: [1, 2]\n"
    "architecture: {vocab_size: 2048, d_model: 128, max_position_embeddings: 256}\n"
)


def device_path(tmp: Path) -> Path:
    return device_site(tmp / "device-site")


def entry_key(e: dict) -> str:
    if "embed_dim" in e:
        return f"layer E{e['embed_dim']}-F{e['ffn_dim']}"
    return f"projection {e['in']} -> {e['out']}" if "in" in e else "fixed"


def table_ms(table: LatencyTable) -> dict[str, float]:
    entries = [*table.layers, *table.projections, table.fixed]
    return {entry_key(e): float(e["ms"]) for e in entries}


def kit_run(kit: Path, site: Path, threads: int, out: Path) -> dict:
    """One run of the kit's runner in the torch-free interpreter, imported as a table."""
    done = run_on_device(kit, site, "--threads", str(threads), "--out", str(out), threads=threads)
    if done.returncode:
        raise SystemExit(f"run_kit.py failed: {done.stderr.strip()}")
    results = json.loads(out.read_text())
    table = out.with_suffix(".table.json")
    assert merino(["latency", "import", str(out), "--kit", str(kit), "--out", str(table)]) == 0
    names = {g["file"]: entry_key(g) for g in json.loads((kit / "manifest.json").read_text())["graphs"]}
    cv = {names[g["file"]]: g["ms"]["cv"] for g in results["graphs"]}
    return {"ms": table_ms(LatencyTable.load(table)), "cv": cv}


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=None, help="a search space YAML (default: a small one, two embed widths)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (default: 3)")
    ap.add_argument("--runs", type=int, default=16, help="timed runs per piece (default: 16)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime and torch threads (default: 1)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "latency_kit.json"))
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-latency-kit-") as tmp_name:
        tmp = Path(tmp_name)
        space = Path(args.space) if args.space else tmp / "space.yaml"
        if not args.space:
            space.write_text(SPACE)
        kit, site = tmp / "kit", device_path(tmp)
        argv = ["--seq", str(args.seq), "--runs", str(args.runs), "--warmup", str(args.warmup)]
        assert merino(["latency", "kit", "--space", str(space), *argv, "--out", str(kit)]) == 0
        kits, profiles, torches = [], [], []
        for i in range(args.repeats):
            kits.append(kit_run(kit, site, args.threads, tmp / f"results-{i}.json"))
            threads = ["--threads", str(args.threads)]
            for runtime, tables in (("onnxruntime", profiles), ("torch", torches)):
                table = tmp / f"profile-{runtime}-{i}.json"
                cmd = ["latency", "profile", "--space", str(space), *argv, *threads, "--runtime", runtime]
                assert merino([*cmd, "--out", str(table)]) == 0
                tables.append(table_ms(LatencyTable.load(table)))
    rows = []
    for key in profiles[0]:
        k = [r["ms"][key] for r in kits]
        p = [r[key] for r in profiles]
        ks, ps = spread(k), spread(p)
        ratio = statistics.median(k) / statistics.median(p)
        torch_ms = statistics.median(r[key] for r in torches)
        rows.append(
            {
                "entry": key,
                "kit_ms": statistics.median(k),
                "kit_repeats": k,
                "kit_spread": ks,
                "kit_cv_within_runs": statistics.median(r["cv"][key] for r in kits),
                "profile_ms": statistics.median(p),
                "profile_repeats": p,
                "profile_spread": ps,
                "kit_over_profile": ratio,
                "within_noise": abs(math.log(ratio)) <= math.log1p(ks) + math.log1p(ps),
                "torch_profile_ms": torch_ms,
                "kit_over_torch_profile": statistics.median(k) / torch_ms,
            }
        )
    print(
        f"\nkit (onnxruntime, torch-free interpreter) vs latency profile --runtime onnxruntime (and torch) "
        f"on this CPU: {args.repeats} "
        f"repeats each, {args.runs} runs per piece, {args.threads} thread(s), seq {args.seq} "
        f"({time.time() - t0:.0f} s)\n"
    )
    print(
        "| entry | kit ms | kit spread % | kit CV in a run % | profile ms | profile spread % "
        "| kit / profile | within noise | torch profile ms | kit / torch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['entry']} | {r['kit_ms']:.3f} | {100 * r['kit_spread']:.0f} | {100 * r['kit_cv_within_runs']:.0f} | "
            f"{r['profile_ms']:.3f} | "
            f"{100 * r['profile_spread']:.0f} | {r['kit_over_profile']:.2f} | {'yes' if r['within_noise'] else 'no'} | "
            f"{r['torch_profile_ms']:.3f} | {r['kit_over_torch_profile']:.2f} |"
        )
    agree = sum(r["within_noise"] for r in rows)
    print(f"\n{agree} of {len(rows)} entries agree within the measured noise")
    write_json(args.out, {"repeats": args.repeats, "runs": args.runs, "threads": args.threads, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
