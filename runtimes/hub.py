"""Hub ids (``org/name``, ``org/name@revision``) resolved to a local snapshot through huggingface_hub's cache.

Only the files a model source is read from are fetched (``HUB_FILES``): configs and other JSON,
safetensors weights, tokenizer files and the model card (where sentence-transformers records Matryoshka
dimensions); never Python files or pickled weights, which this library neither runs nor unpickles.
``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read when a model is resolved, not when a
module is imported, so a process that sets them late is still obeyed. The snapshot folder's name is the
resolved commit, which the export manifest records. No torch: the ONNX Runtime path may resolve ids.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import ModelFileError

# owner/name as the Hub spells them, with an optional @revision (branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9._/-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What is fetched from a Hub repository: every file a model source can be read from, nothing else.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "README.md"]
# Excluded even where a pattern above would match (a "tokenizer.py" custom tokenizer, a "tokenizer.bin").
HUB_EXCLUDED = ["*.py", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.h5", "*.msgpack"]
_TRUE = ("1", "true", "yes", "on")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``text`` reads as a Hub id, else None."""
    match = _HUB_ID.match(str(text))
    return (match["repo"], match["revision"]) if match else None


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder from the environment as it is now: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve_hub_id(text: str) -> tuple[Path, dict]:
    """The local snapshot folder of the Hub id ``text`` and ``{"id", "revision", "commit"}``.

    Offline (``HF_HUB_OFFLINE``), only the cache is read; with nothing cached for the id and revision,
    one ModelFileError line says so. Online, the allowed files of the revision are fetched into the
    cache first (files already there are not fetched again).
    """
    parsed = parse_hub_id(text)
    if parsed is None:
        raise ModelFileError(f"{text!r} is neither a folder nor a Hub id (org/name or org/name@revision)")
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:
        raise ModelFileError(
            f"{text} is a Hub id; resolving it needs huggingface_hub (pip install huggingface_hub)"
        ) from exc
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=str(hub_cache_dir()), local_files_only=offline,
            allow_patterns=HUB_FILES, ignore_patterns=HUB_EXCLUDED,
        )
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set and" if offline else "the Hub cannot be reached and"
        raise ModelFileError(
            f"{text}: {where} nothing is cached for {repo_id}@{revision or 'main'} in {hub_cache_dir()}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{text}: cannot be fetched from the Hub: {first_line}") from None
    folder = Path(folder)
    commit = folder.name if _COMMIT.match(folder.name) else None
    return folder, {"id": repo_id, "revision": revision or "main", "commit": commit}
