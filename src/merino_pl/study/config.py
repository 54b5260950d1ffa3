"""The study config (``search/study-*.yaml``), checked up front: every problem in one message.

name: cpu
space: space-study.yaml            # relative to this file
budgets: [flops=4G]
architectures: 24                  # sampled uniformly from the feasible set
sample_seed: 0
seed: 1                            # training seed of every run (init, data order, Lightning)
noise_ceiling: {architectures: 8, seed: 2}   # the first 8 trained again with this seed
fit: {config: ../recipes/fit/study-cpu.yaml, args: []}   # the `merino-pl fit` config
tokenizer: {vocab_size: 2048}      # a BPE trained on the training split; or {file: tokenizer.json}
heldout: {sequences: 128, cross_domain: wikitext2}
proxies: {batches: 4, batch_size: 8, entropy: {paper: {beta: 0.0625}, beta1: {beta: 1.0}}}
head_to_head: {...}                # see merino_pl.study.compare
lengths: {multiples: [4], architectures: 8, ceiling: 8}   # also train the first 8 at 4x the steps
lr_grid: {lrs: [1.0e-3, 2.0e-3, 4.0e-3], architectures: 8}  # each of the first 8 at every lr (1x length)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_yaml
from merino_pl.core.space import SearchSpace, load_space
from merino_pl.search.api import Budget, EntropyConfig, parse_budget

KEYS = (
    "name",
    "space",
    "budgets",
    "architectures",
    "sample_seed",
    "seed",
    "noise_ceiling",
    "fit",
    "tokenizer",
    "heldout",
    "proxies",
    "head_to_head",
    "lengths",
    "lr_grid",
)
CROSS_DOMAIN = ("wikitext2", None)


@dataclass
class StudyConfig:
    """A resolved study config (paths absolute)."""

    name: str
    source: str
    space: SearchSpace
    budgets: list[Budget]
    architectures: int
    fit_config: Path
    sample_seed: int = 0
    seed: int = 1
    ceiling_architectures: int = 8
    ceiling_seed: int = 2
    fit_args: list[str] = field(default_factory=list)
    tokenizer_file: Path | None = None
    vocab_size: int = 2048
    heldout_sequences: int = 128
    cross_domain: str | None = "wikitext2"
    proxy_batches: int = 4
    proxy_batch_size: int = 8
    entropy: dict[str, EntropyConfig] = field(default_factory=dict)
    head_to_head: dict[str, Any] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    length_architectures: int = 0
    length_ceiling: int = 0
    lrs: list[float] = field(default_factory=list)
    lr_architectures: int = 0
    raw: dict[str, Any] = field(default_factory=dict)


def _int(data: dict, key: str, default: int, low: int, problems: list[str], where: str = "") -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        problems.append(f"{where}{key} must be an integer >= {low}, got {value!r}")
        return default
    return value


def _section(data: dict, key: str, known: set[str], problems: list[str]) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key} must be a mapping, got {value!r}")
        return {}
    problems += [f"unknown key {key}.{k} (valid: {', '.join(sorted(known))})" for k in value if k not in known]
    return value


def _entropy_configs(value: Any, problems: list[str]) -> dict[str, EntropyConfig]:
    if not isinstance(value, dict) or not value:
        problems.append(f"proxies.entropy must map names to entropy settings, got {value!r}")
        return {}
    out = {}
    for name, settings in value.items():
        try:
            out[str(name)] = EntropyConfig.from_dict(settings, source=f"proxies.entropy.{name}")
        except MerinoError as e:
            problems.append(str(e))
    return out


def _lengths(data: dict, n: int, problems: list[str]) -> tuple[list[int], int, int]:
    """``lengths``: training lengths as whole multiples of the fit config's ``max_steps`` (1 is the
    main study itself), for the first ``architectures`` of the sample, and ``ceiling`` of them again
    with the noise-ceiling seed at every length."""
    sec = _section(data, "lengths", {"multiples", "architectures", "ceiling"}, problems)
    if not sec:
        return [], 0, 0
    multiples = sec.get("multiples")
    if (
        not isinstance(multiples, list)
        or not multiples
        or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in multiples)
        or len(set(multiples)) != len(multiples)
    ):
        problems.append(f"lengths.multiples must be distinct whole numbers >= 1 (times max_steps), got {multiples!r}")
        multiples = []
    archs = _int(sec, "architectures", n, 1, problems, "lengths.")
    ceiling = _int(sec, "ceiling", 0, 0, problems, "lengths.")
    if archs > n:
        problems.append(f"lengths.architectures {archs} exceeds architectures {n}")
    if ceiling > archs:
        problems.append(f"lengths.ceiling {ceiling} exceeds lengths.architectures {archs}")
    return sorted(m for m in multiples if m != 1), archs, ceiling


def _lr_grid(data: dict, n: int, problems: list[str]) -> tuple[list[float], int]:
    """``lr_grid``: every lr for each of the first ``architectures``, at the main study's length."""
    sec = _section(data, "lr_grid", {"lrs", "architectures"}, problems)
    if not sec:
        return [], 0
    lrs = sec.get("lrs")
    ok = isinstance(lrs, list) and len(lrs) >= 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in lrs)
    if not ok or len(set(lrs)) != len(lrs):
        problems.append(f"lr_grid.lrs must be at least 2 distinct learning rates in (0, 1), got {lrs!r}")
        lrs = []
    archs = _int(sec, "architectures", n, 1, problems, "lr_grid.")
    if archs > n:
        problems.append(f"lr_grid.architectures {archs} exceeds architectures {n}")
    return sorted(float(v) for v in lrs), archs


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and check a study config; raises one ``MerinoError`` listing every problem."""
    path = Path(path)
    data = read_yaml(path, "study config")
    if not isinstance(data, dict):
        raise MerinoError(f"{path}: a study config must be a mapping")
    here = path.parent
    problems = [f"unknown key {k!r} (valid: {', '.join(KEYS)})" for k in data if k not in KEYS]
    space = None
    try:
        space = load_space(here / data["space"] if data.get("space") else None)
    except MerinoError as e:
        problems.append(str(e))
    budgets = []
    texts = data.get("budgets") or []
    for t in [texts] if isinstance(texts, str) else texts:
        try:
            budgets.append(parse_budget(str(t)))
        except MerinoError as e:
            problems.append(str(e))
    if not texts:
        problems.append("budgets: give at least one budget, e.g. [flops=4G]")
    n = _int(data, "architectures", 24, 4, problems)
    ceiling = _section(data, "noise_ceiling", {"architectures", "seed"}, problems)
    fit = _section(data, "fit", {"config", "args"}, problems)
    fit_config = here / str(fit.get("config", ""))
    if not fit.get("config") or not fit_config.is_file():
        problems.append(f"fit.config: a `merino-pl fit` config file is required, not found: {fit.get('config')!r}")
    fit_args = fit.get("args") or []
    if not isinstance(fit_args, list) or not all(isinstance(a, (str, int, float)) for a in fit_args):
        problems.append(f"fit.args must be a list of command-line arguments, got {fit_args!r}")
    tok = _section(data, "tokenizer", {"vocab_size", "file"}, problems)
    tok_file = here / tok["file"] if tok.get("file") else None
    if tok_file is not None and not tok_file.is_file():
        problems.append(f"tokenizer.file not found: {tok_file}")
    heldout = _section(data, "heldout", {"sequences", "cross_domain"}, problems)
    if heldout.get("cross_domain", "wikitext2") not in CROSS_DOMAIN:
        problems.append(f"heldout.cross_domain {heldout['cross_domain']!r} is not one of wikitext2, null")
    proxies = _section(data, "proxies", {"batches", "batch_size", "entropy"}, problems)
    entropy = _entropy_configs(proxies.get("entropy", {"paper": {}}), problems)
    h2h = _section(data, "head_to_head", {"searches", "uniform", "seeds", "args"}, problems)
    lengths, length_archs, length_ceiling = _lengths(data, n, problems)
    lrs, lr_archs = _lr_grid(data, n, problems)
    cfg = StudyConfig(
        name=str(data.get("name") or path.stem),
        source=str(path),
        space=space,
        budgets=budgets,
        architectures=n,
        fit_config=fit_config.resolve(),
        sample_seed=_int(data, "sample_seed", 0, 0, problems),
        seed=_int(data, "seed", 1, 0, problems),
        ceiling_architectures=_int(ceiling, "architectures", 8, 0, problems, "noise_ceiling."),
        ceiling_seed=_int(ceiling, "seed", 2, 0, problems, "noise_ceiling."),
        fit_args=[str(a) for a in fit_args] if isinstance(fit_args, list) else [],
        tokenizer_file=tok_file.resolve() if tok_file else None,
        vocab_size=_int(tok, "vocab_size", 2048, 256, problems, "tokenizer."),
        heldout_sequences=_int(heldout, "sequences", 128, 1, problems, "heldout."),
        cross_domain=heldout.get("cross_domain", "wikitext2"),
        proxy_batches=_int(proxies, "batches", 4, 1, problems, "proxies."),
        proxy_batch_size=_int(proxies, "batch_size", 8, 2, problems, "proxies."),
        entropy=entropy,
        head_to_head=h2h,
        lengths=lengths,
        length_architectures=length_archs,
        length_ceiling=length_ceiling,
        lrs=lrs,
        lr_architectures=lr_archs,
        raw=data,
    )
    if cfg.ceiling_architectures > n:
        problems.append(f"noise_ceiling.architectures {cfg.ceiling_architectures} exceeds architectures {n}")
    if cfg.ceiling_architectures and cfg.ceiling_seed == cfg.seed:
        problems.append(f"noise_ceiling.seed must differ from seed ({cfg.seed})")
    if space is not None and int(space.architecture.get("vocab_size", 50304)) < cfg.vocab_size and tok_file is None:
        problems.append(
            f"tokenizer.vocab_size {cfg.vocab_size} exceeds the space's vocab_size "
            f"{space.architecture.get('vocab_size')}"
        )
    if problems:
        raise MerinoError(f"{path}: " + "; ".join(problems))
    return cfg
