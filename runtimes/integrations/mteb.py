"""MTEB: a Dewey Encoder as an mteb model, for ``mteb.evaluate(model, tasks)`` on any backend.

``DeweyMTEBModel`` follows mteb's encoder protocol: mteb hands it batches of texts with the task's
metadata and a prompt type, and the task type and prompt type choose the prompt the way the Dewey
authors' mteb wrapper did: retrieval queries get the model's ``query`` prompt and retrieval documents
its ``passage`` prompt; STS, pair classification, summarization and reranking get a prompt named
``sts``; any other task a prompt named after the task. A prompt the model does not declare in its
config.json is left out (the text is encoded with no prompt).

``DeweyMTEBMultiVector`` also implements mteb's search protocol, which mteb's retrieval tasks use
instead of their own search: each document is late-chunked (``encode_chunks``, one pass over the whole
document) and scores as its best chunk, the way the Dewey paper's multi-vector results are computed.
Other task types see the same single-vector encoder.

Pass ``cache=None`` to ``mteb.evaluate`` to keep mteb from writing results under ``~/.cache/mteb``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtimes.batching import DEFAULT_BATCH_SIZE
from runtimes.validation import require_int

from .common import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SPLITTER,
    check_late_chunk_args,
    import_library,
    late_chunk,
)

import_library("mteb", "mteb")
from mteb._create_dataloaders import create_dataloader  # noqa: E402  (mteb's own text of a row: title + text)
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402

# The Dewey authors' mteb wrapper (mteb PR #2421): the task types that get the symmetric "sts" prompt;
# retrieval gets the query / passage prompts and every other type a prompt named after the task.
RETRIEVAL_TASK_TYPE = "Retrieval"
SYMMETRIC_TASK_TYPES = ("STS", "PairClassification", "Summarization", "Reranking")
SYMMETRIC_PROMPT = "sts"
QUERY_PROMPT = "query"
PASSAGE_PROMPT = "passage"


def texts_of(inputs) -> list[str]:
    """The texts of an mteb dataloader, in order (mteb has already joined a document's title and text)."""
    texts: list[str] = []
    for batch in inputs:
        texts.extend(batch["text"])
    return texts


def best_chunk_scores(query_vectors: np.ndarray, chunk_vectors: np.ndarray, chunk_counts: list[int]) -> np.ndarray:
    """Cosine scores [Q, documents] of normalised query vectors against documents given as their chunk
    vectors (``chunk_counts[j]`` consecutive rows per document, at least one): each document's best chunk."""
    starts = np.concatenate([[0], np.cumsum(chunk_counts)[:-1]]).astype(np.int64)
    return np.maximum.reduceat(query_vectors @ chunk_vectors.T, starts, axis=1)


class DeweyMTEBModel(AbsEncoder):
    """An Encoder under mteb's encoder protocol.

    encoder: a ``runtimes.Encoder`` (any backend); name and revision: how mteb's results name the model;
    mode: the single-vector mode (default: the model's ``single_vector_type``; the authors ran short-text
    tasks with ``cls_add_mean`` and long-document ones with ``mean``); batch_size: used when mteb's
    ``encode_kwargs`` give none; max_length: the Encoder's row limit (default: the model's maximum;
    longer texts are cut with a ``TruncationWarning``).
    """

    def __init__(self, encoder, name: str = "dewey/local", revision: str = "local", mode: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None):
        self.model = encoder
        self.mode = encoder._mode(mode)
        self.batch_size = require_int("batch_size", batch_size, 1)
        self.max_length = encoder._max_length(max_length)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name,
            revision=revision,
            embed_dim=encoder.vector_size,
            max_tokens=self.max_length,
            similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=bool(encoder.config.prompts),
        ))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r}, mode={self.mode!r})"

    def prompt_for(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """The name of the model prompt for this task and prompt type, or None for no prompt."""
        if task_metadata.type == RETRIEVAL_TASK_TYPE:
            name = QUERY_PROMPT if prompt_type == PromptType.query else PASSAGE_PROMPT
        elif task_metadata.type in SYMMETRIC_TASK_TYPES:
            name = SYMMETRIC_PROMPT
        else:
            name = task_metadata.name
        return name if name in self.model.config.prompts else None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        """float32 [N, D], L2-normalised, for the texts of mteb's dataloader ``inputs``."""
        return self.model.encode(
            texts_of(inputs), mode=self.mode, prompt_name=self.prompt_for(task_metadata, prompt_type),
            batch_size=kwargs.get("batch_size") or self.batch_size, max_length=self.max_length,
            show_progress_bar=kwargs.get("show_progress_bar", False),
        )


class DeweyMTEBMultiVector(DeweyMTEBModel):
    """``DeweyMTEBModel`` plus mteb's search protocol: in retrieval tasks each document is late-chunked
    (chunk_size / chunk_overlap tokens, ``splitter`` as for ``encode_chunks``) and scores as its best chunk.
    """

    def __init__(self, encoder, name: str = "dewey/local-multi-vector", revision: str = "local",
                 mode: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
                 splitter: str = DEFAULT_SPLITTER):
        super().__init__(encoder, name, revision, mode, batch_size, max_length)
        check_late_chunk_args(chunk_size, chunk_overlap, splitter, batch_size)
        self.chunk_size, self.chunk_overlap, self.splitter = chunk_size, chunk_overlap, splitter
        self._corpus_ids: list[str] = []
        self._chunk_vectors = np.zeros((0, encoder.vector_size), dtype=np.float32)
        self._chunk_counts: list[int] = []

    def index(self, corpus, *, task_metadata, hf_split: str, hf_subset: str, encode_kwargs: dict,
              num_proc: int | None = None, **kwargs: Any) -> None:
        """Late-chunk every document of ``corpus`` (mteb's corpus dataset) and keep its chunk vectors."""
        batch_size = encode_kwargs.get("batch_size") or self.batch_size
        loader = create_dataloader(corpus, task_metadata=task_metadata, prompt_type=PromptType.document,
                                   batch_size=batch_size, num_proc=num_proc)
        texts = texts_of(loader)
        chunked = late_chunk(
            self.model, texts, chunk_size=self.chunk_size, chunk_overlap=self.chunk_overlap,
            splitter=self.splitter, prompt=self.prompt_for(task_metadata, PromptType.document), batch_size=batch_size,
        )
        blank = [str(corpus_id) for corpus_id, doc in zip(corpus["id"], chunked) if doc is None]
        if blank:
            raise ValueError(f"corpus documents {blank[:5]} are blank: there is nothing to embed")
        self._corpus_ids = [str(corpus_id) for corpus_id in corpus["id"]]
        self._chunk_vectors = np.concatenate([doc.vectors for doc in chunked]) if chunked else self._chunk_vectors
        self._chunk_counts = [len(doc.vectors) for doc in chunked]

    def search(self, queries, *, task_metadata, hf_split: str, hf_subset: str, top_k: int, encode_kwargs: dict,
               top_ranked: dict[str, list[str]] | None = None, num_proc: int | None = None,
               **kwargs: Any) -> dict[str, dict[str, float]]:
        """The ``top_k`` documents of each query by best-chunk cosine, as {query id: {document id: score}};
        with ``top_ranked`` (reranking tasks) only each query's listed documents are scored."""
        if not self._chunk_counts:
            raise ValueError("index() must be given a corpus before search()")
        batch_size = encode_kwargs.get("batch_size") or self.batch_size
        loader = create_dataloader(queries, task_metadata=task_metadata, prompt_type=PromptType.query,
                                   batch_size=batch_size, num_proc=num_proc)
        query_vectors = self.encode(loader, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                                    prompt_type=PromptType.query, **encode_kwargs)
        scores = best_chunk_scores(query_vectors, self._chunk_vectors, self._chunk_counts)
        column = {corpus_id: j for j, corpus_id in enumerate(self._corpus_ids)}
        results = {}
        for i, query_id in enumerate(queries["id"]):
            candidates = (np.arange(len(self._corpus_ids)) if top_ranked is None
                          else np.array([column[d] for d in top_ranked.get(query_id, [])], dtype=np.int64))
            best = candidates[np.argsort(-scores[i, candidates], kind="stable")[:top_k]]
            results[str(query_id)] = {self._corpus_ids[j]: float(scores[i, j]) for j in best}
        return results
