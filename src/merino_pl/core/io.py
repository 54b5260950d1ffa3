"""Small file helpers every stage shares: atomic writes, hashing, the one JSON and YAML readers."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _temp_name(name: str, kind: str) -> str:
    """``.NAME.HOST-PID-TOKEN.KIND``: unique per process (two concurrent runs never share one),
    and it says which process made it, so a later run can remove those whose process is gone."""
    return f".{name}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}.{kind}"


def _remove_stale(directory: Path, name: str, kinds: tuple[str, ...] = ("tmp",)) -> None:
    """Remove temp files/directories of ``name`` left by processes of this host that have died
    (a ``kill -9`` mid-write); those of live processes, or of other hosts, are left alone."""
    host = socket.gethostname()
    for kind in kinds:
        for stale in directory.glob(f".{glob.escape(name)}.*.{kind}"):
            middle = stale.name[len(name) + 2 : -len(kind) - 1]
            parts = middle.rsplit("-", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash (or ``kill -9``) at any point leaves either the old file or the new one, never a
    truncated mix: the rename is atomic on POSIX file systems and the data is fsync'ed first.
    The file gets the mode the user's umask gives (teammates can read a shared checkpoint);
    temp files of processes that died mid-write are removed here, on the next write. A full disk
    is one ``MerinoError`` naming the file system and ``path``, the partial temp file removed.
    """
    from merino_pl.core.errors import disk_full

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent, path.name)
    tmp_path = path.parent / _temp_name(path.name, "tmp")
    try:
        os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0666 & ~umask
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except Exception as e:
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsync'ed
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory beside ``out`` that replaces ``out`` only once everything is written,
    so an interrupted write never leaves a half-written model where a user would load it.

    The temp directory's name is unique per process (see ``_temp_name``); ones left by dead
    processes are removed on the next write. Callers check ``out`` first (``check_out``): this
    replaces whatever ``out`` holds.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out.parent, out.name, ("tmp", "old"))
    tmp = out.parent / _temp_name(out.name, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # files written by other libraries may be 0600; a shipped model is readable
            f.chmod(0o666 & ~umask)
        if out.exists():
            old = out.parent / _temp_name(out.name, "old")
            out.rename(old)
            tmp.rename(out)
            if old.is_symlink():  # --out was a link: the link is replaced, the folder it points to stays
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out(
    out: str | os.PathLike,
    *,
    overwrite: bool | None = None,
    flag: str = "--out",
    protect: Sequence[tuple[str | os.PathLike, str]] = (),
    file: bool = False,
) -> list[str]:
    """Problems with an output path, found before any work starts (all of them, one line each).

    * ``overwrite``: None for an output that files are written into; a bool for a directory
      replaced as a whole (``atomic_dir``): then an existing non-empty ``out`` needs
      ``--overwrite``, and an ``out`` that is or contains a ``protect`` path ((path, what)
      pairs, e.g. the checkpoint being read) or the working directory is refused even with it,
      since replacing it would delete them;
    * ``file``: ``out`` is a file (replaced atomically), so it must not be a directory;
    * the nearest existing folder of ``out`` must accept a new file (probed by creating one:
      read-only mounts and ``chattr +i`` defeat ``os.access`` for root).
    """
    out_path = Path(os.path.abspath(out))
    problems = []
    if overwrite is not None:
        real = Path(os.path.realpath(out_path))
        for path, what in [*protect, (Path.cwd(), "the current directory")]:
            p = Path(os.path.realpath(path))
            if real == p or real in p.parents:
                problems.append(
                    f"{flag} {out} contains {what} ({path}): replacing it would delete it; choose another {flag}"
                )
                break
        if out_path.is_dir() and not overwrite and any(out_path.iterdir()):
            problems.append(f"{flag} {out} exists and is not empty (pass --overwrite to replace it)")
        elif out_path.exists() and not out_path.is_dir():
            problems.append(f"{flag} {out} exists and is not a directory")
    elif file and out_path.is_dir():
        problems.append(f"{flag} {out} is a directory, expected a file name")
    elif not file and out_path.exists() and not out_path.is_dir():
        problems.append(f"{flag} {out} exists and is not a directory")
    folder = out_path if out_path.is_dir() and overwrite is None and not file else out_path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        problems.append(f"{flag} {out}: {folder} is not a directory")
    elif (why := _unwritable(folder)) is not None:
        problems.append(f"{flag} {out}: cannot write in {folder} ({why})")
    return problems


def _unwritable(folder: Path) -> str | None:
    """Why a new file cannot be created in ``folder`` (None when it can)."""
    probe = folder / _temp_name("write-probe", "tmp")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        return e.strerror or type(e).__name__
    with contextlib.suppress(OSError):
        probe.unlink()
    return None


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """``yaml.safe_load`` of a file; a missing, unreadable or malformed file is a one-line
    ``MerinoError`` naming the file (and the line of a syntax error)."""
    import yaml

    from merino_pl.core.errors import MerinoError

    path, text = _read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MerinoError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """``json.loads`` of a file; a missing, unreadable or malformed file is a one-line
    ``MerinoError`` naming the file (and the line of a syntax error), as ``read_yaml``."""
    from merino_pl.core.errors import MerinoError

    path, text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MerinoError(f"{path}: line {e.lineno} malformed JSON: {e.msg}") from None


def _read_text(path: str | os.PathLike, what: str) -> tuple[Path, str]:
    """(path, its UTF-8 text); a missing file, a directory or an unreadable file is a one-line
    ``MerinoError`` naming it."""
    from merino_pl.core.errors import MerinoError

    path = Path(path)
    if not path.is_file():
        raise MerinoError(
            f"{what} not found: {path}" if not path.is_dir() else f"{path}: is a directory, expected a {what}"
        )
    try:
        return path, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MerinoError(f"{path}: cannot read {what}: {e}") from None
