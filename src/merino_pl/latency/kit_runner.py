"""Time a merino-pl latency kit on this device: ``python run_kit.py [--providers cpu] [--out results.json]``.

Standalone on purpose: a device kit (``merino-pl latency kit``) runs where merino-pl cannot be
installed (a Jetson Nano's JetPack 4 has Python 3.6 / 3.8 and its own onnxruntime wheels), so
this file needs only Python >= 3.8, numpy and onnxruntime: no torch, no merino_pl.

It reads ``manifest.json`` beside it, checks every graph's SHA-256 against it, and times each
graph with the latency report's protocol: batch and sequence from the manifest (1 x 128),
``warmup`` untimed calls, then ``runs`` timed calls, each alone with ``time.perf_counter``;
mean (the paper's statistic), median and p90, and a warning where the runs spread too much
(CV > 15 % or p90 > 1.5 x median). A decoder graph is timed as a prefill on an empty cache and
as ``decode_tokens`` one-token steps on the prompt's cache (per token); a piece of a search
space as one call. The results (with the device: CPU, threads, /etc/nv_tegra_release, GPU,
onnxruntime version and providers) go to ``--out``, for ``merino-pl latency import`` back on the
workstation. A bad argument (a provider this onnxruntime lacks) is one line, exit code 2.
"""

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

RESULTS_FORMAT = "merino-latency-kit-results/1"
KIT_FORMAT = "merino-latency-kit/1"
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
CV_LIMIT, P90_LIMIT = 0.15, 1.5  # the report's spread limits (merino_pl.latency.report)


class KitError(Exception):
    """A bad argument or kit: one line on stderr, exit code 2."""


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stats(ms):
    """mean / median / p90 (numpy's linear interpolation) / min / max / std, cv, p90_over_median."""
    s = sorted(ms)
    pos = 0.9 * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    p90 = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    mean, median = statistics.mean(s), statistics.median(s)
    std = statistics.stdev(s) if len(s) > 1 else 0.0
    out = {"mean": mean, "median": median, "p90": p90, "min": s[0], "max": s[-1], "std": std}
    out = {k: round(v, 4) for k, v in out.items()}
    out["runs"] = [round(x, 4) for x in ms]
    out["cv"] = round(std / mean, 4) if mean > 0 else 0.0
    out["p90_over_median"] = round(p90 / median, 4) if median > 0 else 1.0
    return out


def time_calls(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def device_info(threads, providers):
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.lower().startswith(("model name", "hardware"))]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    tegra = None
    if os.path.exists("/etc/nv_tegra_release"):
        with open("/etc/nv_tegra_release") as f:
            tegra = f.read().strip()
    gpu = None
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if not gpu and os.path.exists("/proc/device-tree/model"):
        with open("/proc/device-tree/model", "rb") as f:
            gpu = f.read().rstrip(b"\x00").decode(errors="replace")  # a Jetson names its board here
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "nv_tegra_release": tegra,
        "gpu": gpu or None,
        "onnxruntime": ort.__version__,
        "providers_available": ort.get_available_providers(),
        "providers": providers,
    }


def read_kit(kit):
    path = os.path.join(kit, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise KitError(f"{path}: not a latency kit manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != KIT_FORMAT:
        raise KitError("{}: not a latency kit manifest (format {!r})".format(path, manifest.get("format")))
    for g in manifest["graphs"]:
        got = sha256(os.path.join(kit, g["file"]))
        if got != g["sha256"]:
            raise KitError(
                "{}: SHA-256 {} is not the manifest's {} (a graph of another kit?)".format(g["file"], got, g["sha256"])
            )
    return manifest


def session(path, providers, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=providers)


def feed_pieces(sess, vocab):
    """Random inputs of a piece's static shapes: floats for activations, token ids for the fixed part."""
    import numpy as np

    rng = np.random.default_rng(0)
    feed = {}
    for i in sess.get_inputs():
        if "int" in i.type:
            feed[i.name] = rng.integers(0, vocab or 2, size=i.shape).astype(np.int64)
        else:
            dtype = np.float16 if "float16" in i.type else np.float32
            feed[i.name] = rng.standard_normal(i.shape).astype(dtype)
    return feed


def time_decoder(sess, protocol):
    """Prefill of ``seq`` tokens on an empty cache; decode steps on its cache, per token."""
    import numpy as np

    inputs = {i.name: i for i in sess.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    present = [n.replace("past_key_values.", "present.", 1) for n in past]
    dtype = np.float16 if inputs[past[0]].type == "tensor(float16)" else np.float32
    batch, seq, steps = protocol["batch"], protocol["seq"], protocol["decode_tokens"]
    vocab = sess.get_outputs()[0].shape[-1]
    rng = np.random.default_rng(protocol.get("seed", 0))
    ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int64)
    next_ids = rng.integers(0, vocab, size=(batch, steps)).astype(np.int64)
    empty = [np.zeros((batch, inputs[n].shape[1], 0, inputs[n].shape[3]), dtype) for n in past]

    def run(tokens, start, cache):
        T = tokens.shape[1]
        feed = {"input_ids": tokens, "attention_mask": np.ones((batch, start + T), np.int64)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, start + T, dtype=np.int64)[None].repeat(batch, 0)
        feed.update(zip(past, cache))
        out = sess.run(["logits"] + present, feed)
        return out[0], out[1:]

    prefill = time_calls(lambda: run(ids, 0, empty), protocol["runs"], protocol["warmup"])
    cache = run(ids, 0, empty)[1]

    def decode():
        c = cache
        for i in range(steps):
            c = run(next_ids[:, i : i + 1], seq + i, c)[1]

    decode_ms = time_calls(decode, protocol["runs"], protocol["warmup"])
    return {"prefill_ms": stats(prefill), "decode_ms_per_token": stats([t / steps for t in decode_ms])}


def spread_warnings(name, timings):
    out = []
    for key, s in timings.items():
        if s["cv"] > CV_LIMIT or s["p90_over_median"] > P90_LIMIT:
            out.append(
                "noisy timings, {} {}: CV {:.0f} %, p90/median {:.2f} (limits CV {:.0f} %, p90/median {}): "
                "rerun on a quiet device or with more --runs".format(
                    name, key, 100 * s["cv"], s["p90_over_median"], 100 * CV_LIMIT, P90_LIMIT
                )
            )
    return out


def run_kit(kit, providers, threads, runs=None):
    import onnxruntime as ort

    manifest = read_kit(kit)
    wanted = [PROVIDERS[p] for p in providers]
    missing = [p for p, name in zip(providers, wanted) if name not in ort.get_available_providers()]
    if missing:
        raise KitError(
            "--providers {}: not in this onnxruntime {} (it has {})".format(
                ",".join(missing), ort.__version__, ", ".join(ort.get_available_providers())
            )
        )
    protocol = dict(manifest["protocol"])
    if runs:
        protocol["runs"] = runs
    results, warnings = [], []
    for g in manifest["graphs"]:
        sess = session(os.path.join(kit, g["file"]), wanted, threads)
        if g["role"] == "decoder":
            timings = time_decoder(sess, protocol)
        else:
            feed = feed_pieces(sess, g.get("vocab_size"))
            call = lambda sess=sess, feed=feed: sess.run(None, feed)  # noqa: E731
            timings = {"ms": stats(time_calls(call, protocol["runs"], protocol["warmup"]))}
        warnings += spread_warnings(g["file"], timings)
        results.append(dict({"file": g["file"], "sha256": g["sha256"], "providers": sess.get_providers()}, **timings))
        print("{}: {}".format(g["file"], ", ".join("{} {:.3f} ms".format(k, v["mean"]) for k, v in timings.items())))
    return {
        "format": RESULTS_FORMAT,
        "kit_id": manifest["kit_id"],
        "kind": manifest["kind"],
        "protocol": protocol,
        "device": device_info(threads, wanted),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "graphs": results,
        "warnings": warnings,
    }


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kit", default=here, help="the kit folder (default: this file's)")
    p.add_argument("--providers", default="cpu", help="comma-separated, in order of preference, of tensorrt,cuda,cpu")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per graph (default: the kit's, 16)")
    p.add_argument("--out", default="results.json", help="the results file to write (default: results.json)")
    args = p.parse_args(argv)
    try:
        providers = [x.strip().lower() for x in args.providers.split(",") if x.strip()]
        bad = [x for x in providers if x not in PROVIDERS]
        if bad or not providers:
            raise KitError("--providers {}: not one of {}".format(",".join(bad) or "(empty)", ",".join(PROVIDERS)))
        if args.runs is not None and args.runs < 1:
            raise KitError(f"--runs must be >= 1, got {args.runs}")
        if os.path.exists(args.out):
            raise KitError(f"--out {args.out}: exists (name a new file; nothing is overwritten)")
        results = run_kit(args.kit, providers, args.threads, args.runs)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    for w in results["warnings"]:
        print("warning: " + w)
    print("wrote {} ({} graphs on {})".format(args.out, len(results["graphs"]), results["device"]["cpu"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
