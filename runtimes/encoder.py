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

# Progress bars appear by themselves from this many batches on, when stderr is a terminal.
AUTO_PROGRESS_MIN_BATCHES = 8


class TruncationWarning(UserWarning):
    """Some input was longer than ``max_length`` and was cut."""


@dataclass
class ChunkedDocument:
    """Late-chunking result for one text.

    ``token_spans`` index the text's own tokens (no [CLS], no prompt); ``char_spans`` index the original
    string, so ``text[a:b] == texts[j]``; ``vector`` is what ``encode`` gives for the text, pooled in the
    same forward pass as the chunks; ``truncated_tokens`` counts text tokens cut by ``max_length``.
    """

    vectors: np.ndarray  # float32 [n_chunks, D]
    token_spans: list[tuple[int, int]]
    char_spans: list[tuple[int, int]]
    texts: list[str]
    vector: np.ndarray  # float32 [D]: the whole text's single vector (``mode``), from the same pass
    truncated_tokens: int = 0


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
    rows: list[np.ndarray]  # int64: [CLS] prompt text[:kept] [SEP]
    text_start: int  # row position of every text's first token
    normalize: bool
    show_progress: bool | None


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
        ``TruncationWarning``; with False such a text raises ValueError instead. A text is tokenized only
        as far as its row holds (runtimes.tokenization.DeweyTokenizer.token_pieces), so a huge string
        costs what is embedded, not its length.
        """
        mode = self._mode(mode)
        job = self._prepare(
            texts, max_length, truncate, prompt=prompt, prompt_name=prompt_name, normalize=normalize,
            normalize_embeddings=normalize_embeddings, show_progress=show_progress, show_progress_bar=show_progress_bar,
        )
        if job is None:
            return np.zeros((0, self.vector_size), dtype=np.float32)
        spans = [np.array([[job.text_start, job.text_start + n]], dtype=np.int64) for n in job.kept]
        cls, means = self._forward_rows(job.rows, spans, batch_size, max_batch_tokens, job.show_progress)
        out = single_vectors(cls, np.stack([m[0] for m in means]), mode, job.normalize)
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
    ) -> list[ChunkedDocument] | ChunkedDocument:
        """Late chunking: one pass over each whole text, one vector per chunk (the mean of its tokens).

        texts, the prompt and the switches as for ``encode``. chunk_size and chunk_overlap count tokens
        of the model's tokenizer; splitter is ``tokens`` (fixed windows on token ids), ``words``
        (windows ending at word boundaries) or ``recursive`` (paragraph, line, sentence, word
        boundaries); the spans come from ``runtimes.chunking.chunk_spans``. Each document also carries
        its single ``vector`` in ``mode`` (as for ``encode``), pooled from the same pass. The tokens past
        ``max_length`` are tokenized piece by piece only to be counted (``truncated_tokens``): memory
        follows what is embedded, time the length of the text.
        """
        check_chunk_args(chunk_size, chunk_overlap, splitter)
        mode = self._mode(mode)
        job = self._prepare(
            texts, max_length, truncate, prompt=prompt, prompt_name=prompt_name, normalize=normalize,
            normalize_embeddings=normalize_embeddings, show_progress=show_progress, show_progress_bar=show_progress_bar,
            count_cut=True,
        )
        if job is None:
            return []
        token_spans = [
            chunk_spans(text, tok.offsets[:n], chunk_size, chunk_overlap, splitter, self._recursive)
            for text, tok, n in zip(job.texts, job.tokens, job.kept)
        ]
        # One pass per text: its chunk spans, then the whole text's span (the `mean` of its vector).
        row_spans = [
            np.concatenate([s + job.text_start, [[job.text_start, job.text_start + n]]]).astype(np.int64)
            for s, n in zip(token_spans, job.kept)
        ]
        cls, span_vectors = self._forward_rows(job.rows, row_spans, batch_size, max_batch_tokens, job.show_progress)
        doc_vectors = single_vectors(cls, np.stack([v[-1] for v in span_vectors]), mode, job.normalize)
        docs = []
        for i, (text, tok, n, spans) in enumerate(zip(job.texts, job.tokens, job.kept, token_spans)):
            chars = char_spans(tok.offsets, spans)
            vectors = span_vectors[i][:-1]
            if job.normalize:
                vectors = l2_normalize(vectors)
            docs.append(
                ChunkedDocument(
                    vectors=vectors.astype(np.float32, copy=False),
                    token_spans=[(int(a), int(b)) for a, b in spans],
                    char_spans=[(int(a), int(b)) for a, b in chars],
                    texts=[text[a:b] for a, b in chars],
                    vector=doc_vectors[i],
                    truncated_tokens=tok.total - n,
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
        show_progress_bar, count_cut=None,
    ) -> _Job | None:
        """The common start of encode and encode_chunks: check the switches (each under either spelling)
        and the texts, tokenize, truncate and lay out the rows. None for an empty sequence of texts."""
        spelling, normalize = one_spelling("normalize_embeddings", normalize_embeddings, "normalize", normalize)
        normalize = True if normalize is None else require_bool(spelling, normalize)
        truncate = require_bool("truncate", truncate)
        count_cut = not truncate if count_cut is None else count_cut
        spelling, show_progress = one_spelling("show_progress_bar", show_progress_bar, "show_progress", show_progress)
        show_progress = require_bool(spelling, show_progress, allow_none=True)
        prompt_spelling, prompt = one_spelling("prompt_name", prompt_name, "prompt", prompt)
        texts, single = check_texts(texts)
        if not texts:
            return None
        prompt_ids = self.tokenizer.prompt_ids(prompt, name_only=prompt_spelling == "prompt_name")
        max_length = self._max_length(max_length)
        budget = self.tokenizer.text_budget(prompt_ids, max_length)
        # Tokenized only as far as a row holds: the tokens past the budget are counted where a result
        # reports them (encode_chunks' truncated_tokens, truncate=False's error), never kept.
        tokens = self.tokenizer.encode_texts(texts, limit=budget, count=count_cut)
        kept = self._apply_truncation(tokens, budget, truncate, max_length)
        rows = [self.tokenizer.row(prompt_ids, t.ids[:n]) for t, n in zip(tokens, kept)]
        return _Job(texts, single, tokens, kept, rows, 1 + len(prompt_ids), normalize, show_progress)

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
        kept = [len(t.ids) for t in tokens]
        cut = [i for i, t in enumerate(tokens) if t.cut]
        if cut and not truncate:
            i = cut[0]
            raise ValueError(
                f"texts[{i}] has {tokens[i].total} tokens but only {budget} fit in max_length={max_length} "
                "(with [CLS], [SEP] and the prompt); "
                f"{len(cut)} text(s) are too long. Pass truncate=True to cut them, or split them with encode_chunks"
            )
        if cut:
            if all(tokens[i].total is not None for i in cut):
                dropped = f"{sum(tokens[i].total - kept[i] for i in cut)} tokens dropped"
            else:  # a long text is tokenized only as far as it is kept
                dropped = "the tokens past the limit of texts longer than one tokenizer piece are not counted"
            warnings.warn(
                f"{len(cut)} of {len(tokens)} texts exceeded {budget} text tokens and were truncated "
                f"({dropped}; first: texts[{cut[0]}]). Pass truncate=False to raise instead.",
                TruncationWarning,
                stacklevel=4,
            )
        return kept

    def _forward_rows(self, rows, spans, batch_size, max_batch_tokens, show_progress):
        """Run rows through the backend in length-sorted batches; results in input order:
        cls float64 [N, D] and a list of span vectors [C_i, D]."""
        batches = plan_batches([len(r) for r in rows], batch_size, max_batch_tokens)
        cls = np.zeros((len(rows), self.vector_size), dtype=np.float64)
        span_vectors: list = [None] * len(rows)
        for batch in self._progress(batches, show_progress):
            ids, mask, bounds = pad_batch(
                [rows[i] for i in batch], [spans[i] for i in batch], self.config.pad_token_id
            )
            batch_cls, batch_spans = self.backend.forward(ids, mask, bounds)
            for j, i in enumerate(batch):
                cls[i] = batch_cls[j]
                span_vectors[i] = np.asarray(batch_spans[j, : len(spans[i])], dtype=np.float64)
        return cls, span_vectors

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
