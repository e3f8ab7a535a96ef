"""Texts longer than the model's window: overlapping windows that give what one pass would.

A text whose tokens do not fit in one row (``max_length`` minus [CLS], [SEP] and the prompt) is covered
by windows of the full capacity that overlap by ``window_overlap`` tokens; each window is framed as a
normal row ([CLS] prompt text-window [SEP]). Every token's state is taken from exactly one window, the
one where it has the most context on both sides: the overlap of two neighbours is cut at its middle. A
chunk (or the whole text) is then pooled over its tokens' kept states, so its vector is the mean of the
same states one pass would pool, each computed with at least ``window_overlap // 2`` tokens of context
on either side (unless it is that close to the text's own start or end).

The backend returns ``head(mean(states of a span))``. Splitting a span into the pieces that different
windows keep and averaging the pieces' outputs weighted by their token counts gives
``head(mean(states))`` exactly when the head is affine (a linear layer with or without a bias: an
affine map commutes with a weighted mean), which every Dewey head is.

The window layout reuses ``chunking.token_windows`` (full-capacity windows, the last one ending at the
text's end), so windows and chunks follow one rule. Only the plan lives here; ``Encoder`` runs it,
batching the windows of every text like any rows and adding each window's span outputs into per-span
running sums, so memory holds one batch of rows plus the outputs, whatever the text's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunking import token_windows
from .validation import require_int

# Default overlap of neighbouring windows, in tokens; a window of capacity C uses
# min(DEFAULT_WINDOW_OVERLAP, C // 4) so that small windows still advance by three quarters of their
# length. From the seam measurement (docs/benchmarks.md, "Windows past the model's length"): overlaps of
# 0 to 1,024 tokens moved chunk vectors by less than 1e-4 in mean cosine, and 128 lifted the chunks that
# hold a seam (0.99675 -> 0.99775 on dewey-mini) at no extra window there; more bought nothing.
DEFAULT_WINDOW_OVERLAP = 128


def default_window_overlap(capacity: int) -> int:
    """The overlap used when the caller gives none, for windows of ``capacity`` text tokens."""
    return min(DEFAULT_WINDOW_OVERLAP, capacity // 4)


def check_window_overlap(window_overlap, capacity: int) -> int:
    """``window_overlap`` checked against a window's text capacity (None: the default for it)."""
    if window_overlap is None:
        return default_window_overlap(capacity)
    window_overlap = require_int("window_overlap", window_overlap, 0)
    if window_overlap >= capacity:
        raise ValueError(
            f"window_overlap ({window_overlap}) must be smaller than a window's {capacity} text tokens "
            "(max_length minus [CLS], [SEP] and the prompt), or the windows would never advance"
        )
    return window_overlap


@dataclass(frozen=True)
class WindowPlan:
    """How one text's ``n_tokens`` tokens are covered.

    ``windows[w] = (start, end)``: the text tokens window ``w`` holds; ``kept[w] = (start, end)``: the
    tokens whose state is taken from window ``w``. The kept ranges partition ``[0, n_tokens)`` in order.
    """

    windows: np.ndarray  # int64 [W, 2]
    kept: np.ndarray  # int64 [W, 2]

    @property
    def n_windows(self) -> int:
        return len(self.windows)


def plan_windows(n_tokens: int, capacity: int, window_overlap: int) -> WindowPlan:
    """Windows of ``capacity`` tokens over ``n_tokens`` (one window when the text fits), neighbours
    overlapping by at least ``window_overlap``; each overlap cut at its middle into the kept ranges."""
    n_tokens = require_int("n_tokens", n_tokens, 1)
    capacity = require_int("capacity", capacity, 1)
    window_overlap = check_window_overlap(window_overlap, capacity)
    windows = token_windows(n_tokens, capacity, window_overlap)
    kept = windows.copy()
    for w in range(1, len(windows)):
        # Tokens [windows[w, 0], windows[w - 1, 1]) are in both windows: the left half keeps its state
        # from window w - 1, the right half from window w.
        cut = (windows[w, 0] + windows[w - 1, 1] + 1) // 2
        kept[w - 1, 1] = kept[w, 0] = cut
    return WindowPlan(windows, kept)


def split_spans(plan: WindowPlan, spans: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The pieces of ``spans`` (int64 [C, 2], text-token ranges) that each window keeps.

    Per window: ``(local_spans [P, 2], span_index [P], weight [P])``: ranges relative to the window's
    first text token, which span of ``spans`` each piece belongs to, and its token count. Summing
    ``weight * output`` over all pieces of span ``c`` and dividing by its length gives span ``c``'s mean.
    """
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    out = []
    for (w_start, _), (k_start, k_end) in zip(plan.windows, plan.kept):
        starts = np.maximum(spans[:, 0], k_start)
        ends = np.minimum(spans[:, 1], k_end)
        index = np.nonzero(ends > starts)[0]
        local = np.stack([starts[index], ends[index]], axis=1) - w_start
        out.append((local.astype(np.int64), index.astype(np.int64), (ends - starts)[index].astype(np.float64)))
    return out
