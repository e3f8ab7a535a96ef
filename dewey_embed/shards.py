"""The output folder of dewey-embed and the rules that make a run resumable.

    OUT/manifest.json                  model (and its files' sha256), backend, precision, options, counts
    OUT/documents/part-NNNNNN.parquet  one row per document: id, source, n_tokens, truncated_tokens, vector
    OUT/chunks/part-NNNNNN.parquet     with --chunks, one row per chunk of the documents of the same shard
    OUT/errors.jsonl                   the documents the last run could not embed, one JSON object a line

A shard is written atomically (a temporary name, then a rename: runtimes.files.atomic_path), its chunks
file first and its documents file last, so a documents file is the mark of a complete shard and its
``id`` column the list of documents it holds. A re-run reads those ids and skips their documents: a
killed run loses at most the shards it was writing, and never leaves a document twice or half of one.
What a killed run left (temporary files, a chunks file whose documents file never came) is removed:
only temporary files of the names dewey-embed writes (the manifest, shards), and only in an OUT that
holds its manifest. The manifest is the first file written into a new OUT, so a folder without one is
never taken for an output of dewey-embed (one holding nothing but a dead run's temporary manifest
file is started afresh).

Vectors from another model or other options never mix into one OUT: the manifest's settings must
match, or the run stops (``--overwrite`` starts over). Only an OUT that holds nothing but what
dewey-embed writes is ever cleared. A run holds a lock on the OUT folder itself (flock, released by
the system even on kill -9), so two runs never write into one OUT.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runtimes.files import atomic_path, clean_leftovers, leftovers

MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.jsonl"
DOCUMENTS_DIR = "documents"
CHUNKS_DIR = "chunks"
TOOL = "dewey-embed"
# 1: documents/ and chunks/ shards, settings compared on resume. 2: ids from names relative to the
# INPUT root (format 1's were paths as typed), and the roots and files seen (``seen``).
MANIFEST_FORMAT = 2
_SHARD = re.compile(r"^part-(\d{6,})\.parquet$")
# What dewey-embed writes at the top of OUT: all that --overwrite may remove.
_OURS = {MANIFEST_FILE, ERRORS_FILE, DOCUMENTS_DIR, CHUNKS_DIR}
# The targets of the temporary files dewey-embed writes, per folder of OUT: all that cleanup removes.
_TEMPORARY_TARGETS = {"": lambda name: name == MANIFEST_FILE, DOCUMENTS_DIR: _SHARD.match, CHUNKS_DIR: _SHARD.match}
# Settings recorded for information only: a model folder that moved still holds the same model.
_INFORMATIVE_SETTINGS = ("model.path",)


class OutputError(Exception):
    """OUT cannot be used: not a dewey-embed output, made with other settings, or in use by another run."""


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def documents_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("source", pa.string()),
        ("n_tokens", pa.int32()),  # text tokens embedded (after truncation)
        ("truncated_tokens", pa.int32()),  # text tokens cut by --max-length / the model's maximum
        ("vector", vector_type(dim)),
    ])


def chunks_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("doc_id", pa.string()),
        ("chunk_index", pa.int32()),
        ("token_start", pa.int32()),  # tokens of the document's text, end exclusive
        ("token_end", pa.int32()),
        ("char_start", pa.int64()),  # characters of the document's text: text[char_start:char_end] == text
        ("char_end", pa.int64()),
        ("text", pa.string()),
        ("vector", vector_type(dim)),
    ])


def shard_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def read_manifest(out: Path) -> dict | None:
    """OUT's manifest if OUT is a dewey-embed output, else None."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(manifest, dict) and manifest.get("tool") == TOOL and isinstance(manifest.get("settings"), dict):
        return manifest
    return None


def setting_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (nested keys dotted), informative ones aside."""
    old, new = _flatten(old), _flatten(new)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if key not in _INFORMATIVE_SETTINGS and old.get(key) != new.get(key)]


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class OutputFolder:
    """An OUT being written by this run: open it with ``open_output``."""

    def __init__(self, out: Path, manifest: dict, log):
        self.out = out
        self.manifest = manifest
        self.log = log
        self.done_ids: frozenset[str] = frozenset()
        self.counts = {"documents": 0, "chunks": 0, "tokens": 0, "shards": 0}
        self._next_shard = 0
        self._errors = None

    # -- what a run reads and writes -----------------------------------------------------------

    def write_shard(self, documents: pa.Table, chunks: pa.Table | None) -> None:
        """Publish one shard: the chunks file, then the documents file that marks it complete."""
        name = shard_name(self._next_shard)
        if chunks is not None:
            with atomic_path(self.out / CHUNKS_DIR / name) as tmp:
                pq.write_table(chunks, tmp)
            self.counts["chunks"] += chunks.num_rows
        with atomic_path(self.out / DOCUMENTS_DIR / name) as tmp:
            pq.write_table(documents, tmp)
        self._next_shard += 1
        self.counts["shards"] += 1
        self.counts["documents"] += documents.num_rows
        self.counts["tokens"] += int(pc.sum(documents["n_tokens"]).as_py() or 0)

    def record_error(self, doc_id: str | None, source: str, message: str) -> None:
        self._errors.write(json.dumps({"id": doc_id, "source": source, "error": message}, ensure_ascii=False) + "\n")
        self._errors.flush()  # readable while the run goes on

    def finish(self, run: dict) -> None:
        """Record the counts and the run's figures; ``complete``: every input was read to its end."""
        self.manifest.update(complete=True, counts=dict(self.counts), last_run=run)
        self._write_manifest()

    # -- opening -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Remove what a killed run left, read the complete shards, start this run's errors.jsonl."""
        for name, targets in _TEMPORARY_TARGETS.items():
            folder = self.out / name
            folder.mkdir(exist_ok=True)
            clean_leftovers(folder, log=self.log, targets=targets)
        documents = _shards(self.out / DOCUMENTS_DIR)
        for index, path in _shards(self.out / CHUNKS_DIR).items():
            if index not in documents:
                path.unlink()
                self.log(f"removed {path}: its documents file was never written (an interrupted run)")
        done = set()
        for index, path in sorted(documents.items()):
            try:
                table = pq.read_table(path, columns=["id", "n_tokens"])
                chunk_path = self.out / CHUNKS_DIR / path.name
                chunk_rows = pq.ParquetFile(chunk_path).metadata.num_rows if chunk_path.exists() else 0
            except (OSError, pa.ArrowException) as exc:
                raise OutputError(f"{path} is not a readable shard ({exc}); move it away or use --overwrite") from exc
            done.update(table["id"].to_pylist())
            self.counts["shards"] += 1
            self.counts["documents"] += table.num_rows
            self.counts["chunks"] += chunk_rows
            self.counts["tokens"] += int(pc.sum(table["n_tokens"]).as_py() or 0)
        self.done_ids = frozenset(done)
        self._next_shard = max(documents, default=-1) + 1
        # Every run reads all inputs again, and failed documents are never in a shard: so each run
        # meets them all anew, and errors.jsonl lists this run's, complete even on a resume.
        self._errors = open(self.out / ERRORS_FILE, "w", encoding="utf-8")
        self.manifest.update(complete=False, counts=dict(self.counts))
        self._write_manifest()

    def _write_manifest(self) -> None:
        with atomic_path(self.out / MANIFEST_FILE) as tmp:
            Path(tmp).write_text(json.dumps(self.manifest, indent=2) + "\n", encoding="utf-8")

    def _close(self) -> None:
        if self._errors is not None:
            self._errors.close()


def _shards(folder: Path) -> dict[int, Path]:
    found = {}
    for path in folder.iterdir():
        match = _SHARD.match(path.name)
        if match:
            found[int(match[1])] = path
    return found


@contextmanager
def open_output(out: Path, settings: dict, overwrite: bool, log, seen: dict | None = None):
    """OUT ready for this run's shards, locked against other runs until the block ends.

    A new or empty OUT is started; a previous output with the same settings is resumed (its complete
    shards' documents are in ``done_ids``); other settings raise OutputError listing them, unless
    ``overwrite`` (then the previous output is removed and the run starts over). A folder that is not
    a dewey-embed output is never used, and never cleared. ``seen``: the INPUT roots and files of this
    run and the earlier ones (inputs.Seen), recorded in the manifest so that a later run names files
    as these did.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        _check_usable(out)  # before the lock, which needs nothing written into OUT
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        previous = _check_usable(out)  # again under the lock: another run may have written meanwhile
        if previous is not None:
            differences = setting_differences(previous["settings"], settings)
            if overwrite:
                _clear(out, log)
            elif previous.get("format") != MANIFEST_FORMAT:
                raise OutputError(
                    f"--out {out} was written by another version of dewey-embed (manifest format "
                    f"{previous.get('format')!r}, this one writes {MANIFEST_FORMAT}: document ids are now names "
                    "relative to the INPUT folder); choose another --out, or pass --overwrite to replace it"
                )
            elif differences:
                raise OutputError(
                    f"--out {out} holds vectors made with other settings ({'; '.join(differences)}); "
                    "choose another --out, or pass --overwrite to replace them"
                )
        folder = OutputFolder(out, {"tool": TOOL, "format": MANIFEST_FORMAT, "settings": settings,
                                    "seen": seen or {"roots": [], "files": {}}}, log)
        try:
            folder._write_manifest()  # first: from here on OUT is a dewey-embed output, whatever happens
            folder._prepare()
            yield folder
        finally:
            folder._close()


def _check_usable(out: Path) -> dict | None:
    """OUT's manifest, or None for a folder that is empty but for a dead run's temporary manifest file
    (a run killed while it began OUT); OutputError for anything else."""
    manifest = read_manifest(out)
    if manifest is None and set(out.iterdir()) - set(leftovers(out, MANIFEST_FILE)):
        raise OutputError(
            f"--out {out} exists, is not empty and is not a dewey-embed output (no {TOOL} {MANIFEST_FILE}): "
            "dewey-embed never deletes what it did not write; choose another --out"
        )
    return manifest


@contextmanager
def _locked(out: Path):
    """An exclusive flock on the folder itself: the system releases it when the process ends, kill -9 too."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another dewey-embed run is writing to {out}; wait for it to end") from None
        yield
    finally:
        os.close(fd)


def _clear(out: Path, log) -> None:
    """Remove a previous dewey-embed output's shards and errors from ``out`` (its manifest is replaced
    next); refuse, removing nothing, if anything dewey-embed does not write is there."""
    for name, targets in _TEMPORARY_TARGETS.items():
        if (out / name).is_dir():
            clean_leftovers(out / name, log=log, targets=targets)
    foreign = [path for path in out.iterdir() if path.name not in _OURS]
    shards = []
    for name in (DOCUMENTS_DIR, CHUNKS_DIR):
        folder = out / name
        if folder.is_dir():
            for path in folder.iterdir():
                (shards if _SHARD.match(path.name) and path.is_file() else foreign).append(path)
        elif folder.exists():
            foreign.append(folder)
    if foreign:
        raise OutputError(
            f"--overwrite: {out} also holds what dewey-embed did not write ({', '.join(map(str, sorted(foreign)))}); "
            "nothing was removed"
        )
    for path in shards:
        path.unlink()
    (out / ERRORS_FILE).unlink(missing_ok=True)
    log(f"--overwrite: removed the previous output's {len(shards)} shard files from {out}")
