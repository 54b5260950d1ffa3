"""``merino-pl eval CKPT_OR_DIR --tasks paper --ppl wikitext2,ptb --out DIR``.

Zero-shot lm-eval tasks through the ``merino`` backend (or lm-eval's stock ``hf`` backend with
``--backend hf``) and WikiText-2 / PTB perplexity, written as ``eval.json`` + ``eval.md`` (+
``accuracy.png``) in the layout of the paper's Tables 2–3. Offline, a task or corpus whose
data cannot be fetched is reported as skipped with the reason; the rest still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Any

from merino_pl.errors import MerinoError, parse_problems
from merino_pl.evaluation.perplexity import CORPORA, MODES, embedded_wikitext2
from merino_pl.evaluation.report import FORMAT
from merino_pl.io import check_out

log = logging.getLogger("merino_pl.eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .ckpt from `merino-pl fit`, an exported directory, or a recipe (fresh init)")
    p.add_argument("--out", required=True, help="output directory for eval.json / eval.md / accuracy.png")
    p.add_argument("--tasks", default="paper",
                   help="`paper` (the 12 of Table 2), a task-list YAML, `t1,t2` lm-eval names, or `none` (default: paper)")
    p.add_argument("--ppl", default="wikitext2,ptb", help=f"perplexity corpora: {', '.join(CORPORA)} or `none`")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="folder of local lm-eval task YAMLs (repeatable), e.g. eval/tasks")
    p.add_argument("--data-files", nargs="+", default=[], metavar="NAME=PATH",
                   help="local perplexity data instead of the hub: wikitext2=wiki.test.raw ptb=ptb.test.txt; "
                   "wikitext2=embedded is the copy shipped with merino-pl")
    p.add_argument("--metadata", nargs="+", default=[], metavar="KEY=VALUE",
                   help="metadata passed to lm-eval tasks (e.g. data_file=... for eval/tasks/wikitext_local)")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task / documents per corpus")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", choices=("merino", "hf"), default="merino",
                   help="lm-eval backend: our registered `merino` LM, or lm-eval's stock HFLM")
    p.add_argument("--ppl-mode", choices=MODES, default=None,
                   help="document-level (lm-eval's rule; WikiText-2 default) or concatenated (PTB default)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: the window)")
    p.add_argument("--window", type=int, default=None, help="perplexity window (default: the model's context)")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: the task list's (paper: 0)")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval bootstrap for non-mean metrics' stderr")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def _pairs(items: list[str], what: str, errors: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            errors.append(f"{what} {item!r}: expected KEY=VALUE")
        else:
            out[key] = value
    return out


def validate_argv(argv: list[str], pending: frozenset[str] = frozenset()) -> list[str]:
    """Problems with these arguments that need no model, for ``pipeline`` before any stage runs
    (task names are checked against lm-eval's index only when eval itself runs: ~20 s)."""
    args, problems = parse_problems(add_arguments, argv, "eval")
    if args is None:
        return problems
    try:
        validate(args, index_tasks=False)
    except MerinoError as e:
        return [str(e)]
    return []


def validate(args: argparse.Namespace, index_tasks: bool = True) -> dict[str, Any]:
    """Check every argument before any heavy work; all problems in one ``MerinoError``."""
    from merino_pl.evaluation.tasks import resolve_tasks

    errors: list[str] = []
    specs, fewshot = [], None
    try:
        specs, fewshot = resolve_tasks(args.tasks)
    except MerinoError as e:
        errors.append(str(e))
    ppl = [] if args.ppl in ("", "none") else [s.strip() for s in args.ppl.split(",") if s.strip()]
    errors += [f"--ppl {n!r}: unknown corpus (valid: {', '.join(CORPORA)})" for n in ppl if n not in CORPORA]
    data_files = _pairs(args.data_files, "--data-files", errors)
    if data_files.get("wikitext2") == "embedded":  # the copy shipped in the package (offline demo)
        data_files["wikitext2"] = str(embedded_wikitext2())
    for name, path in data_files.items():
        if name not in CORPORA:
            errors.append(f"--data-files {name}=...: unknown corpus (valid: {', '.join(CORPORA)})")
        elif not Path(path).is_file():
            errors.append(f"--data-files {name}={path}: file not found")
    metadata = _pairs(args.metadata, "--metadata", errors)
    errors += [f"--include-path {d}: not a directory" for d in args.include_path if not Path(d).is_dir()]
    for flag in ("limit", "batch_size", "stride", "window"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            errors.append(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    if not specs and not ppl:
        errors.append("nothing to evaluate: --tasks none and --ppl none")
    errors += _device_problems(args.device)
    errors += check_out(args.out)
    if errors:
        raise MerinoError("; ".join(errors))
    manager = None
    if specs and index_tasks:
        from merino_pl.evaluation.tasks import task_manager

        manager = task_manager([s.task for s in specs], args.include_path, metadata)
    num_fewshot = args.num_fewshot if args.num_fewshot is not None else fewshot
    return {"specs": specs, "ppl": ppl, "data_files": data_files, "manager": manager, "num_fewshot": num_fewshot}


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = validate(args)
    if plan["specs"] or any(c not in plan["data_files"] for c in plan["ppl"]):  # some data comes from the hub
        from merino_pl.data.sources import offline_unless_reachable

        reason = offline_unless_reachable()
        if reason:
            print(f"note: {reason}: hub datasets are read from the local cache only (uncached tasks are "
                  "skipped at once); --data-files and --include-path data are unaffected", file=sys.stderr)
    problems = _offline_corpora_problems(plan)
    from merino_pl.checkpoint import load_model

    try:
        loaded = load_model(args.checkpoint)  # MerinoError: missing file, weights of another architecture
    except MerinoError as e:
        raise MerinoError("; ".join([str(e), *problems])) from None
    if problems:
        raise MerinoError("; ".join(problems))
    _check_window(args, loaded.model.config.max_position_embeddings)
    print(f"evaluating {loaded.recipe.name} ({loaded.kind}) sha256={loaded.weights_sha256}", file=sys.stderr)
    report = evaluate(loaded, plan, args)
    from merino_pl.evaluation.report import markdown, write

    _check_measured(report)
    paths = write(report, args.out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def _device_problems(device: str | None) -> list[str]:
    import torch

    if device is None:
        return []
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        return [f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)"]
    if kind == "cuda" and not torch.cuda.is_available():
        return [f"--device {device}: no CUDA device is available here (torch {torch.__version__})"]
    return []


def _offline_corpora_problems(plan: dict[str, Any]) -> list[str]:
    """Offline, a perplexity corpus neither given as a file nor in the hub cache is skipped; when
    that leaves nothing to measure, say so now rather than exit 0 with an empty report."""
    from merino_pl.data.sources import hub_offline
    from merino_pl.evaluation.perplexity import DataUnavailable, load_documents

    if plan["specs"] or not hub_offline():
        return []
    missing = {}
    for name in (n for n in plan["ppl"] if n not in plan["data_files"]):
        try:
            load_documents(CORPORA[name], None)
        except DataUnavailable as e:
            missing[name] = str(e)
    if not missing or len(missing) < len(plan["ppl"]):
        return []
    return ["nothing to measure offline: " + "; ".join(
        f"--ppl {n}: not in the hub cache ({why}); pass --data-files {n}=PATH" for n, why in missing.items())]


def _check_measured(report: dict[str, Any]) -> None:
    """A report in which every task and corpus was skipped is an error, not a result."""
    results = [*report["tasks"].values(), *report["perplexity"].values()]
    if results and not any(r.get("status") == "ok" for r in results):
        raise MerinoError("nothing was measured: " + "; ".join(
            f"{name}: {r.get('reason', 'skipped')}" for name, r in [*report["tasks"].items(), *report["perplexity"].items()]))


def _check_window(args: argparse.Namespace, context: int) -> None:
    window = args.window or context
    if window > context:
        raise MerinoError(f"--window {window}: longer than the model's context ({context})")
    if args.stride is not None and args.stride > window:
        raise MerinoError(f"--stride {args.stride}: longer than the window ({window})")


def evaluate(loaded: Any, plan: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run the tasks and perplexities of ``plan`` on ``loaded``; the report as a dict."""
    import lm_eval

    from merino_pl.costs import count_flops, count_params
    from merino_pl.evaluation.harness import MerinoLM, hf_lm
    from merino_pl.evaluation.tasks import run_tasks

    lm = (hf_lm(loaded, args.batch_size, args.device) if args.backend == "hf"
          else MerinoLM(loaded, batch_size=args.batch_size, device=args.device))
    tasks = {}
    if plan["specs"]:
        tasks = run_tasks(lm, plan["specs"], plan["manager"], limit=args.limit,
                          num_fewshot=plan["num_fewshot"], bootstrap_iters=args.bootstrap_iters)
    arch = loaded.recipe.architecture
    return {
        "format": FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "model": {
            "name": loaded.recipe.name, "path": str(loaded.path), "kind": loaded.kind,
            "weights_sha256": loaded.weights_sha256, "params_m": count_params(arch) / 1e6,
            "gflops": count_flops(arch) / 1e9, "context": arch.max_position_embeddings,
            "architecture": arch.to_dict(),
        },
        "backend": args.backend,
        "lm_eval_version": lm_eval.__version__,
        "limit": args.limit,
        "tasks": tasks,
        "perplexity": _perplexities(loaded, plan, args),
    }


def _perplexities(loaded: Any, plan: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from merino_pl.evaluation.harness import tokenizer_source
    from merino_pl.evaluation.perplexity import DataUnavailable, perplexity
    from merino_pl.tokenizer import EOS_TOKEN, load_tokenizer

    tok = load_tokenizer(tokenizer_source(loaded))
    out: dict[str, Any] = {}
    for name in plan["ppl"]:
        try:
            result = perplexity(
                loaded.model, tok, name, data_file=plan["data_files"].get(name), mode=args.ppl_mode,
                window=args.window, stride=args.stride, limit=args.limit, batch_size=args.batch_size,
                eos_id=tok.token_to_id(EOS_TOKEN),
            )
        except DataUnavailable as e:
            out[name] = {"status": "skipped", "reason": f"{e} (offline: --data-files {name}=PATH)"}
            log.warning("perplexity %s skipped: %s", name, out[name]["reason"])
            continue
        out[name] = {"status": "ok", **result.to_dict()}
    return out
