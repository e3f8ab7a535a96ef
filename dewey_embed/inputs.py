"""Reading a corpus: the files an INPUT names, and the documents each file holds.

A text or Markdown file is one document; a JSONL file is one document per line (a JSON object with a
text field); a Parquet file is one document per row (a text column). Every document keeps an id and its
source (the file's path):

- text file: the id is the path;
- JSONL: the record's id field where it has one, else ``path:LINE`` (LINE counted from 1, as editors do);
- Parquet: the id column's value where the file has one, else ``path:ROW`` (ROW counted from 0, as
  pyarrow and pandas do).

A problem with one document (an undecodable file, empty text, a JSONL line that is not JSON or lacks the
field, a Parquet file without the column) becomes an error row, never an exception: the run goes on
and lists it in errors.jsonl. The rows travel as pyarrow tables of ``INPUT_SCHEMA``, the input of the
per-batch function on one machine and on Ray alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runtimes.tokenization import check_encodable

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# What a folder contributes when no --glob is given: text, Markdown, JSONL and Parquet files.
DEFAULT_GLOBS = ("**/*.txt", "**/*.md", "**/*.markdown", "**/*.rst", "**/*.jsonl", "**/*.ndjson", "**/*.parquet")
# Rows per table read from one file: small enough that a huge JSONL or Parquet file streams.
READ_ROWS = 1024

# One row per document, or per document or file that could not be read (text null, error set).
INPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("text", pa.string()),
    ("error", pa.string()),
])


class MissingInput(Exception):
    """An INPUT path that does not exist, or a folder with nothing to read."""


@dataclass(frozen=True)
class Fields:
    """Where JSONL records and Parquet rows keep their text and their id."""

    text: str = "text"
    id: str = "id"


def list_files(inputs: Iterable[Path], globs: Iterable[str] = DEFAULT_GLOBS, exclude: Path | None = None) -> list[Path]:
    """The files to read, in a stable order: each INPUT file as given, and the files under each INPUT
    folder that match one of ``globs``, sorted. Hidden files and folders (a name starting with a dot:
    .git, an editor's swap file) and everything under ``exclude`` (the output folder, whose shards are
    Parquet files too) are left out; a file named twice is read once. Raises MissingInput for a path that
    does not exist and for a folder with no file to read."""
    globs = tuple(globs)
    excluded = exclude.resolve() if exclude is not None else None
    files, seen = [], set()
    for entry in inputs:
        entry = Path(entry)
        if not entry.exists():
            raise MissingInput(f"input not found: {entry}")
        if entry.is_dir():
            found = sorted({path for pattern in globs for path in entry.glob(pattern)
                            if path.is_file() and not _hidden(path.relative_to(entry))}, key=str)
            if not found:
                raise MissingInput(f"no files to read in the folder {entry} (patterns: {' '.join(globs)}; see --glob)")
        else:
            found = [entry]
        for path in found:
            resolved = path.resolve()
            if resolved in seen or (excluded is not None and resolved.is_relative_to(excluded)):
                continue
            seen.add(resolved)
            files.append(path)
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def file_kind(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``text``, by the file's suffix."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def read_file(path: Path, fields: Fields) -> Iterator[dict]:
    """The rows of one file (``INPUT_SCHEMA`` as dicts). A file that cannot be read, or stops being
    readable midway, ends with one error row for the file; the rows before it stand."""
    readers = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "text": _text_rows}
    try:
        yield from readers[file_kind(path)](path, fields)
    except (OSError, pa.ArrowException) as exc:
        yield error_row(None, path, f"cannot read the file: {exc}")


def input_tables(files: Iterable[Path], fields: Fields, rows: int) -> Iterator[pa.Table]:
    """The rows of ``files`` in order, as ``INPUT_SCHEMA`` tables of ``rows`` rows (the last may be
    shorter); a table spans files, so a folder of small text files still fills whole windows."""
    pending: list[dict] = []
    for path in files:
        for row in read_file(path, fields):
            pending.append(row)
            if len(pending) == rows:
                yield pa.Table.from_pylist(pending, schema=INPUT_SCHEMA)
                pending = []
    if pending:
        yield pa.Table.from_pylist(pending, schema=INPUT_SCHEMA)


def count_documents(files: Iterable[Path]) -> int:
    """How many rows reading ``files`` will give, for the progress bar's total: one per text file,
    non-blank lines of a JSONL file, rows of a Parquet file (from its footer), one for a file that
    cannot be read. Cheap next to embedding: JSONL files are scanned for line breaks only."""
    total = 0
    for path in files:
        try:
            kind = file_kind(path)
            if kind == "parquet":
                total += pq.ParquetFile(path).metadata.num_rows
            elif kind == "jsonl":
                with open(path, "rb") as handle:
                    total += sum(1 for line in handle if line.strip())
            else:
                total += 1
        except (OSError, pa.ArrowException):
            total += 1
    return total


def error_row(doc_id: str | None, source: Path, message: str) -> dict:
    return {"id": doc_id, "source": str(source), "text": None, "error": message}


def document_row(doc_id: str, source: Path, text: str) -> dict:
    """A document's row, or an error row when there is nothing to embed or the text is not valid Unicode."""
    if not text.strip():
        return error_row(doc_id, source, "empty text: there is nothing to embed")
    try:
        check_encodable("the text", text)
    except ValueError as exc:
        return error_row(doc_id, source, str(exc))
    return {"id": doc_id, "source": str(source), "text": text, "error": None}


def _text_rows(path: Path, fields: Fields) -> Iterator[dict]:
    # Decoded from bytes, not read in text mode: universal newlines would turn \r\n into \n, and the
    # chunks' character spans must index the file's own text.
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield error_row(str(path), path, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}")
        return
    yield document_row(str(path), path, text)


def _jsonl_rows(path: Path, fields: Fields) -> Iterator[dict]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():  # blank lines (a trailing one, separators) hold no record
                yield _jsonl_row(path, number, raw, fields)


def _jsonl_row(path: Path, number: int, raw: bytes, fields: Fields) -> dict:
    location = f"{path}:{number}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return error_row(location, path, f"line {number} is not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}")
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


def _parquet_rows(path: Path, fields: Fields) -> Iterator[dict]:
    parquet = pq.ParquetFile(path)
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
        texts = batch.column(fields.text).to_pylist()
        # Ids of any scalar type become their string form; a column that cannot (a list, a struct)
        # raises ArrowException, which read_file reports for the file.
        ids = batch.column(fields.id).cast(pa.string()).to_pylist() if fields.id in columns else [None] * len(texts)
        for doc_id, text in zip(ids, texts):
            doc_id = f"{path}:{row}" if doc_id is None else doc_id
            yield document_row(doc_id, path, text) if text is not None else error_row(doc_id, path, "empty text (null)")
            row += 1
