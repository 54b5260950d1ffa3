"""The one matplotlib set-up and save every stage's plots go through.

Headless (the Agg backend: no display on clusters and CI) and atomic: a figure is rendered to a
temporary file beside its path and renamed over it, so a crash never leaves a truncated PNG where
a previous complete one stood (``core.io.atomic_path``).
"""

from __future__ import annotations

import os
from typing import Any

from merino_pl.core.io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless backend (imported on use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically, then close it."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
