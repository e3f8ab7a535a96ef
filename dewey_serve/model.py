"""The served model: requests' inputs turned into the Encoder's rows and spans, one batch's forward, and
the vectors made from its outputs.

The server batches rows from many requests together, so it cannot hand each request to
``Encoder.encode`` (one call, one batch plan). It asks the Encoder for the request's rows instead
(``Encoder.plan_encode`` / ``plan_chunks``: the same tokenization, prompts, span rules, windows past the
row and pooling as ``encode`` / ``encode_chunks``), runs them in shared batches and hands each row's
outputs back to the plan, so a served vector equals the in-process one up to the padding of its batch.
Token-id inputs (the OpenAI API's) have no text: their rows are built here from the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.batching import pad_batch
from runtimes.chunking import check_chunk_args
from runtimes.config import SINGLE_VECTOR_TYPES
from runtimes.encoder import Encoder, RowPlan, single_vectors
from runtimes.export_format import MANIFEST_FILE
from runtimes.precision import precision_name
from runtimes.tokenization import SPECIAL_TOKENS_PER_ROW

from .errors import InputError

# The warm-up runs one row this short beside the longest one: the torch backend takes another attention
# path below 512 tokens (runtimes.attention), and a first short request should not pay for its set-up.
WARMUP_SHORT_TOKENS = 32


@dataclass
class Planned:
    """A request of texts as the Encoder planned it: its rows, their spans, and its answer from their
    outputs (``result``)."""

    plan: RowPlan

    def __post_init__(self):
        self.rows = [self.plan.row(r) for r in range(len(self.plan.lengths))]

    @property
    def spans(self) -> list[np.ndarray]:
        return self.plan.spans

    @property
    def row_tokens(self) -> int:
        return sum(self.plan.lengths)

    @property
    def cut(self) -> list[int]:
        return [c or 0 for c in self.plan.cut]

    def result(self, outputs: list):
        """What ``encode`` / ``encode_chunks`` return, from each row's ``(cls, spans)`` in order."""
        for r, (cls, spans) in enumerate(outputs):
            self.plan.add(r, cls, spans)
        return self.plan.result()


@dataclass
class Rows:
    """A request of token ids as model rows: ``[CLS] prompt ids[:kept] [SEP]``."""

    rows: list[np.ndarray]
    spans: list[np.ndarray]  # each row's mean span (the model's span rule)
    cut: list[int]  # tokens cut per input by truncation
    mode: str

    @property
    def row_tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    def result(self, outputs: list) -> np.ndarray:
        return single_vectors(np.stack([np.asarray(c, np.float64) for c, _ in outputs]),
                              np.stack([np.asarray(s[0], np.float64) for _, s in outputs]), self.mode, normalize=True)


class ServedModel:
    """An Encoder with what the server needs around it: its name, source folder and limits."""

    def __init__(self, encoder: Encoder, name: str, source: Path, backend: str):
        self.encoder = encoder
        self.config = encoder.config
        self.tokenizer = encoder.tokenizer
        self.name = name
        self.source = Path(source)
        self.backend_name = backend

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

    def _planned(self, plan_call, param: str) -> Planned:
        """``plan_call()`` (an Encoder plan), its input errors as 400s naming ``param``."""
        try:
            return Planned(plan_call())
        except (TypeError, ValueError) as exc:
            message = str(exc).replace("texts[", f"{param}[")
            name = "dimensions" if "dimensions" in message else "prompt" if "prompt" in message else param
            raise InputError(message, name) from None

    def plan_texts(self, texts: list[str], mode: str, prompt: str | None, max_tokens: int, truncate: bool,
                   dimensions: int | None = None, param: str = "input") -> Planned:
        """``encode``'s rows for ``texts`` in rows of at most ``max_tokens``: longer inputs cut when
        ``truncate``, else refused, naming the first one and the counts."""
        planned = self._planned(lambda: self.encoder.plan_encode(
            texts, mode=mode, prompt_name=prompt, max_length=max_tokens, truncate=True, dimensions=dimensions,
            count_cut=True), param)
        over = [i for i, c in enumerate(planned.cut) if c]
        if over and not truncate:
            i = over[0]
            length = planned.plan.lengths[i] + planned.cut[i]
            raise InputError(
                f"{param}[{i}] is {length} tokens long ([CLS], [SEP] and the prompt included), over this "
                f"server's limit of {max_tokens} tokens per input; {len(over)} input(s) are too long. Send "
                "\"truncate\": true to cut them, or send long texts to /v1/embeddings/chunks (windows)", param,
                code="input_too_long")
        return planned

    def plan_chunks(self, texts: list[str], mode: str, prompt: str | None, max_tokens: int, chunk_size: int,
                    chunk_overlap: int, splitter: str) -> Planned:
        """``encode_chunks``' rows for ``texts``: a text over ``max_tokens`` runs in windows of it."""
        return self._planned(lambda: self.encoder.plan_chunks(
            texts, chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter=splitter, prompt_name=prompt,
            max_length=max_tokens, mode=mode), "input")

    def tokenize(self, texts: list[str], param: str = "input"):
        """The texts' own tokens (ids, offsets), with the Encoder's checks."""
        return self._planned(lambda: self.encoder.plan_chunks(texts, chunk_size=1, chunk_overlap=0), param).plan.tokens

    def id_rows(self, id_lists: list[list[int]], mode: str, prompt: str | None, max_tokens: int,
                truncate: bool) -> Rows:
        vocab = self.config.vocab_size
        prompt_ids = self.prompt_ids(prompt if prompt is not None else self.config.default_prompt_name)
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
        try:
            budget = self.tokenizer.text_budget(prompt_ids, max_tokens)
        except ValueError as exc:
            raise InputError(str(exc), "prompt") from None
        kept = [min(len(ids), budget) for ids in arrays]
        cut = [len(ids) - n for ids, n in zip(arrays, kept)]
        over = [i for i, c in enumerate(cut) if c]
        if over and not truncate:
            i = over[0]
            length = len(arrays[i]) + SPECIAL_TOKENS_PER_ROW + len(prompt_ids)
            raise InputError(
                f"input[{i}] is {length} tokens long ([CLS], [SEP] and the prompt included), over this "
                f"server's limit of {max_tokens} tokens per input; {len(over)} input(s) are too long. Send "
                "\"truncate\": true to cut them", "input", code="input_too_long")
        rows = [self.tokenizer.row(prompt_ids, ids[:n]) for ids, n in zip(arrays, kept)]
        start = 1 + len(prompt_ids)
        spans = [np.array([self.encoder.mean_span(len(row), start, n, len(prompt_ids))], dtype=np.int64)
                 for row, n in zip(rows, kept)]
        return Rows(rows, spans, cut, mode)

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
