"""Fixtures of the dewey-embed tests: a small corpus in every input format, with its texts known
independently of dewey_embed's readers, and helpers to run the command and read what it wrote."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="dewey-embed writes Parquet: pip install pyarrow")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder holding text, Markdown, JSONL and Parquet documents of Python's own documentation:
    returns (folder, {document id: its text}), ids as dewey-embed assigns them (names relative to the
    folder)."""
    import pyarrow as pa
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    texts = {}

    def text_file(relative: str, text: str) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        texts[relative] = text

    # \r\n line ends and non-ASCII text: char spans must index the file's text as it is.
    text_file("notes/if.txt", topics["if"].replace("\n", "\r\n"))
    text_file("notes/for.md", "# The for statement\n\n" + topics["for"])
    text_file("notes/deep/specialnames.txt", topics["specialnames"][:7000] + " Grüße 🙂 日本語.")
    records = [{"id": f"topic-{name}", "text": topics[name][:2500]} for name in ("while", "with", "try", "pass")]
    records.append({"text": "A record without an id is known by its path and line."})
    with open(folder / "records.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    for number, record in enumerate(records, 1):
        texts[record.get("id", f"records.jsonl:{number}")] = record["text"]
    rows = {"id": [101, 102, 103], "text": [topics[name][:1800] for name in ("del", "return", "yield")]}
    pq.write_table(pa.table(rows), folder / "table.parquet")
    texts.update({str(doc_id): text for doc_id, text in zip(rows["id"], rows["text"])})
    return folder, texts


@pytest.fixture
def embed():
    """Run dewey-embed in this process: embed(*args) -> click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from dewey_embed.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)

    return run


@pytest.fixture
def subprocess_env():
    """The environment for dewey-embed in a child process: the repository importable, no network."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")


@pytest.fixture
def cli_command():
    return [sys.executable, "-m", "dewey_embed.cli"]


@pytest.fixture
def read_output():
    """read_output(OUT) -> (documents {id: row}, chunks {doc_id: [rows by chunk_index]}), vectors as numpy."""
    def read(out: Path):
        documents = {row["id"]: row for row in _rows(out / "documents")}
        chunks: dict[str, list] = {}
        for row in _rows(out / "chunks"):
            chunks.setdefault(row["doc_id"], []).append(row)
        for rows in chunks.values():
            rows.sort(key=lambda row: row["chunk_index"])
        return documents, chunks

    return read


def _rows(folder: Path) -> list[dict]:
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return []
    rows = pq.read_table(folder).to_pylist()
    for row in rows:
        row["vector"] = np.asarray(row["vector"], dtype=np.float32)
    return rows
