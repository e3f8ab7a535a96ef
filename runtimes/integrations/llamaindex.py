"""LlamaIndex: a Dewey Encoder as a ``BaseEmbedding``, and late chunking as a node parser.

- ``DeweyEmbedding``: query embeddings with the model's ``query`` prompt, text embeddings with its
  ``passage`` prompt (each only if the model declares it), sync and async (the async ones run the
  thread-safe Encoder in a worker thread).
- ``LateChunkNodeParser``: a node parser (a transformation for ``IngestionPipeline``) that yields one
  ``TextNode`` per chunk from one pass over each whole text (``encode_chunks``), with
  ``start_char_idx`` / ``end_char_idx`` (``parent.text[start:end] == node.text``) and ``embedding`` set
  to the chunk's late-chunk vector, so an index built from the nodes does not re-embed them (LlamaIndex
  embeds only nodes whose ``embedding`` is None). Pass a ``DeweyEmbedding`` of the same Encoder as the
  index's ``embed_model`` for the queries.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from runtimes.batching import DEFAULT_BATCH_SIZE

from .common import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SPLITTER,
    check_late_chunk_args,
    import_library,
    late_chunk,
    model_prompt,
)

import_library("llama_index.core", "llamaindex")
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.node_parser import NodeParser  # noqa: E402
from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, TextNode  # noqa: E402


class DeweyEmbedding(BaseEmbedding):
    """LlamaIndex ``BaseEmbedding`` over a ``runtimes.Encoder`` (any backend).

    mode: the single-vector mode (default: the model's); query_prompt / passage_prompt: a prompt name of
    the model or a literal prompt (the standard names are dropped when the model does not declare them);
    embed_batch_size: texts per ``Encoder.encode`` call (LlamaIndex batches before calling);
    max_length as for ``Encoder.encode``.
    """

    mode: str = Field(description="single-vector mode: cls, mean or cls_add_mean")
    query_prompt: str | None = Field(default=None, description="prompt of queries (name or literal)")
    passage_prompt: str | None = Field(default=None, description="prompt of texts (name or literal)")
    max_length: int = Field(description="row limit in tokens, prompt and special tokens included")
    _encoder: Any = PrivateAttr()

    def __init__(self, encoder, mode: str | None = None, query_prompt: str | None = "query",
                 passage_prompt: str | None = "passage", embed_batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, **kwargs: Any):
        super().__init__(
            mode=encoder._mode(mode), query_prompt=model_prompt(encoder, query_prompt),
            passage_prompt=model_prompt(encoder, passage_prompt), embed_batch_size=embed_batch_size,
            max_length=encoder._max_length(max_length), model_name=kwargs.pop("model_name", "dewey"), **kwargs,
        )
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "DeweyEmbedding"

    def _encode(self, texts, prompt: str | None):
        return self._encoder.encode(texts, mode=self.mode, prompt=prompt, batch_size=self.embed_batch_size,
                                    max_length=self.max_length).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._encode(query, self.query_prompt)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._encode(text, self.passage_prompt)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._encode(list(texts), self.passage_prompt)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


class LateChunkNodeParser(NodeParser):
    """Late chunking as a LlamaIndex node parser: one ``TextNode`` per chunk, its ``embedding`` from one
    pass over the whole parent text, its span in ``start_char_idx`` / ``end_char_idx``.

    chunk_size / chunk_overlap (tokens) and splitter as for ``Encoder.encode_chunks``; prompt: the
    passage prompt (dropped when the model declares none). Blank texts give no nodes.
    """

    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, description="tokens per chunk", gt=0)
    chunk_overlap: int = Field(default=DEFAULT_CHUNK_OVERLAP, description="tokens shared by neighbours", ge=0)
    splitter: str = Field(default=DEFAULT_SPLITTER, description="tokens, words or recursive")
    prompt: str | None = Field(default="passage", description="prompt of the texts (name or literal)")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, description="rows per forward pass", gt=0)
    _encoder: Any = PrivateAttr()

    def __init__(self, encoder, **kwargs: Any):
        super().__init__(**kwargs)
        check_late_chunk_args(self.chunk_size, self.chunk_overlap, self.splitter, self.batch_size)
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "LateChunkNodeParser"

    def _parse_nodes(self, nodes: Sequence[BaseNode], show_progress: bool = False, **kwargs: Any) -> list[BaseNode]:
        nodes = list(nodes)
        chunked = late_chunk(
            self._encoder, [node.get_content(metadata_mode=MetadataMode.NONE) for node in nodes],
            chunk_size=self.chunk_size, chunk_overlap=self.chunk_overlap, splitter=self.splitter,
            prompt=self.prompt, batch_size=self.batch_size,
        )
        out: list[BaseNode] = []
        for parent, doc in zip(nodes, chunked):
            if doc is None:
                continue
            for j, (text, (start, end), vector) in enumerate(zip(doc.texts, doc.char_spans, doc.vectors)):
                out.append(TextNode(
                    id_=self.id_func(j, parent), text=text, start_char_idx=start, end_char_idx=end,
                    embedding=vector.tolist(),
                    relationships={NodeRelationship.SOURCE: parent.as_related_node_info()},
                ))
        return out

    def _postprocess_parsed_nodes(self, nodes: list[BaseNode], parent_doc_map: dict) -> list[BaseNode]:
        # The base class re-finds each node's text in its document with str.find, which lands on an
        # earlier copy of a repeated passage; the token offsets already give the exact span.
        spans = [(node.start_char_idx, node.end_char_idx) for node in nodes]
        nodes = super()._postprocess_parsed_nodes(nodes, parent_doc_map)
        for node, (start, end) in zip(nodes, spans):
            node.start_char_idx, node.end_char_idx = start, end
        return nodes
