"""The Encoder: everything that must be identical across backends.

Tokenization, prompts, chunk spans, batching, padding, the single-vector modes and normalisation live
here; a backend only runs the forward pass (``runtimes.backends``). So two backends that disagree can
only disagree in their forward.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np

from .backends import Backend
from .batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, pad_batch, plan_batches
from .chunking import RecursiveSplitter, char_spans, check_chunk_args, chunk_spans
from .config import SINGLE_VECTOR_TYPES, DeweyConfig
from .tokenization import DeweyTokenizer, TextTokens, check_texts
from .validation import require_bool, require_int
from .windows import check_window_overlap, plan_windows, split_spans

# Progress bars appear by themselves from this many batches on, when stderr is a terminal.
AUTO_PROGRESS_MIN_BATCHES = 8


class TruncationWarning(UserWarning):
    """Some input was longer than ``max_length`` and was cut."""


@dataclass
class ChunkedDocument:
    """Late-chunking result for one text.

    ``token_spans`` index the text's own tokens (no [CLS], no prompt); ``char_spans`` index the original
    string, so ``text[a:b] == texts[j]``; ``vector`` is what ``encode`` gives for the text, pooled in the
    same forward pass as the chunks. ``windows`` is 1 when the text fit in one row, else the number of
    overlapping windows it was run in (``runtimes.windows``); then ``vector_is_approximate`` is True when
    ``vector`` involves the CLS output (modes ``cls``, ``cls_add_mean``), which is a token-weighted mean
    of the windows' CLS outputs rather than one pass's. ``truncated_tokens`` is always 0: texts over the
    window are windowed, never cut (kept for the shape of older results).
    """

    vectors: np.ndarray  # float32 [n_chunks, D]
    token_spans: list[tuple[int, int]]
    char_spans: list[tuple[int, int]]
    texts: list[str]
    vector: np.ndarray  # float32 [D]: the whole text's single vector (``mode``), from the same pass
    truncated_tokens: int = 0
    windows: int = 1
    vector_is_approximate: bool = False


def one_spelling(name: str, value, alias: str, alias_value) -> tuple[str, object]:
    """An option with two keyword spellings, the sentence-transformers ``name`` and this library's older
    ``alias``: the spelling given and its value (None counts as not given). Both given raise TypeError:
    which one was meant cannot be known."""
    if value is not None and alias_value is not None:
        raise TypeError(f"{name} and {alias} are two spellings of one option: pass only one of them")
    return (alias, alias_value) if value is None else (name, value)


@dataclass
class _Job:
    """One call's input, checked, tokenized and cut to fit: the rows the backend runs."""

    texts: list[str]
    single: bool  # a single string was given: return one result, not a list of them
    tokens: list[TextTokens]
    kept: list[int]  # text tokens kept per text; the rest were cut by truncation
    prompt_ids: np.ndarray
    budget: int  # text tokens that fit in one row; a longer kept text runs in windows of this many
    text_start: int  # row position of every text's first token
    normalize: bool
    show_progress: bool | None


@dataclass
class _Pooled:
    """What ``Encoder._pool`` returns: per text, the CLS output, its span vectors and its window count."""

    cls: np.ndarray  # float64 [N, D]
    spans: list[np.ndarray]  # float64 [C_i, D]
    windows: list[int]  # 1: the text ran as one row


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.finfo(x.dtype).tiny)


def single_vectors(cls: np.ndarray, mean: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """The single-vector modes from the CLS and text-mean outputs [N, D]: ``cls``, ``mean`` or
    ``cls_add_mean`` = normalize(normalize(cls) + normalize(mean)); float32."""
    if mode == "cls":
        out = cls
    elif mode == "mean":
        out = mean
    else:
        out = l2_normalize(cls) + l2_normalize(mean)
    if normalize:
        out = l2_normalize(out)
    return out.astype(np.float32, copy=False)


class Encoder:
    """One encode API over any backend (see ``runtimes.load``)."""

    def __init__(self, config: DeweyConfig, tokenizer: DeweyTokenizer, backend: Backend):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self._recursive = RecursiveSplitter(tokenizer.tokenizer)

    @property
    def vector_size(self) -> int:
        return self.config.vector_size

    def __repr__(self) -> str:
        return f"Encoder(backend={self.backend!r}, vector_size={self.vector_size})"

    def encode(
        self,
        texts,
        mode: str | None = None,
        prompt: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        normalize: bool | None = None,
        show_progress: bool | None = None,
        truncate: bool = True,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        *,
        normalize_embeddings: bool | None = None,
        show_progress_bar: bool | None = None,
        prompt_name: str | None = None,
        window_overlap: int | None = None,
    ) -> np.ndarray:
        """One vector per text: float32 [N, D] (or [D] for a single string), in input order.

        texts: a string, or a sequence of strings (list, tuple, 1-d numpy array); a dict, a set or an
        iterator raises TypeError (no order to match the vectors to), and an empty text or one holding
        a lone surrogate raises ValueError naming its index.
        mode: ``cls``, ``mean`` (text tokens only) or ``cls_add_mean`` =
        normalize(normalize(cls) + normalize(mean)); default: the model's ``single_vector_type``.
        prompt_name: a prompt name of the model (``query``, ``passage``); prompt: such a name or a
        literal prompt string. normalize_embeddings (alias normalize): True (the default) or False;
        show_progress_bar (alias show_progress): True, False or None (automatic). Giving both spellings
        of one option raises TypeError.
        truncate: cut texts longer than ``max_length`` (default: the model's maximum) and warn with a
        ``TruncationWarning``. With False, a longer text is not cut: in mode ``mean`` it runs in
        overlapping windows (``window_overlap`` tokens, default ``runtimes.windows.default_window_overlap``),
        its vector the mean over every token's state from the window where it has the most context; modes
        that involve the CLS output (``cls``, ``cls_add_mean``) come from one pass only, so such a text
        raises ValueError.
        """
        mode = self._mode(mode)
        job = self._prepare(
            texts, max_length, truncate, prompt=prompt, prompt_name=prompt_name, normalize=normalize,
            normalize_embeddings=normalize_embeddings, show_progress=show_progress, show_progress_bar=show_progress_bar,
            windowed=not truncate and mode == "mean",
        )
        if job is None:
            return np.zeros((0, self.vector_size), dtype=np.float32)
        spans = [np.array([[0, n]], dtype=np.int64) for n in job.kept]
        pooled = self._pool(job, spans, batch_size, max_batch_tokens, window_overlap)
        out = single_vectors(pooled.cls, np.stack([m[0] for m in pooled.spans]), mode, job.normalize)
        return out[0] if job.single else out

    def encode_chunks(
        self,
        texts,
        chunk_size: int = 256,
        chunk_overlap: int = 64,
        splitter: str = "tokens",
        prompt: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        normalize: bool | None = None,
        show_progress: bool | None = None,
        truncate: bool = True,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        *,
        mode: str | None = None,
        normalize_embeddings: bool | None = None,
        show_progress_bar: bool | None = None,
        prompt_name: str | None = None,
        window_overlap: int | None = None,
    ) -> list[ChunkedDocument] | ChunkedDocument:
        """Late chunking: one pass over each whole text, one vector per chunk (the mean of its tokens).

        texts, the prompt and the switches as for ``encode``. chunk_size and chunk_overlap count tokens
        of the model's tokenizer; splitter is ``tokens`` (fixed windows on token ids), ``words``
        (windows ending at word boundaries) or ``recursive`` (paragraph, line, sentence, word
        boundaries); the spans come from ``runtimes.chunking.chunk_spans``. Each document also carries
        its single ``vector`` in ``mode`` (as for ``encode``), pooled from the same pass.

        A text longer than one row (``max_length``, default the model's maximum, minus [CLS], [SEP] and
        the prompt) is never cut: it runs in windows of that capacity overlapping by ``window_overlap``
        tokens (``runtimes.windows``); chunk spans are those of the whole text and each chunk vector is
        the mean of its tokens' states, every state from the window where that token has the most
        context. ``truncate`` has no effect here (kept so the keywords match ``encode``).
        """
        check_chunk_args(chunk_size, chunk_overlap, splitter)
        mode = self._mode(mode)
        job = self._prepare(
            texts, max_length, truncate, prompt=prompt, prompt_name=prompt_name, normalize=normalize,
            normalize_embeddings=normalize_embeddings, show_progress=show_progress, show_progress_bar=show_progress_bar,
            windowed=True,
        )
        if job is None:
            return []
        token_spans = [
            chunk_spans(text, tok.offsets, chunk_size, chunk_overlap, splitter, self._recursive)
            for text, tok in zip(job.texts, job.tokens)
        ]
        # Each text's chunk spans, then the whole text's span (the `mean` of its vector).
        text_spans = [np.concatenate([s, [[0, n]]]).astype(np.int64) for s, n in zip(token_spans, job.kept)]
        pooled = self._pool(job, text_spans, batch_size, max_batch_tokens, window_overlap)
        doc_vectors = single_vectors(pooled.cls, np.stack([v[-1] for v in pooled.spans]), mode, job.normalize)
        docs = []
        for i, (text, tok, spans) in enumerate(zip(job.texts, job.tokens, token_spans)):
            chars = char_spans(tok.offsets, spans)
            vectors = pooled.spans[i][:-1]
            if job.normalize:
                vectors = l2_normalize(vectors)
            windows = pooled.windows[i]
            docs.append(
                ChunkedDocument(
                    vectors=vectors.astype(np.float32, copy=False),
                    token_spans=[(int(a), int(b)) for a, b in spans],
                    char_spans=[(int(a), int(b)) for a, b in chars],
                    texts=[text[a:b] for a, b in chars],
                    vector=doc_vectors[i],
                    windows=windows,
                    vector_is_approximate=windows > 1 and mode != "mean",
                )
            )
        return docs[0] if job.single else docs

    # -- shared steps --------------------------------------------------------------------------

    def _mode(self, mode: str | None) -> str:
        mode = self.config.single_vector_type if mode is None else mode
        if mode not in SINGLE_VECTOR_TYPES:
            raise ValueError(f"mode must be one of {SINGLE_VECTOR_TYPES}, got {mode!r}")
        return mode

    def _prepare(
        self, texts, max_length, truncate, *, prompt, prompt_name, normalize, normalize_embeddings, show_progress,
        show_progress_bar, windowed: bool,
    ) -> _Job | None:
        """The common start of encode and encode_chunks: check the switches (each under either spelling)
        and the texts, tokenize, and truncate unless ``windowed`` (every token kept; a text over one row
        then runs in windows). None for an empty sequence of texts."""
        spelling, normalize = one_spelling("normalize_embeddings", normalize_embeddings, "normalize", normalize)
        normalize = True if normalize is None else require_bool(spelling, normalize)
        truncate = require_bool("truncate", truncate)
        spelling, show_progress = one_spelling("show_progress_bar", show_progress_bar, "show_progress", show_progress)
        show_progress = require_bool(spelling, show_progress, allow_none=True)
        prompt_spelling, prompt = one_spelling("prompt_name", prompt_name, "prompt", prompt)
        texts, single = check_texts(texts)
        if not texts:
            return None
        prompt_ids = self.tokenizer.prompt_ids(prompt, name_only=prompt_spelling == "prompt_name")
        max_length = self._max_length(max_length)
        budget = self.tokenizer.text_budget(prompt_ids, max_length)
        tokens = self.tokenizer.encode_texts(texts)
        if windowed:
            kept = [len(t.ids) for t in tokens]
        else:
            kept = self._apply_truncation(tokens, budget, truncate, max_length)
        return _Job(texts, single, tokens, kept, prompt_ids, budget, 1 + len(prompt_ids), normalize, show_progress)

    def _max_length(self, max_length: int | None) -> int:
        """The row length asked for, checked against the model's positions (None: all of them)."""
        limit = self.config.max_position_embeddings
        if max_length is None:
            return limit
        max_length = require_int("max_length", max_length, 1)
        if max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's maximum of {limit} positions")
        return max_length

    @staticmethod
    def _apply_truncation(tokens: list[TextTokens], budget: int, truncate: bool, max_length: int) -> list[int]:
        """Text tokens kept per text; warn about the cut ones, or raise when truncation is off."""
        kept = [min(len(t.ids), budget) for t in tokens]
        cut = [i for i, (t, n) in enumerate(zip(tokens, kept)) if n < len(t.ids)]
        if cut and not truncate:
            i = cut[0]
            raise ValueError(
                f"texts[{i}] has {len(tokens[i].ids)} tokens but only {budget} fit in max_length={max_length} "
                "(with [CLS], [SEP] and the prompt); "
                f"{len(cut)} text(s) are too long. Pass truncate=True to cut them, use mode='mean' (run in "
                "windows), or encode_chunks (chunk vectors over windows)"
            )
        if cut:
            dropped = sum(len(tokens[i].ids) - kept[i] for i in cut)
            warnings.warn(
                f"{len(cut)} of {len(tokens)} texts exceeded {budget} text tokens and were truncated "
                f"({dropped} tokens dropped; first: texts[{cut[0]}]). Pass truncate=False to raise instead.",
                TruncationWarning,
                stacklevel=4,
            )
        return kept

    def _pool(self, job: _Job, text_spans: list[np.ndarray], batch_size, max_batch_tokens, window_overlap) -> _Pooled:
        """The CLS output and the span vectors of every text (``text_spans[i]``: int64 [C_i, 2] ranges of
        its kept text tokens), float64, before normalisation.

        A text that fits in one row (``job.budget`` tokens) runs as that row. A longer one runs in the
        windows of ``runtimes.windows.plan_windows``; each window's outputs are added into running sums as
        its batch returns: a span's vector is the token-weighted sum of its pieces' outputs (exact for the
        affine head), the CLS output the token-weighted mean of the windows' (an approximation).
        """
        overlap = check_window_overlap(window_overlap, job.budget)
        # One entry per row: (text index, first and end text token, span pieces or None for a whole text).
        row_sources: list[tuple[int, int, int, tuple | None]] = []
        row_spans: list[np.ndarray] = []
        windows = []
        for i, (n, spans) in enumerate(zip(job.kept, text_spans)):
            if n <= job.budget:
                row_sources.append((i, 0, n, None))
                row_spans.append(spans + job.text_start)
                windows.append(1)
                continue
            plan = plan_windows(n, job.budget, overlap)
            windows.append(plan.n_windows)
            for (start, end), (kept_start, kept_end), (local, index, weight) in zip(
                plan.windows, plan.kept, split_spans(plan, spans)
            ):
                row_sources.append((i, int(start), int(end), (index, weight, (kept_end - kept_start) / n)))
                row_spans.append(local + job.text_start)
        cls = np.zeros((len(job.kept), self.vector_size), dtype=np.float64)
        sums = [np.zeros((len(s), self.vector_size), dtype=np.float64) for s in text_spans]

        def row(r: int) -> np.ndarray:
            i, start, end, _ = row_sources[r]
            return self.tokenizer.row(job.prompt_ids, job.tokens[i].ids[start:end])

        lengths = [end - start + job.text_start + 1 for _, start, end, _ in row_sources]
        for r, row_cls, row_span_vectors in self._forward_batches(row, lengths, row_spans, batch_size,
                                                                 max_batch_tokens, job.show_progress):
            i, _, _, pieces = row_sources[r]
            if pieces is None:
                cls[i], sums[i] = row_cls, row_span_vectors
                continue
            index, weight, cls_weight = pieces
            cls[i] += cls_weight * row_cls
            sums[i][index] += weight[:, None] * row_span_vectors  # a span has at most one piece per window
        for i, (spans, count) in enumerate(zip(text_spans, windows)):
            if count > 1:
                sums[i] /= (spans[:, 1] - spans[:, 0])[:, None]
        return _Pooled(cls, sums, windows)

    def _forward_batches(self, row, lengths, spans, batch_size, max_batch_tokens, show_progress):
        """Run rows (``row(r)`` builds row ``r``, of ``lengths[r]`` tokens) through the backend in
        length-sorted batches; yield ``(r, cls [D], span vectors [C_r, D])`` float64 per row as its batch
        returns, so no more than one batch of rows and outputs is held at a time."""
        batches = plan_batches(lengths, batch_size, max_batch_tokens)
        for batch in self._progress(batches, show_progress):
            ids, mask, bounds = pad_batch([row(r) for r in batch], [spans[r] for r in batch], self.config.pad_token_id)
            batch_cls, batch_spans = self.backend.forward(ids, mask, bounds)
            for j, r in enumerate(batch):
                yield (r, np.asarray(batch_cls[j], dtype=np.float64),
                       np.asarray(batch_spans[j, : len(spans[r])], dtype=np.float64))

    @staticmethod
    def _progress(batches, show_progress):
        if show_progress is None:
            show_progress = len(batches) >= AUTO_PROGRESS_MIN_BATCHES and sys.stderr.isatty()
        if not show_progress:
            return batches
        try:
            from tqdm.auto import tqdm
        except ImportError:
            warnings.warn("show_progress needs the tqdm package (pip install tqdm); continuing without a bar")
            return batches
        return tqdm(batches, desc="Batches", unit="batch")
