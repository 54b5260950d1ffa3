"""``merino-pl study``: the proxy study (run, report, calibrate, compare).

    merino-pl study run --config search/study-cpu.yaml --out runs/study/cpu [--jobs 2] [--trainer.max_steps 400]
    merino-pl study report runs/study/cpu
    merino-pl study regime runs/study/cpu      # rho per training length and the lr grid (config lengths / lr_grid)
    merino-pl study calibrate runs/study/cpu/report.json --out search/entropy-calibrated.yaml
    merino-pl study compare --config search/study-cpu.yaml --out runs/study/cpu-h2h

Options after the study's own (``--trainer.*``, ``--model.*``, ``--data.*``) pass through to
every run's ``merino-pl fit``, so the same command trains on CPU or GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from merino_pl.core.errors import MerinoError

if TYPE_CHECKING:
    from merino_pl.study.runs import StudySettings

MIN_BOOTSTRAP = 100
PASS_THROUGH = ("--trainer.", "--model.", "--data.", "--checkpoint.", "--speed.")


def _parser() -> argparse.ArgumentParser:
    from merino_pl.core.errors import ArgumentParser

    p = ArgumentParser(prog="merino-pl study", description="which zero-cost proxy ranks trained quality?")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)
    r = sub.add_parser("run", help="sample architectures, train each through fit, score held-out loss")
    r.add_argument("--config", required=True, help="study config YAML (search/study-cpu.yaml)")
    r.add_argument("--out", required=True, help="study directory (created; a re-run continues it)")
    r.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    r.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    rep = sub.add_parser("report", help="correlate every proxy with held-out loss: JSON, Markdown, plots")
    rep.add_argument("study", help="a study directory written by `study run`")
    rep.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95 %% intervals")
    reg = sub.add_parser("regime", help="rho of every proxy per training length, and the lr grid: JSON, Markdown, plot")
    reg.add_argument("study", help="a study directory whose config has `lengths` and / or `lr_grid`")
    reg.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95 %% intervals")
    reg.add_argument(
        "--evidence",
        help="where to write the proxy evidence that `search --tokens` reads (default STUDY/proxy-evidence.json)",
    )
    cal = sub.add_parser("calibrate", help="fit the entropy settings the paper leaves open, cross-validated")
    cal.add_argument("report", help="report.json of a study")
    cal.add_argument("--out", required=True, help="entropy config YAML that `merino-pl search --config` reads")
    cal.add_argument("--folds", type=int, default=4)
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .calibration.json")
    cmp_ = sub.add_parser("compare", help="train the searched recipes head to head, several seeds")
    cmp_.add_argument("--config", required=True, help="study config with a head_to_head section")
    cmp_.add_argument("--out", required=True)
    cmp_.add_argument("--jobs", type=int, default=1)
    cmp_.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = [
        a
        for i, a in enumerate(argv)
        if a.startswith(PASS_THROUGH)
        or (i > 0 and argv[i - 1].startswith(PASS_THROUGH) and "=" not in argv[i - 1] and not a.startswith("--"))
    ]
    own = [a for a in argv if a not in extra] if extra else argv
    args = _parser().parse_args(own)
    if args.cmd in ("run", "compare"):
        for name in ("jobs", "threads"):
            if getattr(args, name) < 1:
                raise MerinoError(f"--{name} must be >= 1, got {getattr(args, name)}")
    elif extra:
        raise MerinoError(f"study {args.cmd} takes no fit options, got {' '.join(extra)}")
    if getattr(args, "bootstrap", MIN_BOOTSTRAP) < MIN_BOOTSTRAP:
        raise MerinoError(
            f"--bootstrap must be >= {MIN_BOOTSTRAP} (resamples for the 95 % intervals), got {args.bootstrap}"
        )
    if args.cmd == "run":
        from merino_pl.study.runs import run_study

        settings = _settings(args, extra)
        run_study(settings)
        if not args.no_report:
            from merino_pl.study.report import write_report

            write_report(Path(args.out))
            if settings.config.lengths or settings.config.lrs:
                from merino_pl.study.regime import write_regime

                write_regime(Path(args.out))
        return 0
    if args.cmd == "report":
        study = _study_dir(args.study)  # before the report's imports (scipy, matplotlib)
        from merino_pl.study.report import write_report

        write_report(study, bootstrap=args.bootstrap)
        return 0
    if args.cmd == "regime":
        study = _study_dir(args.study)
        from merino_pl.study.regime import write_regime

        write_regime(
            study,
            bootstrap=args.bootstrap,
            evidence_out=Path(args.evidence) if args.evidence else None,
        )
        return 0
    if args.cmd == "calibrate":
        from merino_pl.study.calibrate import calibrate_cli

        return calibrate_cli(args.report, args.out, args.folds, args.overwrite)
    from merino_pl.study.compare import compare

    return compare(_settings(args, extra))


def _settings(args: argparse.Namespace, extra: list[str]) -> StudySettings:
    """``study run`` / ``study compare``'s flags as the one ``StudySettings`` their entries take."""
    from merino_pl.study.config import load_study_config
    from merino_pl.study.runs import StudySettings

    out = _writable(args.out)
    return StudySettings(load_study_config(args.config), out, args.jobs, args.threads, list(extra))


def _study_dir(path: str) -> Path:
    out = Path(path)
    if not (out / "study.json").is_file():
        raise MerinoError(f"{out}: not a study directory (no study.json); run `merino-pl study run` first")
    return out


def _writable(path: str) -> Path:
    """The output directory, checked writable before any work (created if missing): a file, or a
    folder nothing can be created in (read-only, ``chattr +i``: probed, root included), is one line."""
    from merino_pl.core.io import check_out

    problems = check_out(path)
    if problems:
        raise MerinoError("; ".join(problems))
    return Path(path)
