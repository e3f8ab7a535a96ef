"""POST /v1/embeddings/chunks and POST /tokenize on a live server: chunk vectors and document vectors equal
``Encoder.encode_chunks``; char spans slice the original text."""

from __future__ import annotations

import base64

import numpy as np
import pytest


from .conftest import API_KEYS, MAX_INPUT_TOKENS, PARITY_ATOL, http

AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


def documents() -> list[str]:
    from pydoc_data.topics import topics

    # \r\n line ends and non-ASCII text: char spans must index the text as sent.
    return [topics["try"][:2400].replace("\n", "\r\n") + " Grüße 🙂", topics["with"][:1500], "one short sentence."]


@pytest.mark.parametrize("splitter,size,overlap", [("tokens", 64, 16), ("words", 48, 8), ("recursive", 80, 0)])
def test_chunks_equal_encode_chunks_and_spans_slice_the_text(torch_server, mini_torch, splitter, size, overlap):
    texts = documents()
    status, headers, body = http("POST", torch_server.url + "/v1/embeddings/chunks", {
        "model": "dewey-mini", "input": texts, "chunk_size": size, "chunk_overlap": overlap, "splitter": splitter,
        "prompt": "passage"}, AUTH)
    assert status == 200, body
    expected = mini_torch.encode_chunks(texts, chunk_size=size, chunk_overlap=overlap, splitter=splitter,
                                        prompt_name="passage", max_length=MAX_INPUT_TOKENS)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for text, doc, ref in zip(texts, body["data"], expected):
        np.testing.assert_allclose(doc["embedding"], ref.vector, rtol=0, atol=PARITY_ATOL)
        assert len(doc["chunks"]) == len(ref.vectors) and doc["truncated_tokens"] == 0
        for j, chunk in enumerate(doc["chunks"]):
            a, b = chunk["char_span"]
            assert text[a:b] == chunk["text"] == ref.texts[j]
            assert tuple(chunk["token_span"]) == ref.token_spans[j]
            np.testing.assert_allclose(chunk["embedding"], ref.vectors[j], rtol=0, atol=PARITY_ATOL)
    assert len(body["data"][0]["chunks"]) > 2  # the long document really was chunked
    assert headers["x-dewey-truncated-inputs"] == "0"


def test_chunks_over_the_input_limit_run_in_windows(torch_server, mini_torch):
    """A document over the server's input limit is neither refused nor cut: it runs in windows of the
    limit, as Encoder.encode_chunks does in process (base64 vectors equal to it)."""
    text = documents()[0] * 3  # over the server's input limit
    status, headers, body = http("POST", torch_server.url + "/v1/embeddings/chunks", {
        "model": "dewey-mini", "input": text, "encoding_format": "base64"}, AUTH)
    assert status == 200, body
    ref = mini_torch.encode_chunks(text, max_length=MAX_INPUT_TOKENS)
    doc = body["data"][0]
    assert ref.windows > 1 and doc["windows"] == ref.windows
    assert doc["truncated_tokens"] == 0 and headers["x-dewey-truncated-inputs"] == "0"
    assert [tuple(c["token_span"]) for c in doc["chunks"]] == ref.token_spans
    got = np.stack([np.frombuffer(base64.b64decode(c["embedding"]), dtype="<f4") for c in doc["chunks"]])
    np.testing.assert_allclose(got, ref.vectors, rtol=0, atol=PARITY_ATOL)


def test_bad_chunk_arguments_name_the_field(torch_server):
    for fields, param in (({"chunk_size": 16, "chunk_overlap": 16}, "chunk_overlap"),
                          ({"splitter": "lines"}, "splitter"), ({"chunk_size": "big"}, "chunk_size")):
        status, _, body = http("POST", torch_server.url + "/v1/embeddings/chunks",
                               {"model": "dewey-mini", "input": "text", **fields}, AUTH)
        assert status == 400 and body["error"]["param"] == param, body


def test_tokenize_gives_ids_offsets_and_counts(torch_server, mini_torch):
    texts = documents()
    status, _, body = http("POST", torch_server.url + "/tokenize", {"input": texts, "prompt": "query"}, AUTH)
    assert status == 200
    prompt_tokens = len(mini_torch.tokenizer.prompt_ids("query"))
    assert body["prompt_tokens"] == prompt_tokens and body["max_input_tokens"] == MAX_INPUT_TOKENS
    for text, item, ref in zip(texts, body["data"], mini_torch.tokenizer.encode_texts(texts)):
        assert item["ids"] == ref.ids.tolist() and item["offsets"] == ref.offsets.tolist()
        assert item["tokens"] == len(ref.ids) and item["row_tokens"] == len(ref.ids) + prompt_tokens + 2
        a, b = item["offsets"][-1]
        assert 0 <= a < b <= len(text)
