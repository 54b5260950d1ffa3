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

from merino_pl.config import MerinoConfig
from merino_pl.costs import count_flops, count_params, embedding_params
from merino_pl.errors import MerinoError
from merino_pl.io import atomic_write_text, read_yaml, write_json
from merino_pl.search.entropy import EntropyConfig
from merino_pl.space import SearchSpace
from merino_pl.study.config import StudyConfig, load_study_config
from merino_pl.study.runner import Run, execute, prepare

FORMAT = "merino-study-compare/1"


def searched(cfg: StudyConfig, spec: dict[str, Any], where: Path) -> MerinoConfig:
    """The global optimum of one search setting over the study's space and budgets."""
    from merino_pl.search.cli import SearchSettings, build_problem, decode
    from merino_pl.search.evolution import PROXIES
    from merino_pl.search.exhaustive import optimum

    spec = dict(spec)
    if "config" in spec:
        path = where / spec.pop("config")
        spec = {**(read_yaml(path, "search config") or {}), **spec}
    proxy = spec.get("proxy", "entropy")
    if proxy not in PROXIES or proxy == "naive":
        raise MerinoError(f"head_to_head search proxy {proxy!r} must be entropy or params")
    settings = SearchSettings(cfg.budgets, cfg.space, proxy, 0, EntropyConfig.from_dict(spec.get("entropy") or {}))
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
    for i, name in enumerate(manifest["contenders"]):
        mine = [r for r in results if r["arch_index"] == i]
        arch = MerinoConfig.from_dict(manifest["architectures"][i])
        row = {"name": name, "blocks": [[b.embed_dim, b.ffn, b.num_layers] for b in arch.blocks],
               "decoder_params": count_params(arch) - embedding_params(arch), "flops": count_flops(arch),
               "seeds": [r["seed"] for r in mine]}
        for h in manifest["heldout"]:
            loss = np.array([r["heldout"][h]["full"] for r in mine])
            if len(loss):
                row[h] = {"loss_mean": round(float(loss.mean()), 4), "loss_sd": round(float(loss.std(ddof=1)) if len(loss) > 1 else 0.0, 4),
                          "ppl_mean": round(float(np.exp(loss).mean()), 2), "ppl_sd": round(float(np.exp(loss).std(ddof=1)) if len(loss) > 1 else 0.0, 2)}
        rows.append(row)
    return {"format": FORMAT, "budgets": manifest["budgets"], "fit_args": manifest["fit_args"], "rows": rows}


def render_markdown(t: dict[str, Any], heldout: list[str]) -> str:
    lines = [f"# Head to head at {', '.join(t['budgets'])}", "",
             f"fit overrides: `{' '.join(t['fit_args'])}`; mean ± sd over seeds.", "",
             "| recipe | blocks (E, F, L) | decoder params | GFLOPs | seeds | " + " | ".join(f"{h} ppl" for h in heldout) + " |",
             "|---|---|---|---|---|" + "---|" * len(heldout)]
    for r in t["rows"]:
        cells = [f"{r[h]['ppl_mean']:.2f} ± {r[h]['ppl_sd']:.2f}" if h in r else "—" for h in heldout]
        lines.append(f"| {r['name']} | {r['blocks']} | {r['decoder_params'] / 1e6:.3f} M | {r['flops'] / 1e9:.2f} | "
                     f"{len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_cli(config: str, out: Path, jobs: int, threads: int, extra: list[str]) -> int:
    cfg = load_study_config(config)
    seeds = cfg.head_to_head.get("seeds") or [11, 12, 13]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise MerinoError(f"head_to_head.seeds must be a list of non-negative integers, got {seeds!r}")
    archs = contenders(cfg)
    for name, arch in archs.items():
        print(f"  {name:<12} E={[b.embed_dim for b in arch.blocks]} F={[b.ffn for b in arch.blocks]} "
              f"L={[b.num_layers for b in arch.blocks]} {count_flops(arch) / 1e9:.2f} GFLOPs")
    cfg.architectures, cfg.ceiling_architectures = 0, 0
    cfg.fit_args = [*cfg.fit_args, *[str(a) for a in cfg.head_to_head.get("args") or []]]
    manifest = prepare(cfg, out, architectures=list(archs.values()))
    manifest["contenders"] = list(archs)
    write_json(out / "study.json", manifest)
    runs = [Run(i, s) for s in seeds for i in range(len(archs))]
    execute(manifest, out, runs, jobs, threads, extra)
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "results").glob("*.json"))]
    t = table(manifest, results)
    write_json(out / "compare.json", t)
    md = render_markdown(t, list(manifest["heldout"]))
    atomic_write_text(out / "compare.md", md)
    print(md)
    return 0
