"""The one checker of ``--ckpt_path`` for ``merino-pl fit | validate | test``, and the run's
directory and checkpoints it looks in.

Every form a user can give goes through :func:`check_ckpt_path` after the config is parsed and
before anything (logs, the saved config, W&B) is written; what it returns is the one file
Lightning then loads:

* ``FILE`` or ``file://FILE``: must be a readable Lightning checkpoint of ``merino-pl fit`` whose
  recipe has the architecture of the config's ``model.recipe`` (Lightning would otherwise print
  one size mismatch per tensor);
* ``http(s)://`` and every other URL: refused. A checkpoint is a pickle and Lightning loads
  remote ones with ``weights_only=False``, i.e. runs whatever code the file holds;
* ``last``: the newest checkpoint of the run, by training step, among ``last*.ckpt`` and the
  periodic ``step-*.ckpt`` (a crash between the two saves leaves the step file newer) and the
  SLURM requeue files ``hpc_ckpt_*.ckpt`` in the run directory. None yet: ``fit`` starts fresh
  (so a first run and its requeues are one command), ``validate`` / ``test`` refuse;
* ``hpc``: the newest requeue checkpoint; ``best`` / ``registry``: refused (a periodic run has
  no "best"; the model registry is remote).
"""

from __future__ import annotations

import re
import sys
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any

import torch

from merino_pl.core.config import Recipe, load_recipe
from merino_pl.core.errors import MerinoError

HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def run_dir(cfg: Any) -> Path:
    """``trainer.default_root_dir``; when not given, ``runs/<recipe name>`` (what ``merino-pl
    slurm`` defaults to as well), so runs of different recipes never share checkpoints. A W&B
    logger without a ``name`` is named after that directory."""
    trainer = cfg.get("trainer")
    root = trainer.get("default_root_dir")
    if not root:
        model = cfg.get("model")
        recipe = (getattr(model, "init_args", model) or {}).get("recipe") or "fit"
        root = trainer["default_root_dir"] = f"runs/{Path(str(recipe)).stem}"
        checkpoint = cfg.get("checkpoint")
        if checkpoint is not None and checkpoint.get("dirpath") in (None, "checkpoints"):  # linked from None
            checkpoint["dirpath"] = str(Path(root) / "checkpoints")
    return Path(root)


def check_ckpt_path(value: Any, cfg: Any, subcommand: str) -> str | None:
    """The checkpoint file to load for ``value`` (see the module docstring), or None (a fresh
    ``fit``); any problem is one ``MerinoError`` naming the value."""
    if not value:
        if subcommand != "fit":
            raise MerinoError(f"{subcommand} scores a trained model: give --ckpt_path CHECKPOINT (or last)")
        return None
    value = str(value)
    if value.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(value).path))
    elif "://" in value:
        raise MerinoError(
            f"ckpt_path {value}: checkpoints are not loaded from URLs (a checkpoint is a pickle, and a remote one "
            "would be loaded with weights_only=False, running any code it holds); download it and pass the file"
        )
    elif value in ("last", "hpc"):
        path = _newest(cfg, requeue_only=value == "hpc")
        if path is None:
            where = run_dir(cfg)
            if subcommand == "fit" and value == "last":
                print(f"note: ckpt_path last: no checkpoint under {where} yet: training from scratch", file=sys.stderr)
                return None
            raise MerinoError(f"ckpt_path {value}: no checkpoint under {where}")
    elif value == "best" or value.startswith("registry"):
        raise MerinoError(f"ckpt_path {value}: not supported here (valid: a checkpoint file, file://FILE, last, hpc)")
    else:
        path = Path(value)
    _check_file(value, path)
    _check_recipe(value, path, cfg)
    return str(path)


def _check_file(value: str, path: Path) -> None:
    if not path.is_file():
        raise MerinoError(f"ckpt_path {value}: {'is a directory' if path.is_dir() else 'file not found'}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the end
        raise MerinoError(f"ckpt_path {value}: not a readable checkpoint (truncated, or not written by torch.save)")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's top level, memory-mapped (the tensors are not read) and with
    ``weights_only=True`` (no code from the file runs); a ``MerinoError`` when unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated / corrupt / a pickle with code in it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MerinoError(f"cannot read checkpoint ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise MerinoError("not a Lightning checkpoint (no state_dict)")
    return ckpt


def _check_recipe(value: str, path: Path, cfg: Any) -> None:
    """The checkpoint's recipe must have the config's architecture (names may differ)."""
    try:
        ckpt = read_checkpoint(path)
    except MerinoError as e:
        raise MerinoError(f"ckpt_path {value}: {e}") from None
    meta = ckpt.get("merino")
    if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict):
        raise MerinoError(f"ckpt_path {value}: not a merino-pl fit checkpoint (no merino.recipe entry)")
    theirs = Recipe.from_dict(meta["recipe"], source=f"{path}[merino.recipe]")
    model = cfg.get("model")
    given = (getattr(model, "init_args", model) or {}).get("recipe")
    ours = load_recipe(given)
    if theirs.architecture.to_dict() != ours.architecture.to_dict():
        raise MerinoError(
            f"ckpt_path {value}: a checkpoint of recipe {theirs.name!r} ({_shape(theirs)}), but model.recipe is "
            f"{given!s} ({_shape(ours)}); resume it with --model.recipe of its architecture, or start a new run"
        )


def _shape(recipe: Recipe) -> str:
    arch = recipe.architecture
    return f"d_model {arch.d_model}, {arch.num_blocks} blocks, vocab {arch.vocab_size}"


def _step(path: Path) -> int:
    """The global step a checkpoint holds (-1: unreadable, so any readable one wins)."""
    try:
        return int(read_checkpoint(path).get("global_step", 0))
    except (MerinoError, TypeError, ValueError):
        print(f"note: ckpt_path last: skipping unreadable {path}", file=sys.stderr)
        return -1


def _newest(cfg: Any, requeue_only: bool = False) -> Path | None:
    """The checkpoint of the run at the highest training step (the newest file on a tie)."""
    root = run_dir(cfg)
    dirpath = (cfg.get("checkpoint") or {}).get("dirpath") or root / "checkpoints"
    found = list(requeue_checkpoints(root))
    if not requeue_only and Path(dirpath).is_dir():
        found += [p for p in Path(dirpath).glob("*.ckpt") if not p.name.startswith(".")]
    ranked = [(_step(p), p.stat().st_mtime, p) for p in found if p.is_file()]
    ranked = [r for r in ranked if r[0] >= 0]
    return max(ranked)[2] if ranked else None


def requeue_checkpoints(root: str | Path) -> list[Path]:
    """``hpc_ckpt_N.ckpt`` files of a run directory (the SLURM requeue saves), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    numbered = [(int(m.group(1)), p) for p in root.iterdir() if (m := HPC_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(numbered)]


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """The ``merino`` entry of a checkpoint ({} when unreadable: Lightning reports it when restoring)."""
    try:
        meta = read_checkpoint(path).get("merino")
    except MerinoError:
        return {}
    return meta if isinstance(meta, dict) else {}
