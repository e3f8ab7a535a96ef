"""Retrieval evaluation without torch: sentence queries drawn from documents, and ranking metrics with
one relevant document per query. The quality gate of reduced-precision exports (dewey_export.gate) and
dewey_train's evaluations both use these.

A query is a sentence of a document, its answer that document. A gold document tied with others is
ranked after them, so a constant scorer gets no credit. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

from .validation import require_int

# -- queries from documents ----------------------------------------------------------------------

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


def check_documents(documents: Sequence[str], name: str = "documents") -> list[str]:
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(documents).__name__}")
    if len(documents) == 0:
        raise ValueError(f"{name} is empty: there is nothing to retrieve from")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str) or not doc.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty string")
    return list(documents)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by whitespace, and at newlines."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def sample_sentence_queries(
    documents: Sequence[str], n_queries: int, seed: int = 0, min_words: int = 6, max_words: int = 40
) -> list[tuple[str, int]]:
    """Up to ``n_queries`` (sentence, document index) pairs; each sentence occurs in its document.

    Documents are drawn uniformly in rounds (a random order of all documents that have a sentence of
    ``min_words``..``max_words`` words, one unused sentence each, then again), so a document gives a
    second query only once every eligible document has given one. Documents with no such sentence are
    skipped; a sentence found in more than one document is never used (it has no single answer).
    Fewer than ``n_queries`` pairs come back when the sentences run out.
    """
    documents = check_documents(documents)
    n_queries = require_int("n_queries", n_queries, 1)
    min_words = require_int("min_words", min_words, 1)
    max_words = require_int("max_words", max_words, min_words)
    rng = np.random.default_rng(seed)
    per_doc = [
        list(dict.fromkeys(s for s in split_sentences(doc) if min_words <= len(s.split()) <= max_words))
        for doc in documents
    ]
    owners = Counter(s for sentences in per_doc for s in sentences)
    remaining = {i: [s for s in sentences if owners[s] == 1] for i, sentences in enumerate(per_doc)}
    remaining = {i: sentences for i, sentences in remaining.items() if sentences}
    if not remaining:
        raise ValueError(f"no document has a sentence of {min_words}..{max_words} words to use as a query")
    queries: list[tuple[str, int]] = []
    while remaining and len(queries) < n_queries:
        for i in rng.permutation(sorted(remaining)):
            sentences = remaining[int(i)]
            queries.append((sentences.pop(int(rng.integers(len(sentences)))), int(i)))
            if not sentences:
                del remaining[int(i)]
            if len(queries) == n_queries:
                break
    return queries


# -- metrics ---------------------------------------------------------------------------------------


def _gold_ranks(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """0-based rank of each query's gold document; documents tied with the gold one rank before it."""
    scores = np.asarray(scores, dtype=np.float64)
    gold = np.asarray(gold)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty [queries, documents] matrix, got shape {scores.shape}")
    if gold.shape != (scores.shape[0],):
        raise ValueError(f"gold must have one index per query: shape ({scores.shape[0]},), got {gold.shape}")
    if not np.issubdtype(gold.dtype, np.integer):
        raise ValueError(f"gold must hold integer document indices, got dtype {gold.dtype}")
    if gold.min() < 0 or gold.max() >= scores.shape[1]:
        raise ValueError(f"gold indices must lie in [0, {scores.shape[1]}), got {gold.min()}..{gold.max()}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    gold_scores = scores[np.arange(len(gold)), gold]
    return (scores >= gold_scores[:, None]).sum(axis=1) - 1


def ndcg_at_k(scores: np.ndarray, gold: np.ndarray, k: int = 10) -> float:
    """Mean nDCG@k with one relevant document per query: 1/log2(rank + 2) if rank < k, else 0.

    scores: [Q, N] similarity of each query to each document; gold: [Q] index of the relevant document.
    A gold document tied with others counts as ranked after all of them.
    """
    k = require_int("k", k, 1)
    ranks = _gold_ranks(scores, gold)
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def recall_at_k(scores: np.ndarray, gold: np.ndarray, k: int = 1) -> float:
    """Fraction of queries whose gold document ranks in the top k (ties ranked pessimistically)."""
    k = require_int("k", k, 1)
    return float((_gold_ranks(scores, gold) < k).mean())

