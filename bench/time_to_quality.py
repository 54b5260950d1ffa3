"""Time to quality (issue 25): held-out nats per character reached within a wall-clock budget.

    python bench/time_to_quality.py                      # budgets 3 and 6 min, all three systems
    python bench/time_to_quality.py --budgets 180         # one budget
    python bench/time_to_quality.py --contenders demo,gpt # without the peer (no .venv/litgpt)

On one thread each, one run at a time, the same text (the embedded corpus, paragraphs held out
by hash at the demo's val_fraction), the same tokenizer and held-out scoring
(``merino_pl.eval.intrinsic``: windows of the trained context, nats over characters):

(a) ``demo``: the demo's pipeline, i.e. ``merino-pl search --config search/cpu-demo.yaml`` then
    ``merino-pl fit --config recipes/fit/cpu-demo.yaml`` on its recipe (search time counted);
(b) ``gpt``: a GPT-2-shaped decoder (every layer its own weights, FFN 4x, width 128) with as many
    layers as the same 6.5 GFLOPs budget fits, trained by the same ``fit`` config;
(c) ``litgpt``: LitGPT (``litgpt`` 0.5.13 on PyPI) pretraining the same-size GPT with its own
    training code and recipe (``litgpt.pretrain.setup``: its Fabric loop, ``torch.compile``, init,
    AdamW 6e-4 / betas 0.9, 0.95 / weight decay 0.1, clip 1.0, warm-up + cosine to 6e-5, tied
    embeddings: its ``nano_gpt.yaml`` GPT-2 recipe), scaled only where a tiny model needs it (batch
    8 as fit, warm-up as fit's rule, fp32; ``bench/peers/litgpt_peer.py`` says which and why). It
    runs in ``.venv/litgpt`` (``make litgpt-env``, built here when missing: LitGPT pins
    jsonargparse <= 4.41 and huggingface-hub < 1.4, which clash with this project's). This script
    writes its data with merino-pl's own split code: the training paragraphs (held-out ones
    excluded) as text, which LitGPT tokenizes with the same ``tokenizer.json``, and the held-out
    token stream, which the peer scores with ``intrinsic``'s windows; the nats are divided here by
    the same character count (checked against (a) and (b)'s). Nothing is downloaded.

nanoGPT's published character-level figure (1.88 nats / character: its "baby GPT" on a CPU in
~3 min, on its own split) is drawn as a reference line.

Each run gets its step count = (budget - start-up) x the step rate measured by a short probe run
(``max_steps`` for fit, ``max_tokens`` for LitGPT), so the lr schedule ends near the budget, and a
hard stop at the budget counted from the system's start (fit: Lightning's ``max_time``, which counts
from the first step, = budget - search - the probe's start-up; LitGPT has no ``max_time``: its
training data ends at the deadline, which ends its loop; neither stops inside a start-up that is
longer than the budget). LitGPT's start-up includes its ``torch.compile`` (cold: each run
gets a fresh compile cache). The probe is not counted. Curves are stamped as each progress line
arrives, in seconds since the system's first command started (search counted for (a)). The
machine's load is whatever it is: the JSON records it (load average) and every figure here is a
wall-clock figure under that load.

Writes runs/bench/time_to_quality/time_to_quality.{json,md,png}, each run's folder and log beside them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.core.config import BlockConfig, MerinoConfig, Recipe  # noqa: E402
from merino_pl.core.costs import count_flops, count_params  # noqa: E402
from merino_pl.eval.intrinsic import IntrinsicScore, heldout_figures  # noqa: E402

FIT_CONFIG = REPO / "recipes" / "fit" / "cpu-demo.yaml"
SEARCH_CONFIG = REPO / "search" / "cpu-demo.yaml"
LITGPT_PYTHON = REPO / ".venv" / "litgpt" / "bin" / "python"
LITGPT_STAMP = REPO / ".venv" / "litgpt" / ".installed"
LITGPT_PEER = REPO / "bench" / "peers" / "litgpt_peer.py"
CONTENDERS = ("demo", "gpt", "litgpt")
NANOGPT_CPU = 1.88  # nanoGPT README: character-level Shakespeare "baby GPT" on a CPU, ~3 min, val loss
FLOPS_BUDGET = 6.5e9  # search/cpu-demo.yaml's budget (paper convention)
FIT_LINE = re.compile(r"step\s+(\d+)/\d+\s+loss\s+([\d.]+)")
LITGPT_LINE = re.compile(r"iter \d+ step (\d+) \| loss train: ([\d.]+)")
LITGPT_DONE = "litgpt_peer: training done"


def gpt_recipe(out: Path) -> Path:
    """(b): GPT-2 proportions at width 128, as many unshared layers as the FLOPs budget fits."""
    n, arch = 1, None
    while True:
        blocks = tuple(BlockConfig(embed_dim=128, ffn_ratio=4, num_layers=1) for _ in range(n))
        cand = MerinoConfig(blocks=blocks, vocab_size=2048, d_model=128, max_position_embeddings=128)
        if count_flops(cand) > FLOPS_BUDGET:
            break
        arch, n = cand, n + 1
    recipe = Recipe(f"gpt-{n - 1}x128", arch, {"source": "bench/time_to_quality.py", "shape": "GPT-2, FFN 4x"})
    return recipe.save(out)


def run_logged(
    cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None
) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd`` (stdout and stderr merged, unbuffered; ``env`` added to this process's); its
    wall-clock seconds and its output lines, each stamped with the seconds since the start at which
    it arrived (also written to ``log``)."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with (
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env) as proc,
        log.open("w") as f,
    ):
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            f.write(f"[{lines[-1][0]:8.2f}] {line}")
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}); log: {log}\n{tail}")
    return seconds, lines


def merino(*argv: str, log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run a ``merino-pl`` command: its wall-clock seconds and stamped output lines."""
    return run_logged([sys.executable, "-m", "merino_pl.cli", *argv], log, f"merino-pl {' '.join(argv[:1])}")


def curve(lines: list[tuple[float, str]], pattern: re.Pattern = FIT_LINE) -> list[tuple[float, int, float]]:
    """(seconds since the command started, step, training loss) from its progress lines."""
    return [(t, int(m[1]), float(m[2])) for t, text in lines if (m := pattern.search(text))]


def rate_of(points: list[tuple[float, int, float]], end_s: float) -> tuple[float, float]:
    """(start-up seconds, steps per second) of a run from its progress points and the seconds at
    which its training ended: the rate between the first and last point, the rest start-up."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        raise SystemExit(f"the probe logged {len(points)} progress line(s): raise --probe-steps")
    (t0, s0, _), (t1, s1, _) = points[0], points[-1]
    rate = (s1 - s0) / (t1 - t0)
    return max(0.0, end_s - s1 / rate), rate


def schedule(steps: int) -> tuple[int, int]:
    """(warm-up steps, log interval) of a run of ``steps``: fit's demo rule (60, capped at a tenth),
    and >= 2 progress lines for a probe."""
    return min(60, max(1, steps // 10)), max(1, min(20, steps // 4))


# ---- (a), (b): merino-pl fit ---------------------------------------------------------------------
def fit(recipe: Path, run: Path, steps: int, max_time_s: float | None) -> tuple[float, list[tuple[float, str]]]:
    warmup, log_every = schedule(steps)
    argv = ["fit", "--config", str(FIT_CONFIG), "--model.recipe", str(recipe), "--trainer.max_steps", str(steps)]
    argv += ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)]
    argv += ["--data.val_sequences", "0", "--trainer.limit_val_batches", "0"]
    argv += ["--checkpoint.every_n_train_steps", str(steps), "--model.warmup_steps", str(warmup)]
    argv += ["--trainer.log_every_n_steps", str(log_every)]
    if max_time_s is not None:
        d, rest = divmod(int(max_time_s), 86400)
        argv += ["--trainer.max_time", f"{d:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"]
    return merino(*argv, log=run.with_suffix(".log"))


def run_merino(name: str, budget: float, run: Path, probe_steps: int) -> dict:
    search_s = 0.0
    if name == "demo":
        recipe = run / "recipe.yaml"
        argv = ["search", "--config", str(SEARCH_CONFIG), "--out", str(recipe), "--no-plot"]
        search_s, _ = merino(*argv, log=run / "search.log")
    else:
        recipe = gpt_recipe(run / "recipe.yaml")
    seconds, lines = fit(recipe, run / "probe", probe_steps, None)
    startup, rate = rate_of(curve(lines), seconds)
    steps = max(20, int((budget - search_s - startup) * rate))
    # Lightning's max_time counts from the first step: the budget less what comes before it
    seconds, lines = fit(recipe, run / "fit", steps, max(1.0, budget - search_s - startup))
    figures = heldout_figures({name: run / "fit" / "checkpoints" / "last.ckpt"}, _data(), wikitext_chars=None)
    arch = yaml.safe_load(recipe.read_text())["architecture"]
    cfg = MerinoConfig.from_dict(arch)
    points = curve(lines)
    return {
        "contender": name,
        "budget_s": budget,
        "search_s": round(search_s, 1),
        "fit_s": round(seconds, 1),
        "probe": {"startup_s": round(startup, 1), "steps_per_s": round(rate, 3)},
        "max_steps": steps,
        "steps_done": max((s for _, s, _ in points), default=0),
        "recipe": {"blocks": arch["blocks"], "params": count_params(cfg), "flops": count_flops(cfg)},
        "heldout": figures[name]["indomain"],
        "curve": [(round(t + search_s, 2), s, loss) for t, s, loss in points],
    }


# ---- (c): LitGPT ---------------------------------------------------------------------------------
def litgpt_env() -> Path:
    """``.venv/litgpt``'s python, built with ``make litgpt-env`` when missing."""
    if not LITGPT_STAMP.is_file():
        print("== building .venv/litgpt (make litgpt-env: once, a few minutes)", flush=True)
        proc = subprocess.run(["make", "-C", str(REPO), "litgpt-env"])
        if proc.returncode != 0 or not LITGPT_PYTHON.is_file():
            raise SystemExit(
                f"litgpt: `make litgpt-env` failed (exit {proc.returncode}); run it to see why, "
                "or leave LitGPT out with --contenders demo,gpt"
            )
    return LITGPT_PYTHON


def litgpt_data(out: Path) -> Path:
    """The peer's data, written with merino-pl's own split and tokenizer code (once per ``out``):
    ``train.jsonl`` (the paragraphs fit trains on, in source order), ``train_meta.json`` (their
    token count with merino-pl's packing), ``heldout.json`` (``intrinsic``'s token stream of the
    held-out paragraphs: ids, characters, bytes, window) and ``tokenizer/`` (the shipped
    ``tokenizer.json`` and the ``tokenizer_config.json`` LitGPT's ``Tokenizer`` reads)."""
    from merino_pl.core.tokenizer import find_eos, load_tokenizer, shipped_tokenizer_file
    from merino_pl.data import DocumentTokenizer, is_heldout
    from merino_pl.data.sources import open_stream, resolve_source
    from merino_pl.eval.intrinsic import fit_data, heldout_texts, token_stream

    folder = out / "litgpt-data"
    data = fit_data(_data())
    spec = _data()["tokenizer"]
    key = {**data, "tokenizer": spec}
    meta = folder / "train_meta.json"
    if (folder / "heldout.json").is_file() and meta.is_file() and json.loads(meta.read_text()).get("data") == key:
        return folder
    tok = load_tokenizer(spec)
    eos = find_eos(tok, spec)
    src = resolve_source(str(data["source"]))
    field = src.field(str(data["text_field"]))
    train = []
    for batch in open_stream(src).iter(batch_size=1024):  # the documents PackedStream trains on
        train += [t for t in batch[field] if t and not is_heldout(t, float(data["val_fraction"]))]
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped_tokenizer_file(spec), folder / "tokenizer" / "tokenizer.json")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.id_to_token(eos), "add_bos_token": False}
        )
    )
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in train)
    tokens = len(DocumentTokenizer(spec, eos)(train))
    texts = heldout_texts("indomain", str(data["source"]), float(data["val_fraction"]), str(data["text_field"]))
    ids, chars, nbytes = token_stream(texts, spec)
    heldout = {"ids": ids.tolist(), "characters": chars, "bytes": nbytes, "window": int(data["seq_len"])}
    (folder / "heldout.json").write_text(json.dumps(heldout))
    meta.write_text(json.dumps({"data": key, "documents": len(train), "tokens": tokens}))  # last: marks it complete
    return folder


def litgpt(python: Path, data: Path, run: Path, layers: int, steps: int, deadline_s: float | None) -> tuple:
    """One LitGPT run of ``steps`` optimizer steps: (training seconds, progress points, result)."""
    if run.exists():
        shutil.rmtree(run)  # LitGPT would resume nothing, but a stale result.json must not be read
    run.mkdir(parents=True)
    batch, block = int(_data()["batch_size"]), int(_data()["seq_len"])
    warmup, log_every = schedule(steps)
    cmd = [str(python), str(LITGPT_PEER), "--data", str(data), "--out", str(run), "--layers", str(layers)]
    cmd += ["--max-tokens", str(steps * batch * block), "--batch", str(batch), "--block", str(block)]
    cmd += ["--warmup-steps", str(warmup), "--log-interval", str(log_every)]
    if deadline_s is not None:
        cmd += ["--deadline", f"{time.time() + deadline_s:.3f}"]
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(run / "inductor-cache")}  # a cold torch.compile each run
    _, lines = run_logged(cmd, run.with_suffix(".log"), "litgpt peer", env=cold)
    done = next((t for t, text in lines if text.startswith(LITGPT_DONE)), None)
    if done is None:
        raise SystemExit(f"litgpt peer: no {LITGPT_DONE!r} line in {run.with_suffix('.log')}")
    return done, curve(lines, LITGPT_LINE), json.loads((run / "result.json").read_text())


def run_litgpt(budget: float, run: Path, out: Path, probe_steps: int) -> dict:
    python = litgpt_env()
    data = litgpt_data(out)
    heldout = json.loads((data / "heldout.json").read_text())
    arch = MerinoConfig.from_dict(yaml.safe_load(gpt_recipe(run / "recipe.yaml").read_text())["architecture"])
    layers = arch.num_layer_applications
    seconds, points, _ = litgpt(python, data, run / "probe", layers, probe_steps, None)
    startup, rate = rate_of(points, seconds)
    steps = max(20, int((budget - startup) * rate))
    seconds, points, result = litgpt(python, data, run / "fit", layers, steps, budget)
    if result["tokens"] != len(heldout["ids"]) - 1:
        expected = len(heldout["ids"]) - 1
        raise SystemExit(f"litgpt peer scored {result['tokens']} tokens, the held-out stream has {expected}")
    score = IntrinsicScore(result["nats"], result["tokens"], heldout["characters"], heldout["bytes"], result["window"])
    blocks = [{"embed_dim": b.embed_dim, "ffn_ratio": b.ffn_ratio, "num_layers": b.num_layers} for b in arch.blocks]
    return {
        "contender": "litgpt",
        "budget_s": budget,
        "search_s": 0.0,
        "fit_s": round(seconds, 1),
        "probe": {"startup_s": round(startup, 1), "steps_per_s": round(rate, 3)},
        "max_steps": steps,
        "steps_done": result["steps"],
        "recipe": {"blocks": blocks, "params": result["params"], "flops": count_flops(arch)},
        "litgpt_config": result["config"],
        "heldout": score.to_dict(),
        "curve": [(round(t, 2), s, loss) for t, s, loss in points],
    }


def run_contender(name: str, budget: float, out: Path, probe_steps: int) -> dict:
    run = out / f"{name}-{int(budget)}s"
    if run.exists():  # this bench's own run folder from an earlier run: its checkpoints would be read back
        print(f"   replacing the earlier run folder {run}", flush=True)
        shutil.rmtree(run)
    run.mkdir(parents=True)
    if name == "litgpt":
        return run_litgpt(budget, run, out, probe_steps)
    return run_merino(name, budget, run, probe_steps)


def _data() -> dict:
    return yaml.safe_load(FIT_CONFIG.read_text())["data"]


def check_same_heldout(results: list[dict]) -> None:
    """Every system was scored on the same tokens and characters (else nats / char would not compare)."""
    seen = {(r["heldout"]["tokens"], r["heldout"]["characters"], r["heldout"]["window"]) for r in results}
    if len(seen) > 1:
        raise SystemExit(f"held-out sets differ between systems (tokens, characters, window): {sorted(seen)}")


def write(results: list[dict], out: Path, chars_per_token: float) -> None:
    check_same_heldout(results)
    rows = [
        "| budget | contender | blocks | params | start-up s | steps | wall-clock s | held-out nats / char "
        "| bits / byte |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        blocks = ", ".join(
            f"({b['embed_dim']}, {b.get('ffn_ratio', b.get('ffn_dim'))}, {b['num_layers']})"
            for b in r["recipe"]["blocks"]
        )
        rows.append(
            f"| {r['budget_s']:.0f} s | {r['contender']} | {blocks} | {r['recipe']['params'] / 1e6:.2f} M | "
            f"{r['probe']['startup_s']:.0f} | {r['steps_done']} | {r['search_s'] + r['fit_s']:.0f} | "
            f"{r['heldout']['nats_per_char']:.3f} | {r['heldout']['bits_per_byte']:.3f} |"
        )
    rows.append(
        "| — | nanoGPT baby GPT (published, CPU, ~3 min, its own split) | — | 0.8 M | — | — | ~180 | "
        f"{NANOGPT_CPU} | — |"
    )
    rows.append(
        "\nStart-up: the probe's seconds before training steps (imports, data, LitGPT's cold torch.compile); "
        "wall-clock: search + fit (a), fit (b), LitGPT until its model is saved (c); held-out scoring not counted."
    )
    load = os.getloadavg()
    note = f"Load average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores."
    (out / "time_to_quality.md").write_text("\n".join(["# Time to quality", "", *rows, "", note, ""]))
    (out / "time_to_quality.json").write_text(
        json.dumps(
            {"results": results, "nanogpt_cpu": NANOGPT_CPU, "load": load, "chars_per_token": chars_per_token}, indent=1
        )
    )
    plot(results, out / "time_to_quality.png", chars_per_token)
    print("\n".join(rows) + "\n" + note)


def plot(results: list[dict], path: Path, chars_per_token: float) -> None:
    """Left: training loss (per character) against wall-clock seconds, each run's held-out figure
    as a dot at its end; right: held-out nats / character per system against the budget."""
    from merino_pl.core.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    colors = {name: f"C{i}" for i, name in enumerate(CONTENDERS)}
    styles = ["-", "--", ":", "-."]
    budgets = sorted({r["budget_s"] for r in results})
    for r in results:
        color, style = colors.get(r["contender"], "k"), styles[budgets.index(r["budget_s"]) % len(styles)]
        t = [p[0] for p in r["curve"]]
        y = [p[2] / chars_per_token for p in r["curve"]]
        ax.plot(t, y, color=color, linestyle=style, label=f"{r['contender']} ({r['budget_s']:.0f} s), training")
        ax.scatter([r["search_s"] + r["fit_s"]], [r["heldout"]["nats_per_char"]], color=color, marker="o", zorder=3)
    for name in CONTENDERS:
        mine = sorted((r["budget_s"], r["heldout"]["nats_per_char"]) for r in results if r["contender"] == name)
        if mine:
            bx.plot(*zip(*mine), color=colors[name], marker="o", label=name)
    for a in (ax, bx):
        a.axhline(NANOGPT_CPU, color="grey", linestyle="--", label="nanoGPT baby GPT on CPU (published, 1.88)")
        a.legend(fontsize=7)
    ax.set_xlabel("wall-clock seconds (one thread)")
    ax.set_ylabel("nats / character (dots: held-out)")
    bx.set_xlabel("wall-clock budget, seconds")
    bx.set_ylabel("held-out nats / character")
    bx.set_xticks(budgets)
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="180,360", help="wall-clock budgets in seconds, comma-separated")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"some of {', '.join(CONTENDERS)}")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "time_to_quality")
    args = p.parse_args()
    names = args.contenders.split(",")
    if bad := [n for n in names if n not in CONTENDERS]:
        p.error(f"--contenders {','.join(bad)}: valid are {', '.join(CONTENDERS)}")
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets {args.budgets!r}: seconds, comma-separated")
    args.out.mkdir(parents=True, exist_ok=True)
    from merino_pl.core.tokenizer import default_corpus_file, load_tokenizer

    # the corpus's characters per token: turns the training loss (per token) into per character
    text = default_corpus_file().read_text(encoding="utf-8")
    chars_per_token = len(text) / len(load_tokenizer(_data()["tokenizer"]).encode(text).ids)
    results = []
    for budget in budgets:
        for name in names:
            print(f"== {name}, {budget:.0f} s", flush=True)
            results.append(run_contender(name, budget, args.out, args.probe_steps))
            write(results, args.out, chars_per_token)


if __name__ == "__main__":
    main()
