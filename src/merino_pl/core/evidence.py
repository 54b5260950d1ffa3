"""What trained models say about each search proxy, by training regime: the evidence file format.

``merino-pl study regime`` measures, per training length, how well every proxy ranks held-out
quality (Spearman ρ with a bootstrap interval, beside the seed-to-seed noise ceiling) and writes
the points as a ``merino-proxy-evidence/1`` file; ``merino-pl search --tokens N`` reads it (the
package ships the CPU study's) to tell the user what the evidence says about the chosen proxy at
the training length they plan. Core, because the study writes it and the search reads it.

The regime of a run is its training tokens per decoder parameter (the embedding and the tied head
excluded): the study's points are ~1-9 tokens per parameter, LTS's ~2 B-token runs >= 20, the
paper's own MeRino-64M run ~26 000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merino_pl.core.assets import asset
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_json

FORMAT = "merino-proxy-evidence/1"
# A point covers the regimes within this factor of its own tokens per parameter: the study's lengths
# are 2x apart, so each point speaks for its octave and no further.
COVERS = math.sqrt(2)


def shipped() -> Path:
    """The evidence of the CPU study shipped with the package (docs/study/cpu in the repository)."""
    return asset("study", "proxy-evidence.json")


@dataclass(frozen=True)
class Verdict:
    """What the evidence says about one proxy at one regime."""

    proxy: str
    tokens_per_decoder_param: float
    status: str  # "measured" or "unvalidated"
    rho: float | None = None
    rho_ci: tuple[float, float] | None = None
    noise_ceiling: float | None = None
    n: int | None = None
    measured_at: float | None = None  # tokens per decoder parameter of the point used
    covered: tuple[float, float] | None = None  # the range the evidence covers
    source: str = ""

    def line(self) -> str:
        """One line for the search's output."""
        at = f"{self.tokens_per_decoder_param:,.1f} training tokens per decoder parameter"
        if self.status != "measured":
            span = f"{self.covered[0]:.1f}-{self.covered[1]:.1f}" if self.covered else "none"
            return f"evidence for proxy {self.proxy} at {at}: unvalidated (studies cover {span}; {self.source})"
        lo, hi = self.rho_ci or (float("nan"), float("nan"))
        sign = "ranks backwards" if hi < 0 else "ranks forwards" if lo > 0 else "is not distinguishable from chance"
        ceiling = f", noise ceiling {self.noise_ceiling:+.2f}" if self.noise_ceiling is not None else ""
        return (
            f"evidence for proxy {self.proxy} at {at}: Spearman rho {self.rho:+.2f} [{lo:+.2f}, {hi:+.2f}] "
            f"with held-out loss over {self.n} trained designs at {self.measured_at:.1f}{ceiling}: it {sign} "
            f"there ({self.source})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def load_evidence(path: str | Path | None = None) -> dict[str, Any]:
    """Read an evidence file (the shipped one by default); one line naming the file if it is not one."""
    path = Path(path) if path else shipped()
    data = read_json(path, "proxy evidence")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("points"), list):
        raise MerinoError(f"{path} is not a proxy evidence file ({FORMAT}, written by `merino-pl study regime`)")
    return data


def judge(evidence: dict[str, Any], proxy: str, key: str | None, tokens_per_param: float) -> Verdict:
    """The evidence for ``proxy`` (its name in the study's tables: ``key``) at ``tokens_per_param``."""
    if not (tokens_per_param > 0 and math.isfinite(tokens_per_param)):
        raise MerinoError(f"training tokens per decoder parameter must be positive, got {tokens_per_param!r}")
    pts = [p for p in evidence["points"] if key and key in p["proxies"]]
    source = str(evidence.get("source", ""))
    xs = [p["tokens_per_decoder_param"] for p in pts]
    covered = (min(xs), max(xs)) if xs else None
    near = [p for p in pts if abs(math.log(tokens_per_param / p["tokens_per_decoder_param"])) <= math.log(COVERS)]
    if not near:
        return Verdict(proxy, tokens_per_param, "unvalidated", covered=covered, source=source)
    p = min(near, key=lambda p: abs(math.log(tokens_per_param / p["tokens_per_decoder_param"])))
    c = p["proxies"][key]
    ceiling = p.get("noise_ceiling") or {}
    return Verdict(
        proxy,
        tokens_per_param,
        "measured",
        rho=c["spearman"],
        rho_ci=tuple(c["spearman_ci"]),
        noise_ceiling=ceiling.get("spearman"),
        n=c["n"],
        measured_at=p["tokens_per_decoder_param"],
        covered=covered,
        source=source,
    )
