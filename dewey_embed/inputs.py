"""Reading a corpus: the files an INPUT names, and the documents each file holds.

A text or Markdown file is one document; a JSONL file is one document per line (a JSON object with a
text field); a Parquet file is one document per row (a text column). A file is known by its name: its
path relative to the INPUT root ('/'-separated), which is the INPUT folder for the files found in it and
the folder holding an INPUT file for that file (so its name is the file's own). Ids come from names, so
the same corpus gets the same ids however its INPUT is spelt (absolute, relative, from another working
folder), and a resumed run skips what it holds already:

- text file: the id is the name;
- JSONL: the record's id field where it has one, else ``NAME:LINE`` (LINE counted from 1, as editors do);
- Parquet: the id column's value where the file has one, else ``NAME:ROW`` (ROW counted from 0, as
  pyarrow and pandas do).

A resumed run may name the corpus from another root (the parent folder, one file of it): ``list_files``
takes the roots and files OUT has seen (``Seen``), and a file under one of them keeps the name it had.
Each document's ``source`` is the file's absolute path.

Listing a folder reads regular files only; symbolic links are followed when they lead inside the INPUT
root (a link to a folder is walked as that folder) and skipped, with a line saying so, when they lead
out of it, unless ``follow_symlinks``. FIFOs, devices and sockets are skipped (an INPUT that is one is
refused), and so are hidden names, OUT, and earlier outputs of dewey (``dewey_outputs``): their Parquet
shards and Markdown files are not a corpus.

A problem with one document (an undecodable file, empty text, a file or JSONL line over the size limit,
a JSONL line that is not JSON or lacks the field, a Parquet file without the column) becomes an error
row, never an exception: the run goes on and lists it in errors.jsonl. The rows travel as pyarrow tables
of ``INPUT_SCHEMA``, the input of the per-batch function on one machine and on Ray alike.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runtimes.export_format import MANIFEST_FILE as EXPORT_MANIFEST
from runtimes.tokenization import check_encodable

from .shards import MANIFEST_FILE as EMBED_MANIFEST, read_manifest

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# What a folder contributes when no --glob is given: text, Markdown, JSONL and Parquet files.
DEFAULT_GLOBS = ("**/*.txt", "**/*.md", "**/*.markdown", "**/*.rst", "**/*.jsonl", "**/*.ndjson", "**/*.parquet")
# Rows per table read from one file: small enough that a huge JSONL or Parquet file streams.
READ_ROWS = 1024
# The largest document read (a text file, a JSONL line, a Parquet text value), in bytes: larger ones are
# an error row, never read whole. A document is cut at the model's maximum length anyway (dewey-mini's
# 131,072 tokens are about 600 kB of English); this is room for long ones, and a bound on what one
# document can cost (a one-line 50 MB file embeds in under 1 GiB: docs/embed.md).
DEFAULT_MAX_DOCUMENT_BYTES = 64 << 20
# Characters of text a window of documents holds at most on one machine (besides --shard-size rows):
# so 256 documents near the size limit never sit in memory together.
WINDOW_CHARS = 64 << 20
# Bytes read at a time where a file is scanned rather than parsed (counting JSONL lines, skipping a line
# over the size limit).
SCAN_BYTES = 1 << 20
# The mark of the Triton model repository dewey-export writes (dewey_export.triton.REPOSITORY_MANIFEST;
# not imported: dewey-embed needs nothing of the exporter).
TRITON_MANIFEST = "dewey_triton.json"

# One row per document, or per document or file that could not be read (text null, error set).
INPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("text", pa.string()),
    ("error", pa.string()),
])


class InputError(Exception):
    """INPUT or --glob cannot be used: a missing path, a folder with nothing to read, a FIFO or device,
    a pattern that is empty or reaches outside the INPUT folder."""


class MissingInput(InputError):
    """An INPUT path that does not exist, or a folder with nothing to read."""


@dataclass(frozen=True)
class Fields:
    """Where JSONL records and Parquet rows keep their text and their id, and the largest document read."""

    text: str = "text"
    id: str = "id"
    max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES


@dataclass(frozen=True)
class InputFile:
    """A file to read: its absolute ``path`` (the INPUT root, resolved, and the path below it) and its
    ``name`` (module docstring), from which its documents' ids come."""

    path: Path
    name: str


@dataclass
class Seen:
    """What earlier runs into one OUT listed: their INPUT folders (resolved) and INPUT files (absolute
    path -> name). A file under one of those folders, or one of those files, keeps the name it had."""

    roots: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record) -> "Seen":
        record = record if isinstance(record, dict) else {}
        return cls(list(record.get("roots", [])), dict(record.get("files", {})))

    def record(self) -> dict:
        return {"roots": self.roots, "files": self.files}

    def name(self, path: Path, name: str) -> str:
        """The name ``path`` had in an earlier run, else ``name``."""
        if str(path) in self.files:
            return self.files[str(path)]
        for root in self.roots:
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return name


def check_globs(globs: Iterable[str]) -> tuple[str, ...]:
    """The --glob patterns, or InputError for one that is empty, absolute or leaves the INPUT folder."""
    checked = []
    for pattern in globs:
        parts = PurePosixPath(pattern).parts
        if not pattern.strip() or not parts:
            raise InputError(f"--glob {pattern!r}: an empty pattern matches nothing; give one such as '**/*.txt'")
        if PurePosixPath(pattern).is_absolute() or ".." in parts:
            raise InputError(f"--glob {pattern!r}: patterns are relative to each INPUT folder and stay inside "
                             "it (such as '**/*.txt'); name a file outside it as an INPUT of its own")
        if any("**" in part and part != "**" for part in parts):
            raise InputError(f"--glob {pattern!r}: '**' must be a whole path component (such as '**/*.txt')")
        checked.append(pattern)
    return tuple(checked)


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether a relative path matches a glob pattern, both as components: ``**`` is any number of
    folders, other components are fnmatch patterns (as pathlib.Path.glob)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def dewey_output(folder: Path) -> str | None:
    """What earlier output of dewey ``folder`` is (an embed OUT, an export folder, a Triton repository), or None."""
    if (folder / EMBED_MANIFEST).is_file() and read_manifest(folder) is not None:
        return "a dewey-embed output"
    if (folder / EXPORT_MANIFEST).is_file():
        return "a dewey-export folder"
    if (folder / TRITON_MANIFEST).is_file():
        return "a dewey-export Triton repository"
    return None


@dataclass
class _Skipped:
    """What listing one INPUT folder left out, reported in a line per kind."""

    outside: list[tuple[Path, str]] = field(default_factory=list)  # symbolic links leading out of the root
    broken: list[Path] = field(default_factory=list)  # symbolic links to nothing
    special: list[tuple[Path, str]] = field(default_factory=list)  # FIFOs, devices, sockets

    def report(self, folder: Path, log) -> None:
        if self.outside:
            link, target = self.outside[0]
            log(f"skipped {len(self.outside)} symbolic link(s) in {folder} leading outside it (first: {link} -> "
                f"{target}); pass --follow-symlinks to read them")
        if self.broken:
            log(f"skipped {len(self.broken)} broken symbolic link(s) in {folder} (first: {self.broken[0]})")
        if self.special:
            path, kind = self.special[0]
            log(f"skipped {len(self.special)} file(s) in {folder} that are not regular files (first: {path}, "
                f"a {kind})")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _walk(root: Path, patterns: list[tuple[str, ...]], exclude: Path | None, follow_symlinks: bool,
          log) -> list[tuple[tuple[str, ...], Path]]:
    """(relative parts, path) of the regular files under the folder ``root`` (resolved) that match one of
    ``patterns``, in the order of their relative paths; module docstring for what is left out."""
    found, skipped, visited = [], _Skipped(), {root}
    pending = [(root, ())]
    while pending:
        folder, parts = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            log(f"skipped the folder {folder}: {exc.strerror or exc}")
            continue
        for entry in entries:
            if entry.name.startswith("."):  # hidden: .git, an editor's swap file
                continue
            path, relative = folder / entry.name, parts + (entry.name,)
            wanted = any(_matches(relative, pattern) for pattern in patterns)
            if entry.is_symlink():
                real = Path(os.path.realpath(path))
                if not os.path.exists(path):
                    if wanted:
                        skipped.broken.append(path)
                    continue
                if not follow_symlinks and not real.is_relative_to(root):
                    if wanted or real.is_dir():
                        skipped.outside.append((path, str(real)))
                    continue
            try:
                mode = entry.stat().st_mode  # the link's target, for a link
            except OSError as exc:
                log(f"skipped {path}: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(mode):
                real = Path(os.path.realpath(path))
                if real in visited or (exclude is not None and real == exclude):
                    continue  # a folder met before (a link to it, a loop), or OUT
                output = dewey_output(path)
                if output:
                    log(f"skipped {path}: {output}, not a corpus")
                    continue
                visited.add(real)
                pending.append((path, relative))
            elif wanted:
                if stat.S_ISREG(mode):
                    found.append((relative, path))
                else:
                    skipped.special.append((path, _kind(mode)))
    skipped.report(root, log)
    return sorted(found)


def list_files(inputs: Iterable[Path], globs: Iterable[str] = DEFAULT_GLOBS, exclude: Path | None = None,
               follow_symlinks: bool = False, seen: Seen | None = None, log=lambda message: None) -> list[InputFile]:
    """The files to read, in a stable order: each INPUT file as given, and the files under each INPUT
    folder that match one of ``globs``, by relative path (module docstring for what is left out and how
    files are named; ``seen``: what earlier runs into OUT listed). Everything under ``exclude`` (the
    output folder, whose shards are Parquet files too) is left out; a file named twice is read once.
    Raises InputError for a path that does not exist, is not a regular file or folder, or is an output of
    dewey, for a folder with no file to read, and for a bad pattern; ``log`` gets a line for each kind of
    thing left out. ``seen`` gains this run's INPUT folders and files (with the names they got), for OUT's
    manifest."""
    patterns = [PurePosixPath(pattern).parts for pattern in check_globs(globs)]
    excluded = exclude.resolve() if exclude is not None else None
    seen = seen or Seen()
    files, read = [], set()
    for entry in inputs:
        entry = Path(entry)
        if not os.path.lexists(entry):
            raise MissingInput(f"input not found: {entry}")
        try:
            mode = entry.stat().st_mode
        except OSError as exc:
            raise MissingInput(f"input not found: {entry} ({exc.strerror or exc}: a broken symbolic link?)") from None
        if stat.S_ISDIR(mode):
            root = entry.resolve()
            output = dewey_output(root)
            if output:
                raise InputError(f"input {entry} is {output}, not a corpus; name its files to read them")
            found = [(root / Path(*relative), "/".join(relative))
                     for relative, _ in _walk(root, patterns, excluded, follow_symlinks, log)]
            if not found:
                raise MissingInput(f"no files to read in the folder {entry} (patterns: {' '.join(globs)}; see --glob)")
            if str(root) not in seen.roots:
                seen.roots.append(str(root))
        elif stat.S_ISREG(mode):
            path = entry.absolute().parent.resolve() / entry.name
            found = [(path, entry.name)]
            seen.files.setdefault(str(path), seen.name(path, entry.name))
        else:
            raise InputError(f"input {entry} is not a regular file or a folder (a {_kind(mode)}): "
                             "dewey-embed reads regular files only")
        for path, name in found:
            resolved = path.resolve()
            if resolved in read or (excluded is not None and resolved.is_relative_to(excluded)):
                continue
            read.add(resolved)
            files.append(InputFile(path, seen.name(path, name)))
    return files


def file_kind(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``text``, by the file's suffix."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _open_regular(path: Path):
    """``path`` opened for binary reading, or OSError if it is no longer a regular file: opened without
    blocking, so a FIFO put in its place since the listing never hangs the run."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(f"not a regular file (a {_kind(mode)}): dewey-embed reads regular files only")
    return os.fdopen(fd, "rb")


def _too_large(size: int, fields: Fields, what: str) -> str:
    return (f"{what} is {size} bytes, over the limit of {fields.max_bytes} bytes a document (--max-document-bytes); "
            "it was not read")


def read_file(file: InputFile, fields: Fields) -> Iterator[dict]:
    """The rows of one file (``INPUT_SCHEMA`` as dicts). A file that cannot be read, or stops being
    readable midway, ends with one error row for the file; the rows before it stand."""
    readers = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "text": _text_rows}
    try:
        yield from readers[file_kind(file.path)](file, fields)
    except (OSError, pa.ArrowException) as exc:
        yield error_row(None, file.path, f"cannot read the file: {exc}")


def input_tables(files: Iterable[InputFile], fields: Fields, rows: int,
                 max_chars: int | None = None) -> Iterator[pa.Table]:
    """The rows of ``files`` in order, as ``INPUT_SCHEMA`` tables of ``rows`` rows (the last may be
    shorter), and holding about ``max_chars`` characters of text at most (a table is cut after the row
    that reaches it); a table spans files, so a folder of small text files still fills whole windows."""
    pending: list[dict] = []
    chars = 0
    for file in files:
        for row in read_file(file, fields):
            pending.append(row)
            chars += len(row["text"] or "")
            del row  # the table is the one copy of the texts while it is embedded
            if len(pending) == rows or (max_chars is not None and chars >= max_chars):
                table = pa.Table.from_pylist(pending, schema=INPUT_SCHEMA)
                pending, chars = [], 0  # before the yield: the rows' strings are not kept while it is embedded
                yield table
    if pending:
        yield pa.Table.from_pylist(pending, schema=INPUT_SCHEMA)


def count_documents(files: Iterable[InputFile]) -> int:
    """How many rows reading ``files`` will give, for the progress bar's total: one per text file,
    non-blank lines of a JSONL file, rows of a Parquet file (from its footer), one for a file that
    cannot be read. Cheap next to embedding: JSONL files are scanned for line breaks only."""
    total = 0
    for file in files:
        try:
            kind = file_kind(file.path)
            if kind == "parquet":
                with _open_regular(file.path) as handle:
                    total += pq.ParquetFile(handle).metadata.num_rows
            elif kind == "jsonl":
                total += _count_lines(file.path)
            else:
                total += 1
        except (OSError, pa.ArrowException):
            total += 1
    return total


def _count_lines(path: Path) -> int:
    """Non-blank lines of a file, read in blocks: a line of any length costs one block of memory."""
    lines, blank = 0, True
    with _open_regular(path) as handle:
        while block := handle.read(SCAN_BYTES):
            for i, piece in enumerate(block.split(b"\n")):
                if i:  # a line break ended the line before this piece
                    lines += not blank
                    blank = True
                blank = blank and not piece.strip()
    return lines + (not blank)


def error_row(doc_id: str | None, source: Path, message: str) -> dict:
    return {"id": doc_id, "source": str(source), "text": None, "error": message}


def document_row(doc_id: str, source: Path, text: str) -> dict:
    """A document's row, or an error row when there is nothing to embed or the text is not valid Unicode."""
    if not text or text.isspace():  # not strip(): no copy of a huge text
        return error_row(doc_id, source, "empty text: there is nothing to embed")
    try:
        check_encodable("the text", text)
    except ValueError as exc:
        return error_row(doc_id, source, str(exc))
    return {"id": doc_id, "source": str(source), "text": text, "error": None}


def _text_rows(file: InputFile, fields: Fields) -> Iterator[dict]:
    # The row comes from a function, so this generator's frame holds no copy of a huge text while the
    # row travels on.
    yield _text_row(file, fields)


def _text_row(file: InputFile, fields: Fields) -> dict:
    # Decoded from bytes, not read in text mode: universal newlines would turn \r\n into \n, and the
    # chunks' character spans must index the file's own text.
    with _open_regular(file.path) as handle:
        size = os.fstat(handle.fileno()).st_size
        # Read one byte past the limit: a file that grew since fstat is still caught.
        data = b"" if size > fields.max_bytes else handle.read(fields.max_bytes + 1)
    if size > fields.max_bytes or len(data) > fields.max_bytes:
        return error_row(file.name, file.path, _too_large(max(size, len(data)), fields, "the file"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return error_row(file.name, file.path, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}")
    del data
    return document_row(file.name, file.path, text)


def _jsonl_rows(file: InputFile, fields: Fields) -> Iterator[dict]:
    with _open_regular(file.path) as handle:
        number = 0
        while raw := handle.readline(fields.max_bytes + 1):
            number += 1
            if len(raw) > fields.max_bytes and not raw.endswith(b"\n"):
                size = len(raw) + _skip_line(handle)
                yield error_row(f"{file.name}:{number}", file.path, _too_large(size, fields, f"line {number}"))
            elif raw.strip():  # blank lines (a trailing one, separators) hold no record
                yield _jsonl_row(file, number, raw, fields)


def _skip_line(handle) -> int:
    """Read past the rest of the current line in blocks; returns the bytes skipped."""
    skipped = 0
    while block := handle.readline(SCAN_BYTES):
        skipped += len(block)
        if block.endswith(b"\n"):
            break
    return skipped


def _jsonl_row(file: InputFile, number: int, raw: bytes, fields: Fields) -> dict:
    location, path = f"{file.name}:{number}", file.path
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return error_row(location, path,
                         f"line {number} is not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}")
    except json.JSONDecodeError as exc:
        return error_row(location, path, f"line {number} is not JSON: {exc}")
    if not isinstance(record, dict):
        return error_row(location, path, f"line {number} is a JSON {type(record).__name__}, not an object")
    if fields.text not in record:
        return error_row(location, path, f"line {number} has no {fields.text!r} field "
                                         f"(fields: {', '.join(map(repr, record)) or 'none'}); see --text-field")
    text = record[fields.text]
    if not isinstance(text, str):
        return error_row(location, path, f"line {number}: {fields.text!r} is {type(text).__name__}, not a string")
    doc_id = record.get(fields.id)
    if doc_id is None:
        return document_row(location, path, text)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return error_row(location, path, f"line {number}: {fields.id!r} is {type(doc_id).__name__}, "
                                         "not a string or an integer")
    return document_row(str(doc_id), path, text)


def _parquet_rows(file: InputFile, fields: Fields) -> Iterator[dict]:
    path = file.path
    with _open_regular(path) as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        if fields.text not in schema.names:
            yield error_row(None, path, f"no column {fields.text!r} (columns: {', '.join(map(repr, schema.names))}); "
                                        "see --text-field")
            return
        text_type = schema.field(fields.text).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            yield error_row(None, path, f"column {fields.text!r} is {text_type}, not text")
            return
        columns = [fields.text] + ([fields.id] if fields.id in schema.names else [])
        row = 0
        for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=columns):
            sizes = pc.binary_length(batch.column(fields.text)).to_pylist()
            texts = batch.column(fields.text).to_pylist()
            # Ids of any scalar type become their string form; a column that cannot (a list, a struct)
            # raises ArrowException, which read_file reports for the file.
            ids = (batch.column(fields.id).cast(pa.string()).to_pylist() if fields.id in columns
                   else [None] * len(texts))
            for doc_id, text, size in zip(ids, texts, sizes):
                doc_id = f"{file.name}:{row}" if doc_id is None else doc_id
                if text is None:
                    yield error_row(doc_id, path, "empty text (null)")
                elif size > fields.max_bytes:
                    yield error_row(doc_id, path, _too_large(size, fields, f"row {row}"))
                else:
                    yield document_row(doc_id, path, text)
                row += 1
