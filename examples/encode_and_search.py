"""Encode queries and passages with the packaged dewey-mini model and rank the passages for each query.

Shows ``runtimes.load()`` with no path (the packaged default model, PyTorch backend), the ``query`` and
``passage`` prompts, and that the vectors are L2-normalised, so a dot product is the cosine similarity.

    python examples/encode_and_search.py
    python examples/encode_and_search.py --query "how do I read a file line by line?" --top-k 2
"""

from __future__ import annotations

import argparse

import numpy as np

from runtimes import load

PASSAGES = (
    "json.loads() parses a string holding a JSON document and returns the Python objects it describes.",
    "list.sort() sorts the items of a list in place; sorted() returns a new sorted list.",
    "A for loop over an open file object yields the file's lines one at a time.",
    "The sky looks blue because air scatters short wavelengths of sunlight more than long ones.",
    "Bread rises because yeast ferments sugars and releases carbon dioxide into the dough.",
)
QUERIES = (
    "how do I parse a JSON string?",
    "why is the sky blue?",
    "what makes bread dough rise?",
)
DEFAULT_TOP_K = 3


def rank(query_vectors: np.ndarray, passage_vectors: np.ndarray, top_k: int) -> list[list[tuple[int, float]]]:
    """For each query, the ``top_k`` (passage index, cosine) pairs, best first."""
    scores = query_vectors @ passage_vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return [[(int(j), float(row[j])) for j in best] for row, best in zip(scores, order)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--query", action="append", help="A query to search with (repeatable; default: built-in ones).")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="Passages shown per query.")
    args = parser.parse_args()
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    queries = args.query or list(QUERIES)

    encoder = load()  # no path: the packaged dewey-mini
    print(f"model: {encoder}")
    query_vectors = encoder.encode(queries, prompt="query")
    passage_vectors = encoder.encode(list(PASSAGES), prompt="passage")
    print(f"query vectors {query_vectors.shape}, passage vectors {passage_vectors.shape}, {query_vectors.dtype}")
    for query, hits in zip(queries, rank(query_vectors, passage_vectors, args.top_k)):
        print(f"\nquery: {query}")
        for position, (j, score) in enumerate(hits, 1):
            print(f"  {position}. {score:.3f}  {PASSAGES[j]}")


if __name__ == "__main__":
    main()
