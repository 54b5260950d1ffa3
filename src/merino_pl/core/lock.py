"""One writer per output folder: ``with folder_lock(out, "pipeline"): ...``.

The lock is a file beside the folder, ``PARENT/.NAME.lock`` (beside, not inside: a stage that
replaces its folder as one unit would swap a lock inside it away), holding the owner's pid, host,
start time and command as JSON. It is held with ``flock`` on that file, so the kernel releases it
when the owner dies, however it dies (``kill -9`` included): a lock file whose owner is gone
is *stale* and the next run takes it over. A file left by another host (a shared file system,
where ``flock`` may not reach across machines) cannot be checked from here, so it counts as live
and the message says how to remove it. A second run on a locked folder is one ``MerinoError``
line naming the running one.

A stage adopts it with two lines::

    from merino_pl.core.lock import folder_lock
    with folder_lock(settings.out, "export"):
        ...

``locked_output`` is the same lock plus the clean-up of a failed run: whatever the failure (a
full disk, bad input found late, Ctrl-C), what this run created is removed again and nothing
that was there before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merino_pl.core.errors import MerinoError, disk_full
from merino_pl.core.io import _alive  # the one "is this pid running here" check (stale temp files use it too)


@dataclass
class HeldLock:
    """A held lock: its file, the descriptor holding the ``flock`` (pass it to a child process,
    ``subprocess.Popen(..., pass_fds=[lock.fd])``, to keep the folder locked while that child
    runs, even if this process is killed first), and the record of a stale owner it replaced."""

    path: Path
    fd: int
    previous: dict[str, Any] = field(default_factory=dict)


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of ``folder``: ``PARENT/.NAME.lock``."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[HeldLock]:
    """Hold the lock of ``folder`` for the ``with`` block (``HeldLock.previous``: the record of
    a stale owner taken over, else empty). A live owner is a one-line ``MerinoError``."""
    path = lock_path(folder)
    fd, previous = _acquire(path, Path(folder))
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": command}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:  # a full disk: one line naming the lock file
            raise (disk_full(e, path) or MerinoError(f"{path}: cannot write the lock file ({e.strerror})")) from None
        yield HeldLock(path, fd, previous)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the flock goes: a waiter that opened this inode re-checks it (_acquire)
        os.close(fd)


@contextlib.contextmanager
def locked_output(folder: str | os.PathLike, command: str, names: Sequence[str] = ()) -> Iterator[HeldLock]:
    """``folder_lock`` for a stage that writes its files into ``folder``; if the block fails (any
    exception, Ctrl-C included) it removes what this run created and nothing else:

    * ``folder`` with its contents when it did not exist before (checked under the lock, so it is
      not another run's), and the empty folders above it this run made;
    * in a folder that existed, the entries of ``names`` (the stage's own files) that were not
      there before; a file it replaced, and everything else, stays.
    """
    folder = Path(os.path.abspath(folder))
    above = folder.parent
    while not above.exists() and above != above.parent:
        above = above.parent  # the nearest folder that exists now: nothing at or above it is removed
    ok = False
    try:
        with folder_lock(folder, command) as held:
            existed = folder.exists() or folder.is_symlink()
            before = {n for n in names if (folder / n).exists() or (folder / n).is_symlink()} if existed else set()
            try:
                yield held
            except BaseException:
                if not existed:
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    for name in set(names) - before:
                        _remove(folder / name)
                raise
        ok = True
    finally:
        if not ok:  # the lock file is gone by now: remove the empty folders it (or the run) made
            _remove_empty_parents(folder, above)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    """``rmdir`` the folders from ``folder``'s parent up to, not including, ``stop``, while empty."""
    p = folder.parent
    while p != stop and stop in p.parents:
        try:
            p.rmdir()
        except OSError:  # not empty (another run's, or the user's files): leave it and all above
            return
        p = p.parent


def _acquire(path: Path, folder: Path) -> tuple[int, dict[str, Any]]:
    """(an fd holding ``flock`` on the file now at ``path``, the stale owner's record or {})."""
    for _ in range(20):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise MerinoError(f"{path}: cannot create the lock file of {folder} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            raise MerinoError(f"{folder} is in use by {_describe(owner)}; wait for it to finish or stop it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the owner released (and unlinked) it between our open and flock: try the new file
            os.close(fd)
            continue
        owner = _read(fd)
        if owner and owner.get("host") != socket.gethostname():
            os.close(fd)
            raise MerinoError(
                f"{folder} is in use by {_describe(owner)} (another host: its process cannot be checked "
                f"from here; if that run is gone, remove {path})"
            )
        return fd, owner
    raise MerinoError(f"{path}: could not take the lock (it kept being replaced)")


def _read(fd: int) -> dict[str, Any]:
    """The owner record in the lock file; {} when empty or unreadable (an owner killed before writing it)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "another run (its owner record is not written yet)"
    what = f" ({owner['command']})" if owner.get("command") else ""
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        # the owner died but a child it passed the lock to (a stage still running) holds it
        what += ", no longer running: a process it started still holds the lock"
    return f"pid {pid} on {owner.get('host')} since {owner.get('started')}{what}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
