"""Chunk spans for late chunking, in tokens of the model's tokenizer.

A splitter turns one tokenized text into token spans ``(start, end)`` (end exclusive, indices into the
text's own tokens: no [CLS], no prompt). Character spans follow from the token offsets, so every chunk
maps back to a slice of the caller's original string.

- ``tokens``: fixed windows of ``chunk_size`` tokens, stepping ``chunk_size - chunk_overlap``, on token
  ids (the authors' retrieval setting is 256 / 64). The last window ends at the text's end and, when
  the text is longer than ``chunk_size``, still holds ``chunk_size`` tokens: it starts earlier and
  overlaps its neighbour by more. A short tail window would be a mean over a few tokens, and a few
  tokens that match a query outscore every full window under max-over-chunks scoring.
- ``words``: windows of at most ``chunk_size`` tokens that start and end at word boundaries (a word
  is a whitespace-delimited run of the text), stepping back about ``chunk_overlap`` tokens; a single
  word longer than ``chunk_size`` tokens is cut. This is the paper's "split by words", counted in
  tokens.
- ``recursive``: boundaries at paragraphs, then lines, sentences, words, as the maintained
  semantic-text-splitter library finds them with the model's own tokenizer counting the size; overlap
  in tokens. The library measures each chunk tokenized alone; inside the whole text a boundary token
  can tokenize differently, so a chunk that comes out longer than ``chunk_size`` in context is split
  into windows: a span never exceeds ``chunk_size`` and no token is left out. A text the library finds
  no chunk in (it trims whitespace, so one whose kept tokens are all whitespace) gets the ``tokens``
  windows, with the same overlap.

``chunk_spans`` is the one entry point: ``Encoder.encode_chunks`` and the training samples of
``dewey_train`` both call it, so a training chunk is exactly an ``encode_chunks`` chunk.
"""

from __future__ import annotations

import threading

import numpy as np

from .validation import require_int

SPLITTERS = ("tokens", "words", "recursive")


def check_chunk_args(chunk_size, chunk_overlap, splitter: str) -> None:
    if splitter not in SPLITTERS:
        raise ValueError(f"splitter must be one of {SPLITTERS}, got {splitter!r}")
    require_int("chunk_size", chunk_size, 1)
    require_int("chunk_overlap", chunk_overlap, 0)
    if chunk_overlap >= chunk_size:
        raise ValueError(
            f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size}), "
            "or the windows would never advance"
        )


def token_windows(n_tokens: int, chunk_size: int, chunk_overlap: int) -> np.ndarray:
    """Windows of ``chunk_size`` over ``n_tokens``, each starting ``chunk_size - chunk_overlap`` after the
    last, except the final one: it ends at ``n_tokens`` and starts at ``n_tokens - chunk_size`` (so it
    overlaps the one before by at least ``chunk_overlap``), or at 0 for a text of at most ``chunk_size``
    tokens. The count is ``1 + ceil((n_tokens - chunk_size) / step)``. Returns int64 [n_chunks, 2]."""
    step = chunk_size - chunk_overlap
    spans = []
    if n_tokens <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    start = 0
    while start + chunk_size < n_tokens:
        spans.append((start, start + chunk_size))
        start += step
    spans.append((max(n_tokens - chunk_size, 0), n_tokens))
    return np.asarray(spans, dtype=np.int64)


def word_starts(text: str, offsets: np.ndarray) -> np.ndarray:
    """Indices of the tokens that begin a word: the first token, and every token preceded by whitespace,
    either between it and the previous token (WordPiece drops spaces) or as its own first character
    (byte-level BPE keeps the space in the token: " word"). Sorted int64."""
    starts = [0] if len(offsets) else []
    for i in range(1, len(offsets)):
        before = text[int(offsets[i - 1, 1]): int(offsets[i, 0]) + 1]
        if any(ch.isspace() for ch in before):
            starts.append(i)
    return np.asarray(starts, dtype=np.int64)


def word_windows(starts: np.ndarray, n_tokens: int, chunk_size: int, chunk_overlap: int) -> np.ndarray:
    """Greedy windows over ``n_tokens`` whose ends fall on word starts (``starts``, from ``word_starts``):
    each as long as whole words allow within ``chunk_size``. The next window starts at the first word
    start at or after ``end - chunk_overlap`` from which it reaches past the current end (so no window
    is contained in another); with none, at ``end``. Returns int64 [n_chunks, 2]."""
    if n_tokens <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    bounds = np.append(starts[(starts > 0) & (starts < n_tokens)], n_tokens)

    def window_end(start: int) -> int:
        limit = start + chunk_size
        if limit >= n_tokens:
            return n_tokens
        fitting = bounds[(bounds > start) & (bounds <= limit)]
        return int(fitting[-1]) if len(fitting) else limit  # one word longer than chunk_size: cut it

    spans = []
    start, end = 0, window_end(0)
    while True:
        spans.append((start, end))
        if end == n_tokens:
            break
        candidates = bounds[(bounds >= end - chunk_overlap) & (bounds > start) & (bounds < end)]
        start = next((int(c) for c in candidates if window_end(int(c)) > end), end)
        end = window_end(start)
    return np.asarray(spans, dtype=np.int64)


def chunk_spans(
    text: str, offsets: np.ndarray, chunk_size: int, chunk_overlap: int, splitter: str, recursive: RecursiveSplitter
) -> np.ndarray:
    """Token spans of the chunks of ``text`` whose tokens have character ``offsets`` [n, 2] (the first n
    tokens of the text: a caller that cuts the text passes only the kept ones), by ``splitter`` (module docstring);
    ``recursive`` serves ``splitter="recursive"``. Returns int64 [n_chunks, 2]."""
    n_tokens = len(offsets)
    if splitter == "words":
        return word_windows(word_starts(text, offsets), n_tokens, chunk_size, chunk_overlap)
    if splitter == "recursive":
        # Split only the text the tokens cover: up to the end of the last token passed.
        visible = text[: int(offsets[-1, 1])]
        ranges = recursive.char_ranges(visible, chunk_size, chunk_overlap)
        spans = spans_from_char_ranges(offsets, ranges, chunk_size, chunk_overlap)
        if len(spans):
            return spans
    # splitter "tokens", or a recursive split that found no chunk
    return token_windows(n_tokens, chunk_size, chunk_overlap)


def spans_from_char_ranges(offsets: np.ndarray, char_ranges, chunk_size: int, chunk_overlap: int = 0) -> np.ndarray:
    """Token spans of the tokens that overlap each character range.

    Token offsets are non-decreasing, so both ends come from binary searches. A range that takes more
    than ``chunk_size`` tokens in context is split into windows of ``chunk_size`` (with
    ``chunk_overlap``), so no span is too long and no token is dropped.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    spans = []
    for char_start, char_end in char_ranges:
        first = int(np.searchsorted(ends, char_start, side="right"))
        last = int(np.searchsorted(starts, char_end, side="left"))
        if last - first > chunk_size:
            spans.extend(first + token_windows(last - first, chunk_size, chunk_overlap))
        elif last > first:
            spans.append((first, last))
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def char_spans(offsets: np.ndarray, token_spans: np.ndarray) -> np.ndarray:
    """Character span of each token span: from its first token's start to its last token's end."""
    if len(token_spans) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return np.stack([offsets[token_spans[:, 0], 0], offsets[token_spans[:, 1] - 1, 1]], axis=1)


class RecursiveSplitter:
    """semantic-text-splitter over the model tokenizer; one splitter per (size, overlap), the last
    ``max_cached`` kept."""

    def __init__(self, tokenizer, max_cached: int = 32):
        self._tokenizer = tokenizer
        self._splitters = {}
        self._max_cached = max_cached  # each splitter holds a copy of the tokenizer
        # Encoders are shared by threads: without the lock one thread's eviction can remove the entry
        # another has just checked for. Only the cache is locked, not the splitting.
        self._lock = threading.Lock()

    def _splitter(self, chunk_size: int, chunk_overlap: int):
        key = (chunk_size, chunk_overlap)
        with self._lock:
            if key not in self._splitters:
                try:
                    from semantic_text_splitter import TextSplitter
                except ImportError as exc:
                    raise ImportError(
                        "splitter='recursive' needs the semantic-text-splitter package: "
                        "pip install semantic-text-splitter"
                    ) from exc
                if len(self._splitters) >= self._max_cached:
                    self._splitters.pop(next(iter(self._splitters)))  # the oldest
                self._splitters[key] = TextSplitter.from_huggingface_tokenizer(
                    self._tokenizer, chunk_size, overlap=chunk_overlap
                )
            return self._splitters[key]

    def char_ranges(self, text: str, chunk_size: int, chunk_overlap: int) -> list[tuple[int, int]]:
        splitter = self._splitter(chunk_size, chunk_overlap)
        # chunk_indices gives character offsets (Python str indices) of each trimmed chunk.
        return [(start, start + len(chunk)) for start, chunk in splitter.chunk_indices(text)]
