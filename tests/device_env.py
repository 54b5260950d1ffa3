"""A device's environment on this machine, for the latency kit's test and bench: the base
interpreter without site-packages (``-I -S``) and on its path only numpy, onnxruntime and what
onnxruntime imports, so torch and merino_pl cannot be imported (the launcher checks that)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# the runner as a device runs it: no site-packages, only numpy and onnxruntime on the path
LAUNCHER = """
import runpy, sys
sys.path.insert(0, sys.argv.pop(1))
for name in ("torch", "merino_pl"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(name + " imports in the device's environment")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def device_site(path: Path) -> Path:
    """``path`` made a site folder holding links to numpy, onnxruntime and their imports only."""
    import numpy

    site = Path(numpy.__file__).parents[1]
    path.mkdir(parents=True, exist_ok=True)
    for name in ("numpy", "numpy.libs", "onnxruntime", "flatbuffers", "packaging", "google"):
        if (site / name).exists():
            (path / name).symlink_to(site / name)
    return path


def run_on_device(kit: Path, site: Path, *args: str, threads: int = 1) -> subprocess.CompletedProcess:
    """``run_kit.py ARGS`` in ``kit`` as a device runs it (see the module's docstring)."""
    script = kit.parent / "isolated.py"
    script.write_text(LAUNCHER)
    cmd = [sys.executable, "-I", "-S", str(script), str(site), "run_kit.py", *args]
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(cmd, cwd=kit, capture_output=True, text=True, env=env, timeout=600)
