"""The LangChain adapter on the packaged dewey-mini, with langchain-core's own in-memory vector store: vectors
equal the Encoder's (``encode`` with the passage / query prompts, ``encode_chunks`` for late chunks), and
search finds the page a question comes from."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

pytest.importorskip("torch", reason="the packaged model runs on the torch backend")
pytest.importorskip("langchain_core", reason="the langchain extra is not installed")
from langchain_core.documents import Document  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402

from runtimes.integrations.langchain import (  # noqa: E402
    END_KEY,
    PARENT_ID_KEY,
    START_KEY,
    VECTOR_KEY,
    DeweyEmbeddings,
    LateChunkTransformer,
    add_late_chunks,
)
from test_integrations_imports import CHUNK_OVERLAP, CHUNK_SIZE, QUESTIONS, corpus  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    from runtimes import load

    return load()


@pytest.fixture(scope="module")
def pages():
    return corpus()


@pytest.fixture(scope="module")
def passage_vectors(encoder, pages):
    """The reference: the pages through Encoder.encode with the passage prompt."""
    return encoder.encode(list(pages.values()), prompt="passage")


@pytest.fixture(scope="module")
def late_chunks(encoder, pages):
    """The reference: the pages through Encoder.encode_chunks with the passage prompt."""
    return encoder.encode_chunks(list(pages.values()), chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP,
                                 prompt="passage")


@pytest.fixture(scope="module")
def chunks(encoder, pages):
    return LateChunkTransformer(encoder, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP).transform_documents(
        documents(pages))


def documents(pages) -> list[Document]:
    return [Document(page_content=text, id=name, metadata={"topic": name}) for name, text in pages.items()]


def as_array(vectors) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float32)


def test_embeddings_equal_encode_with_the_model_prompts(encoder, pages, passage_vectors):
    embeddings = DeweyEmbeddings(encoder)
    texts = list(pages.values())
    expected_docs = passage_vectors
    expected_query = encoder.encode(QUESTIONS[0][0], prompt="query")
    np.testing.assert_array_equal(as_array(embeddings.embed_documents(texts)), expected_docs)
    np.testing.assert_array_equal(as_array(embeddings.embed_query(QUESTIONS[0][0])), expected_query)
    np.testing.assert_array_equal(as_array(asyncio.run(embeddings.aembed_documents(texts))), expected_docs)
    np.testing.assert_array_equal(as_array(asyncio.run(embeddings.aembed_query(QUESTIONS[0][0]))), expected_query)
    # the prompts matter: without them the vectors differ
    assert not np.allclose(expected_query, encoder.encode(QUESTIONS[0][0]), atol=1e-3)
    assert embeddings.embed_documents([]) == []


def test_store_filled_through_the_embeddings_finds_each_page(encoder, pages, passage_vectors):
    store = InMemoryVectorStore(DeweyEmbeddings(encoder))
    ids = store.add_documents(documents(pages))
    assert ids == list(pages)
    stored = as_array([store.store[name]["vector"] for name in pages])
    np.testing.assert_array_equal(stored, passage_vectors)
    for question, topic in QUESTIONS:
        assert store.similarity_search(question, k=1)[0].id == topic, question


def test_transformer_gives_late_chunks_with_spans_and_vectors(pages, late_chunks, chunks):
    expected = late_chunks
    assert len(chunks) == sum(len(doc.texts) for doc in expected) >= 3 * len(pages)
    position = 0
    for (name, text), doc in zip(pages.items(), expected):
        mine = chunks[position: position + len(doc.texts)]
        position += len(doc.texts)
        for j, chunk in enumerate(mine):
            meta = chunk.metadata
            assert meta[PARENT_ID_KEY] == name and meta["topic"] == name and chunk.id == f"{name}:{j}"
            assert text[meta[START_KEY]: meta[END_KEY]] == chunk.page_content == doc.texts[j]
        np.testing.assert_array_equal(as_array([c.metadata[VECTOR_KEY] for c in mine]), doc.vectors)


def test_store_filled_through_the_transformer_keeps_late_chunk_vectors(encoder, late_chunks, chunks):
    embeddings = DeweyEmbeddings(encoder)
    store = InMemoryVectorStore(embeddings)
    ids = add_late_chunks(store, chunks)
    assert ids == [chunk.id for chunk in chunks]
    stored = as_array([store.store[i]["vector"] for i in ids])
    np.testing.assert_array_equal(stored, np.concatenate([doc.vectors for doc in late_chunks]))
    # each chunk embedded alone (what a plain add_documents does) is not what the store holds
    alone = encoder.encode([c.page_content for c in chunks], prompt="passage")
    assert np.abs(alone - stored).max() > 1e-2
    assert all(VECTOR_KEY not in store.store[i]["metadata"] for i in ids)
    for question, topic in QUESTIONS:
        hit = store.similarity_search(question, k=1)[0]
        assert hit.metadata[PARENT_ID_KEY] == topic, question
    # afterwards the embeddings encode again
    np.testing.assert_array_equal(as_array(embeddings.embed_documents(["a short text"])),
                                  encoder.encode(["a short text"], prompt="passage"))


def test_precomputed_vectors_refuse_another_order(encoder):
    embeddings = DeweyEmbeddings(encoder)
    with pytest.raises(ValueError, match="not the next precomputed chunk text"):
        with embeddings.precomputed(["first", "second"], [[1.0], [2.0]]):
            embeddings.embed_documents(["second", "first"])
    with pytest.raises(RuntimeError, match="never asked for"):
        with embeddings.precomputed(["first"], [[1.0]]):
            pass
    with pytest.raises(TypeError, match="DeweyEmbeddings"):
        add_late_chunks(InMemoryVectorStore(embedding=_OtherEmbeddings()), [])


def test_blank_documents_give_no_chunks_and_bad_settings_are_refused(encoder):
    transformer = LateChunkTransformer(encoder)
    chunks = transformer.transform_documents([Document(page_content="  \n"), Document(page_content="one line", id="x")])
    assert [c.id for c in chunks] == ["x:0"]
    with pytest.raises(ValueError, match="chunk_overlap"):
        LateChunkTransformer(encoder, chunk_size=16, chunk_overlap=16)
    with pytest.raises(ValueError, match="mode"):
        DeweyEmbeddings(encoder, mode="max")


class _OtherEmbeddings:
    """Any embeddings that are not DeweyEmbeddings."""

    def embed_documents(self, texts):
        return [[0.0] for _ in texts]

    def embed_query(self, text):
        return [0.0]


def test_example_runs(tmp_path):
    from test_examples import run_example, succeeded

    out = succeeded(run_example("langchain_vector_store.py", cwd=tmp_path))
    assert "whole pages: best page 'with'" in out, out
    exact = re.search(r"== chunk text for (\d+) of (\d+) chunks", out)
    assert exact and exact[1] == exact[2] and int(exact[2]) > 8, out
    best_chunk = out.split("chunks\n")[-1].splitlines()[0]
    assert "page 'with'" in best_chunk and "__enter__" in best_chunk, out
