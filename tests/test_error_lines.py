"""Every ``merino-pl`` command, nested ones included, answers a bad value with one line: exit
code 2, stderr exactly one non-empty line naming the value, no traceback, and nothing on stdout
(no banner, progress or summary before the error).

Each case runs the real CLI as a subprocess, with a path holding a space and non-ASCII letters
where the bad value is a path. The processes run a few at a time (most of the file's time is
Python importing the stage), once for the module; each case is then its own test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from merino_pl.cli import STAGES

WHERE = "bad inputs ü"  # the folder every missing path of a case lies under


def cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """command (as ``merino-pl --help`` and the nested helps name it) -> (argv, the bad value the
    line must name). ``root``: a folder holding nothing these name (they are all missing)."""
    m = root / WHERE
    missing, out = str(m / "nö such.ckpt"), str(root / "out dir")
    yaml = str(m / "nö such.yaml")
    return {
        "info": (["info", "no-such-recipe"], "no-such-recipe"),
        "demo": (["demo", "--config", yaml], yaml),
        "search": (["search", "--budget", "flops=lots"], "flops=lots"),
        "prepare": (["prepare", str(m / "nö such.txt"), "--out", out], str(m / "nö such.txt")),
        "fit": (["fit", "--config", yaml], yaml),
        "validate": (["validate", "--config", yaml, "--ckpt_path", missing], yaml),
        "test": (["test", "--config", yaml, "--ckpt_path", missing], yaml),
        "export": (["export", missing, "--out", out], missing),
        "eval": (["eval", missing, "--out", out], missing),
        "quantize": (["quantize", missing, "--out", out], missing),
        "generate": (["generate", missing], missing),
        "latency": (["latency", missing, "--out", out], missing),
        "latency kit": (["latency", "kit", missing, "--out", out], missing),
        "latency import": (["latency", "import", str(m / "results.json"), "--kit", str(m), "--out", out], str(m)),
        "latency plot": (
            ["latency", "plot", "--latency", str(m / "latency.json"), "--out", out],
            str(m / "latency.json"),
        ),
        "latency profile": (["latency", "profile", "--out", out, "--space", yaml], yaml),
        "study run": (["study", "run", "--config", yaml, "--out", out], yaml),
        "study report": (["study", "report", str(m)], str(m)),
        "study regime": (["study", "regime", str(m)], str(m)),
        "study calibrate": (["study", "calibrate", str(m / "report.json"), "--out", out], str(m / "report.json")),
        "study compare": (["study", "compare", "--config", yaml, "--out", out], yaml),
        "slurm submit": (["slurm", "submit", "--config", yaml, "--recipe", "merino-tiny", "--dry-run"], yaml),
        "slurm chain": (["slurm", "chain", "--config", yaml, "--recipe", "merino-tiny", "--dry-run"], yaml),
        "slurm prepare": (["slurm", "prepare", "embedded", "--out", out, "--tasks", "0", "--dry-run"], "--tasks"),
        "slurm status": (["slurm", "status", str(m)], str(m)),
        "slurm logs": (["slurm", "logs", str(m), "--lines", "many"], "many"),
        "pipeline": (["pipeline", "--config", yaml], yaml),
        "no such command": (["fitt"], "fitt"),
    }


def nested(command: str) -> list[str]:
    """The sub-commands of ``command`` as its own parser knows them (none: [])."""
    import argparse

    if command == "latency":
        from merino_pl.latency.cli import SUBCOMMANDS

        return sorted(SUBCOMMANDS)
    if command == "study":
        from merino_pl.study.cli import _parser

        parser = _parser()
    elif command == "slurm":
        from merino_pl.slurm.cli import add_arguments

        parser = argparse.ArgumentParser()
        add_arguments(parser)
    else:
        return []
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_has_a_case(tmp_path):
    want = {f"{c} {s}" for c in STAGES for s in nested(c)} | {c for c in STAGES if not nested(c) or c == "latency"}
    assert want <= set(cases(tmp_path)), sorted(want - set(cases(tmp_path)))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("error lines")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["WANDB_MODE"] = "offline"

    def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "merino_pl.cli", *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def run_case(command: str) -> subprocess.CompletedProcess:
        folder = root / command  # a folder per case: what one case writes never shows in another's
        folder.mkdir()
        return run(cases(folder)[command][0], folder)

    with ThreadPoolExecutor(max_workers=4) as pool:
        commands = list(cases(root))
        done = dict(zip(commands, pool.map(run_case, commands)))
    return root, done


@pytest.mark.parametrize("command", list(cases(Path("/"))))
def test_a_bad_value_is_one_line(results, command):
    root, done = results
    root = root / command
    named = cases(root)[command][1]
    proc = done[command]
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert named in lines[0], (named, lines[0])
    assert proc.stdout == "", proc.stdout
    assert sorted(p.name for p in root.iterdir()) == [], proc.stderr  # nothing written for a refused run
