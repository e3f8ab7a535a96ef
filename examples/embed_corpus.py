"""Embed a corpus with dewey-embed, then answer a question by its best chunks with pyarrow and numpy only.

The corpus is Python's own documentation (``pydoc_data.topics``, shipped with Python), written as a
JSONL file, one topic a line. ``dewey-embed --chunks`` embeds it into Parquet shards with late chunking
(one pass over each whole topic, one vector per chunk); a second, one-line ``dewey-embed --prompt
query`` run embeds the question the same way. Both run as child processes, as a user would run them:
this process only reads Parquet and multiplies matrices, and imports no torch. Running the same
command again with the same --out resumes: everything already embedded is skipped.

    python examples/embed_corpus.py
    python examples/embed_corpus.py --topics specialnames,formatstrings --question "How do I pad a number with zeros?"
    python examples/embed_corpus.py --out corpus-run   # run it again: nothing is embedded twice
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pydoc_data.topics import topics

DEFAULT_QUESTION = "Which method is called to create a new instance of a class?"
CHUNK_SIZE = 256  # tokens, with the authors' 256/64 setting
CHUNK_OVERLAP = 64
PREVIEW_CHARS = 200
DEWEY_EMBED = [sys.executable, "-m", "dewey_embed.cli"]


def dewey_embed(*args) -> None:
    """Run the dewey-embed command; its progress and summary go to this terminal."""
    subprocess.run([*DEWEY_EMBED, *map(str, args)], check=True)


def write_jsonl(path: Path, records: dict[str, str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for doc_id, text in records.items():
            handle.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")


def vectors(table) -> np.ndarray:
    """The ``vector`` column (fixed-size lists of float32) as a [rows, D] matrix, without copying rows one by one."""
    column = table["vector"].combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topics", help="Comma-separated pydoc_data.topics names (default: all of them).")
    parser.add_argument("--max-chars", type=int, help="Keep only each topic's first MAX_CHARS characters.")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--out", type=Path, help="Working folder (corpus, embeddings); default: a new temporary one.")
    parser.add_argument("--model", help="Model folder for dewey-embed (default: the packaged dewey-mini).")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx", "trt"))
    args = parser.parse_args()
    names = args.topics.split(",") if args.topics else sorted(topics)
    unknown = [name for name in names if name not in topics]
    if unknown:
        parser.error(f"unknown topics {unknown}; see pydoc_data.topics.topics")
    if args.max_chars is not None and args.max_chars < 1:
        parser.error("--max-chars must be at least 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="embed-corpus-"))
    out.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model] if args.model else []

    corpus = {name: topics[name][: args.max_chars] for name in names}
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "question.jsonl", {"question": args.question})
    print(f"corpus: {len(corpus)} topics, {sum(map(len, corpus.values()))} characters -> {out / 'corpus.jsonl'}")
    dewey_embed(out / "corpus.jsonl", "--out", out / "embeddings", "--chunks", "--chunk-size", CHUNK_SIZE,
                "--chunk-overlap", CHUNK_OVERLAP, "--splitter", "recursive", "--backend", args.backend, *model)
    dewey_embed(out / "question.jsonl", "--out", out / "question", "--prompt", "query", "--backend", args.backend,
                *model)

    # The search side: Parquet and numpy only.
    chunks = pq.read_table(out / "embeddings" / "chunks")
    documents = pq.read_table(out / "embeddings" / "documents")
    print(f"embeddings: {documents.num_rows} documents, {chunks.num_rows} chunks, "
          f"{chunks.schema.field('vector').type.list_size}-d float32 vectors")
    exact = sum(corpus[doc_id][a:b] == text for doc_id, a, b, text in zip(
        chunks["doc_id"].to_pylist(), chunks["char_start"].to_pylist(), chunks["char_end"].to_pylist(),
        chunks["text"].to_pylist()))
    print(f"text[a:b] == chunk text for {exact} of {chunks.num_rows} chunks, (a, b) = (char_start, char_end)")

    scores = vectors(chunks) @ vectors(pq.read_table(out / "question" / "documents"))[0]
    print(f"\nquestion: {args.question}")
    for rank, row in enumerate(np.argsort(-scores)[: args.top_k], 1):
        chunk = chunks.slice(int(row), 1).to_pylist()[0]
        preview = " ".join(chunk["text"].split())[:PREVIEW_CHARS]
        print(f"  {rank}. {chunk['doc_id']} chunk {chunk['chunk_index']} ({scores[row]:.3f}) "
              f"text[{chunk['char_start']}:{chunk['char_end']}]: {preview}")
    print(f"\ntorch imported by this process: {'yes' if 'torch' in sys.modules else 'no'}")


if __name__ == "__main__":
    main()
