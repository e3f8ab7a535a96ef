"""Small file helpers shared by every part: atomic files and folders, and the cleanup of what an
interrupted writer left behind.

Every temporary name made here is ``.{target}.{pid}.{random}.tmp`` (a file or folder being written),
``.{target}.{pid}.{random}.old`` (the previous folder, moved aside during a swap) or
``.{target}.{pid}.{random}.new`` (a folder being marked before it becomes a ``.tmp``), beside the target.
The writer's process id in the name is what lets a later run tell a crashed writer's leftovers (the
process is gone) from a concurrent writer's work in progress (the process is alive).

A name is not proof of authorship: a user's own folder may match the pattern. So every temporary folder
made here holds an empty ``LEFTOVER_MARK`` folder while it is temporary, and cleanup touches a folder
only if it holds the mark; temporary files cannot carry one, so a caller names the targets it writes
(``clean_leftovers``' ``name`` or ``targets``) and cleans only folders it owns.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>tmp|old|new)$")
# The mark inside every temporary folder made here (an empty folder: file tables, which list files,
# never see it); removed when the folder is published under its target's name.
LEFTOVER_MARK = ".dewey-temporary"


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


def _marked_folder(target: Path) -> Path:
    """A new temporary folder for ``target``, its mark inside from the moment it has its name: made and
    marked as ``.new`` first, then renamed (a kill in between leaves a ``.new``, a leftover like any)."""
    tmp, new = _temporary_name(target, "tmp"), _temporary_name(target, "new")
    new.mkdir()
    (new / LEFTOVER_MARK).mkdir()
    new.rename(tmp)
    return tmp


def _unmark(path: Path) -> None:
    try:
        (path / LEFTOVER_MARK).rmdir()
    except FileNotFoundError:
        pass


def _ours(path: Path) -> bool:
    """A temporary file, or a folder holding the mark: never a user's folder that only has such a name."""
    if path.is_symlink():
        return False
    return (path / LEFTOVER_MARK).is_dir() if path.is_dir() else True


def leftovers(folder: str | Path, name: str | None = None, targets=None) -> list[Path]:
    """Temporary files and marked temporary folders in ``folder`` (of the target ``name`` only, when
    given; of the targets for which ``targets(target)`` is true, when given) whose writer process is
    gone: what a crash or a kill -9 left behind."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if (match and (name is None or match["target"] == name) and (targets is None or targets(match["target"]))
                and not _process_alive(int(match["pid"])) and _ours(entry)):
            found.append(entry)
    return sorted(found)


def clean_leftovers(folder: str | Path, name: str | None = None, log=None, targets=None, owned=None) -> list[Path]:
    """Remove what dead writers left in ``folder`` (for the target ``name`` only, when given; for the
    targets ``targets(target)`` accepts, when given); returns the removed paths. Only temporary files and
    folders holding the mark (module docstring) are touched: a user's folder with a matching name never is.
    ``owned``: a further predicate on a leftover's path (what the caller's tool writes); one it refuses is
    left alone.

    A folder moved aside during a swap (``.old``) is the previous target: when the crash came between
    the two renames and the target is missing, it is put back instead of being removed.
    """
    removed = []
    for path in leftovers(folder, name, targets):
        if owned is not None and not owned(path):
            continue
        target = path.with_name(_LEFTOVER.match(path.name)["target"])
        if path.name.endswith(".old") and not target.exists():
            path.rename(target)
            _unmark(target)
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
    tmp = _marked_folder(target)
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
        # Marked before the move: a crash between the renames leaves an .old that cleanup may restore.
        (out / LEFTOVER_MARK).mkdir(exist_ok=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    # Unmarked only once in place: a crash before leaves a staging folder cleanup still recognises (and,
    # after, an empty hidden folder in out, which file tables never list).
    _unmark(out)


def discard_folder(folder: Path) -> None:
    """Delete ``folder``; it is first renamed to a temporary name of this process, so a kill during the
    delete leaves a dead writer's leftover (removed by the next ``clean_leftovers``), never a half-deleted
    folder under its own name that looks complete."""
    (folder / LEFTOVER_MARK).mkdir(exist_ok=True)
    doomed = _temporary_name(folder, "tmp")
    folder.rename(doomed)
    shutil.rmtree(doomed)
