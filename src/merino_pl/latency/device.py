"""An exact description of the machine a latency was measured on, so two reports compare.

Records the CPU model and thread count, the GPU name with its CUDA runtime and driver, and on an
NVIDIA Jetson the L4T release read from ``/etc/nv_tegra_release`` (the path is an argument so a
test can point it at a fixture file). Everything here only reads the system; nothing is assumed.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")

# "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: ..."
_TEGRA_RE = re.compile(r"#\s*R(?P<major>\d+)\s*\(release\),\s*REVISION:\s*(?P<revision>[\d.]+)(?P<rest>.*)")


def parse_tegra_release(text: str) -> dict[str, Any] | None:
    """Parse the first line of ``/etc/nv_tegra_release``; None if it is not in L4T's format."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = _TEGRA_RE.match(first)
    if not m:
        return None
    info: dict[str, Any] = {
        "l4t": f"{m['major']}.{m['revision']}",
        "release": f"R{m['major']}",
        "revision": m["revision"],
    }
    for field in m["rest"].split(","):
        key, _, value = field.partition(":")
        if value.strip():
            info[key.strip().lower()] = value.strip()
    info["raw"] = first
    return info


def jetson_info(tegra_release: Path = TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL) -> dict[str, Any] | None:
    """L4T release (and the board model, where the device tree names it) on a Jetson, else None."""
    try:
        info = parse_tegra_release(Path(tegra_release).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    if info is None:
        return None
    try:  # e.g. "NVIDIA Jetson Nano Developer Kit" (NUL-terminated in the device tree)
        info["model"] = Path(model_file).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's marketing name: x86 ``model name``; on ARM boards ``Hardware`` / ``Model``."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_info(index: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, memory, CUDA runtime and driver versions."""
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": _nvidia_driver(),
    }


def describe_device(device: str = "cpu", tegra_release: Path = TEGRA_RELEASE) -> dict[str, Any]:
    """Everything a latency depends on besides the model: write it into every report."""
    desc: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": cuda_info() if device.startswith("cuda") and torch.cuda.is_available() else None,
        "jetson": jetson_info(tegra_release),
    }
    desc["summary"] = device_summary(desc)
    return desc


def device_summary(desc: dict[str, Any]) -> str:
    """One line: 'Jetson Nano (L4T 32.7.1) · NVIDIA Tegra X1 · cuda 10.2' or 'AMD EPYC · 2 threads'."""
    parts = []
    if desc.get("jetson"):
        j = desc["jetson"]
        parts.append(f"{j.get('model', 'NVIDIA Jetson')} (L4T {j['l4t']})")
    if desc.get("gpu"):
        g = desc["gpu"]
        parts.append(f"{g['name']} (CUDA {g['cuda_runtime']}, driver {g['driver'] or '?'})")
    else:
        parts.append(f"{desc['cpu']} ({desc['torch_threads']} threads)")
    return " · ".join(parts)
