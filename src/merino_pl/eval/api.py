"""The eval stage's library: ``evaluate(EvalSettings(...))`` is its entry function
(``merino-pl eval`` calls it after parsing its flags, see ``eval/cli.py``).

Zero-shot lm-eval tasks through the ``merino`` backend (or lm-eval's stock ``hf`` backend) and
WikiText-2 / PTB perplexity, written as ``eval.json`` + ``eval.md`` (+ ``accuracy.png``) in the
layout of the paper's Tables 2–3. Offline, a task or corpus whose data cannot be fetched is
reported as skipped with the reason; the rest still run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.assets import embedded_wikitext2
from merino_pl.core.config import model_source_problems
from merino_pl.core.errors import MerinoError
from merino_pl.core.io import check_out
from merino_pl.core.tracking import log_report
from merino_pl.eval.perplexity import CORPORA
from merino_pl.eval.report import EvalModel, EvalReport, markdown, write

log = logging.getLogger("merino_pl.eval")
OUTPUT_NAMES = (EvalReport.json_name, EvalReport.markdown_name, "accuracy.png")  # what eval writes into --out


@dataclass
class EvalSettings:
    """One evaluation, as ``merino-pl eval``'s flags give it (same names, same defaults; the
    report records these fields under ``arguments``)."""

    checkpoint: str  # a .ckpt from `merino-pl fit`, an exported directory, or a recipe (fresh init)
    out: str  # output directory for eval.json / eval.md / accuracy.png
    tasks: str = "paper"  # `paper`, a task-list YAML, `t1,t2` lm-eval names, or `none`
    ppl: str = "wikitext2,ptb"  # perplexity corpora, comma-separated, or `none`
    include_path: list[str] = field(default_factory=list)  # folders of local lm-eval task YAMLs
    data_files: list[str] = field(default_factory=list)  # NAME=PATH local perplexity data
    metadata: list[str] = field(default_factory=list)  # KEY=VALUE passed to lm-eval tasks
    limit: int | None = None
    batch_size: int = 8
    backend: str = "merino"  # "merino" or lm-eval's stock "hf"
    ppl_mode: str | None = None
    stride: int | None = None
    window: int | None = None  # default: the context the model was trained at
    beyond_trained_context: bool = False  # allow --window past the trained context (not past max_position_embeddings)
    num_fewshot: int | None = None
    bootstrap_iters: int = 1000
    device: str | None = None
    wandb: str | None = None  # W&B project to log the report to, linked to the training run (core.tracking)


def _pairs(items: list[str], what: str, errors: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            errors.append(f"{what} {item!r}: expected KEY=VALUE")
        else:
            out[key] = value
    return out


def validate(settings: EvalSettings, index_tasks: bool = True, pending: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Check every argument before any heavy work; all problems in one ``MerinoError``
    (``pending``: paths an earlier pipeline stage will write: not there yet, not missing)."""
    from merino_pl.eval.tasks import resolve_tasks

    errors: list[str] = []
    specs, fewshot = [], None
    try:
        specs, fewshot = resolve_tasks(settings.tasks)
    except MerinoError as e:
        errors.append(str(e))
    ppl = [] if settings.ppl in ("", "none") else [s.strip() for s in settings.ppl.split(",") if s.strip()]
    errors += [f"--ppl {n!r}: unknown corpus (valid: {', '.join(CORPORA)})" for n in ppl if n not in CORPORA]
    data_files = _pairs(settings.data_files, "--data-files", errors)
    if data_files.get("wikitext2") == "embedded":  # the copy shipped in the package (offline demo)
        data_files["wikitext2"] = str(embedded_wikitext2())
    for name, path in data_files.items():
        if name not in CORPORA:
            errors.append(f"--data-files {name}=...: unknown corpus (valid: {', '.join(CORPORA)})")
        elif not Path(path).is_file():
            errors.append(f"--data-files {name}={path}: file not found")
    metadata = _pairs(settings.metadata, "--metadata", errors)
    errors += [f"--include-path {d}: not a directory" for d in settings.include_path if not Path(d).is_dir()]
    for flag in ("limit", "batch_size", "stride", "window"):
        value = getattr(settings, flag)
        if value is not None and value < 1:
            errors.append(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    if not specs and not ppl:
        errors.append("nothing to evaluate: --tasks none and --ppl none")
    errors += _device_problems(settings.device)
    errors += [] if settings.checkpoint in pending else model_source_problems(settings.checkpoint)
    errors += check_out(settings.out)
    if errors:
        raise MerinoError("; ".join(errors))
    manager = None
    if specs and index_tasks:
        from merino_pl.eval.tasks import task_manager

        manager = task_manager([s.task for s in specs], settings.include_path, metadata)
    num_fewshot = settings.num_fewshot if settings.num_fewshot is not None else fewshot
    return {"specs": specs, "ppl": ppl, "data_files": data_files, "manager": manager, "num_fewshot": num_fewshot}


def evaluate(settings: EvalSettings) -> EvalReport:
    """The stage's entry function: check ``settings`` (every problem in one ``MerinoError``), load
    the model, run the tasks and perplexities, write ``eval.json`` / ``eval.md`` /
    ``accuracy.png`` into ``settings.out`` and print the Markdown. Returns the report."""
    plan = validate(settings)
    if plan["specs"] or any(c not in plan["data_files"] for c in plan["ppl"]):  # some data comes from the hub
        from merino_pl.data.sources import offline_unless_reachable

        reason = offline_unless_reachable()
        if reason:
            print(
                f"note: {reason}: hub datasets are read from the local cache only (uncached tasks are "
                "skipped at once); --data-files and --include-path data are unaffected",
                file=sys.stderr,
            )
    problems = _offline_corpora_problems(plan)
    from merino_pl.core.checkpoint import load_model
    from merino_pl.core.lock import locked_output

    try:
        loaded = load_model(settings.checkpoint)  # MerinoError: missing file, weights of another architecture
    except MerinoError as e:
        raise MerinoError("; ".join([str(e), *problems])) from None
    if problems:
        raise MerinoError("; ".join(problems))
    _check_tokenizer(settings, loaded)
    window = _check_window(settings, loaded)
    print(
        f"evaluating {loaded.recipe.name} ({loaded.kind}) sha256={loaded.weights_sha256}, window {window}",
        file=sys.stderr,
    )
    # one writer per --out; a failure (a full disk, Ctrl-C) leaves no --out or file of its own behind
    with locked_output(settings.out, f"merino-pl eval {settings.checkpoint}", names=OUTPUT_NAMES):
        report = _measure(loaded, plan, settings, window)
        _check_measured(report)
        paths = write(report, settings.out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    log_report(settings.wandb, paths["json"], settings.checkpoint, "eval")
    return report


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
    from merino_pl.eval.perplexity import DataUnavailable, load_documents

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
    return [
        "nothing to measure offline: "
        + "; ".join(
            f"--ppl {n}: not in the hub cache ({why}); pass --data-files {n}=PATH" for n, why in missing.items()
        )
    ]


def _check_measured(report: EvalReport) -> None:
    """A report in which every task and corpus was skipped is an error, not a result."""
    results = [*report.tasks.values(), *report.perplexity.values()]
    if results and not any(r.get("status") == "ok" for r in results):
        raise MerinoError(
            "nothing was measured: "
            + "; ".join(
                f"{name}: {r.get('reason', 'skipped')}"
                for name, r in [*report.tasks.items(), *report.perplexity.items()]
            )
        )


def _check_tokenizer(settings: EvalSettings, loaded: Any) -> None:
    """The tokenizer lm-eval and perplexity read text with (the model's own, ``harness.tokenizer_source``;
    a recipe's: the default) must fit the model's embedding: one line naming both sizes."""
    from merino_pl.core.tokenizer import check_vocab, load_tokenizer, model_tokenizer

    spec = None if loaded.kind == "recipe" else model_tokenizer(loaded.path)
    check_vocab(load_tokenizer(spec), loaded.recipe.architecture.vocab_size, settings.checkpoint, spec)


def _check_window(settings: EvalSettings, loaded: Any) -> int:
    """The window perplexity and lm-eval score with: ``--window``, else the context the model was
    trained at (positions past it never received a gradient); past that only when asked for."""
    from merino_pl.core.checkpoint import context_window, trained_context

    limit = loaded.model.config.max_position_embeddings
    default, note = context_window(loaded)
    if note and loaded.kind != "recipe":  # a recipe is untrained: it has no trained context to miss
        print(f"note: {note}", file=sys.stderr)
    window = settings.window or default
    trained = trained_context(loaded)
    if window > limit:
        raise MerinoError(f"--window {window}: longer than the model's max_position_embeddings ({limit})")
    if trained is not None and window > trained and not settings.beyond_trained_context:
        raise MerinoError(
            f"--window {window}: longer than the context the model was trained at ({trained} tokens); "
            "positions past it never received a gradient (add --beyond-trained-context to score them anyway)"
        )
    if settings.stride is not None and settings.stride > window:
        raise MerinoError(f"--stride {settings.stride}: longer than the window ({window})")
    return window


def _measure(loaded: Any, plan: dict[str, Any], settings: EvalSettings, window: int) -> EvalReport:
    """Run the tasks and perplexities of ``plan`` on ``loaded`` with ``window`` tokens of context
    (lm-eval's ``max_length``, the perplexity window); the report."""
    import lm_eval

    from merino_pl.core.checkpoint import trained_context
    from merino_pl.core.costs import count_flops, count_params
    from merino_pl.eval.harness import MerinoLM, hf_lm
    from merino_pl.eval.tasks import run_tasks

    lm = (
        hf_lm(loaded, settings.batch_size, settings.device, max_length=window)
        if settings.backend == "hf"
        else MerinoLM(loaded, batch_size=settings.batch_size, device=settings.device, max_length=window)
    )
    tasks = {}
    if plan["specs"]:
        tasks = run_tasks(
            lm,
            plan["specs"],
            plan["manager"],
            limit=settings.limit,
            num_fewshot=plan["num_fewshot"],
            bootstrap_iters=settings.bootstrap_iters,
        )
    arch = loaded.recipe.architecture
    return EvalReport(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        arguments=dataclasses.asdict(settings),
        model=EvalModel(
            name=loaded.recipe.name,
            path=str(loaded.path),
            kind=loaded.kind,
            weights_sha256=loaded.weights_sha256,
            params_m=count_params(arch) / 1e6,
            gflops=count_flops(arch) / 1e9,
            context=arch.max_position_embeddings,
            architecture=arch.to_dict(),
            trained_context=trained_context(loaded),
            window=window,
        ),
        backend=settings.backend,
        lm_eval_version=lm_eval.__version__,
        limit=settings.limit,
        tasks=tasks,
        perplexity=_perplexities(loaded, plan, settings, window),
    )


def _perplexities(loaded: Any, plan: dict[str, Any], settings: EvalSettings, window: int) -> dict[str, Any]:
    from merino_pl.core.tokenizer import EOS_TOKEN, load_tokenizer
    from merino_pl.eval.harness import tokenizer_source
    from merino_pl.eval.perplexity import DataUnavailable, perplexity

    tok = load_tokenizer(tokenizer_source(loaded))
    out: dict[str, Any] = {}
    for name in plan["ppl"]:
        try:
            result = perplexity(
                loaded.model,
                tok,
                name,
                data_file=plan["data_files"].get(name),
                mode=settings.ppl_mode,
                window=window,
                stride=settings.stride,
                limit=settings.limit,
                batch_size=settings.batch_size,
                eos_id=tok.token_to_id(EOS_TOKEN),
            )
        except DataUnavailable as e:
            out[name] = {"status": "skipped", "reason": f"{e} (offline: --data-files {name}=PATH)"}
            log.warning("perplexity %s skipped: %s", name, out[name]["reason"])
            continue
        out[name] = {"status": "ok", **result.to_dict()}
    return out
