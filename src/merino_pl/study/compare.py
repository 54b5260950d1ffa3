"""``merino-pl study compare``: the verdict, trained head to head.

At the study's space and budget, each named search (its global optimum, ``search --exhaustive``)
gives one recipe, plus a uniform decoder (every block the same width, FFN ratio and depth:
Pythia-like) that uses as much of the budget as any uniform design can. Every recipe is trained
with the study's fit config (plus ``head_to_head.args``, e.g. more steps) on the study's data
and tokenizer, once per seed, and scored on the study's held-out sets::

    head_to_head:
      searches:
        paper: {proxy: entropy, entropy: {beta: 0.0625}}
        calibrated: {config: entropy-calibrated.yaml}      # written by `study calibrate`
        params: {proxy: params}
      uniform: true
      seeds: [11, 12, 13]
      args: [--trainer.max_steps, "2400"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from merino_pl.core.config import MerinoConfig
from merino_pl.core.costs import count_flops, count_params, embedding_params
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_write_text, read_yaml, write_json
from merino_pl.core.space import SearchSpace
from merino_pl.search.api import EntropyConfig
from merino_pl.study.config import StudyConfig
from merino_pl.study.runs import Run, StudySettings, execute, prepare

FORMAT = "merino-study-compare/1"


def searched(cfg: StudyConfig, spec: dict[str, Any], where: Path) -> MerinoConfig:
    """The global optimum of one search setting over the study's space and budgets."""
    from merino_pl.search.api import SearchPlan, build_problem, decode, optimum, proxies

    spec = dict(spec)
    if "config" in spec:
        path = where / spec.pop("config")
        spec = {**(read_yaml(path, "search config") or {}), **spec}
    proxy = spec.get("proxy", "entropy")
    scoring = [name for name, p in proxies().items() if p.search is None]  # naive scaling is a rule, not a score
    if proxy not in scoring:
        raise MerinoError(f"head_to_head search proxy {proxy!r} must be one of {', '.join(scoring)}")
    settings = SearchPlan(cfg.budgets, cfg.space, proxy, 0, EntropyConfig.from_dict(spec.get("entropy") or {}))
    problem = build_problem(settings)
    return decode(cfg.space, problem.genes, optimum(problem).codes)


def uniform_decoder(space: SearchSpace, cfg: StudyConfig) -> MerinoConfig:
    """Every block the same (E, FFN, L): the feasible one with the largest FLOPs (then params)."""
    best, key = None, None
    for e in space.embed_dims:
        for f in space.ffn_choices:
            for n in space.num_layers:
                arch = space.config([space.block(e, f, n)] * space.num_blocks)
                costs = {"flops": count_flops(arch), "params": count_params(arch)}
                if all(costs.get(b.cost, np.inf) <= b.limit for b in cfg.budgets):
                    k = (costs["flops"], costs["params"])
                    if key is None or k > key:
                        best, key = arch, k
    if best is None:
        raise MerinoError(f"no uniform decoder of {space.source} fits {', '.join(b.text for b in cfg.budgets)}")
    return best


def contenders(cfg: StudyConfig) -> dict[str, MerinoConfig]:
    h2h, where = cfg.head_to_head, Path(cfg.source).parent
    searches = h2h.get("searches") or {}
    if not isinstance(searches, dict) or not (searches or h2h.get("uniform")):
        raise MerinoError(f"{cfg.source}: head_to_head needs `searches` (name: settings) and/or `uniform: true`")
    # the uniform decoder first: a search added to the config later then extends the list (the
    # contenders already trained keep their index, so a re-run trains only the new one)
    out = {"uniform": uniform_decoder(cfg.space, cfg)} if h2h.get("uniform") else {}
    out.update({str(name): searched(cfg, spec or {}, where) for name, spec in searches.items()})
    return out


def table(manifest: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out loss and perplexity, mean ± sd over seeds, per contender and held-out set."""
    rows = []
    for name, i in zip(manifest["contenders"], manifest["contender_arch"]):
        mine = [r for r in results if r["arch_index"] == i]
        arch = MerinoConfig.from_dict(manifest["architectures"][i])
        same = [n for n, j in zip(manifest["contenders"], manifest["contender_arch"]) if j == i and n != name]
        row = {
            "name": name,
            "same_as": same,
            "blocks": [[b.embed_dim, b.ffn, b.num_layers] for b in arch.blocks],
            "decoder_params": count_params(arch) - embedding_params(arch),
            "flops": count_flops(arch),
            "seeds": [r["seed"] for r in mine],
        }
        for h in manifest["heldout"]:
            loss = np.array([r["heldout"][h]["full"] for r in mine])
            if len(loss):
                row[h] = {
                    "loss_mean": round(float(loss.mean()), 4),
                    "loss_sd": round(float(loss.std(ddof=1)) if len(loss) > 1 else 0.0, 4),
                    "ppl_mean": round(float(np.exp(loss).mean()), 2),
                    "ppl_sd": round(float(np.exp(loss).std(ddof=1)) if len(loss) > 1 else 0.0, 2),
                }
        rows.append(row)
    base_name, base = manifest["contenders"][0], manifest["contender_arch"][0]
    for row, i in zip(rows, manifest["contender_arch"]):
        if i != base:
            row["vs"] = {h: _paired(results, i, base, h) for h in manifest["heldout"]}
    return {
        "format": FORMAT,
        "budgets": manifest["budgets"],
        "fit_args": manifest["fit_args"],
        "baseline": base_name,
        "rows": rows,
    }


def _paired(results: list[dict[str, Any]], i: int, base: int, heldout: str) -> dict[str, Any] | None:
    """Held-out loss of recipe ``i`` minus the baseline's, paired by seed (same data order and
    init seed), with the paired t-test's two-sided p where there are >= 2 seeds."""
    from scipy import stats

    loss = {(r["arch_index"], r["seed"]): r["heldout"][heldout]["full"] for r in results}
    seeds = sorted(s for a, s in loss if a == i and (base, s) in loss)
    if not seeds:
        return None
    d = np.array([loss[i, s] - loss[base, s] for s in seeds])
    p = (
        float(stats.ttest_rel([loss[i, s] for s in seeds], [loss[base, s] for s in seeds]).pvalue)
        if len(d) > 1
        else None
    )
    return {
        "seeds": len(d),
        "delta_mean": round(float(d.mean()), 4),
        "delta_sd": round(float(d.std(ddof=1)) if len(d) > 1 else 0.0, 4),
        "wins": int((d < 0).sum()),
        "p": None if p is None or np.isnan(p) else round(p, 4),
    }


def training_curves(out: Path, results: list[dict[str, Any]], points: int = 200) -> dict[str, list[list[float]]]:
    """Each run's training loss by step, from its CSV log (a resumed run logs a new version; the
    later one wins per step), kept in ``curves.json`` so the plot survives the run directories."""
    import csv

    path = out / "curves.json"
    curves = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for r in results:
        by_step: dict[int, float] = {}
        for log in sorted(
            (out / "runs" / r["id"]).glob("fit/logs/version_*/metrics.csv"),
            key=lambda p: int(p.parent.name.split("_")[-1]),
        ):
            with log.open(encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    if row.get("train/loss"):
                        by_step[int(row["step"])] = float(row["train/loss"])
        if by_step:
            logged = sorted(by_step.items())
            curves[r["id"]] = [[s, round(v, 4)] for s, v in logged[:: max(1, len(logged) // points)]]
    write_json(path, curves)
    return curves


def plot(
    t: dict[str, Any],
    manifest: dict[str, Any],
    results: list[dict[str, Any]],
    curves: dict[str, list[list[float]]],
    path: Path,
) -> Path:
    """Left: training loss (mean over seeds) per recipe; right: held-out perplexity ± sd."""
    from merino_pl.core.plotting import pyplot, save_figure

    plt = pyplot()
    heldout = list(manifest["heldout"])
    fig, axes = plt.subplots(1, 1 + len(heldout), figsize=(5.5 + 3.2 * len(heldout), 4.2))
    shown: dict[int, str] = {}
    for row, i in zip(t["rows"], manifest["contender_arch"]):
        shown[i] = shown[i] + " = " + row["name"] if i in shown else row["name"]
    colors = plt.get_cmap("tab10")
    tokens = manifest["data"]["seq_len"] * manifest["data"]["batch_size"]
    for k, (i, label) in enumerate(shown.items()):
        runs = [curves[r["id"]] for r in results if r["arch_index"] == i and r["id"] in curves]
        if not runs:
            continue
        n = min(len(c) for c in runs)
        steps = np.array([c[0] for c in runs[0][:n]])
        loss = np.mean([[v for _, v in c[:n]] for c in runs], axis=0)
        w = min(5, n)  # moving average over 5 logged points
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        axes[0].plot(
            (steps[w // 2 : w // 2 + len(smooth)] + 1) * tokens / 1e6,
            smooth,
            color=colors(k),
            label=f"{label} ({len(runs)} seeds)",
        )
    axes[0].set(xlabel="training tokens (M)", ylabel="training loss (mean over seeds, smoothed)", title="training")
    axes[0].legend(fontsize=8)
    first = {}  # one bar per distinct recipe, named by every setting that found it
    for row, i in zip(t["rows"], manifest["contender_arch"]):
        first.setdefault(i, row)
    for ax, h in zip(axes[1:], heldout):
        bars = [(k, shown[i], row) for k, (i, row) in enumerate(first.items()) if h in row]
        ax.bar(
            range(len(bars)),
            [row[h]["ppl_mean"] for _, _, row in bars],
            yerr=[row[h]["ppl_sd"] for _, _, row in bars],
            capsize=4,
            color=[colors(k) for k, _, _ in bars],
        )
        ax.set_xticks(range(len(bars)), [label for _, label, _ in bars], rotation=15, fontsize=8)
        rows = [row for _, _, row in bars]
        lo = min(r[h]["ppl_mean"] - r[h]["ppl_sd"] for r in rows) if rows else 0
        ax.set_ylim(lo * 0.95, None)
        ax.set(ylabel="held-out perplexity (mean ± sd)", title=h)
    fig.suptitle(f"head to head at {', '.join(t['budgets'])}: {' '.join(t['fit_args'])}", fontsize=9)
    save_figure(fig, path, dpi=100)
    return path


def render_markdown(t: dict[str, Any], heldout: list[str]) -> str:
    base = t.get("baseline")
    lines = [
        f"# Head to head at {', '.join(t['budgets'])}",
        "",
        f"fit overrides: `{' '.join(t['fit_args'])}`; mean ± sd over seeds. Δ: held-out loss (nats) minus "
        f"{base}'s at the same seed, mean ± sd, seeds where it is lower, paired t-test p.",
        "",
        "| recipe | blocks (E, F, L) | decoder params | GFLOPs | seeds | "
        + " | ".join(f"{h} ppl | {h} Δ vs {base}" for h in heldout)
        + " |",
        "|---|---|---|---|---|" + "---|---|" * len(heldout),
    ]
    for r in t["rows"]:
        cells = []
        for h in heldout:
            cells.append(f"{r[h]['ppl_mean']:.2f} ± {r[h]['ppl_sd']:.2f}" if h in r else "—")
            v = (r.get("vs") or {}).get(h)
            cells.append(
                "—"
                if not v
                else f"{v['delta_mean']:+.4f} ± {v['delta_sd']:.4f} ({v['wins']}/{v['seeds']}"
                + (f", p = {v['p']:.3f})" if v["p"] is not None else ")")
            )
        name = r["name"] + (f" (= {', '.join(r['same_as'])})" if r.get("same_as") else "")
        lines.append(
            f"| {name} | {r['blocks']} | {r['decoder_params'] / 1e6:.3f} M | {r['flops'] / 1e9:.2f} | "
            f"{len(r['seeds'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def compare(settings: StudySettings) -> int:
    """``study compare``: train the contenders of ``head_to_head`` on every seed, then the table,
    its Markdown and the plot in ``settings.out``."""
    cfg, out = settings.config, settings.out
    seeds = cfg.head_to_head.get("seeds", [11, 12, 13])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise MerinoError(
            f"head_to_head.seeds must be a non-empty list of distinct non-negative integers, got {seeds!r}"
        )
    archs = contenders(cfg)
    for name, arch in archs.items():
        print(
            f"  {name:<12} E={[b.embed_dim for b in arch.blocks]} F={[b.ffn for b in arch.blocks]} "
            f"L={[b.num_layers for b in arch.blocks]} {count_flops(arch) / 1e9:.2f} GFLOPs"
        )
    cfg.architectures, cfg.ceiling_architectures = 0, 0
    cfg.fit_args = [*cfg.fit_args, *[str(a) for a in cfg.head_to_head.get("args") or []]]
    # two settings that find the same recipe share its runs (training it twice would only add seeds)
    unique: list[MerinoConfig] = []
    index = []
    for arch in archs.values():
        if arch not in unique:
            unique.append(arch)
        index.append(unique.index(arch))
    for name, i in zip(archs, index):
        if list(archs).index(name) != index.index(i):
            print(f"  {name} finds the same recipe as {list(archs)[index.index(i)]}: trained once, reported for both")
    manifest = prepare(cfg, out, architectures=unique)
    manifest["contenders"], manifest["contender_arch"] = list(archs), index
    write_json(out / "study.json", manifest)
    runs = [Run(i, s) for s in seeds for i in range(len(unique))]
    execute(manifest, runs, settings)
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "results").glob("*.json"))]
    t = table(manifest, results)
    write_json(out / "compare.json", t)
    md = render_markdown(t, list(manifest["heldout"]))
    if results:
        png = plot(t, manifest, results, training_curves(out, results), out / "compare.png")
        md += f"\n![head to head]({png.name})\n"
    atomic_write_text(out / "compare.md", md)
    print(md)
    return 0
