"""``merino-pl study report``: every proxy against trained held-out loss (JSON + Markdown + PNG).

Target: −held-out loss (equivalently −perplexity; a rank correlation does not care) of the
primary-seed runs at full length, on the in-domain hold-out and on WikiText-2. Beside every
proxy's ρ / τ (bootstrap 95 % intervals) the report gives what bounds them:

* the noise ceiling: ρ between the two seeds' held-out losses over the re-trained architectures;
* the stability of the ranking: ρ between each run's held-out loss at half and at full length;
* seed spread (mean |Δ loss| between seeds) against architecture spread (sd of loss).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from merino_pl.core.config import MerinoConfig
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_write_text, write_json
from merino_pl.study.proxies import DATA, analytic_proxies
from merino_pl.study.stats import correlate

FORMAT = "merino-study-report/1"


def load_results(study: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The study's manifest and every finished, readable result (one line naming a damaged file)."""
    from merino_pl.study.runs import read_result

    try:
        manifest = json.loads((study / "study.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MerinoError(f"{study / 'study.json'} cannot be read ({e}): run `merino-pl study run` again") from None
    results = []
    for p in sorted((study / "results").glob("*.json")):
        result = read_result(study, p.stem)
        if result is None:
            raise MerinoError(
                f"{p} is not a complete study result (truncated or edited): `merino-pl study run` with the same "
                "--config and --out trains that run again and replaces it"
            )
        results.append(result)
    return manifest, results


def _entropy_configs(manifest: dict[str, Any]):
    from merino_pl.search.api import EntropyConfig

    cfg = (manifest["config"].get("proxies") or {}).get("entropy") or {"paper": {}}
    return {name: EntropyConfig.from_dict(v, source=f"proxies.entropy.{name}") for name, v in cfg.items()}


def build_rows(manifest: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per architecture: proxies, and held-out losses per seed."""
    seed = int(manifest["config"].get("seed", 1))
    entropy = _entropy_configs(manifest)
    rows: dict[int, dict[str, Any]] = {}
    for r in results:
        if r.get("length", 1) != 1 or "-lr" in r["id"]:  # the lengths / lr grid: see merino_pl.study.regime
            continue
        i = r["arch_index"]
        row = rows.setdefault(i, {"arch_index": i, "architecture": r["architecture"], "runs": {}})
        row["runs"][str(r["seed"])] = {
            "heldout": r["heldout"],
            "train_loss_end": r.get("train_loss_end"),
            "fit_seconds": r.get("fit_seconds"),
        }
        if r["seed"] == seed:
            arch = MerinoConfig.from_dict(r["architecture"])
            row["proxies"] = {**analytic_proxies(arch, entropy), **{k: r["proxies"][k] for k in DATA}}
    return [rows[i] for i in sorted(rows) if "proxies" in rows[i]]


def _noise_ceiling(
    rows: list[dict[str, Any]], seed: str, other: str, heldout: str, resamples: int
) -> dict[str, Any] | None:
    both = [r for r in rows if seed in r["runs"] and other in r["runs"]]
    if len(both) < 3:
        return None
    a = np.array([r["runs"][seed]["heldout"][heldout]["full"] for r in both])
    b = np.array([r["runs"][other]["heldout"][heldout]["full"] for r in both])
    return {
        **correlate(a, b, resamples).to_dict(),
        "seed_spread_mean_abs": round(float(np.mean(np.abs(a - b))), 4),
        "architectures": [r["arch_index"] for r in both],
    }


def analyse(manifest: dict[str, Any], results: list[dict[str, Any]], resamples: int = 2000) -> dict[str, Any]:
    """The whole report as a JSON-able dict."""
    rows = build_rows(manifest, results)
    if len(rows) < 4:
        raise MerinoError(f"only {len(rows)} finished architecture(s) in the study: a ranking needs at least 4")
    seed = str(manifest["config"].get("seed", 1))
    other = str((manifest["config"].get("noise_ceiling") or {}).get("seed", 2))
    report: dict[str, Any] = {
        "format": FORMAT,
        "study": manifest["name"],
        "architectures": len(rows),
        "budgets": manifest["budgets"],
        "seed": seed,
        "ceiling_seed": other,
        "tokenizer": manifest["tokenizer"],
        "fit_config": manifest["fit_config"],
        "fit_args": manifest["fit_args"],
        "target": "-held-out loss at full length (same ranking as -perplexity)",
        "heldout": manifest["heldout"],
        "correlations": {},
        "noise_ceiling": {},
        "half_vs_full": {},
        "spread": {},
        "rows": rows,
    }
    proxies = list(rows[0]["proxies"])
    for h in manifest["heldout"]:
        loss = np.array([r["runs"][seed]["heldout"][h]["full"] for r in rows])
        half = np.array([r["runs"][seed]["heldout"][h]["half"] for r in rows])
        for p in proxies:
            x = np.array([r["proxies"][p] for r in rows])
            report["correlations"].setdefault(p, {})[h] = correlate(x, -loss, resamples).to_dict()
        report["half_vs_full"][h] = correlate(half, loss, resamples).to_dict()
        report["noise_ceiling"][h] = _noise_ceiling(rows, seed, other, h, resamples)
        report["spread"][h] = {
            "architecture_sd": round(float(np.std(loss, ddof=1)), 4),
            "best": round(float(loss.min()), 4),
            "worst": round(float(loss.max()), 4),
        }
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (the study's stage renderer)."""
    hs = list(report["heldout"])
    lines = [
        f"# Proxy study `{report['study']}`",
        "",
        f"{report['architectures']} architectures sampled uniformly from the feasible set under "
        f"{', '.join(report['budgets'])}; each trained with `{Path(report['fit_config']).name}` "
        f"{' '.join(report['fit_args'])} (identical data order, tokens, schedule and seed). Target: "
        f"{report['target']}. Intervals: bootstrap 95 % over architectures.",
        "",
        "| proxy | " + " | ".join(f"{h} Spearman ρ [95 % CI] | {h} Kendall τ [95 % CI]" for h in hs) + " |",
        "|---|" + "---|---|" * len(hs),
    ]
    for p, by in report["correlations"].items():
        cells = [
            f"{c['spearman']:+.3f} [{c['spearman_ci'][0]:+.2f}, {c['spearman_ci'][1]:+.2f}] | "
            f"{c['kendall']:+.3f} [{c['kendall_ci'][0]:+.2f}, {c['kendall_ci'][1]:+.2f}]"
            for c in (by[h] for h in hs)
        ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## What bounds these figures",
        "",
        "| held-out set | noise ceiling ρ (seed vs seed) [CI], n | "
        "half vs full length ρ [CI] | mean abs. seed difference (nats) | architecture sd (nats) | best / worst loss |",
        "|---|---|---|---|---|---|",
    ]
    for h in hs:
        nc, hf, sp = report["noise_ceiling"].get(h), report["half_vs_full"][h], report["spread"][h]
        nc_txt = (
            f"{nc['spearman']:+.3f} [{nc['spearman_ci'][0]:+.2f}, {nc['spearman_ci'][1]:+.2f}], {nc['n']}"
            if nc
            else "n/a"
        )
        lines.append(
            f"| {h} | {nc_txt} | {hf['spearman']:+.3f} [{hf['spearman_ci'][0]:+.2f}, {hf['spearman_ci'][1]:+.2f}] | "
            f"{nc['seed_spread_mean_abs'] if nc else 'n/a'} | {sp['architecture_sd']} | {sp['best']} / {sp['worst']} |"
        )
    lines += [
        "",
        "Proxies are oriented so that higher predicts lower loss (`ntk_cond` is −κ). "
        "Plots: `proxies.png` (all), `proxy-NAME.png` (one each), `noise-ceiling.png`.",
        "",
    ]
    return "\n".join(lines)


def _scatter(ax: Any, x: np.ndarray, ppl: np.ndarray, title: str, xlabel: str) -> None:
    ax.scatter(x, ppl, s=18)
    ax.set(title=title, xlabel=xlabel, ylabel="held-out perplexity")
    if np.all(x > 0) and x.max() / max(x.min(), 1e-30) > 30:
        ax.set_xscale("log")


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Fig. 3-style scatters: one PNG per proxy, a grid of all, and the noise ceiling."""
    from merino_pl.core.plotting import pyplot, save_figure

    plt = pyplot()
    rows, seed, other = report["rows"], report["seed"], report["ceiling_seed"]
    ppl = np.exp([r["runs"][seed]["heldout"]["indomain"]["full"] for r in rows])
    written, proxies = [], list(report["correlations"])
    cols = 4
    fig, axes = plt.subplots(
        math.ceil(len(proxies) / cols), cols, figsize=(4 * cols, 3.4 * math.ceil(len(proxies) / cols))
    )
    for ax, p in zip(np.ravel(axes), proxies):
        c = report["correlations"][p]["indomain"]
        x = np.array([r["proxies"][p] for r in rows])
        title = f"{p}: ρ={c['spearman']:+.2f}, τ={c['kendall']:+.2f}"
        _scatter(ax, x, ppl, title, p)
        one, ax1 = plt.subplots(figsize=(5, 4))
        _scatter(ax1, x, ppl, title, p)
        path = out / f"proxy-{p.replace(':', '-')}.png"
        save_figure(one, path, dpi=100)
        written.append(path)
    for ax in np.ravel(axes)[len(proxies) :]:
        ax.axis("off")
    save_figure(fig, out / "proxies.png", dpi=90)
    written.append(out / "proxies.png")
    nc = report["noise_ceiling"].get("indomain")
    if nc:
        both = [r for r in rows if other in r["runs"]]
        a = [r["runs"][seed]["heldout"]["indomain"]["full"] for r in both]
        b = [r["runs"][other]["heldout"]["indomain"]["full"] for r in both]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(a, b)
        lo, hi = min(a + b), max(a + b)
        ax.plot([lo, hi], [lo, hi], "--", c="gray")
        ax.set(
            xlabel=f"held-out loss, seed {seed}",
            ylabel=f"held-out loss, seed {other}",
            title=f"noise ceiling ρ={nc['spearman']:+.2f}",
        )
        save_figure(fig, out / "noise-ceiling.png", dpi=100)
        written.append(out / "noise-ceiling.png")
    return written


def write_report(study: Path, bootstrap: int = 2000) -> dict[str, Any]:
    """Analyse a study directory; write report.json, report.md and the plots into it."""
    manifest, results = load_results(study)
    report = analyse(manifest, results, bootstrap)
    write_json(study / "report.json", report)
    atomic_write_text(study / "report.md", render_markdown(report))
    plot(report, study)
    print(render_markdown(report))
    print(f"wrote {study / 'report.json'}, {study / 'report.md'} and plots")
    return report
