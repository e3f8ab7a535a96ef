"""The official openai client (sync and async) against live servers: the default base64 answer, explicit
float, token-id input, ``dimensions`` refused, Dewey's ``extra_body`` options, and every vector equal to
the in-process Encoder's on the torch, onnx and openvino backends."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from .conftest import API_KEYS, MAX_INPUT_TOKENS, PARITY_ATOL, http, start


def sample_texts() -> list[str]:
    """Texts of a few to several hundred tokens, unicode included."""
    from pydoc_data.topics import topics

    return ["why is the sky blue?", "Grüße aus Köln 🙂 日本語のテキスト.", topics["if"][:900], topics["while"][:2500],
            topics["for"][:400]]


def vectors(response) -> np.ndarray:
    return np.asarray([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def test_default_base64_and_explicit_float_match_the_encoder(client, mini_torch):
    texts = sample_texts()
    reference = mini_torch.encode(texts, max_length=MAX_INPUT_TOKENS)
    default = client.embeddings.create(model="dewey-mini", input=texts)  # the client asks for base64
    assert default.model == "dewey-mini" and [d.index for d in default.data] == list(range(len(texts)))
    np.testing.assert_allclose(vectors(default), reference, rtol=0, atol=PARITY_ATOL)
    floats = client.embeddings.create(model="dewey-mini", input=texts, encoding_format="float")
    assert all(isinstance(d.embedding[0], float) for d in floats.data)
    np.testing.assert_allclose(vectors(floats), reference, rtol=0, atol=PARITY_ATOL)
    # usage counts the tokens the model ran: the texts' own, plus [CLS] and [SEP] each
    own = sum(len(t.ids) for t in mini_torch.tokenizer.encode_texts(texts))
    assert default.usage.prompt_tokens == default.usage.total_tokens == own + 2 * len(texts)


def test_single_string_and_token_ids(client, mini_torch):
    text = sample_texts()[2]
    one = client.embeddings.create(model="dewey-mini", input=text)
    assert len(one.data) == 1
    np.testing.assert_allclose(vectors(one)[0], mini_torch.encode(text), rtol=0, atol=PARITY_ATOL)
    ids = [t.ids.tolist() for t in mini_torch.tokenizer.encode_texts(sample_texts()[:3])]
    as_ids = client.embeddings.create(model="dewey-mini", input=ids)
    np.testing.assert_allclose(vectors(as_ids), mini_torch.encode(sample_texts()[:3]), rtol=0, atol=PARITY_ATOL)
    single_ids = client.embeddings.create(model="dewey-mini", input=ids[0])
    np.testing.assert_allclose(vectors(single_ids)[0], mini_torch.encode(sample_texts()[0]), rtol=0,
                               atol=PARITY_ATOL)


def test_dimensions_is_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="dewey-mini", input="text", dimensions=128)
    assert caught.value.body["param"] == "dimensions" and "384" in caught.value.body["message"]


@pytest.mark.parametrize("mode", ["cls", "mean", "cls_add_mean"])
@pytest.mark.parametrize("prompt", ["query", "passage"])
def test_extra_body_mode_and_prompt(client, mini_torch, mode, prompt):
    texts = sample_texts()[:3]
    response = client.embeddings.create(model="dewey-mini", input=texts, extra_body={"mode": mode, "prompt": prompt})
    expected = mini_torch.encode(texts, mode=mode, prompt_name=prompt)
    np.testing.assert_allclose(vectors(response), expected, rtol=0, atol=PARITY_ATOL)
    other = mini_torch.encode(texts, mode=mode)
    assert np.abs(expected - other).max() > 1e-3  # the prompt changed the vectors: the test can tell


def test_async_client_concurrent_requests(torch_server, mini_torch):
    from openai import AsyncOpenAI

    texts = sample_texts()

    async def main():
        async with AsyncOpenAI(base_url=torch_server.url + "/v1", api_key=API_KEYS[0], max_retries=0,
                               timeout=120) as client:
            return await asyncio.gather(*(client.embeddings.create(model="dewey-mini", input=[t]) for t in texts))

    answers = asyncio.run(main())
    reference = mini_torch.encode(texts)
    for answer, expected in zip(answers, reference):
        np.testing.assert_allclose(vectors(answer)[0], expected, rtol=0, atol=PARITY_ATOL)


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["dewey-mini"]


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_export_backends_match_their_encoder(backend, request, tmp_path_factory):
    from openai import OpenAI

    import runtimes

    folder = request.getfixturevalue(f"mini_{backend}")
    server = start(tmp_path_factory, f"{backend}-server", folder, "--backend", backend, "--model-name", "mini",
                   "--max-input-tokens", MAX_INPUT_TOKENS)
    try:
        server.wait_ready()
        encoder = runtimes.load(folder, backend=backend, **({"dtype": "fp32"} if backend == "openvino" else {}))
        texts = sample_texts()
        with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            got = vectors(client.embeddings.create(model="mini", input=texts))
            query = vectors(client.embeddings.create(model="mini", input=texts[:2],
                                                     extra_body={"prompt": "query", "mode": "cls_add_mean"}))
        np.testing.assert_allclose(got, encoder.encode(texts), rtol=0, atol=PARITY_ATOL)
        np.testing.assert_allclose(query, encoder.encode(texts[:2], prompt_name="query", mode="cls_add_mean"),
                                   rtol=0, atol=PARITY_ATOL)
        status, _, info = http("GET", server.url + "/info")
        assert status == 200 and info["backend"] == backend and info["precision"] == "fp32" and len(info["manifest_sha256"]) == 64
    finally:
        assert server.stop() == 0
