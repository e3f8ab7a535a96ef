"""The served model: requests' inputs turned into the Encoder's rows and spans, one batch's forward, and
the vectors made from its outputs.

The server batches rows from many requests together, so it cannot hand each request to
``Encoder.encode`` (one call, one batch plan). It builds the same rows from the same parts the Encoder
uses (``DeweyTokenizer.prompt_ids`` / ``encode_texts`` / ``text_budget`` / ``row``,
``runtimes.chunking.chunk_spans``, ``runtimes.batching.pad_batch``, ``runtimes.encoder.single_vectors``)
and pools in the same order and precision (backend float32, float64 pooling, float32 out), so a served
vector equals the in-process ``encode`` / ``encode_chunks`` one up to the padding of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.batching import pad_batch
from runtimes.chunking import RecursiveSplitter, char_spans, check_chunk_args, chunk_spans
from runtimes.config import SINGLE_VECTOR_TYPES
from runtimes.encoder import Encoder, l2_normalize, single_vectors
from runtimes.export_format import MANIFEST_FILE
from runtimes.precision import precision_name
from runtimes.tokenization import SPECIAL_TOKENS_PER_ROW, TextTokens, check_encodable

from .errors import InputError

# The warm-up runs one row this short beside the longest one: the torch backend takes another attention
# path below 512 tokens (runtimes.attention), and a first short request should not pay for its set-up.
WARMUP_SHORT_TOKENS = 32


@dataclass
class Rows:
    """A request's inputs as model rows: ``[CLS] prompt text[:kept] [SEP]``."""

    rows: list[np.ndarray]
    kept: list[int]  # text tokens kept per input
    cut: list[int]  # text tokens cut per input by truncation
    text_start: int  # row position of each input's first text token
    tokens: list[TextTokens] | None  # the texts' tokens (None for token-id inputs)

    @property
    def row_tokens(self) -> int:
        return sum(len(r) for r in self.rows)


class ServedModel:
    """An Encoder with what the server needs around it: its name, source folder and limits."""

    def __init__(self, encoder: Encoder, name: str, source: Path, backend: str):
        self.encoder = encoder
        self.config = encoder.config
        self.tokenizer = encoder.tokenizer
        self.name = name
        self.source = Path(source)
        self.backend_name = backend
        self._recursive = RecursiveSplitter(self.tokenizer.tokenizer)

    # -- checks -----------------------------------------------------------------------------------

    def mode(self, mode: str | None) -> str:
        mode = self.config.single_vector_type if mode is None else mode
        if mode not in SINGLE_VECTOR_TYPES:
            raise InputError(f"mode must be one of {', '.join(SINGLE_VECTOR_TYPES)}, got {mode!r}", "mode")
        return mode

    def prompt_ids(self, prompt: str | None) -> np.ndarray:
        """A prompt by name only (``query``, ``passage``, or another the model's config declares)."""
        try:
            return self.tokenizer.prompt_ids(prompt, name_only=True)
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc), "prompt") from None

    # -- rows -------------------------------------------------------------------------------------

    def text_rows(self, texts: list[str], prompt_ids: np.ndarray, max_tokens: int, truncate: bool,
                  param: str = "input") -> Rows:
        for i, text in enumerate(texts):
            if not text.strip():
                raise InputError(f"{param}[{i}] is empty or only whitespace: there is nothing to embed", param)
            try:
                check_encodable(f"{param}[{i}]", text)
            except ValueError as exc:
                raise InputError(str(exc), param) from None
        try:
            tokens = self.tokenizer.encode_texts(texts)
        except ValueError as exc:  # a text of only characters the tokenizer drops
            raise InputError(str(exc).replace("texts[", f"{param}["), param) from None
        return self._fit([t.ids for t in tokens], prompt_ids, max_tokens, truncate, tokens, param)

    def id_rows(self, id_lists: list[list[int]], prompt_ids: np.ndarray, max_tokens: int, truncate: bool) -> Rows:
        vocab = self.config.vocab_size
        arrays = []
        for i, ids in enumerate(id_lists):
            if not ids:
                raise InputError(f"input[{i}] is an empty list of token ids", "input")
            array = np.asarray(ids, dtype=np.int64)
            bad = np.flatnonzero((array < 0) | (array >= vocab))
            if len(bad):
                raise InputError(f"input[{i}][{bad[0]}] = {ids[bad[0]]} is not a token id of this model "
                                 f"(0 .. {vocab - 1})", "input")
            arrays.append(array)
        return self._fit(arrays, prompt_ids, max_tokens, truncate, None, "input")

    def _fit(self, id_arrays, prompt_ids, max_tokens: int, truncate: bool, tokens, param: str) -> Rows:
        """Rows of at most ``max_tokens``: longer inputs cut when ``truncate``, else refused, naming the
        first one and the counts."""
        try:
            budget = self.tokenizer.text_budget(prompt_ids, max_tokens)
        except ValueError as exc:
            raise InputError(str(exc), "prompt") from None
        kept = [min(len(ids), budget) for ids in id_arrays]
        cut = [len(ids) - n for ids, n in zip(id_arrays, kept)]
        over = [i for i, c in enumerate(cut) if c]
        if over and not truncate:
            i = over[0]
            length = len(id_arrays[i]) + SPECIAL_TOKENS_PER_ROW + len(prompt_ids)
            raise InputError(
                f"{param}[{i}] is {length} tokens long ([CLS], [SEP] and the prompt included), over this "
                f"server's limit of {max_tokens} tokens per input; {len(over)} input(s) are too long. Send "
                "\"truncate\": true to cut them, or split long texts with /v1/embeddings/chunks", param,
                code="input_too_long")
        rows = [self.tokenizer.row(prompt_ids, ids[:n]) for ids, n in zip(id_arrays, kept)]
        return Rows(rows, kept, cut, 1 + len(prompt_ids), tokens)

    def pooled_spans(self, rows: Rows) -> list[np.ndarray]:
        """Each row's text span: the ``mean`` of its single vector."""
        return [np.array([[rows.text_start, rows.text_start + n]], dtype=np.int64) for n in rows.kept]

    def chunk_token_spans(self, texts: list[str], rows: Rows, chunk_size: int, chunk_overlap: int,
                          splitter: str) -> list[np.ndarray]:
        """Each text's chunk spans (its own tokens, as ``Encoder.encode_chunks``)."""
        return [chunk_spans(text, tok.offsets[:n], chunk_size, chunk_overlap, splitter, self._recursive)
                for text, tok, n in zip(texts, rows.tokens, rows.kept)]

    @staticmethod
    def check_chunk_args(chunk_size, chunk_overlap, splitter: str) -> None:
        try:
            check_chunk_args(chunk_size, chunk_overlap, splitter)
        except (TypeError, ValueError) as exc:
            param = next((p for p in ("chunk_overlap", "chunk_size", "splitter") if p in str(exc)), None)
            raise InputError(str(exc), param) from None

    # -- forward and vectors ----------------------------------------------------------------------

    def forward(self, rows: list[np.ndarray], spans: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One batch through the backend: cls float64 [B, D] and each row's span vectors float64 [C_i, D]."""
        ids, mask, bounds = pad_batch(rows, spans, self.config.pad_token_id)
        cls, span_vectors = self.encoder.backend.forward(ids, mask, bounds)
        cls = np.asarray(cls, dtype=np.float64)
        return cls, [np.asarray(span_vectors[j, : len(s)], dtype=np.float64) for j, s in enumerate(spans)]

    @staticmethod
    def single(cls: np.ndarray, means: np.ndarray, mode: str) -> np.ndarray:
        return single_vectors(cls, means, mode, normalize=True)

    @staticmethod
    def chunk_vectors(span_vectors: np.ndarray) -> np.ndarray:
        return l2_normalize(span_vectors).astype(np.float32, copy=False)

    @staticmethod
    def char_spans(tokens: TextTokens, spans: np.ndarray) -> np.ndarray:
        return char_spans(tokens.offsets, spans)

    def warm_up(self, tokens: int) -> None:
        """Run a row of ``tokens`` tokens (the longest a request may send) and a short one, so the first
        requests find every kernel chosen and every buffer sized."""
        filler = self.tokenizer.tokenizer.encode("warm up", add_special_tokens=False).ids or [self.config.cls_token_id]
        for length in sorted({min(WARMUP_SHORT_TOKENS, tokens), tokens}):
            text = np.resize(np.asarray(filler, dtype=np.int64), max(length - SPECIAL_TOKENS_PER_ROW, 1))
            row = self.tokenizer.row(np.zeros(0, dtype=np.int64), text)
            self.forward([row], [np.array([[1, len(row) - 1]], dtype=np.int64)])

    # -- description ------------------------------------------------------------------------------

    def precision(self) -> str:
        """The export manifest's precision; a checkpoint runs in the backend's dtype (fp32 by default)."""
        manifest = self.source / MANIFEST_FILE
        if manifest.is_file():
            import json

            return json.loads(manifest.read_text(encoding="utf-8")).get("precision", "unknown")
        return precision_name(getattr(self.encoder.backend, "dtype", "fp32"))
