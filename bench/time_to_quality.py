"""Time to quality (issue 25): held-out nats per character reached within a wall-clock budget.

    python bench/time_to_quality.py                      # budgets 3 and 6 min
    python bench/time_to_quality.py --budgets 180         # one budget

On one thread each, one run at a time, the same text (the embedded corpus, paragraphs held out
by hash at the demo's val_fraction), the same tokenizer and held-out scoring
(``merino_pl.eval.intrinsic``: windows of the trained context, nats over characters):

(a) ``demo``: the demo's pipeline, i.e. ``merino-pl search --config search/cpu-demo.yaml`` then
    ``merino-pl fit --config recipes/train/cpu-demo.yaml`` on its recipe (search time counted);
(b) ``gpt``: a GPT-2-shaped decoder (every layer its own weights, FFN 4x, width 128) with as many
    layers as the same 6.5 GFLOPs budget fits, trained by the same ``fit`` config;
(c) LitGPT is NOT run: a peer trainer in its own environment was not built in the session that
    wrote this bench (LitGPT 0.5.13 pins jsonargparse <= 4.41 and huggingface-hub < 1.4, which
    clash with this project's, so it needs a venv of its own beside the CPU torch, and a data
    module feeding it this text and tokenizer). nanoGPT's published character-level figure (1.88
    nats / character: its "baby GPT" on a CPU in ~3 min, on its own split) is drawn as the
    reference line instead.

Each run gets ``max_steps`` = (budget - start-up) x the step rate measured by a short probe run,
and Lightning's ``max_time`` = the budget as a hard stop, so the lr schedule ends near the budget.
The probe is not counted. The machine's load is whatever it is: the JSON records it (load average)
and every figure here is a wall-clock figure under that load.

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
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from merino_pl.core.config import BlockConfig, MerinoConfig, Recipe  # noqa: E402
from merino_pl.core.costs import count_flops, count_params  # noqa: E402
from merino_pl.eval.intrinsic import heldout_figures  # noqa: E402

FIT_CONFIG = REPO / "recipes" / "train" / "cpu-demo.yaml"
SEARCH_CONFIG = REPO / "search" / "cpu-demo.yaml"
NANOGPT_CPU = 1.88  # nanoGPT README: character-level Shakespeare "baby GPT" on a CPU, ~3 min, val loss
FLOPS_BUDGET = 6.5e9  # search/cpu-demo.yaml's budget (paper convention)
STEP_LINE = re.compile(r"step\s+(\d+)/\d+\s+loss\s+([\d.]+).*elapsed\s+(\d+):(\d\d):(\d\d)")


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


def merino(*argv: str, log: Path | None = None) -> tuple[float, str]:
    """Run a ``merino-pl`` command; its wall-clock seconds and output (also written to ``log``)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "merino_pl.cli", *argv], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(out)
    if proc.returncode != 0:
        raise SystemExit(f"merino-pl {' '.join(argv[:2])} failed (exit {proc.returncode}):\n{out[-2000:]}")
    return seconds, out


def curve(output: str) -> list[tuple[float, int, float]]:
    """(elapsed s, step, training loss) from fit's progress lines."""
    return [
        (int(h) * 3600 + int(m) * 60 + int(s), int(step), float(loss))
        for step, loss, h, m, s in STEP_LINE.findall(output)
    ]


def fit(recipe: Path, run: Path, steps: int, max_time_s: float | None) -> tuple[float, str]:
    argv = ["fit", "--config", str(FIT_CONFIG), "--model.recipe", str(recipe), "--trainer.max_steps", str(steps)]
    argv += ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)]
    argv += [
        "--data.val_sequences",
        "0",
        "--trainer.limit_val_batches",
        "0",
        "--checkpoint.every_n_train_steps",
        str(steps),
    ]
    argv += ["--model.warmup_steps", str(min(60, max(1, steps // 10)))]
    argv += ["--trainer.log_every_n_steps", str(max(1, min(20, steps // 4)))]  # the probe's rate needs >= 2 lines
    if max_time_s is not None:
        d, rest = divmod(int(max_time_s), 86400)
        argv += ["--trainer.max_time", f"{d:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"]
    return merino(*argv, log=run.with_suffix(".log"))


def probe_rate(recipe: Path, out: Path, steps: int) -> tuple[float, float]:
    """(start-up seconds, steps per second) of ``fit`` on this recipe, from a short run."""
    seconds, output = fit(recipe, out / "probe", steps, None)
    points = curve(output)
    (t0, s0, _), (t1, s1, _) = points[0], points[-1]
    rate = (s1 - s0) / (t1 - t0) if t1 > t0 else s1 / max(t1, 1)  # elapsed is printed in whole seconds
    return max(0.0, seconds - s1 / rate), rate


def run_contender(name: str, budget: float, out: Path, probe_steps: int) -> dict:
    run = out / f"{name}-{int(budget)}s"
    run.mkdir(parents=True, exist_ok=True)
    search_s = 0.0
    if name == "demo":
        recipe = run / "recipe.yaml"
        search_s, _ = merino("search", "--config", str(SEARCH_CONFIG), "--out", str(recipe), "--no-plot")
    else:
        recipe = gpt_recipe(run / "recipe.yaml")
    startup, rate = probe_rate(recipe, run, probe_steps)
    steps = max(20, int((budget - search_s - startup) * rate))
    seconds, output = fit(recipe, run / "fit", steps, budget - search_s)
    figures = heldout_figures({name: run / "fit" / "checkpoints" / "last.ckpt"}, _data(), wikitext_chars=None)
    arch = yaml.safe_load(recipe.read_text())["architecture"]
    cfg = MerinoConfig.from_dict(arch)
    return {
        "contender": name,
        "budget_s": budget,
        "search_s": round(search_s, 1),
        "fit_s": round(seconds, 1),
        "probe": {"startup_s": round(startup, 1), "steps_per_s": round(rate, 3)},
        "max_steps": steps,
        "steps_done": max((s for _, s, _ in curve(output)), default=0),
        "recipe": {"blocks": arch["blocks"], "params": count_params(cfg), "flops": count_flops(cfg)},
        "heldout": figures[name]["indomain"],
        "curve": [(t + search_s, s, loss) for t, s, loss in curve(output)],
    }


def _data() -> dict:
    return yaml.safe_load(FIT_CONFIG.read_text())["data"]


def write(results: list[dict], out: Path, chars_per_token: float) -> None:
    rows = [
        "| budget | contender | blocks | params | steps | wall-clock s | held-out nats / char | bits / byte |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        blocks = ", ".join(
            f"({b['embed_dim']}, {b.get('ffn_ratio', b.get('ffn_dim'))}, {b['num_layers']})"
            for b in r["recipe"]["blocks"]
        )
        rows.append(
            f"| {r['budget_s']:.0f} s | {r['contender']} | {blocks} | {r['recipe']['params'] / 1e6:.2f} M | "
            f"{r['steps_done']} | {r['search_s'] + r['fit_s']:.0f} | {r['heldout']['nats_per_char']:.3f} | "
            f"{r['heldout']['bits_per_byte']:.3f} |"
        )
    rows.append(
        f"| — | nanoGPT baby GPT (published, CPU, ~3 min, its own split) | — | 0.8 M | — | ~180 | {NANOGPT_CPU} | — |"
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
    from merino_pl.core.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        t = [p[0] for p in r["curve"]]
        y = [p[2] / chars_per_token for p in r["curve"]]
        line = ax.plot(t, y, label=f"{r['contender']} ({r['budget_s']:.0f} s budget), training")[0]
        ax.scatter(
            [r["search_s"] + r["fit_s"]], [r["heldout"]["nats_per_char"]], color=line.get_color(), marker="o", zorder=3
        )
    ax.axhline(NANOGPT_CPU, color="grey", linestyle="--", label="nanoGPT baby GPT on CPU (published, 1.88)")
    ax.set_xlabel("wall-clock seconds (one thread)")
    ax.set_ylabel("nats / character (dots: held-out)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="180,360", help="wall-clock budgets in seconds, comma-separated")
    p.add_argument("--contenders", default="demo,gpt")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "time_to_quality")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from merino_pl.core.tokenizer import default_corpus_file, load_tokenizer

    # the corpus's characters per token: turns the training loss (per token) into per character
    text = default_corpus_file().read_text(encoding="utf-8")
    chars_per_token = len(text) / len(load_tokenizer(_data()["tokenizer"]).encode(text).ids)
    results = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in args.contenders.split(","):
            print(f"== {name}, {budget:.0f} s", flush=True)
            results.append(run_contender(name, budget, args.out, args.probe_steps))
            write(results, args.out, chars_per_token)


if __name__ == "__main__":
    main()
