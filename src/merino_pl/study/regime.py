"""``merino-pl study regime``: how each proxy's ranking moves with training length and learning rate.

A study config with ``lengths`` trains its first architectures again at whole multiples of the
main study's steps, and with ``lr_grid`` at several learning rates (``merino_pl.study.runs``).
Every run is scored on the same held-out windows, so this report can line them up:

* one **point** per training length: the half-length checkpoint of every run (mid-schedule: the
  lr has not decayed yet, so it is a point of a longer schedule stopped early) and the full one
  (decayed), at ``steps x batch x seq_len`` training tokens; per point, every proxy's Spearman ρ /
  Kendall τ with −held-out loss (bootstrap 95 % intervals) over the architectures trained to it,
  and the noise ceiling (ρ between the two seeds) where reruns exist at that length;
* the **lr grid**: per architecture the held-out loss at each lr, its best lr, and every proxy's ρ
  with each architecture at its best lr beside the fixed-lr ρ;
* ``regime.png``: ρ against training tokens per decoder parameter, every proxy, the noise ceiling,
  and the published references (LTS, the paper's own run) as lines, not data.

Separate runs per length (not one warm-up-stable-decay run with decay branches) because a
branch at each length would need a second schedule in ``fit`` and its "length" would differ from
the main study's own schedule; separate runs keep every length the main study's schedule, shape
for shape, so the 1x points need no re-training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from merino_pl.core.config import MerinoConfig
from merino_pl.core.costs import count_params, embedding_params
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_write_text, write_json
from merino_pl.study.proxies import DATA, analytic_proxies
from merino_pl.study.report import _entropy_configs, load_results
from merino_pl.study.runs import Run
from merino_pl.study.stats import correlate

FORMAT = "merino-study-regime/1"

# Published evidence drawn as references (not data of this study). LTS (Javaheripi et al. 2022,
# arXiv 2203.02094): 200 GPT-2 designs, each ~2 B tokens (40 000 steps x 256 x 192); decoder
# parameters vs validation perplexity Spearman rho 0.97 (WikiText-103) / 0.99 (LM1B). Its decoders
# are below 100 M parameters, so it sits at >= 20 tokens per decoder parameter (drawn there, as a bound).
LTS = {"tokens": 40_000 * 256 * 192, "decoder_params_at_most": 100e6, "rho": {"wikitext103": 0.97, "lm1b": 0.99}}


# The paper's own run: 600 k steps x 1024 sequences x 1024 tokens for MeRino-64M, whose decoder (without
# the tied embedding) has 23.88 M parameters (`merino-pl info recipes/merino-64m.yaml`).
PAPER_RUN = {"tokens": 600_000 * 1024 * 1024, "decoder_params": 23_877_376}
PAPER_RUN["tokens_per_decoder_param"] = round(PAPER_RUN["tokens"] / PAPER_RUN["decoder_params"], 1)


def decoder_params(arch: dict[str, Any]) -> int:
    """Parameters without the embeddings (the tied head is the embedding): the ``decoder_params`` proxy."""
    cfg = MerinoConfig.from_dict(arch)
    return count_params(cfg) - embedding_params(cfg)


def _by_variant(results: list[dict[str, Any]]) -> dict[tuple[int, float | None, int], dict[int, dict[str, Any]]]:
    """Results keyed (length, lr override or None, seed) -> {arch_index: result}."""
    out: dict[tuple[int, float | None, int], dict[int, dict[str, Any]]] = {}
    for r in results:
        run = Run.parse(r["id"])
        out.setdefault((run.length, run.lr, run.seed), {})[run.arch_index] = r
    return out


def _proxies(manifest: dict[str, Any], result: dict[str, Any], entropy: dict) -> dict[str, float]:
    arch = MerinoConfig.from_dict(result["architecture"])
    return {**analytic_proxies(arch, entropy), **{k: result["proxies"][k] for k in DATA}}


def _point(
    runs: dict[int, dict[str, Any]],
    reruns: dict[int, dict[str, Any]],
    which: str,
    heldout: str,
    proxies: dict[int, dict[str, float]],
    resamples: int,
) -> dict[str, Any]:
    archs = sorted(runs)
    loss = np.array([runs[i]["heldout"][heldout][which] for i in archs])
    point: dict[str, Any] = {"architectures": archs, "loss_mean": round(float(loss.mean()), 4), "correlations": {}}
    for p in proxies[archs[0]]:
        x = np.array([proxies[i][p] for i in archs])
        point["correlations"][p] = correlate(x, -loss, resamples).to_dict()
    both = [i for i in archs if i in reruns]
    point["noise_ceiling"] = (
        correlate(
            np.array([runs[i]["heldout"][heldout][which] for i in both]),
            np.array([reruns[i]["heldout"][heldout][which] for i in both]),
            resamples,
        ).to_dict()
        if len(both) >= 3
        else None
    )
    return point


def analyse_regime(study: Path, resamples: int = 2000) -> dict[str, Any]:
    """The regime report of a study directory as a JSON-able dict."""
    manifest, results = load_results(study)
    cfg = manifest["config"]
    seed, other = int(cfg.get("seed", 1)), int((cfg.get("noise_ceiling") or {}).get("seed", 2))
    variants = _by_variant(results)
    lengths = sorted({k[0] for k in variants if k[1] is None and k[2] == seed})
    if len(lengths) < 2 and not any(k[1] is not None for k in variants):
        raise MerinoError(
            f"{study}: no runs at other lengths or learning rates yet; give the study config `lengths` / `lr_grid` "
            "and run `merino-pl study run` again"
        )
    entropy = _entropy_configs(manifest)
    data = manifest["data"]
    tokens_per_step = int(data.get("batch_size", 8)) * int(data.get("seq_len", 128))
    subset = sorted(set.intersection(*(set(variants[(m, None, seed)]) for m in lengths)))
    if len(subset) < 4:
        raise MerinoError(f"{study}: only {len(subset)} architecture(s) finished at every length; a ranking needs 4")
    main = variants[(1, None, seed)]
    proxies = {i: _proxies(manifest, main[i], entropy) for i in main}
    params = {i: decoder_params(main[i]["architecture"]) for i in main}
    report: dict[str, Any] = {
        "format": FORMAT,
        "study": manifest["name"],
        "seed": seed,
        "ceiling_seed": other,
        "architectures": subset,
        "decoder_params": {str(i): params[i] for i in subset},
        "tokens_per_step": tokens_per_step,
        "points": [],
        "lr_grid": None,
        "references": {"lts": LTS, "paper": PAPER_RUN},
    }
    median_params = float(np.median([params[i] for i in subset]))
    for m in lengths:
        runs = {i: variants[(m, None, seed)][i] for i in subset}
        reruns = variants.get((m, None, other), {})
        for which in ("half", "full"):
            steps = next(iter(runs.values()))["half_step" if which == "half" else "steps"]
            tokens = steps * tokens_per_step
            point = {
                "length": m,
                "checkpoint": which,
                "steps": steps,
                "tokens": tokens,
                "tokens_per_decoder_param": round(tokens / median_params, 3),
                "heldout": {h: _point(runs, reruns, which, h, proxies, resamples) for h in manifest["heldout"]},
            }
            report["points"].append(point)
    report["points"].sort(key=lambda p: p["tokens"])
    report["lr_grid"] = _lr_grid(variants, seed, manifest, proxies, resamples)
    return report


def _base_lr(manifest: dict[str, Any], result: dict[str, Any]) -> float | None:
    """The lr the main study trained at: recorded in the result, else its fit argv, else the fit config."""
    from merino_pl.core.io import read_yaml
    from merino_pl.study.runs import fit_config_of, last_flag

    lr = result.get("lr") or last_flag(result.get("fit_argv") or [], "--model.lr")
    fit_config = fit_config_of(manifest) if lr is None else None
    if fit_config is not None:
        lr = ((read_yaml(fit_config, "fit config") or {}).get("model") or {}).get("lr")
    return float(lr) if lr is not None else None


def _lr_grid(variants, seed: int, manifest: dict[str, Any], proxies, resamples: int) -> dict[str, Any] | None:
    """Held-out loss per (architecture, lr) at the main length; the ranking at each one's best lr."""
    lrs = sorted({k[1] for k in variants if k[1] is not None and k[0] == 1 and k[2] == seed})
    if not lrs:
        return None
    main = variants[(1, None, seed)]
    base_lr = _base_lr(manifest, next(iter(main.values())))
    grid_lrs = sorted({*lrs, *([base_lr] if base_lr else [])})
    archs = sorted(i for i in main if all(i in variants[(1, lr, seed)] for lr in lrs))
    if len(archs) < 4:
        return {"lrs": grid_lrs, "architectures": archs, "note": "fewer than 4 architectures finished every lr"}
    out: dict[str, Any] = {"lrs": grid_lrs, "base_lr": base_lr, "architectures": archs, "heldout": {}}
    for h in manifest["heldout"]:
        table = {}
        for i in archs:
            by_lr = {lr: variants[(1, lr, seed)][i]["heldout"][h]["full"] for lr in lrs}
            if base_lr:
                by_lr[base_lr] = main[i]["heldout"][h]["full"]
            table[i] = by_lr
        best = np.array([min(table[i].values()) for i in archs])
        fixed = np.array([table[i][base_lr] for i in archs]) if base_lr else None
        rows = {
            str(i): {
                "loss": {f"{lr:g}": round(v, 4) for lr, v in sorted(table[i].items())},
                "best_lr": min(table[i], key=table[i].get),
            }
            for i in archs
        }
        corr = {}
        for p in proxies[archs[0]]:
            x = np.array([proxies[i][p] for i in archs])
            corr[p] = {
                "best_lr": correlate(x, -best, resamples).to_dict(),
                "fixed_lr": correlate(x, -fixed, resamples).to_dict() if fixed is not None else None,
            }
        out["heldout"][h] = {
            "rows": rows,
            "correlations": corr,
            "fixed_vs_best": correlate(fixed, best, resamples).to_dict() if fixed is not None else None,
        }
    return out


def _cell(c: dict[str, Any] | None) -> str:
    if not c or c.get("spearman") is None or math.isnan(c["spearman"]):
        return "n/a"
    return f"{c['spearman']:+.2f} [{c['spearman_ci'][0]:+.2f}, {c['spearman_ci'][1]:+.2f}]"


def render_markdown(report: dict[str, Any]) -> str:
    """The regime report as Markdown (a table per held-out set, then the lr grid)."""
    pts = report["points"]
    hs = list(pts[0]["heldout"])
    proxies = list(pts[0]["heldout"][hs[0]]["correlations"])
    lines = [
        f"# Training-length regime of study `{report['study']}`",
        "",
        f"Architectures {report['architectures']} (seed {report['seed']}), each trained to every length; "
        f"{report['tokens_per_step']} tokens per step. Spearman ρ of each proxy with −held-out loss "
        "[bootstrap 95 %]; the noise ceiling is ρ between two training seeds. `half` checkpoints are "
        "mid-schedule (lr not yet decayed).",
    ]
    for h in hs:
        lines += [
            "",
            f"## {h}",
            "",
            "| tokens | tokens / decoder param | checkpoint | mean loss | noise ceiling | "
            + " | ".join(proxies)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(proxies),
        ]
        for p in pts:
            d = p["heldout"][h]
            cells = " | ".join(_cell(d["correlations"][q]) for q in proxies)
            lines.append(
                f"| {p['tokens'] / 1e6:.2f} M | {p['tokens_per_decoder_param']:.1f} | {p['length']}x "
                f"{p['checkpoint']} | {d['loss_mean']:.3f} | {_cell(d['noise_ceiling'])} | {cells} |"
            )
    grid = report.get("lr_grid")
    if grid and grid.get("heldout"):
        lines += ["", f"## Learning rate (lrs {', '.join(f'{v:g}' for v in grid['lrs'])}, 1x length)", ""]
        for h, g in grid["heldout"].items():
            lrs = [f"{v:g}" for v in grid["lrs"]]
            lines += [
                f"### {h}",
                "",
                "| architecture | " + " | ".join(f"loss @ {v}" for v in lrs) + " | best lr |",
                "|---|" + "---|" * len(lrs) + "---|",
            ]
            for i, row in g["rows"].items():
                lines.append(
                    f"| a{int(i):03d} | "
                    + " | ".join(f"{row['loss'][v]:.3f}" for v in lrs)
                    + f" | {row['best_lr']:g} |"
                )
            lines += [
                "",
                f"Fixed-lr vs best-lr loss ρ: {_cell(g['fixed_vs_best'])}.",
                "",
                "| proxy | ρ at the fixed lr | ρ at each one's best lr |",
                "|---|---|---|",
            ]
            lines += [f"| {q} | {_cell(c['fixed_lr'])} | {_cell(c['best_lr'])} |" for q, c in g["correlations"].items()]
            lines.append("")
    elif grid:
        lines += ["", f"Learning-rate grid: {grid.get('note')}.", ""]
    lts = report["references"]["lts"]
    lines += [
        "",
        f"References (drawn in `regime.png`, not data of this study): LTS trained each GPT-2 design on "
        f"{lts['tokens'] / 1e9:.2f} B tokens; decoder parameters ranked validation perplexity at ρ "
        f"{lts['rho']['wikitext103']} (WikiText-103) / {lts['rho']['lm1b']} (LM1B); with decoders under "
        f"{lts['decoder_params_at_most'] / 1e6:.0f} M parameters that is >= "
        f"{lts['tokens'] / lts['decoder_params_at_most']:.0f} tokens per decoder parameter.",
        "",
    ]
    return "\n".join(lines)


def plot_regime(report: dict[str, Any], path: Path, heldout: str = "indomain") -> Path:
    """ρ of every proxy against tokens per decoder parameter, with the ceiling and the references."""
    from merino_pl.core.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    pts = report["points"]
    x = np.array([p["tokens_per_decoder_param"] for p in pts])
    names = list(pts[0]["heldout"][heldout]["correlations"])
    for k, q in enumerate(names):
        cs = [p["heldout"][heldout]["correlations"][q] for p in pts]
        y = np.array([c["spearman"] for c in cs])
        err = np.array([[c["spearman"] - c["spearman_ci"][0], c["spearman_ci"][1] - c["spearman"]] for c in cs]).T
        shift = 1.04 ** (k - (len(names) - 1) / 2)  # side by side, so the intervals stay readable
        ax.errorbar(x * shift, y, yerr=err, marker="o", ms=4, capsize=2, lw=1.2, elinewidth=0.7, label=q)
    ceiling = [(p["tokens_per_decoder_param"], p["heldout"][heldout]["noise_ceiling"]) for p in pts]
    ceiling = [(t, c["spearman"]) for t, c in ceiling if c]
    if ceiling:
        ax.plot(*zip(*ceiling), "k--", lw=1.5, label="noise ceiling (seed vs seed)")
    lts = report["references"]["lts"]
    lts_x, lts_y = lts["tokens"] / lts["decoder_params_at_most"], lts["rho"]["wikitext103"]
    ax.annotate("", xy=(lts_x * 8, lts_y), xytext=(lts_x, lts_y), arrowprops={"arrowstyle": "->", "color": "crimson"})
    ax.scatter([lts_x], [lts_y], marker="*", s=160, c="crimson", zorder=5, label="LTS: decoder params, ~2 B tokens (≥)")
    paper = report["references"].get("paper")
    if paper:
        ax.axvline(paper["tokens_per_decoder_param"], c="gray", ls=":", lw=1.5)
        ax.text(paper["tokens_per_decoder_param"], -0.95, " MeRino-64M\n paper run", fontsize=8, color="gray")
    ax.axhline(0, c="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(x) / 1.6, max(lts_x * 12, paper["tokens_per_decoder_param"] * 3 if paper else 0))
    ax.set(
        xlabel="training tokens per decoder parameter (median over the architectures)",
        ylabel=f"Spearman ρ with −held-out loss ({heldout})",
        title=f"Which proxy ranks trained quality, by training length (study {report['study']}, 95 % intervals)",
        ylim=(-1.05, 1.05),
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path, dpi=110)
    return path


def evidence(report: dict[str, Any], manifest: dict[str, Any], heldout: str = "indomain") -> dict[str, Any]:
    """The decayed (full-length) points of a regime report as a proxy evidence file (core.evidence),
    which ``merino-pl search --tokens`` reads: a planned run is a whole schedule, never a half one."""
    from merino_pl.core.evidence import FORMAT as EVIDENCE

    return {
        "format": EVIDENCE,
        "source": f"study {report['study']}: {len(report['architectures'])} designs under "
        f"{', '.join(manifest['budgets'])}, {manifest['data'].get('source', 'embedded')} data, {heldout} held-out loss",
        "entropy": (manifest["config"].get("proxies") or {}).get("entropy") or {},
        "points": [
            {
                "tokens": p["tokens"],
                "tokens_per_decoder_param": p["tokens_per_decoder_param"],
                "proxies": p["heldout"][heldout]["correlations"],
                "noise_ceiling": p["heldout"][heldout]["noise_ceiling"],
            }
            for p in report["points"]
            if p["checkpoint"] == "full"
        ],
    }


def write_regime(study: Path, bootstrap: int = 2000, evidence_out: Path | None = None) -> dict[str, Any]:
    """Analyse the lengths / lr grid of a study; write regime.json, regime.md, regime.png and the proxy
    evidence (``proxy-evidence.json``, or ``evidence_out``) into it."""
    report = analyse_regime(study, bootstrap)
    write_json(study / "regime.json", report)
    atomic_write_text(study / "regime.md", render_markdown(report))
    plot_regime(report, study / "regime.png")
    manifest, _ = load_results(study)
    out = evidence_out or study / "proxy-evidence.json"
    write_json(out, evidence(report, manifest))
    print(render_markdown(report))
    print(f"wrote {study / 'regime.json'}, {study / 'regime.md'}, {study / 'regime.png'} and {out}")
    return report
