"""Small file helpers shared by every part: atomic files and folders."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    A crash or an error mid-write leaves the previous file (or none) in place, never half a file.
    """
    target = Path(target)
    # A fresh name, not a file made by mkstemp: the writer creates it with the usual permissions.
    tmp = str(target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
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
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        publish_folder(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(staging: Path, out: Path) -> None:
    """Rename the finished staging folder onto ``out``; an old ``out`` is removed only afterwards."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
