"""Batching: which rows run together, and the padded arrays a backend receives. One place decides.

Rows are sorted by length (longest first, so a batch that does not fit in memory fails at once, not at
the end of a long job), then cut into batches of consecutive sorted rows, capped both by a row count and
by a token budget on the padded batch (rows x longest row), like TEI's ``max_batch_tokens``. A row longer
than the budget runs alone. Rows longer than ``long_threshold`` share a batch only with rows of exactly
their length, so they are never padded: global attention costs S^2, and padding a long row to a longer
neighbour would waste the most compute exactly where it is dearest. Results are put back in input order
by the caller.

Where to cut is chosen, not greedy: filling each batch to its caps pads a 16-token text to the 128 tokens
of the longest one beside it. Among the cuts within the caps, the plan has the fewest padded tokens plus
``BATCH_COST_TOKENS`` per batch (the fixed cost of one more forward call, in tokens), found by dynamic
programming over the sorted rows (at most ``batch_size`` candidates per row).
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
# What one more batch costs, in padded tokens: a forward call's fixed work (dispatching every op of the
# graph) next to its time per token. ModernBERT-base shape, 2 threads, 16 against 64 tokens per call: 19 ms
# fixed at 0.27 ms per token (OpenVINO bf16, 70 tokens), 30 ms at 1.0 (ONNX Runtime fp32, 30), 27 ms at
# 0.37 (torch bf16, 73). encode() of 32 texts of 16..128 tokens / 8 texts of 288..512, seconds with a cost
# of 10^9 (one batch, as before), 128, 64, 32 tokens: OpenVINO bf16 1.09 / 0.78 / 0.75 / 0.81 and
# 1.17 / 0.94 / 0.88 / 0.89; torch bf16 1.29 / 0.83 / 0.79 / 0.78 and 1.68 / 1.06 / 1.04 / 1.09.
BATCH_COST_TOKENS = 64


def plan_batches(lengths, batch_size: int = DEFAULT_BATCH_SIZE, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 long_threshold: int = DEFAULT_LONG_THRESHOLD, batch_cost_tokens: int | None = None):
    """Split row indices into batches: sorted longest first, at most ``batch_size`` rows and at most
    ``max_batch_tokens`` padded tokens each (a single longer row makes a batch of one); rows over
    ``long_threshold`` tokens only with rows of the same length. Of the plans that keep to these rules, the
    one with the fewest padded tokens plus ``batch_cost_tokens`` (None: ``BATCH_COST_TOKENS``) per batch;
    among equal ones, the one whose earlier batches are fuller."""
    batch_size = require_int("batch_size", batch_size, 1)
    max_batch_tokens = require_int("max_batch_tokens", max_batch_tokens, 1)
    long_threshold = require_int("long_threshold", long_threshold, 1)
    batch_cost = BATCH_COST_TOKENS if batch_cost_tokens is None else require_int("batch_cost_tokens",
                                                                                  batch_cost_tokens, 0)
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    sorted_lengths = [int(lengths[i]) for i in order]
    n = len(order)
    # cost[i]: the cheapest plan of sorted rows i.. ; end[i]: where its first batch ends (exclusive).
    cost, end = [0] * (n + 1), [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        width = sorted_lengths[i]  # sorted longest first: the padded length of a batch starting at i
        best = None
        for j in range(i + 1, min(n, i + batch_size) + 1):
            rows = j - i
            if rows > 1 and (rows * width > max_batch_tokens
                             or (width > long_threshold and sorted_lengths[j - 1] != width)):
                break  # more rows only make the batch wider or longer
            total = rows * width + batch_cost + cost[j]
            if best is None or total <= best:  # ties: the longer first batch
                best, end[i] = total, j
        cost[i] = best
    batches, i = [], 0
    while i < n:
        batches.append(order[i:end[i]])
        i = end[i]
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
