"""LlamaIndex: late chunking in an ingestion pipeline, then an in-memory index that keeps those vectors.

Pages of Python's own documentation (``pydoc_data.topics``) go through an ``IngestionPipeline`` whose
one transformation is ``LateChunkNodeParser``: each page is embedded in one pass and cut into
``TextNode``s carrying ``start_char_idx`` / ``end_char_idx`` and their late-chunk ``embedding``. A
``VectorStoreIndex`` built from those nodes embeds none of them again (LlamaIndex embeds only nodes
without an embedding); ``DeweyEmbedding`` embeds the question with the query prompt. Any backend works:
``--model`` an export folder with ``--backend onnx`` (or openvino, trt).

    python examples/llamaindex_ingestion.py
    python examples/llamaindex_ingestion.py --question "How is a relative import resolved?"
"""

from __future__ import annotations

import argparse

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from pydoc_data.topics import topics

from runtimes import load
from runtimes.integrations.llamaindex import DeweyEmbedding, LateChunkNodeParser

DEFAULT_TOPICS = "assert,import,with,for,try,class,lambda,global"
DEFAULT_QUESTION = "What happens when the condition of an assert statement is false?"
DEFAULT_MAX_CHARS = 1500  # the start of each page: a few chunks each, quick on a CPU
CHUNK_SIZE, CHUNK_OVERLAP = 128, 32  # tokens
PREVIEW_CHARS = 160
TOP_NODES = 2


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
    pages = {name: topics[name][: args.max_chars] for name in names}
    pipeline = IngestionPipeline(transformations=[
        LateChunkNodeParser(encoder, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP),
    ])
    nodes = pipeline.run(documents=[Document(text=text, id_=name) for name, text in pages.items()])
    exact = sum(pages[n.ref_doc_id][n.start_char_idx: n.end_char_idx] == n.text for n in nodes)
    print(f"{len(nodes)} nodes of {len(pages)} pages, each with its late-chunk embedding "
          f"({sum(n.embedding is not None for n in nodes)} set)")
    print(f"page[start_char_idx:end_char_idx] == node.text for {exact} of {len(nodes)} nodes")

    index = VectorStoreIndex(nodes, embed_model=DeweyEmbedding(encoder))
    print(f"\nquestion: {args.question}")
    for hit in index.as_retriever(similarity_top_k=TOP_NODES).retrieve(args.question):
        node = hit.node
        print(f"  {hit.score:.3f} page {node.ref_doc_id!r} [{node.start_char_idx}:{node.end_char_idx}]: "
              f"{' '.join(node.text.split())[:PREVIEW_CHARS]}")


if __name__ == "__main__":
    main()
