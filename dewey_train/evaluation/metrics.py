"""Ranking metrics with one relevant document per query.

A gold document tied with others is ranked after them, so a constant scorer gets no credit.
"""

from __future__ import annotations

import numpy as np

from runtimes.validation import require_int


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

