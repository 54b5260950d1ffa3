"""The ratios of a latency report: speed-ups over the peers, fast-path gains, spread warnings.

Every ratio is given of the means (the paper's statistic) and of the medians (what one outlier
run cannot move); a row whose runs spread beyond ``report.CV_LIMIT`` / ``report.P90_LIMIT`` gets
a warning naming it. Plain JSON rows in, plain JSON objects out: no torch.
"""

from __future__ import annotations

from typing import Any

from merino_pl.latency.peers import PAPER
from merino_pl.latency.report import CV_LIMIT, P90_LIMIT, spread

# (our path, the peer path it is compared with): the paper's full forward, and generation's prefill
COMPARISONS = (("plain", "plain"), ("fast", "last-logits"))


def paper_ratio(peer: str, model: str) -> float | None:
    """The paper's Jetson Nano speed-up of ``model`` over ``peer`` (None when it lists either not)."""
    return PAPER[peer].jetson_ms / PAPER[model].jetson_ms if peer in PAPER and model in PAPER else None


def speedups(rows: list[dict[str, Any]], model_name: str) -> list[dict[str, Any]]:
    """Peer mean / our mean per precision, like with like (paper Table 3's comparison)."""
    ours = {(r["precision"], r["path"]): r for r in rows if r["role"] == "model"}
    out = []
    for mine, theirs in COMPARISONS:
        for peer in (r for r in rows if r["role"] == "peer" and r["path"] == theirs and (r["precision"], mine) in ours):
            me = ours[(peer["precision"], mine)]
            paper = paper_ratio(peer["model"], model_name)
            out.append(
                {
                    "precision": peer["precision"],
                    "model": model_name,
                    "peer": peer["model"],
                    "paths": f"{mine} vs {theirs}",
                    **_ratios(peer, me),
                    "paper_jetson_nano": paper,
                }
            )
    return out


def paper_speedups(rows: list[dict[str, Any]], model_name: str) -> list[dict[str, Any]]:
    """Peer mean / our mean under the authors' protocol, beside the paper's Jetson Nano ratio."""
    ours = {r["precision"]: r for r in rows if r["role"] == "model"}
    out = []
    for peer in (r for r in rows if r["role"] == "peer" and r["precision"] in ours):
        me = ours[peer["precision"]]
        paper = paper_ratio(peer["model"], model_name)
        out.append(
            {
                "precision": peer["precision"],
                "model": model_name,
                "peer": peer["model"],
                "speedup": peer["mean_ms"] / me["mean_ms"],
                "peer_includes_lm_head": peer["includes_lm_head"],
                "model_includes_lm_head": me["includes_lm_head"],
                "paper_jetson_nano": paper,
            }
        )
    return out


def fast_path_gains(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain mean / fast (and onnxruntime) mean of our model, per precision."""
    out = []
    for plain in (r for r in rows if r["role"] == "model" and r["path"] == "plain"):
        for other in (
            r for r in rows if r["role"] == "model" and r["path"] != "plain" and r["precision"] == plain["precision"]
        ):
            out.append({"precision": plain["precision"], "path": other["path"], **_ratios(plain, other)})
    return out


def _ratios(slow: dict[str, Any], fast: dict[str, Any]) -> dict[str, float]:
    """slow / fast for prefill and decode: of the means (``prefill``, ``decode``: the paper's
    statistic) and of the medians (``*_median``: what an outlier run cannot move)."""
    out = {}
    for key, stat in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
        out[key] = slow[stat]["mean"] / fast[stat]["mean"]
        out[f"{key}_median"] = slow[stat]["median"] / fast[stat]["median"]
    return out


def spread_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One warning per row whose runs spread too much for its ratios to be trusted."""
    out = []
    for row in rows:
        bad = []
        for what, stat in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
            cv, tail = spread(row[stat])
            if cv > CV_LIMIT or tail > P90_LIMIT:
                bad.append(f"{what} CV {100 * cv:.0f} %, p90/median {tail:.2f}")
        if bad:
            out.append(
                f"noisy timings, {row['model']} {row['precision']} {row['path']}: {'; '.join(bad)} "
                f"(limits CV {100 * CV_LIMIT:.0f} %, "
                f"p90/median {P90_LIMIT}): ratios using this row are not trustworthy (compare the median columns; "
                "rerun on a quiet machine or with more --runs)"
            )
    return out
