"""LangChain: Dewey as the embeddings of a vector store, and late-chunked documents in it.

Pages of Python's own documentation (``pydoc_data.topics``) go into LangChain's in-memory vector store
twice: whole, through ``DeweyEmbeddings`` (passage prompt for documents, query prompt for questions),
and as late chunks: ``LateChunkTransformer`` embeds each page in one pass and gives one ``Document``
per chunk (its text, ``start_index`` / ``end_index`` in the page, ``parent_id``, its vector), which
``add_late_chunks`` stores with those vectors instead of embedding each chunk alone. Any backend works:
``--model`` an export folder with ``--backend onnx`` (or openvino, trt).

    python examples/langchain_vector_store.py
    python examples/langchain_vector_store.py --question "What does the else clause of a loop do?"
"""

from __future__ import annotations

import argparse

from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from pydoc_data.topics import topics

from runtimes import load
from runtimes.integrations.langchain import DeweyEmbeddings, LateChunkTransformer, add_late_chunks

DEFAULT_TOPICS = "assert,import,with,for,try,class,lambda,global"
DEFAULT_QUESTION = "Which method of a context manager does the with statement call first?"
DEFAULT_MAX_CHARS = 1500  # the start of each page: a few chunks each, quick on a CPU
CHUNK_SIZE, CHUNK_OVERLAP = 128, 32  # tokens
PREVIEW_CHARS = 160


def preview(text: str) -> str:
    return " ".join(text.split())[:PREVIEW_CHARS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topics", default=DEFAULT_TOPICS, help="Comma-separated pydoc_data.topics pages.")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="Characters kept per page.")
    parser.add_argument("--model", help="A checkpoint or export folder (default: the packaged dewey-mini).")
    parser.add_argument("--backend", default="torch", help="torch, onnx, openvino or trt (default: torch).")
    args = parser.parse_args()
    names = [name.strip() for name in args.topics.split(",") if name.strip()]
    unknown = [name for name in names if name not in topics]
    if not names or unknown:
        parser.error(f"--topics: unknown or no pages {unknown}; e.g. {DEFAULT_TOPICS}")
    if args.max_chars < 1:
        parser.error("--max-chars must be at least 1")

    encoder = load(args.model, backend=args.backend)
    pages = [Document(page_content=topics[name][: args.max_chars], id=name) for name in names]

    whole = InMemoryVectorStore(DeweyEmbeddings(encoder))
    whole.add_documents(pages)
    best_page = whole.similarity_search_with_score(args.question, k=1)[0]
    print(f"question: {args.question}")
    print(f"whole pages: best page {best_page[0].id!r} ({best_page[1]:.3f})")

    chunks = LateChunkTransformer(encoder, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP).transform_documents(pages)
    store = InMemoryVectorStore(DeweyEmbeddings(encoder))
    add_late_chunks(store, chunks)
    print(f"late chunks: {len(chunks)} chunks of {len(pages)} pages, vectors from one pass per page")
    exact = sum(topics[c.metadata["parent_id"]][c.metadata["start_index"]: c.metadata["end_index"]] == c.page_content
                for c in chunks)
    print(f"page[start_index:end_index] == chunk text for {exact} of {len(chunks)} chunks")
    for chunk, score in store.similarity_search_with_score(args.question, k=2):
        meta = chunk.metadata
        print(f"  {score:.3f} page {meta['parent_id']!r} [{meta['start_index']}:{meta['end_index']}]: "
              f"{preview(chunk.page_content)}")


if __name__ == "__main__":
    main()
