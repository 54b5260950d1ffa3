"""Reading a ``fit`` command line before LightningCLI parses it (no Lightning imported here, so
``merino-pl fit --config MISSING`` is one line at once)."""

from __future__ import annotations

from collections.abc import Sequence


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config FILE`` / ``--config=FILE`` values of a fit command line."""
    return [v for i, a in enumerate(argv) if (v := flag_value(argv, i, "--config")) is not None]


def flag_value(argv: Sequence[str], i: int, flag: str) -> str | None:
    """The value of ``flag`` at ``argv[i]`` (``--flag V`` or ``--flag=V``), else None."""
    if argv[i] == flag and i + 1 < len(argv):
        return argv[i + 1]
    if argv[i].startswith(flag + "="):
        return argv[i].split("=", 1)[1]
    return None
