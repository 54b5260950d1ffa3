"""W&B for every stage: a finished report (eval, quantize, latency) as a run of the training's
W&B project, linked to the training run, offline-safe.

``log_report(project, report_json, model)`` starts one W&B run per report (``job_type`` = the
stage, ``group`` = the training run's id, ``config.training_run_id`` the same), puts the report's
numbers in the run summary, its PNG figures as images and its JSON / Markdown as files, and
finishes. ``project`` None (no ``--wandb``) does nothing and imports nothing.

The mode is decided here, never by a prompt: ``WANDB_MODE`` when set (``offline``,
``disabled``, ``online``), else ``online`` with an API key (``WANDB_API_KEY`` or a netrc entry
for the W&B host) and ``offline`` without one, with the ``wandb sync`` command to upload later.
(``wandb.init`` with no mode and no key shows a login menu on a terminal and waits for input.)

The training run is found from the model the report measured: a ``.ckpt`` of ``merino-pl fit``
stores its W&B run id (``checkpoint["merino"]["wandb_run_id"]``); an exported or quantized
directory does not, so the checkpoint is looked for where ``slurm chain`` and ``pipeline`` put
it (``RUN/model``, ``RUN/quantized/intN`` beside ``RUN/checkpoints/last.ckpt``; ``OUT/model``,
``OUT/quantized/intN`` beside ``OUT/fit/checkpoints/last.ckpt``). ``WANDB_RUN_GROUP`` (W&B's
own variable) overrides the group.
"""

from __future__ import annotations

import argparse
import json
import netrc
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError

MODES = ("online", "offline", "disabled")


def add_wandb_argument(parser: argparse.ArgumentParser) -> None:
    """``--wandb PROJECT``: the option every stage that writes a report shares."""
    parser.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log the report to this W&B project (the training run's, e.g. merino-pl), linked to the "
        "training run; offline without an API key (WANDB_MODE decides when set)",
    )


def wandb_mode() -> str:
    """``WANDB_MODE`` if set, else online with an API key and offline without (never a prompt)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        if mode not in MODES:
            raise MerinoError(f"WANDB_MODE={mode!r}: expected one of {', '.join(MODES)}")
        return mode
    return "online" if api_key_available() else "offline"


def api_key_available() -> bool:
    """An API key in ``WANDB_API_KEY`` or in the netrc entry of the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def training_checkpoint(model: str | Path) -> Path | None:
    """The ``fit`` checkpoint ``model`` came from: itself if a ``.ckpt``, else the one the chain /
    pipeline layout puts beside it (see the module docstring); None when there is none."""
    path = Path(model)
    if path.suffix == ".ckpt":
        return path if path.is_file() else None
    for root in (path.parent, path.parent.parent):
        for ckpt in (root / "checkpoints" / "last.ckpt", root / "fit" / "checkpoints" / "last.ckpt"):
            if ckpt.is_file():
                return ckpt
    return None


def training_run_id(model: str | Path) -> str | None:
    """The W&B run id the training checkpoint of ``model`` recorded, if any."""
    ckpt = training_checkpoint(model)
    if ckpt is None:
        return None
    import torch

    try:  # mmap: reads the small "merino" entry without loading the weights into memory
        data = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint only costs the link
        print(f"W&B: cannot read the training run id from {ckpt} ({type(e).__name__}); not linked", file=sys.stderr)
        return None
    meta = data.get("merino") if isinstance(data, dict) else None
    run_id = (meta or {}).get("wandb_run_id")
    return str(run_id) if run_id else None


def flat_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a report's JSON, keyed by its path (``perplexity/wikitext2/value``)."""
    if isinstance(data, dict):
        out: dict[str, float] = {}
        for key, value in data.items():
            out |= flat_numbers(value, f"{prefix}{key}/")
        return out
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return {prefix.rstrip("/"): data}
    return {}


def log_report(
    project: str | None, report: str | Path, model: str | Path, stage: str, local: str | Path | None = None
) -> Path | None:
    """Log the finished report ``report`` (a stage's ``*.json``; its ``.md`` and the folder's
    PNGs with it) of ``model`` as a ``stage`` run of W&B ``project``; the run's local folder
    (None when ``project`` is None or ``WANDB_MODE=disabled``). The run's files go to
    ``WANDB_DIR``, else ``local``, else the report's folder (under ``wandb/``)."""
    if not project:
        return None
    mode = wandb_mode()
    if mode == "disabled":
        return None
    import wandb

    report = Path(report)
    folder = report.parent
    run_id = training_run_id(model)
    run = wandb.init(
        project=project,
        group=os.environ.get("WANDB_RUN_GROUP") or run_id,
        job_type=stage,
        name=f"{stage}-{Path(model).name}",
        dir=os.environ.get("WANDB_DIR") or str(local or folder),
        mode=mode,
        config={"stage": stage, "model": str(model), "report": str(report), "training_run_id": run_id},
        # a run of its own even when the calling process has one active (a training run in the same
        # process, a notebook): logging into that run would put the report's figures in the wrong place
        settings=wandb.Settings(console="off", silent=True, reinit="create_new"),
    )
    try:
        run.summary.update(flat_numbers(json.loads(report.read_text(encoding="utf-8"))))
        images = {f"{stage}/{png.stem}": wandb.Image(str(png)) for png in sorted(folder.glob("*.png"))}
        if images:
            run.log(images)
        for path in (report, report.with_suffix(".md")):
            if path.is_file():  # files in the run's folder are uploaded with it (run.save would symlink and warn)
                shutil.copyfile(path, Path(run.dir) / path.name)
    finally:
        run.finish()
    where = Path(run.dir).parent
    if mode == "offline":
        print(f"W&B: {stage} report logged offline in {where}; upload with: wandb sync {where}", file=sys.stderr)
    return where
