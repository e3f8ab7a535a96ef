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
    ``vector`` is a token-weighted mean of the windows' outputs rather than a pool over kept states
    (modes ``cls`` and ``cls_add_mean``, or a ``mean`` whose span rule is not the text's tokens), and
    ``chunks_are_approximate`` when the model's head is not affine (a tanh Dense layer), so a chunk that
    crosses a seam combines its pieces after the head. ``truncated_tokens`` is always 0: texts over the
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
    chunks_are_approximate: bool = False
    n_tokens: int = 0  # the text's tokens, every one of them embedded


def one_spelling(name: str, value, alias: str, alias_value) -> tuple[str, object]:
    """An option with two keyword spellings, the sentence-transformers ``name`` and this library's older
    ``alias``: the spelling given and its value (None counts as not given). Both given raise TypeError:
    which one was meant cannot be known."""
    if value is not None and alias_value is not None:
        raise TypeError(f"{name} and {alias} are two spellings of one option: pass only one of them")
    return (alias, alias_value) if value is None else (name, value)


@dataclass
class _Job:
    """One call's input, checked, tokenized and cut to fit; rows are built from it as they are run."""

    texts: list[str]
    single: bool  # a single string was given: return one result, not a list of them
    tokens: list[TextTokens]  # each text's own tokens (offsets into the text)
    kept: list[int]  # text tokens kept per text; the rest were cut by truncation
    prefixes: list[np.ndarray]  # int64 ids between [CLS] and each text: its prompt's tokens
    budgets: list[int]  # text tokens that fit in one row; a longer kept text runs in windows of this many
    normalize: bool
    show_progress: bool | None
    prompt_tokens: int = 0  # the prompt's tokens, tokenized alone

    def text_start(self, i: int) -> int:
        """Row position of text ``i``'s first token."""
        return 1 + len(self.prefixes[i])


@dataclass
class _Pooled:
    """What a ``RowPlan``'s rows pooled to, per text: the CLS output, the span vectors, the single-vector
    ``mean`` and the window count (1: the text ran as one row), float64, before normalisation."""

    cls: np.ndarray  # [N, D]
    spans: list[np.ndarray]  # [C_i, D]
    mean: np.ndarray  # [N, D]
    windows: list[int]


def prefixed_tokens(joined: list[TextTokens], prompt_chars: int) -> tuple[list[TextTokens], list[np.ndarray]]:
    """Split tokenizations of ``prompt + text`` (the "prefix" prompt style) at the prompt's end: the
    text's tokens (every token that ends inside the text, so a token straddling the boundary, such as
    " word" after a prompt ending in a space, is the text's first), with offsets into the text, and the
    prompt's ids as tokenized with each text."""
    tokens, prefixes = [], []
    for tok in joined:
        first = int(np.searchsorted(tok.offsets[:, 1], prompt_chars, side="right"))
        if first >= len(tok.ids):
            raise ValueError("a text produced no tokens after the prompt: there is nothing to embed")
        total = None if tok.total is None else tok.total - first
        tokens.append(TextTokens(tok.ids[first:], np.maximum(tok.offsets[first:] - prompt_chars, 0), total))
        prefixes.append(tok.ids[:first])
    return tokens, prefixes


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None, allowed: tuple[int, ...], normalize: bool):
    """Matryoshka truncation: the first ``dimensions`` values, re-normalised when ``normalize``; only
    the dimensions the model declares (``allowed``) and its full size are accepted."""
    if dimensions is None:
        return vectors
    full = vectors.shape[-1]
    dimensions = require_int("dimensions", dimensions, 1)
    if dimensions != full and dimensions not in allowed:
        raise ValueError(
            f"dimensions={dimensions} is not one this model was trained for "
            f"({', '.join(map(str, allowed)) or 'it declares no Matryoshka dimensions'}; full size {full})"
        )
    out = vectors[..., :dimensions]
    return l2_normalize(out).astype(np.float32, copy=False) if normalize else np.ascontiguousarray(out)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.finfo(x.dtype).tiny)


def single_vectors(cls: np.ndarray, mean: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """The single-vector modes from the CLS and mean outputs [N, D]: ``cls``, ``mean`` or
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

    def __init__(self, config: DeweyConfig, tokenizer: DeweyTokenizer, backend: Backend, source=None):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.source = source  # the runtimes.model_source.ModelSource a model folder was read as, if any
        self._recursive = RecursiveSplitter(tokenizer.tokenizer)

    @property
    def vector_size(self) -> int:
        return self.config.vector_size

    def __repr__(self) -> str:
        source = "" if self.source is None else f", source={self.source!r}"
        return f"Encoder(backend={self.backend!r}, vector_size={self.vector_size}{source})"

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
        dimensions: int | None = None,
        window_overlap: int | None = None,
    ) -> np.ndarray:
        """One vector per text: float32 [N, D] (or [D] for a single string), in input order.

        texts: a string, or a sequence of strings (list, tuple, 1-d numpy array); a dict, a set or an
        iterator raises TypeError (no order to match the vectors to), and an empty text or one holding
        a lone surrogate raises ValueError naming its index.
        mode: ``cls``, ``mean`` or ``cls_add_mean`` = normalize(normalize(cls) + normalize(mean));
        default: the model's ``single_vector_type``. ``mean`` averages the tokens of the model's span
        rule (``config.mean_tokens``): the text's own tokens for Dewey models, every attended token for
        sentence-transformers models (docs/models.md).
        prompt_name: a prompt name of the model (``query``, ``passage``); prompt: such a name or a
        literal prompt string; neither: the model's ``default_prompt_name``, if it has one (pass
        prompt="" for none). normalize_embeddings (alias normalize): True or False (default: the
        model's, True unless a sentence-transformers model has no Normalize module);
        show_progress_bar (alias show_progress): True, False or None (automatic). Giving both spellings
        of one option raises TypeError.
        truncate: cut texts longer than ``max_length`` (default: the model's maximum) and warn with a
        ``TruncationWarning``. With False, a longer text is not cut: in mode ``mean`` of a model whose
        mean is over the text's own tokens (``config.mean_tokens == "text"``, every Dewey model) it runs
        in overlapping windows (``window_overlap`` tokens, default
        ``runtimes.windows.default_window_overlap``), its vector the mean over every token's state from
        the window where it has the most context; other modes and span rules come from one pass only,
        so such a text raises ValueError. With truncation a text is tokenized only as far as its row
        holds (``runtimes.tokenization.DeweyTokenizer.token_pieces``), so a huge string costs what is
        embedded, not its length.
        dimensions: keep the first N values of each vector (Matryoshka), then normalise again; only the
        dimensions the model declares (``config.matryoshka_dimensions``) are accepted.
        """
        plan = self.plan_encode(
            texts, mode=mode, prompt=prompt, max_length=max_length, normalize=normalize, show_progress=show_progress,
            truncate=truncate, normalize_embeddings=normalize_embeddings, show_progress_bar=show_progress_bar,
            prompt_name=prompt_name, dimensions=dimensions, window_overlap=window_overlap,
        )
        return self.run(plan, batch_size, max_batch_tokens)

    def plan_encode(self, texts, mode=None, prompt=None, max_length=None, normalize=None, show_progress=None,
                    truncate=True, *, normalize_embeddings=None, show_progress_bar=None, prompt_name=None,
                    dimensions=None, window_overlap=None, count_cut=False) -> RowPlan:
        """``encode``'s rows, and how their outputs become its result, without running them: for a caller
        that batches rows of many calls together (``dewey-serve``). Run the rows (``plan.row(r)``,
        ``plan.spans[r]``) through ``backend.forward`` in any batches, ``plan.add`` each row's outputs, and
        ``plan.result()`` is what ``encode`` returns. Keywords as for ``encode``; ``count_cut``: count the
        tokens truncation cuts (``plan.cut``; tokenizing the rest of a long text piece by piece) where
        ``encode`` only knows that it cut."""
        mode = self._mode(mode)
        job = self._prepare(
            texts, max_length, truncate, prompt=prompt, prompt_name=prompt_name, normalize=normalize,
            normalize_embeddings=normalize_embeddings, show_progress=show_progress, show_progress_bar=show_progress_bar,
            windowed=not truncate and mode == "mean" and self.config.mean_tokens == "text", count_cut=count_cut,
        )
        if job is None:
            return RowPlan(self, None, [], window_overlap, lambda pooled: np.zeros((0, self.vector_size), np.float32))

        def finish(pooled: _Pooled):
            out = single_vectors(pooled.cls, pooled.mean, mode, job.normalize)
            out = truncate_dimensions(out, dimensions, self.config.matryoshka_dimensions, job.normalize)
            return out[0] if job.single else out

        no_spans = [np.zeros((0, 2), dtype=np.int64)] * len(job.texts)
        return RowPlan(self, job, no_spans, window_overlap, finish)

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
        dimensions: int | None = None,
        window_overlap: int | None = None,
    ) -> list[ChunkedDocument] | ChunkedDocument:
        """Late chunking: one pass over each whole text, one vector per chunk (the mean of its tokens).

        texts, the prompt and the switches as for ``encode``. chunk_size and chunk_overlap count tokens
        of the model's tokenizer; splitter is ``tokens`` (fixed windows on token ids), ``words``
        (windows ending at word boundaries) or ``recursive`` (paragraph, line, sentence, word
        boundaries); the spans come from ``runtimes.chunking.chunk_spans``. Each document also carries
        its single ``vector`` in ``mode`` (as for ``encode``), pooled from the same pass. Chunks are
        always means of their own text tokens, whatever the model's span rule for ``mean``.

        A text longer than one row (``max_length``, default the model's, minus [CLS], [SEP] and the
        prompt) is never cut: it runs in windows of that capacity overlapping by ``window_overlap``
        tokens (``runtimes.windows``); chunk spans are those of the whole text and each chunk vector is
        the mean of its tokens' states, every state from the window where that token has the most
        context. ``truncate`` has no effect here (kept so the keywords match ``encode``).
        """
        plan = self.plan_chunks(
            texts, chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter=splitter, prompt=prompt,
            max_length=max_length, normalize=normalize, show_progress=show_progress, truncate=truncate, mode=mode,
            normalize_embeddings=normalize_embeddings, show_progress_bar=show_progress_bar, prompt_name=prompt_name,
            dimensions=dimensions, window_overlap=window_overlap,
        )
        return self.run(plan, batch_size, max_batch_tokens)

    def plan_chunks(self, texts, chunk_size=256, chunk_overlap=64, splitter="tokens", prompt=None, max_length=None,
                    normalize=None, show_progress=None, truncate=True, *, mode=None, normalize_embeddings=None,
                    show_progress_bar=None, prompt_name=None, dimensions=None, window_overlap=None) -> RowPlan:
        """``encode_chunks``' rows and how their outputs become its result, as ``plan_encode`` is for
        ``encode``; ``plan.result()`` is what ``encode_chunks`` returns."""
        check_chunk_args(chunk_size, chunk_overlap, splitter)
        mode = self._mode(mode)
        job = self._prepare(
            texts, max_length, truncate, prompt=prompt, prompt_name=prompt_name, normalize=normalize,
            normalize_embeddings=normalize_embeddings, show_progress=show_progress, show_progress_bar=show_progress_bar,
            windowed=True,
        )
        if job is None:
            return RowPlan(self, None, [], window_overlap, lambda pooled: [])
        token_spans = [
            chunk_spans(text, tok.offsets, chunk_size, chunk_overlap, splitter, self._recursive)
            for text, tok in zip(job.texts, job.tokens)
        ]

        def finish(pooled: _Pooled):
            doc_vectors = single_vectors(pooled.cls, pooled.mean, mode, job.normalize)
            doc_vectors = truncate_dimensions(doc_vectors, dimensions, self.config.matryoshka_dimensions, job.normalize)
            docs = []
            for i, (text, tok, spans) in enumerate(zip(job.texts, job.tokens, token_spans)):
                chars = char_spans(tok.offsets, spans)
                vectors = pooled.spans[i]
                if job.normalize:
                    vectors = l2_normalize(vectors)
                vectors = truncate_dimensions(vectors, dimensions, self.config.matryoshka_dimensions, job.normalize)
                windows = pooled.windows[i]
                docs.append(
                    ChunkedDocument(
                        vectors=vectors.astype(np.float32, copy=False),
                        token_spans=[(int(a), int(b)) for a, b in spans],
                        char_spans=[(int(a), int(b)) for a, b in chars],
                        texts=[text[a:b] for a, b in chars],
                        vector=doc_vectors[i],
                        windows=windows,
                        vector_is_approximate=windows > 1 and (mode != "mean" or self.config.mean_tokens != "text"),
                        chunks_are_approximate=windows > 1 and not self.config.head_affine,
                        n_tokens=job.kept[i],
                    )
                )
            return docs[0] if job.single else docs

        return RowPlan(self, job, token_spans, window_overlap, finish)

    def run(self, plan: RowPlan, batch_size: int = DEFAULT_BATCH_SIZE,
            max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        """Run a plan's rows through the backend in length-sorted batches (``runtimes.batching``), adding
        each batch's outputs as it returns (so at most one batch of rows and outputs is held at a time);
        returns ``plan.result()``."""
        batches = plan_batches(plan.lengths, batch_size, max_batch_tokens) if plan.lengths else []
        for batch in self._progress(batches, plan.show_progress):
            ids, mask, bounds = pad_batch([plan.row(r) for r in batch], [plan.spans[r] for r in batch],
                                          self.config.pad_token_id)
            batch_cls, batch_spans = self.backend.forward(ids, mask, bounds)
            for j, r in enumerate(batch):
                plan.add(r, batch_cls[j], batch_spans[j, : len(plan.spans[r])])
        return plan.result()

    # -- shared steps --------------------------------------------------------------------------

    def _mean_span(self, job: _Job, i: int, row_length: int, start: int, end: int) -> tuple[int, int]:
        """The row span the single-vector ``mean`` averages in a row of ``row_length`` tokens that holds
        text ``i``'s tokens ``start..end``."""
        return self.mean_span(row_length, job.text_start(i), end - start, job.prompt_tokens)

    def mean_span(self, row_length: int, text_start: int, text_tokens: int, prompt_tokens: int = 0) -> tuple[int, int]:
        """The row span the single-vector ``mean`` averages, by the model's span rule
        (runtimes.config.MEAN_TOKEN_RULES), in a row of ``row_length`` tokens whose ``text_tokens`` text
        tokens start at ``text_start`` after a prompt of ``prompt_tokens`` tokens (tokenized alone)."""
        rule = self.config.mean_tokens
        if rule == "attended":
            return 0, row_length
        if rule == "last":
            return row_length - 1, row_length
        if rule == "after_prompt":
            # sentence-transformers masks [CLS] and the prompt tokenized alone, only when there is a prompt.
            return (1 + prompt_tokens if prompt_tokens else 0), row_length
        return text_start, text_start + text_tokens

    def _mode(self, mode: str | None) -> str:
        mode = self.config.single_vector_type if mode is None else mode
        if mode not in SINGLE_VECTOR_TYPES:
            raise ValueError(f"mode must be one of {SINGLE_VECTOR_TYPES}, got {mode!r}")
        return mode

    def _prepare(
        self, texts, max_length, truncate, *, prompt, prompt_name, normalize, normalize_embeddings, show_progress,
        show_progress_bar, windowed: bool, count_cut: bool = False,
    ) -> _Job | None:
        """The common start of encode and encode_chunks: check the switches (each under either spelling)
        and the texts, tokenize, and truncate unless ``windowed`` (every token kept; a text over one row
        then runs in windows). None for an empty sequence of texts."""
        spelling, normalize = one_spelling("normalize_embeddings", normalize_embeddings, "normalize", normalize)
        normalize = self.config.normalize_embeddings if normalize is None else require_bool(spelling, normalize)
        truncate = require_bool("truncate", truncate)
        spelling, show_progress = one_spelling("show_progress_bar", show_progress_bar, "show_progress", show_progress)
        show_progress = require_bool(spelling, show_progress, allow_none=True)
        prompt_spelling, prompt = one_spelling("prompt_name", prompt_name, "prompt", prompt)
        texts, single = check_texts(texts)
        if not texts:
            return None
        if prompt is None and self.config.default_prompt_name is not None:
            prompt, prompt_spelling = self.config.default_prompt_name, "prompt_name"
        prompt_ids = self.tokenizer.prompt_ids(prompt, name_only=prompt_spelling == "prompt_name")
        max_length = self._max_length(max_length)
        # Tokenized only as far as a row holds unless every token is used (windowed): the tokens past the
        # room are counted only where a result reports them (truncate=False's error), never kept.
        count = count_cut or not truncate
        if self.config.prompt_style == "prefix" and len(prompt_ids):
            # The prompt string joins the text before tokenization, as sentence-transformers does.
            prompt_text = self.tokenizer.resolve_prompt(prompt, name_only=prompt_spelling == "prompt_name")
            room = self.tokenizer.text_budget(prompt_ids[:0], max_length)
            joined = self.tokenizer.encode_texts([prompt_text + text for text in texts],
                                                 limit=None if windowed else room, count=count)
            tokens, prefixes = prefixed_tokens(joined, len(prompt_text))
            budgets = [room - len(prefix) for prefix in prefixes]
            if min(budgets) < 1:
                raise ValueError(
                    f"max_length={max_length} leaves no room for text after [CLS], [SEP] and a prompt of "
                    f"{len(prefixes[budgets.index(min(budgets))])} tokens"
                )
        else:
            budget = self.tokenizer.text_budget(prompt_ids, max_length)
            tokens = self.tokenizer.encode_texts(texts, limit=None if windowed else budget, count=count)
            prefixes, budgets = [prompt_ids] * len(texts), [budget] * len(texts)
        if windowed:
            kept = [len(t.ids) for t in tokens]
        else:
            kept = self._apply_truncation(tokens, budgets, truncate, max_length)
        return _Job(texts, single, tokens, kept, prefixes, budgets, normalize, show_progress, len(prompt_ids))

    def _max_length(self, max_length: int | None) -> int:
        """The row length asked for, checked against the model's positions (None: the model's
        max_seq_length, else all its positions)."""
        limit = self.config.max_position_embeddings
        if max_length is None:
            return self.config.max_seq_length or limit
        max_length = require_int("max_length", max_length, 1)
        if max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's maximum of {limit} positions")
        return max_length

    @staticmethod
    def _apply_truncation(tokens: list[TextTokens], budgets: list[int], truncate: bool, max_length: int) -> list[int]:
        """Text tokens kept per text; warn about the cut ones, or raise when truncation is off. ``tokens``
        were tokenized up to the budget (``DeweyTokenizer.encode_texts``' limit): ``cut`` and ``total``
        say whether there are more and, where counted, how many."""
        kept = [min(len(t.ids), budget) for t, budget in zip(tokens, budgets)]
        cut = [i for i, (t, n) in enumerate(zip(tokens, kept)) if t.cut or n < len(t.ids)]
        if cut and not truncate:
            i = cut[0]
            raise ValueError(
                f"texts[{i}] has {tokens[i].total} tokens but only {budgets[i]} fit in max_length={max_length} "
                "(with [CLS], [SEP] and the prompt); "
                f"{len(cut)} text(s) are too long. Pass truncate=True to cut them, or use encode_chunks (chunk "
                "vectors over windows), or mode='mean' of a model whose mean is over the text (run in windows)"
            )
        if cut:
            if all(tokens[i].total is not None for i in cut):
                dropped = f"{sum(tokens[i].total - kept[i] for i in cut)} tokens dropped"
            else:  # a long text is tokenized only as far as it is kept
                dropped = "the tokens past the limit of texts longer than one tokenizer piece are not counted"
            warnings.warn(
                f"{len(cut)} of {len(tokens)} texts exceeded {budgets[cut[0]]} text tokens and were truncated "
                f"({dropped}; first: texts[{cut[0]}]). Pass truncate=False to raise instead.",
                TruncationWarning,
                stacklevel=4,
            )
        return kept

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


class RowPlan:
    """The rows of one ``encode`` / ``encode_chunks`` call and the running sums their outputs go into.

    A text that fits in one row (``job.budgets[i]`` tokens) runs as that row. A longer one runs in the
    windows of ``runtimes.windows.plan_windows``; each window's outputs are added into running sums as
    they come. A span's vector is the token-weighted sum of its pieces' outputs: exact when the head is
    affine (``config.head_affine``), and so is ``mean`` over the text's tokens (the span rule "text").
    The CLS output, and a ``mean`` by another span rule, are the token-weighted means of the windows'
    (an approximation). ``lengths[r]`` and ``spans[r]`` (int64 [C_r, 2] row positions) describe row
    ``r``; ``row(r)`` builds it; ``cut[i]`` counts text ``i``'s tokens cut by truncation (None: cut, but
    not counted) and ``tokens[i]`` holds its text tokens (ids, offsets into the text).
    """

    def __init__(self, encoder: Encoder, job: _Job | None, text_spans: list[np.ndarray], window_overlap, finish):
        """``job`` None: a call with no texts, no rows, and ``finish(None)`` as its result."""
        self._encoder, self._finish, self._result = encoder, finish, None
        self._text_rule = text_rule = encoder.config.mean_tokens == "text"
        self.show_progress = None if job is None else job.show_progress
        job = job or _Job([], False, [], [], [], [], True, None)
        self._job = job
        self.tokens = job.tokens
        # Tokens truncation cut per text (None: some, not counted: a long text tokenized only as far as kept).
        self.cut = [(t.total - n if t.total is not None else None) if t.cut or n < len(t.ids) else 0
                    for t, n in zip(job.tokens, job.kept)]
        # One entry per row: (text index, first and end text token, pieces or None for a whole text).
        self._sources: list[tuple[int, int, int, tuple | None]] = []
        self.spans: list[np.ndarray] = []
        self.windows: list[int] = []
        for i, (n, spans, budget) in enumerate(zip(job.kept, text_spans, job.budgets)):
            start_in_row = job.text_start(i)
            if n <= budget:
                mean_span = encoder._mean_span(job, i, start_in_row + n + 1, 0, n)
                self._sources.append((i, 0, n, None))
                self.spans.append(np.concatenate([spans + start_in_row, [mean_span]]).astype(np.int64))
                self.windows.append(1)
                continue
            plan = plan_windows(n, budget, check_window_overlap(window_overlap, budget))
            self.windows.append(plan.n_windows)
            # With the text rule, the whole text is one more span, pooled exactly like a chunk.
            pooled_spans = np.concatenate([spans, [[0, n]]]) if text_rule else spans
            for (start, end), (kept_start, kept_end), (local, index, weight) in zip(
                plan.windows, plan.kept, split_spans(plan, pooled_spans)
            ):
                local = local + start_in_row
                if not text_rule:
                    local = np.concatenate([local, [encoder._mean_span(job, i, start_in_row + end - start + 1,
                                                                       start, end)]])
                self._sources.append((i, int(start), int(end), (index, weight, (kept_end - kept_start) / n)))
                self.spans.append(local.astype(np.int64))
        self.lengths = [end - start + job.text_start(i) + 1 for i, start, end, _ in self._sources]
        size = encoder.vector_size
        self._cls = np.zeros((len(job.kept), size), dtype=np.float64)
        self._mean = np.zeros((len(job.kept), size), dtype=np.float64)
        self._sums = [np.zeros((len(s) + (text_rule and count > 1), size), dtype=np.float64)
                      for s, count in zip(text_spans, self.windows)]
        self._text_spans = text_spans

    def row(self, r: int) -> np.ndarray:
        """Row ``r``: int64 ``[CLS] prompt text-tokens [SEP]``."""
        i, start, end, _ = self._sources[r]
        return self._encoder.tokenizer.row(self._job.prefixes[i], self._job.tokens[i].ids[start:end])

    def add(self, r: int, cls: np.ndarray, span_vectors: np.ndarray) -> None:
        """Row ``r``'s outputs: its CLS output [D] and its spans' vectors [len(spans[r]), D]."""
        cls = np.asarray(cls, dtype=np.float64)
        span_vectors = np.asarray(span_vectors, dtype=np.float64)
        i, _, _, pieces = self._sources[r]
        if pieces is None:
            self._cls[i], self._sums[i], self._mean[i] = cls, span_vectors[:-1], span_vectors[-1]
            return
        index, weight, window_weight = pieces
        self._cls[i] += window_weight * cls
        if not self._text_rule:
            self._mean[i] += window_weight * span_vectors[-1]
            span_vectors = span_vectors[:-1]
        self._sums[i][index] += weight[:, None] * span_vectors  # a span has at most one piece per window

    def result(self):
        """What ``encode`` / ``encode_chunks`` return, once every row's outputs were added."""
        if self._result is None:
            if not self._job.texts:
                self._result = (self._finish(None),)
            else:
                for i, (n, count) in enumerate(zip(self._job.kept, self.windows)):
                    if count > 1:
                        spans = self._text_spans[i]
                        spans = np.concatenate([spans, [[0, n]]]) if self._text_rule else spans
                        self._sums[i] /= (spans[:, 1] - spans[:, 0])[:, None]
                        if self._text_rule:
                            self._sums[i], self._mean[i] = self._sums[i][:-1], self._sums[i][-1]
                self._result = (self._finish(_Pooled(self._cls, self._sums, self._mean, self.windows)),)
        return self._result[0]
