"""LangChain: a Dewey Encoder as ``Embeddings``, and late chunking as a document transformer.

- ``DeweyEmbeddings``: ``embed_documents`` encodes with the model's ``passage`` prompt, ``embed_query``
  with its ``query`` prompt (each only if the model declares it), with async variants that run the
  Encoder in a worker thread (it is thread-safe).
- ``LateChunkTransformer``: turns ``Document``s into one ``Document`` per chunk, from one pass over each
  whole text (``encode_chunks``): the chunk's text as ``page_content``, and in its metadata the parent's
  metadata plus ``parent_id``, ``chunk_index``, ``start_index`` / ``end_index`` (the chunk's characters
  in the parent: ``parent.page_content[start_index:end_index] == chunk.page_content``) and the chunk's
  vector under ``embedding``.
- ``add_late_chunks(store, chunks)``: adds those chunks to a vector store built on ``DeweyEmbeddings``
  with their late-chunk vectors, so the store does not re-embed each chunk alone; the stored metadata
  leaves the vector out.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from runtimes.batching import DEFAULT_BATCH_SIZE
from runtimes.validation import require_int

from .common import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SPLITTER,
    check_late_chunk_args,
    import_library,
    late_chunk,
    model_prompt,
)

import_library("langchain_core", "langchain")
from langchain_core.documents import BaseDocumentTransformer, Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402

# Metadata keys of a late chunk; ``start_index`` is the key LangChain's own text splitters use.
PARENT_ID_KEY = "parent_id"
CHUNK_INDEX_KEY = "chunk_index"
START_KEY = "start_index"
END_KEY = "end_index"
VECTOR_KEY = "embedding"


class DeweyEmbeddings(Embeddings):
    """LangChain ``Embeddings`` over a ``runtimes.Encoder`` (any backend).

    mode: the single-vector mode (default: the model's); query_prompt / passage_prompt: a prompt name of
    the model or a literal prompt (the standard names are dropped when the model does not declare them);
    batch_size and max_length as for ``Encoder.encode``.
    """

    def __init__(self, encoder, mode: str | None = None, query_prompt: str | None = "query",
                 passage_prompt: str | None = "passage", batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None):
        self.encoder = encoder
        self.mode = encoder._mode(mode)
        self.query_prompt = model_prompt(encoder, query_prompt)
        self.passage_prompt = model_prompt(encoder, passage_prompt)
        self.batch_size = require_int("batch_size", batch_size, 1)
        self.max_length = encoder._max_length(max_length)
        self._lock = threading.Lock()
        self._precomputed: deque[tuple[str, list[float]]] = deque()

    def __repr__(self) -> str:
        return f"DeweyEmbeddings({self.encoder!r}, mode={self.mode!r})"

    def _encode(self, texts, prompt: str | None):
        return self.encoder.encode(texts, mode=self.mode, prompt=prompt, batch_size=self.batch_size,
                                   max_length=self.max_length)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, with the passage prompt (or the vectors queued by ``precomputed``)."""
        texts = list(texts)
        with self._lock:
            if self._precomputed:
                return self._take_precomputed(texts)
        return self._encode(texts, self.passage_prompt).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The vector of one query, with the query prompt."""
        return self._encode(text, self.query_prompt).tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)

    @contextmanager
    def precomputed(self, texts: Sequence[str], vectors: Sequence[Sequence[float]]) -> Iterator[None]:
        """While open, ``embed_documents`` returns these vectors for these texts, in order, instead of
        encoding them (a store may ask in several calls); texts asked in another order raise ValueError.
        The vectors must all have been asked for when the block ends. Use one such block at a time."""
        if len(texts) != len(vectors):
            raise ValueError(f"precomputed: {len(texts)} texts but {len(vectors)} vectors")
        with self._lock:
            if self._precomputed:
                raise RuntimeError("precomputed: another block of precomputed vectors is still open")
            self._precomputed.extend(zip(texts, (list(v) for v in vectors)))
        try:
            yield
            with self._lock:
                if self._precomputed:
                    raise RuntimeError(
                        f"precomputed: {len(self._precomputed)} vectors were never asked for by embed_documents"
                    )
        finally:
            with self._lock:
                self._precomputed.clear()

    def _take_precomputed(self, texts: list[str]) -> list[list[float]]:
        if len(texts) > len(self._precomputed):
            raise ValueError(f"embed_documents: {len(texts)} texts asked, {len(self._precomputed)} precomputed left")
        taken = [self._precomputed.popleft() for _ in texts]
        for i, (text, (expected, _)) in enumerate(zip(texts, taken)):
            if text != expected:
                raise ValueError(
                    f"embed_documents: texts[{i}] is not the next precomputed chunk text (the store reordered "
                    "or changed the documents); its late-chunk vector cannot be matched to it"
                )
        return [vector for _, vector in taken]


class LateChunkTransformer(BaseDocumentTransformer):
    """Late chunking as a LangChain document transformer: one ``Document`` per chunk, its vector from one
    pass over the whole parent text (see the module docstring for the metadata).

    chunk_size / chunk_overlap (tokens) and splitter as for ``Encoder.encode_chunks``; prompt: the
    passage prompt (dropped when the model declares none); a parent without an ``id`` gets a random one.
    Blank documents give no chunks.
    """

    def __init__(self, encoder, chunk_size: int = DEFAULT_CHUNK_SIZE, chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
                 splitter: str = DEFAULT_SPLITTER, prompt: str | None = "passage",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        check_late_chunk_args(chunk_size, chunk_overlap, splitter, batch_size)
        self.encoder = encoder
        self.chunk_size, self.chunk_overlap, self.splitter = chunk_size, chunk_overlap, splitter
        self.prompt = prompt
        self.batch_size = batch_size

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> list[Document]:
        documents = list(documents)
        chunked = late_chunk(
            self.encoder, [doc.page_content for doc in documents], chunk_size=self.chunk_size,
            chunk_overlap=self.chunk_overlap, splitter=self.splitter, prompt=self.prompt, batch_size=self.batch_size,
        )
        out = []
        for parent, doc in zip(documents, chunked):
            if doc is None:
                continue
            parent_id = parent.id or str(uuid.uuid4())
            for j, (text, (start, end), vector) in enumerate(zip(doc.texts, doc.char_spans, doc.vectors)):
                metadata = {**parent.metadata, PARENT_ID_KEY: parent_id, CHUNK_INDEX_KEY: j, START_KEY: start,
                            END_KEY: end, VECTOR_KEY: vector.tolist()}
                out.append(Document(page_content=text, metadata=metadata, id=f"{parent_id}:{j}"))
        return out


def add_late_chunks(store, chunks: Sequence[Document], **kwargs: Any) -> list[str]:
    """Add ``LateChunkTransformer`` chunks to ``store`` (a LangChain vector store whose ``embeddings`` is a
    ``DeweyEmbeddings``) with their own late-chunk vectors; the stored metadata leaves the vector out.
    Returns the store's ids; ``kwargs`` go to ``store.add_documents``."""
    embeddings = getattr(store, "embeddings", None)
    if not isinstance(embeddings, DeweyEmbeddings):
        raise TypeError(f"add_late_chunks needs a store built on DeweyEmbeddings, got {type(embeddings).__name__}")
    missing = [i for i, chunk in enumerate(chunks) if VECTOR_KEY not in chunk.metadata]
    if missing:
        raise ValueError(f"chunks[{missing[0]}] has no '{VECTOR_KEY}' in its metadata: not a LateChunkTransformer chunk")
    stored = [
        Document(page_content=chunk.page_content, id=chunk.id,
                 metadata={k: v for k, v in chunk.metadata.items() if k != VECTOR_KEY})
        for chunk in chunks
    ]
    with embeddings.precomputed([c.page_content for c in chunks], [c.metadata[VECTOR_KEY] for c in chunks]):
        return store.add_documents(stored, **kwargs)
