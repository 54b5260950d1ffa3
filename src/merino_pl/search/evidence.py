"""``search --tokens``: what trained-model studies say about the chosen proxy at the user's regime.

The regime is the planned training tokens per decoder parameter of the recipe found. The evidence
(``core.evidence``; the package ships the CPU study's) has the proxy's measured Spearman ρ with
held-out loss at the regimes a study covered and nothing elsewhere ("unvalidated"). The paper's
proxy stays the default unless the evidence at the user's regime says it ranks backwards (its
whole 95 % interval below zero) while another registered proxy ranks forwards (its whole interval
above zero): then that one is used, and the recipe and the output say why. ``--proxy`` is always
the user's choice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from merino_pl.core.config import MerinoConfig
from merino_pl.core.costs import count_params, embedding_params
from merino_pl.core.errors import MerinoError
from merino_pl.core.evidence import Verdict, judge, load_evidence
from merino_pl.core.io import read_yaml

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def planned_tokens(value: str) -> int:
    """``--tokens``: a count (``600B``, ``4.9M``, ``2e9``) or a ``merino-pl fit`` config whose
    steps x batch x sequence x accumulation x devices x nodes it is."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", value.lower())
    if m:
        tokens = float(m.group(1)) * _SUFFIX[m.group(2)]
        if tokens >= 1:
            return int(tokens)
        raise MerinoError(f"--tokens must be at least 1 token, got {value!r}")
    if not Path(value).is_file():
        raise MerinoError(f"--tokens {value!r} is neither a token count (600B, 4.9M, 2e9) nor a fit config file")
    cfg = read_yaml(value, "fit config") or {}
    trainer, data = cfg.get("trainer") or {}, (cfg.get("data") or {}).get("init_args", cfg.get("data") or {})
    parts = {
        "trainer.max_steps": trainer.get("max_steps"),
        "data.batch_size": data.get("batch_size"),
        "data.seq_len": data.get("seq_len"),
        "trainer.accumulate_grad_batches": trainer.get("accumulate_grad_batches", 1),
        "trainer.devices": trainer.get("devices", 1),
        "trainer.num_nodes": trainer.get("num_nodes", 1),
    }
    bad = [f"{k}={v!r}" for k, v in parts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise MerinoError(f"--tokens {value}: cannot count its training tokens, needs whole numbers: {', '.join(bad)}")
    tokens = 1
    for v in parts.values():
        tokens *= v
    return tokens


def study_key(proxy: str, entropy: Any, evidence: dict[str, Any]) -> str | None:
    """The proxy's name in the study's tables; an entropy proxy only where a study measured the
    entropy with exactly these settings."""
    if proxy == "entropy":
        from merino_pl.search.entropy import EntropyConfig

        for name, settings in (evidence.get("entropy") or {}).items():
            if EntropyConfig.from_dict(settings, source=f"evidence entropy {name}") == entropy:
                return f"entropy:{name}"
        return None
    return {"params": "decoder_params"}.get(proxy, proxy)


def decoder_params(arch: MerinoConfig) -> int:
    return count_params(arch) - embedding_params(arch)


def assess(
    proxy: str, arch: MerinoConfig, tokens: int, entropy: Any, evidence_file: str | None = None
) -> tuple[Verdict, dict[str, Any]]:
    """The verdict for ``proxy`` on the recipe ``arch`` trained on ``tokens``, and the evidence."""
    evidence = load_evidence(evidence_file)
    ratio = tokens / decoder_params(arch)
    return judge(evidence, proxy, study_key(proxy, entropy, evidence), ratio), evidence


def better_default(default: Verdict, evidence: dict[str, Any], entropy: Any, proxies: list[str]) -> Verdict | None:
    """Another registered proxy to use instead of the default, only when the evidence at this regime
    is decisive both ways (the default's interval below zero, the other's above)."""
    if default.status != "measured" or default.rho_ci is None or default.rho_ci[1] >= 0:
        return None
    ratio = default.tokens_per_decoder_param
    found = [judge(evidence, p, study_key(p, entropy, evidence), ratio) for p in proxies if p != default.proxy]
    good = [v for v in found if v.status == "measured" and v.rho_ci and v.rho_ci[0] > 0]
    return max(good, key=lambda v: v.rho) if good else None


def apply_evidence(settings: Any, plan: Any, recipe: Any, research: Any) -> tuple[Any, Verdict]:
    """Record the evidence for the recipe's proxy at ``settings.tokens`` in its provenance; when the
    proxy was left to the default and the evidence is decisive against it, search again with the
    better proxy (``research(plan) -> recipe``) and say so."""
    from dataclasses import replace

    from merino_pl.search.registry import proxies

    tokens = planned_tokens(settings.tokens)
    verdict, evidence = assess(plan.proxy, recipe.architecture, tokens, plan.entropy, settings.evidence)
    chosen_by_user = settings.proxy is not None or (
        settings.config and "proxy" in (read_yaml(settings.config, "search config") or {})
    )
    alt = None if chosen_by_user else better_default(verdict, evidence, plan.entropy, list(proxies()))
    if alt is not None:
        note = (
            f"the default proxy {plan.proxy} ranks backwards at this regime (rho {verdict.rho:+.2f}, interval "
            f"{verdict.rho_ci[0]:+.2f}..{verdict.rho_ci[1]:+.2f}); {alt.proxy} ranks forwards (rho {alt.rho:+.2f}): "
            f"searched with {alt.proxy} (give --proxy {plan.proxy} to keep the paper's)"
        )
        print(f"  {note}")
        recipe = research(replace(plan, proxy=alt.proxy))
        recipe.provenance["proxy_choice"] = note
        verdict, _ = assess(alt.proxy, recipe.architecture, tokens, plan.entropy, settings.evidence)
    recipe.provenance["evidence"] = {"planned_tokens": tokens, **verdict.to_dict()}
    return recipe, verdict
