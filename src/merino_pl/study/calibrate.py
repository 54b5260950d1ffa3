"""``merino-pl study calibrate``: fit the entropy settings the paper leaves open, cross-validated.

The paper states β = 1/16 but not ε, the init scale nor α; the matrix entropy depends on the
last two only through c = std² / ε². Over a grid of β, α_FFN / α_MHSA and ε (at the model's
init std), the setting with the highest Spearman ρ against −held-out loss is chosen. Picked on
all architectures, that ρ is optimistic (fitted to noise), so the report also gives k-fold
cross-validation over architectures, repeated over shuffles: the setting is chosen on k − 1
folds and scored on the fold it never saw; the paper's setting and the decoder-parameter proxy
are scored on the same folds for comparison. The output is a search config (``entropy:``
section) that ``merino-pl search --config FILE --budget ...`` reads; searched recipes record it.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from merino_pl.core.config import MerinoConfig
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_write_text, check_out, write_json
from merino_pl.search.api import EntropyConfig, arch_entropy
from merino_pl.study.stats import spearman

BETAS = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)
FFN_OVER_MHSA = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)  # inf: FFN only
EPS = (1e-4, 1e-3, 1e-2, 2e-2, 1e-1, 1.0)


def grid(init_std: float = 0.02) -> list[EntropyConfig]:
    out = []
    for beta, ratio, eps in itertools.product(BETAS, FFN_OVER_MHSA, EPS):
        a_mhsa, a_ffn = (0.0, 1.0) if math.isinf(ratio) else (1.0, ratio)
        out.append(EntropyConfig(init_std=init_std, eps=eps, alpha_mhsa=a_mhsa, alpha_ffn=a_ffn, beta=beta))
    return out


def score_matrix(archs: list[MerinoConfig], configs: list[EntropyConfig]) -> np.ndarray:
    """Eq. 15 of every architecture under every config, (configs, archs)."""
    return np.array([[arch_entropy(a, c)["total"] for a in archs] for c in configs])


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    return spearman(x, y) if np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")


def cross_validate(
    scores: np.ndarray,
    target: np.ndarray,
    folds: int,
    repeats: int = 20,
    seed: int = 0,
    baselines: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Held-out-fold ρ of the config chosen on the other folds (and of fixed baselines)."""
    rng = np.random.default_rng(seed)
    n = len(target)
    chosen, held, base = [], [], {k: [] for k in (baselines or {})}
    for _ in range(repeats):
        order = rng.permutation(n)
        for f in range(folds):
            test = order[f::folds]
            train = np.setdiff1d(order, test)
            rhos = np.array([_rho(s[train], target[train]) for s in scores])
            best = int(np.nanargmax(rhos))
            chosen.append(best)
            held.append(_rho(scores[best][test], target[test]))
            for k, v in (baselines or {}).items():
                base[k].append(_rho(v[test], target[test]))
    summary = {
        "folds": folds,
        "repeats": repeats,
        "cv_rho_mean": round(float(np.nanmean(held)), 4),
        "cv_rho_sd": round(float(np.nanstd(held)), 4),
        "baselines_cv_rho_mean": {k: round(float(np.nanmean(v)), 4) for k, v in base.items()},
    }
    counts = np.bincount(chosen, minlength=len(scores))
    summary["most_chosen"] = int(counts.argmax())
    summary["most_chosen_share"] = round(float(counts.max() / len(chosen)), 3)
    return summary


def calibrate(report: dict[str, Any], folds: int = 4, heldout: str = "indomain") -> dict[str, Any]:
    """Best entropy settings in-sample and cross-validated, from a study report."""
    rows = report["rows"]
    seed = str(report["seed"])
    archs = [MerinoConfig.from_dict(r["architecture"]) for r in rows]
    target = -np.array([r["runs"][seed]["heldout"][heldout]["full"] for r in rows])
    if not 2 <= folds <= len(rows) // 2:
        raise MerinoError(f"--folds {folds}: needs 2 <= folds <= architectures / 2 ({len(rows)} architectures)")
    init_std = archs[0].init_std
    configs = grid(init_std)
    scores = score_matrix(archs, configs)
    rhos = np.array([_rho(s, target) for s in scores])
    best = int(np.nanargmax(rhos))
    paper = EntropyConfig(init_std=init_std)
    baselines = {
        "entropy (paper settings)": score_matrix(archs, [paper])[0],
        "decoder_params": np.array([r["proxies"]["decoder_params"] for r in rows]),
    }
    cv = cross_validate(scores, target, folds, baselines=baselines)
    return {
        "heldout": heldout,
        "architectures": len(rows),
        "grid": {
            "beta": list(BETAS),
            "ffn_over_mhsa": [str(r) for r in FFN_OVER_MHSA],
            "eps": list(EPS),
            "init_std": init_std,
            "size": len(configs),
        },
        "best": configs[best].to_dict(),
        "in_sample_rho": round(float(rhos[best]), 4),
        "paper_in_sample_rho": round(_rho(baselines["entropy (paper settings)"], target), 4),
        "decoder_params_in_sample_rho": round(_rho(baselines["decoder_params"], target), 4),
        "cross_validation": cv,
        "most_chosen_in_cv": configs[cv["most_chosen"]].to_dict(),
    }


def calibrate_cli(report_path: str, out: str, folds: int, overwrite: bool = False) -> int:
    path = Path(report_path)
    if not path.is_file():
        raise MerinoError(f"study report not found: {path} (write it with `merino-pl study report DIR`)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MerinoError(f"{path}: cannot read study report: {e}") from None
    if not isinstance(report, dict) or report.get("format") != "merino-study-report/1":
        raise MerinoError(f"{path}: not a study report (format merino-study-report/1)")
    if Path(out).suffix not in (".yaml", ".yml"):
        raise MerinoError(f"--out {out} must be a .yaml file")
    problems = check_out(out, file=True)  # a folder, or a folder nothing can be created in
    written = [p for p in (Path(out), Path(out).with_suffix(".calibration.json")) if p.exists()]
    if written and not overwrite:  # as `search --out`: never replace what the user did not name
        problems.append(f"--out {out}: {', '.join(map(str, written))} already exists (pass --overwrite to replace)")
    if problems:
        raise MerinoError("; ".join(problems))
    result = calibrate(report, folds)
    best = {k: v for k, v in result["best"].items() if k != "table"}
    cv = result["cross_validation"]
    header = (
        f"# Entropy settings calibrated on the proxy study {report['study']!r} ({result['architectures']} trained "
        f"architectures, {report_path}).\n# Spearman rho vs -held-out loss: in-sample {result['in_sample_rho']:+.3f}, "
        f"{cv['folds']}-fold cross-validated {cv['cv_rho_mean']:+.3f} +- {cv['cv_rho_sd']:.3f}\n"
        f"# (paper settings in-sample {result['paper_in_sample_rho']:+.3f}, "
        f"decoder params {result['decoder_params_in_sample_rho']:+.3f}; "
        f"cross-validated {cv['baselines_cv_rho_mean']}).\n"
        f"#   merino-pl search --config {out} --budget flops=60G --out recipes/calibrated-60g.yaml\n"
    )
    atomic_write_text(out, header + yaml.safe_dump({"entropy": best}, sort_keys=False))
    write_json(Path(out).with_suffix(".calibration.json"), result)
    print(header.replace("# ", "").rstrip())
    print(f"best: {best}\nwrote {out} (+ {Path(out).with_suffix('.calibration.json').name})")
    return 0
