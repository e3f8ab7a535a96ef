"""Four ways to score queries against documents, and the long-document retrieval task.

- ``student_single``: the student's mean vector of the whole document (one pass, up to its maximum);
- ``student_multi``: the student's late-chunking vectors (``encode_chunks``), document score = max over chunks;
- ``teacher_truncated``: the teacher's vector of the document, which the teacher cuts to its own window;
- ``teacher_chunks``: the teacher's vectors of the student's chunk texts, document score = max over chunks.

Queries always use the same model as the documents they are compared with: student and teacher vectors
live in different spaces and are never compared with each other. ``long_document_retrieval`` makes a
sentence of a document the query and the document its answer. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Protocol, Sequence

import numpy as np

from runtimes import TruncationWarning
from runtimes.chunking import check_chunk_args
from runtimes.evaluation import check_documents, ndcg_at_k, recall_at_k, sample_sentence_queries
from runtimes.validation import require_int

METHODS = ("student_single", "student_multi", "teacher_truncated", "teacher_chunks")

TokenCounter = Callable[[list[str]], list[int]]


class TeacherLike(Protocol):
    """What the evaluation needs of a teacher model."""

    name: str
    max_tokens: int  # the teacher's window: longer texts are cut to it inside ``embed``

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [N, d], L2-normalised; each text truncated to the teacher's window."""
        ...


# -- the four scoring methods ------------------------------------------------------------------


def _quiet_truncation(fn, *args, **kwargs):
    """Call ``fn``; return its result and the messages of the TruncationWarnings it raised.

    The test configuration turns TruncationWarning into an error; here truncation is expected and
    reported in the result instead. Other warnings pass through unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        result = fn(*args, **kwargs)
    notes = []
    for w in caught:
        if issubclass(w.category, TruncationWarning):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, notes


def _teacher_embed(teacher: TeacherLike, texts: list[str]) -> np.ndarray:
    """Teacher vectors of ``texts``; blank texts (a chunk of whitespace) get a zero vector."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    vectors = np.asarray(teacher.embed([texts[i] for i in keep]), dtype=np.float32) if keep else None
    if vectors is not None and (vectors.ndim != 2 or len(vectors) != len(keep)):
        raise ValueError(f"teacher {teacher.name!r} returned shape {vectors.shape} for {len(keep)} texts")
    width = vectors.shape[1] if vectors is not None else 1
    out = np.zeros((len(texts), width), dtype=np.float32)
    if keep:
        out[keep] = vectors
    return out


def _max_per_document(similarities: np.ndarray, chunk_counts: list[int]) -> np.ndarray:
    """[Q, total chunks] -> [Q, documents]: the best chunk of each document."""
    starts = np.concatenate([[0], np.cumsum(chunk_counts)[:-1]]).astype(np.int64)
    return np.maximum.reduceat(similarities, starts, axis=1)


def score_methods(
    student,
    teacher: TeacherLike,
    queries: list[str],
    documents: list[str],
    chunk_size: int,
    chunk_overlap: int,
    splitter: str,
    batch_size: int,
    show_progress: bool,
) -> tuple[dict[str, np.ndarray], list[str], list]:
    """Scores [Q, N] of every method, truncation notes, and the student's ChunkedDocuments.

    Each document is embedded once per method; the chunk texts the teacher sees are the student's
    chunks (``splitter``), so both chunked methods score the same pieces of text.
    """
    options = dict(batch_size=batch_size, show_progress=show_progress)
    notes = []
    student_queries, cut = _quiet_truncation(student.encode, queries, mode="mean", **options)
    notes += [f"student queries: {m}" for m in cut]
    student_docs, cut = _quiet_truncation(student.encode, documents, mode="mean", **options)
    notes += [f"student_single: {m}" for m in cut]
    chunked, cut = _quiet_truncation(
        student.encode_chunks, documents, chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter=splitter,
        **options,
    )
    notes += [f"student_multi and teacher_chunks: {m}" for m in cut]
    counts = [len(doc.texts) for doc in chunked]
    student_chunks = np.concatenate([doc.vectors for doc in chunked])

    teacher_queries = _teacher_embed(teacher, queries)
    teacher_docs = _teacher_embed(teacher, documents)
    teacher_chunks = _teacher_embed(teacher, [text for doc in chunked for text in doc.texts])

    scores = {
        "student_single": student_queries @ student_docs.T,
        "student_multi": _max_per_document(student_queries @ student_chunks.T, counts),
        "teacher_truncated": teacher_queries @ teacher_docs.T,
        "teacher_chunks": _max_per_document(teacher_queries @ teacher_chunks.T, counts),
    }
    return scores, notes, chunked


def student_token_counter(student) -> TokenCounter:
    """A ``count_tokens`` function: text tokens of each text by the student's tokenizer (no [CLS]/[SEP])."""

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(t.ids) for t in student.tokenizer.encode_texts(list(texts))]

    return count_tokens


def check_eval_args(chunk_size: int, chunk_overlap: int, splitter: str, batch_size: int) -> None:
    """Refuse bad chunking or batch settings before any model runs."""
    check_chunk_args(chunk_size, chunk_overlap, splitter)
    require_int("batch_size", batch_size, 1)


# -- long-document retrieval -------------------------------------------------------------------


def _queries_from(
    documents: list[str], n_queries: int, seed: int, query_documents: Sequence[int] | None
) -> list[tuple[str, int]]:
    """(sentence, index into ``documents``) pairs, drawn from ``query_documents`` only when given."""
    if query_documents is None:
        return sample_sentence_queries(documents, n_queries, seed=seed)
    pool = [int(i) for i in query_documents]
    if not pool or min(pool) < 0 or max(pool) >= len(documents):
        raise ValueError(f"query_documents must be indices into the {len(documents)} documents")
    return [(q, pool[i]) for q, i in sample_sentence_queries([documents[i] for i in pool], n_queries, seed=seed)]


def _metrics_by_method(scores: dict[str, np.ndarray], gold: np.ndarray) -> dict[str, dict[str, float]]:
    """nDCG@10 and recall@1 of every method over the queries (rows) of ``scores``."""
    return {
        method: {"ndcg@10": ndcg_at_k(s, gold, 10), "recall@1": recall_at_k(s, gold, 1)}
        for method, s in scores.items()
    }


def _metrics_by_min_tokens(
    scores: dict[str, np.ndarray], gold: np.ndarray, gold_tokens: np.ndarray, bands: Sequence[int]
) -> dict[str, dict]:
    """Per band, the metrics over the queries whose gold document has more than ``band`` tokens
    (bands no query reaches are left out)."""
    by_band = {}
    for band in bands:
        longer = gold_tokens > band
        if longer.any():
            subset = {method: s[longer] for method, s in scores.items()}
            by_band[str(band)] = {"n_queries": int(longer.sum()), **_metrics_by_method(subset, gold[longer])}
    return by_band


def long_document_retrieval(
    student,
    teacher: TeacherLike,
    documents: Sequence[str],
    n_queries: int = 200,
    seed: int = 0,
    chunk_size: int = 256,
    chunk_overlap: int = 64,
    splitter: str = "tokens",
    batch_size: int = 8,
    show_progress: bool = False,
    query_documents: Sequence[int] | None = None,
    min_tokens_bands: Sequence[int] = (),
) -> dict:
    """Retrieve each document from one of its own sentences, by the four methods.

    ``query_documents``: indices of the documents queries are drawn from (default: all); every document
    stays a candidate. ``min_tokens_bands``: also report the metrics over the queries whose gold
    document has more than each of these many student tokens (``by_min_tokens``).

    Queries come from ``sample_sentence_queries``; all ``documents`` are candidates for every query.
    Returns ``{"task", "n_queries", "n_documents", "document_tokens": {min, median, max},
    "n_truncated_documents", "chunk_size", "chunk_overlap", "splitter", "teacher", "methods": {method:
    {"ndcg@10", "recall@1"}}, "by_min_tokens": {band: {"n_queries", method: ...}}, "notes"}``.
    Documents longer than the student's maximum are truncated for ``student_single`` (noted) and run in
    overlapping windows for ``student_multi`` (``Encoder.encode_chunks``).
    ``splitter`` is the student's chunker (``tokens``: fixed token windows, the authors' 256/64 setting;
    ``words``, ``recursive``); ``teacher_chunks`` embeds the same chunk texts.
    """
    documents = check_documents(documents)
    check_eval_args(chunk_size, chunk_overlap, splitter, batch_size)
    pairs = _queries_from(documents, n_queries, seed, query_documents)
    queries = [q for q, _ in pairs]
    gold = np.array([i for _, i in pairs], dtype=np.int64)
    tokens = np.array(student_token_counter(student)(documents))

    scores, notes, chunked = score_methods(
        student, teacher, queries, documents, chunk_size, chunk_overlap, splitter, batch_size, show_progress
    )
    if len(pairs) < n_queries:
        notes.append(f"only {len(pairs)} usable sentences were found for queries ({n_queries} asked)")
    return {
        "task": "long_document_retrieval",
        "n_queries": len(pairs),
        "n_documents": len(documents),
        "document_tokens": {
            "min": int(tokens.min()),
            "median": float(np.median(tokens)),
            "max": int(tokens.max()),
        },
        # Cut for student_single (noted); student_multi runs them in windows (Encoder.encode_chunks).
        "n_truncated_documents": sum(doc.windows > 1 for doc in chunked),
        "chunk_size": chunk_size,
        "chunk_overlap": chunk_overlap,
        "splitter": splitter,
        "teacher": getattr(teacher, "name", type(teacher).__name__),
        "methods": _metrics_by_method(scores, gold),
        "by_min_tokens": _metrics_by_min_tokens(scores, gold, tokens[gold], min_tokens_bands),
        "notes": notes,
    }

