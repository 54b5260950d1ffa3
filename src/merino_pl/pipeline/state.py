"""``OUT/pipeline-state.json``: each stage's key and status, and every file the pipeline wrote.

The pipeline owns only the files this record lists with their current content (path, size and
SHA-256; a file whose size or content changed since is no longer its own). Anything else in
``OUT`` is *unknown*: a run refuses to start beside unknown files unless told (``--keep-unknown``),
and then never deletes or overwrites them. Cleaning a stage's folder removes only owned files.
A state file that cannot be read, or is not one, stops the run in one line naming it: without the
record the pipeline cannot tell its files from the user's, so it deletes nothing.

Files a killed run left (the pipeline died while a stage ran, so nothing was recorded) belong to
that stage when they sit in its folder or log and are newer than the stage's recorded start.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import read_json, write_json
from merino_pl.pipeline.stages import file_digest

FORMAT = 2
# left in OUT by our own writers and never the user's: atomic temp files / directories of a killed
# writer (core.io: ``.NAME.HOST-PID-TOKEN.tmp|old``) and folder locks (core.lock: ``.NAME.lock``)
TRANSIENT = re.compile(r"^\..+\.(.+-\d+-[0-9a-f]+\.(tmp|old)|lock)$")


@dataclass
class RunState:
    """The state of one output folder: ``stages`` (name -> key, status, argv, seconds, started)
    and ``files`` (path relative to ``out`` -> size, sha256) the pipeline wrote."""

    out: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        from merino_pl.pipeline.layout import STATE_NAME

        return self.out / STATE_NAME

    @classmethod
    def read(cls, out: Path) -> RunState:
        """The folder's state; empty when there is none yet. Anything unreadable is a one-line error."""
        state = cls(out)
        if not state.path.exists() and not state.path.is_symlink():
            return state
        data = read_json(state.path, "pipeline state")  # a one-line MerinoError naming the file
        why = _malformed(data)
        if why:
            raise MerinoError(
                f"{state.path}: not a pipeline state ({why}); without it the pipeline cannot tell its files "
                f"from yours, so it stops and deletes nothing: use another out_dir, or clear {out} yourself"
            )
        state.stages, state.files = data["stages"], data["files"]
        return state

    def save(self) -> None:
        write_json(self.path, {"format": FORMAT, "stages": self.stages, "files": self.files})

    # ---- ownership
    def owns(self, path: Path) -> bool:
        """Whether ``path`` is a file the pipeline wrote, unchanged since."""
        rec = self.files.get(self._rel(path))
        return bool(rec) and _fingerprint(path) == rec

    def record(self, paths: Iterable[Path]) -> None:
        """Record these files (just written by the pipeline or one of its stages) as its own."""
        for p in paths:
            if (fp := _fingerprint(p)) is not None:
                self.files[self._rel(p)] = fp

    def files_under(self, folder: Path) -> list[Path]:
        """Every file under ``folder`` (symlinks, to directories too, as files: never followed),
        transient ones left out."""
        if folder.is_file() or folder.is_symlink():
            return [folder]
        found = []
        for root, dirs, names in os.walk(folder):
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            dirs[:] = [d for d in dirs if not TRANSIENT.match(d) and d not in links]
            found += [Path(root) / n for n in [*names, *links] if not TRANSIENT.match(n)]
        return sorted(found)

    def unknown(self, interrupted: dict[str, list[Path]]) -> list[Path]:
        """Files in ``out`` the pipeline does not own, after giving a stage the run was killed in
        (``interrupted``: stage name -> its folder and log) the files it left there."""
        for name, places in interrupted.items():
            started = self.stages.get(name, {}).get("started")
            started = started if isinstance(started, (int, float)) else float("inf")  # unrecorded: give it nothing
            self.record(p for place in places for p in self.files_under(place) if p.lstat().st_mtime >= started - 1)
        return [p for p in self.files_under(self.out) if p != self.path and not self.owns(p)]

    def clean(self, folder: Path) -> None:
        """Remove the pipeline's own files under ``folder``, then the folders left empty; anything
        else stays where it is."""
        for p in self.files_under(folder):
            if self.owns(p):
                p.unlink()
                self.files.pop(self._rel(p), None)
        for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
            if not os.listdir(root):
                os.rmdir(root)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()


def _fingerprint(path: Path) -> dict[str, Any] | None:
    """{size, sha256} of a file; a symlink by its target's name (never followed); None when absent."""
    if path.is_symlink():
        target = os.readlink(path)
        return {"size": -1, "sha256": hashlib.sha256(target.encode()).hexdigest()}
    if not path.is_file():
        return None
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def _malformed(data: Any) -> str | None:
    """Why ``data`` is not a state of this format (None when it is one)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, expected an object"
    if data.get("format") != FORMAT:
        older = "stages" not in data and "files" not in data
        return "written by an older merino-pl, which kept no record of its files" if older else "unknown format"
    if not isinstance(data.get("stages"), dict) or not isinstance(data.get("files"), dict):
        return "'stages' and 'files' must be objects"
    for name, entry in data["stages"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or "status" not in entry:
            return f"stage {name!r} is {_short(entry)}, expected an object with a key and a status"
    for rel, rec in data["files"].items():
        if not isinstance(rec, dict) or not isinstance(rec.get("size"), int) or not isinstance(rec.get("sha256"), str):
            return f"file {rel!r} is {_short(rec)}, expected an object with its size and sha256"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
