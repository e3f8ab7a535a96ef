"""The LlamaIndex adapter on the packaged dewey-mini: an ingestion pipeline with the late-chunk node parser
into an in-memory VectorStoreIndex; node embeddings equal ``encode_chunks``, spans slice the source, the
index does not re-embed the nodes, and retrieval returns the node holding the question's sentence."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

pytest.importorskip("torch", reason="the packaged model runs on the torch backend")
pytest.importorskip("llama_index.core", reason="the llamaindex extra is not installed")
from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.ingestion import IngestionPipeline  # noqa: E402

from conftest import FP32_ATOL  # noqa: E402
from runtimes.integrations.llamaindex import DeweyEmbedding, LateChunkNodeParser  # noqa: E402
from test_integrations_imports import CHUNK_OVERLAP, CHUNK_SIZE, QUESTIONS, corpus  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    from runtimes import load

    return load()


@pytest.fixture(scope="module")
def pages():
    return corpus()


@pytest.fixture(scope="module")
def late_chunks(encoder, pages):
    """The reference: the pages through Encoder.encode_chunks with the passage prompt."""
    return encoder.encode_chunks(list(pages.values()), chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP,
                                 prompt="passage")


def documents(pages) -> list[Document]:
    return [Document(text=text, id_=name) for name, text in pages.items()]


def parser(encoder) -> LateChunkNodeParser:
    return LateChunkNodeParser(encoder, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)


@pytest.fixture(scope="module")
def nodes(encoder, pages):
    return IngestionPipeline(transformations=[parser(encoder)]).run(documents=documents(pages))


class CountingEmbedding(DeweyEmbedding):
    """A DeweyEmbedding that counts the texts it is asked to embed (queries apart)."""

    texts_embedded: int = 0

    def _get_text_embeddings(self, texts):
        self.texts_embedded += len(texts)
        return super()._get_text_embeddings(texts)

    def _get_text_embedding(self, text):
        self.texts_embedded += 1
        return super()._get_text_embedding(text)


def test_embedding_equals_encode_with_the_model_prompts(encoder, pages):
    embedding = DeweyEmbedding(encoder, embed_batch_size=3)  # LlamaIndex splits the batch: 3 + 3 + 2 texts
    texts = list(pages.values())
    question = QUESTIONS[0][0]
    expected_texts = encoder.encode(texts, prompt="passage")
    expected_query = encoder.encode(question, prompt="query")
    # other batches, other padding: equal up to fp32 rounding
    np.testing.assert_allclose(np.asarray(embedding.get_text_embedding_batch(texts), np.float32), expected_texts,
                               rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(np.asarray(embedding.get_text_embedding(texts[0]), np.float32), expected_texts[0],
                               rtol=0, atol=FP32_ATOL)
    np.testing.assert_array_equal(np.asarray(embedding.get_query_embedding(question), np.float32), expected_query)
    np.testing.assert_array_equal(np.asarray(asyncio.run(embedding.aget_query_embedding(question)), np.float32),
                                  expected_query)
    np.testing.assert_allclose(np.asarray(asyncio.run(embedding.aget_text_embedding_batch(texts)), np.float32),
                               expected_texts, rtol=0, atol=FP32_ATOL)


def test_pipeline_nodes_carry_late_chunk_embeddings_and_spans(pages, late_chunks, nodes):
    assert len(nodes) == sum(len(doc.texts) for doc in late_chunks) >= 3 * len(pages)
    position = 0
    for (name, text), doc in zip(pages.items(), late_chunks):
        mine = nodes[position: position + len(doc.texts)]
        position += len(doc.texts)
        assert [node.ref_doc_id for node in mine] == [name] * len(mine)
        for node, chunk_text, span in zip(mine, doc.texts, doc.char_spans):
            assert text[node.start_char_idx: node.end_char_idx] == node.text == chunk_text
            assert (node.start_char_idx, node.end_char_idx) == span
        np.testing.assert_array_equal(np.asarray([node.embedding for node in mine], np.float32), doc.vectors)


def test_index_keeps_the_late_chunk_embeddings_and_retrieves_the_right_node(encoder, pages, late_chunks, nodes):
    embed_model = CountingEmbedding(encoder)
    index = VectorStoreIndex(nodes, embed_model=embed_model)
    assert embed_model.texts_embedded == 0  # the nodes' own embeddings went into the index
    stored = np.asarray([index.vector_store.get(node.node_id) for node in nodes], np.float32)
    np.testing.assert_array_equal(stored, np.concatenate([doc.vectors for doc in late_chunks]))
    retriever = index.as_retriever(similarity_top_k=1)
    for question, topic in QUESTIONS:
        hit = retriever.retrieve(question)[0].node
        assert hit.ref_doc_id == topic, question
        assert pages[topic][hit.start_char_idx: hit.end_char_idx] == hit.text


def test_async_pipeline_gives_the_same_nodes(encoder, pages, nodes):
    again = asyncio.run(IngestionPipeline(transformations=[parser(encoder)]).arun(documents=documents(pages)))
    assert [(n.ref_doc_id, n.start_char_idx, n.end_char_idx, n.embedding) for n in again] == [
        (n.ref_doc_id, n.start_char_idx, n.end_char_idx, n.embedding) for n in nodes]


def test_repeated_passages_keep_their_own_spans(encoder):
    # Chunks of four tokens over a repeated pair of words: LlamaIndex's own span search (str.find from
    # one character after the previous chunk's start) would put the second chunk at 8 instead of 16.
    text = "one two " * 6 + "end."
    nodes = LateChunkNodeParser(encoder, chunk_size=4, chunk_overlap=0).get_nodes_from_documents(
        [Document(text=text, id_="repeat")])
    spans = [(node.start_char_idx, node.end_char_idx) for node in nodes]
    assert spans == encoder.encode_chunks(text, chunk_size=4, chunk_overlap=0, prompt="passage").char_spans
    assert spans[1] == (16, 31) and text.find(nodes[1].text, spans[0][0] + 1) == 8
    assert all(text[a:b] == node.text for node, (a, b) in zip(nodes, spans))


def test_blank_documents_give_no_nodes_and_bad_settings_are_refused(encoder):
    nodes = parser(encoder).get_nodes_from_documents([Document(text=" \n\t", id_="blank"), Document(text="one line")])
    assert len(nodes) == 1 and nodes[0].text == "one line"
    with pytest.raises(ValueError, match="chunk_overlap"):
        LateChunkNodeParser(encoder, chunk_size=16, chunk_overlap=16)
    with pytest.raises(ValueError, match="mode"):
        DeweyEmbedding(encoder, mode="max")


def test_example_runs(tmp_path):
    from test_examples import run_example, succeeded

    out = succeeded(run_example("llamaindex_ingestion.py", cwd=tmp_path))
    nodes = re.search(r"(\d+) nodes of 8 pages, each with its late-chunk embedding \((\d+) set\)", out)
    exact = re.search(r"== node\.text for (\d+) of (\d+) nodes", out)
    assert nodes and nodes[1] == nodes[2] == exact[1] == exact[2], out
    best = out.split("question: ")[1].splitlines()[1]
    assert "page 'assert'" in best, out
