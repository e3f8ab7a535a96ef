"""Small file helpers shared by every part: atomic writes."""

from __future__ import annotations

import os
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
