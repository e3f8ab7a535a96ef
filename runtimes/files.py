"""Small file helpers shared by every part: atomic files and folders, and the cleanup of what an
interrupted writer left behind.

Every temporary name made here is ``.{target}.{pid}.{random}.tmp`` (a file or folder being written) or
``.{target}.{pid}.{random}.old`` (the previous folder, moved aside during a swap), beside the target.
The writer's process id in the name is what lets a later run tell a crashed writer's leftovers (the
process is gone) from a concurrent writer's work in progress (the process is alive).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)$")


def _temporary_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by another user
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def leftovers(folder: str | Path, name: str | None = None) -> list[Path]:
    """Temporary files and folders in ``folder`` (of the target ``name`` only, when given) whose
    writer process is gone: what a crash or a kill -9 left behind."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and (name is None or match["target"] == name) and not _process_alive(int(match["pid"])):
            found.append(entry)
    return sorted(found)


def clean_leftovers(folder: str | Path, name: str | None = None, log=None, owned=None) -> list[Path]:
    """Remove what dead writers left in ``folder`` (for the target ``name`` only, when given); returns
    the removed paths. ``owned``: a predicate on a leftover's path; one it refuses (a user's file that
    only happens to be named like a leftover) is left alone.

    A folder moved aside during a swap (``.old``) is the previous target: when the crash came between
    the two renames and the target is missing, it is put back instead of being removed.
    """
    removed = []
    for path in leftovers(folder, name):
        if owned is not None and not owned(path):
            continue
        target = path.with_name(_LEFTOVER.match(path.name)["target"])
        if path.name.endswith(".old") and not target.exists():
            path.rename(target)
            if log:
                log(f"restored {target} from {path.name}, left by an interrupted replace")
            continue
        _remove(path)
        removed.append(path)
        if log:
            log(f"removed {path}, left by an interrupted run")
    return removed


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    A crash or an error mid-write leaves the previous file (or none) in place, never half a file.
    """
    target = Path(target)
    # A fresh name, not a file made by mkstemp: the writer creates it with the usual permissions.
    tmp = str(_temporary_name(target, "tmp"))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_folder(target: str | Path):
    """Yield a fresh temporary folder beside ``target``; when the block succeeds, it replaces ``target``
    (an old ``target`` is moved aside first and deleted only after the swap). On an error the
    temporary folder is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        publish_folder(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(staging: Path, out: Path) -> None:
    """Rename the finished staging folder onto ``out``; an old ``out`` is removed only afterwards.

    A crash between the two renames leaves the old folder as ``.{out}.{pid}.{random}.old``;
    ``clean_leftovers(out.parent, out.name)`` puts it back.
    """
    if out.exists():
        old = _temporary_name(out, "old")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def discard_folder(folder: Path) -> None:
    """Delete ``folder``; it is first renamed to a temporary name of this process, so a kill during the
    delete leaves a dead writer's leftover (removed by the next ``clean_leftovers``), never a half-deleted
    folder under its own name that looks complete."""
    doomed = _temporary_name(folder, "tmp")
    folder.rename(doomed)
    shutil.rmtree(doomed)
