"""Batching: which rows run together, and the padded arrays a backend receives. One place decides.

Rows are sorted by length (longest first, so a batch that does not fit in memory fails at once, not at
the end of a long job), then packed into batches capped both by a row count and by a token budget on
the padded batch (rows x longest row), like TEI's ``max_batch_tokens``. A row longer than the budget
runs alone. Rows longer than ``long_threshold`` share a batch only with rows of exactly their length,
so they are never padded: global attention costs S^2, and padding a long row to a longer neighbour
would waste the most compute exactly where it is dearest. Results are put back in input order by the
caller.
"""

from __future__ import annotations

import numpy as np

from .validation import require_int

# Padded tokens per batch: 16384 is TEI's default max_batch_tokens and keeps a batch of a 400M-parameter
# encoder within a few GiB of activations at short lengths.
DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_BATCH_SIZE = 32
# Above this many tokens a row runs unpadded (alone or with equal-length peers). At 2048 tokens the
# quadratic global layers already cost about as much as the linear rest of a Dewey-size layer stack.
DEFAULT_LONG_THRESHOLD = 2048


def plan_batches(lengths, batch_size: int = DEFAULT_BATCH_SIZE, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 long_threshold: int = DEFAULT_LONG_THRESHOLD):
    """Split row indices into batches: sorted longest first, at most ``batch_size`` rows and at most
    ``max_batch_tokens`` padded tokens each (a single longer row makes a batch of one); rows over
    ``long_threshold`` tokens only with rows of the same length."""
    batch_size = require_int("batch_size", batch_size, 1)
    max_batch_tokens = require_int("max_batch_tokens", max_batch_tokens, 1)
    long_threshold = require_int("long_threshold", long_threshold, 1)
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[list[int]] = []
    for index in order.tolist():
        length = int(lengths[index])
        if batches:
            current = batches[-1]
            width = int(lengths[current[0]])  # sorted longest first: the batch's padded length
            if (len(current) < batch_size and (len(current) + 1) * width <= max_batch_tokens
                    and (width <= long_threshold or length == width)):
                current.append(index)
                continue
        batches.append([index])
    return batches


def pad_batch(rows: list[np.ndarray], spans: list[np.ndarray], pad_token_id: int):
    """Right-pad rows into ``input_ids``/``attention_mask`` [B, S] and spans into ``span_bounds``
    [B, C, 2] with empty ``(0, 0)`` spans, all int64 (the backend contract)."""
    seq = max(len(r) for r in rows)
    n_spans = max(len(s) for s in spans)
    input_ids = np.full((len(rows), seq), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), seq), dtype=np.int64)
    span_bounds = np.zeros((len(rows), n_spans, 2), dtype=np.int64)
    for b, (row, row_spans) in enumerate(zip(rows, spans)):
        input_ids[b, : len(row)] = row
        attention_mask[b, : len(row)] = 1
        span_bounds[b, : len(row_spans)] = row_spans
    return input_ids, attention_mask, span_bounds
