"""Start-up time of the light commands (issue 16): wall seconds of a fresh ``merino-pl`` process
for ``--help``, ``info``, a demo-sized ``search`` and ``prepare --help``, against the targets, and
which heavy packages each one imported (``python -X importtime``; none of them may load torch or
transformers).

    python bench/startup.py               # 5 runs per command
    python bench/startup.py --repeats 11

The machine may be busy (a training study in the background): each row also gives the ratio to a
bare ``python -c pass`` timed the same way, which is steadier than the seconds.

Prints a table (a missed target is marked "!") and writes runs/bench/startup.json; exits 1 when
a command imports a heavy package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lightning", "datasets", "lm_eval", "matplotlib")

# label -> (arguments after `merino-pl`, target seconds); "{out}" is a fresh temporary path
COMMANDS: dict[str, tuple[list[str], float]] = {
    "merino-pl --help": (["--help"], 0.5),
    "merino-pl info recipes/merino-52m.yaml": (["info", "recipes/merino-52m.yaml"], 1.5),
    "merino-pl search --config search/cpu-demo.yaml --no-plot": (
        ["search", "--config", "search/cpu-demo.yaml", "--no-plot", "--out", "{out}"],
        2.0,
    ),
    "merino-pl prepare --help": (["prepare", "--help"], 1.0),
}


def _env() -> dict[str, str]:
    # one BLAS thread, as the search bench uses; stable hash seeds; the repo's package first
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _time(cmd: list[str], tmp: Path, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` fresh processes (output discarded; a failure stops the bench)."""
    seconds = []
    for i in range(repeats):
        argv = [a.replace("{out}", str(tmp / f"run{i}" / "recipe.yaml")) for a in cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds


def heavy_imports(args: list[str], tmp: Path) -> list[str]:
    """Top-level heavy packages the command imports, from ``python -X importtime``."""
    argv = [a.replace("{out}", str(tmp / "importtime" / "recipe.yaml")) for a in args]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "merino_pl.cli", *argv],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def _row(label: str, seconds: list[float], target: float | None, bare: float, heavy: list[str] | None) -> dict:
    median = statistics.median(seconds)
    return {
        "command": label,
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "runs_s": seconds,
        "target_s": target,
        "meets_target": None if target is None else median <= target,
        "x_bare_python": median / bare,
        "heavy_imports": heavy,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per command (default 5)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "startup.json"))
    args = p.parse_args()
    exe = Path(sys.executable).with_name("merino-pl")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "merino_pl.cli"]

    with tempfile.TemporaryDirectory(prefix="startup-") as d:
        tmp = Path(d)
        bare_runs = _time([sys.executable, "-c", "pass"], tmp, args.repeats)
        bare = statistics.median(bare_runs)
        rows = [_row(f"python -c pass ({Path(sys.executable).name})", bare_runs, None, bare, None)]
        for label, (cmd, target) in COMMANDS.items():
            seconds = _time(launcher + cmd, tmp / label.split()[1], args.repeats)
            rows.append(_row(label, seconds, target, bare, heavy_imports(cmd, tmp)))

    load = os.getloadavg()
    print(
        f"\nStart-up of a fresh process, {args.repeats} runs each ({' '.join(launcher)}), "
        f"load average {load[0]:.2f} on {os.cpu_count()} cores:"
    )
    print(f"{'command':<56} {'median':>7} {'min':>7} {'max':>7} {'target':>7} {'x bare':>7}  heavy imports")
    for r in rows:
        target = "" if r["target_s"] is None else f"{r['target_s']:.1f}s" + ("" if r["meets_target"] else " !")
        heavy = "" if r["heavy_imports"] is None else (", ".join(r["heavy_imports"]) or "none")
        print(
            f"{r['command']:<56} {r['median_s']:>6.3f}s {r['min_s']:>6.3f}s {r['max_s']:>6.3f}s {target:>7} "
            f"{r['x_bare_python']:>6.1f}x  {heavy}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "repeats": args.repeats,
                "launcher": launcher,
                "load_average": load,
                "cpu_count": os.cpu_count(),
                "bare_python_s": bare,
                "commands": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 1 if any(r["heavy_imports"] for r in rows) else 0  # seconds depend on the machine; imports do not


if __name__ == "__main__":
    sys.exit(main())
