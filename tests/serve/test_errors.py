"""Errors in OpenAI's body (``{"error": {message, type, param, code}}``) with their statuses: 400, 401
(with the probes still open), 404, 413, 429 with Retry-After under a flood, and the server answering
correctly afterwards."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtimes import TruncationWarning

from .conftest import API_KEYS, MAX_INPUT_TOKENS, PARITY_ATOL, http, start

AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


def is_openai_error(body: dict) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def long_text(tokens_at_least: int) -> str:
    return " ".join(f"word{i}" for i in range(tokens_at_least))


@pytest.mark.parametrize("body,param,code", [
    ({"model": "dewey-mini", "input": long_text(MAX_INPUT_TOKENS)}, "input", "input_too_long"),
    ({"model": "dewey-mini", "input": "x", "mode": "max"}, "mode", "invalid_value"),
    ({"model": "dewey-mini", "input": "x", "dimensions": 64}, "dimensions", "unsupported_parameter"),
    ({"model": "dewey-mini", "input": "x", "dimensions": "64"}, "dimensions", "invalid_type"),
    ({"model": "dewey-mini", "input": "x", "prompt": "summary"}, "prompt", "invalid_value"),
    ({"model": "dewey-mini", "input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"model": "dewey-mini", "input": "x", "truncate": "yes"}, "truncate", "invalid_type"),
    ({"model": "dewey-mini", "input": "x", "temperature": 1}, "temperature", "unknown_parameter"),
    ({"model": "dewey-mini", "input": ["ok", "   "]}, "input", "invalid_value"),
    ({"model": "dewey-mini", "input": "bad \ud800 text"}, "input", "invalid_value"),
    ({"model": "dewey-mini", "input": [[1, 2], [99999999]]}, "input", "invalid_value"),
    ({"model": "dewey-mini", "input": []}, "input", "invalid_type"),
    ({"input": "x"}, "model", "missing_required_parameter"),
])
def test_bad_requests_are_400_with_the_field_named(torch_server, body, param, code):
    status, _, answer = http("POST", torch_server.url + "/v1/embeddings", body, AUTH)
    assert status == 400 and is_openai_error(answer), answer
    assert answer["error"]["param"] == param and answer["error"]["code"] == code
    assert answer["error"]["type"] == "invalid_request_error"


def test_invalid_json_unknown_model_and_path(torch_server):
    status, _, answer = http("POST", torch_server.url + "/v1/embeddings", b"{not json", AUTH)
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    status, _, answer = http("POST", torch_server.url + "/v1/embeddings", {"model": "gpt", "input": "x"}, AUTH)
    assert status == 404 and answer["error"]["code"] == "model_not_found" and is_openai_error(answer)
    status, _, answer = http("GET", torch_server.url + "/v2/nothing", headers=AUTH)
    assert status == 404 and is_openai_error(answer)


def test_truncation_only_when_asked_and_counted(torch_server, mini_torch):
    text = long_text(MAX_INPUT_TOKENS)
    before = torch_server.metric("dewey_serve_truncated_inputs_total")
    status, headers, answer = http("POST", torch_server.url + "/v1/embeddings",
                                   {"model": "dewey-mini", "input": [text, "short"], "truncate": True}, AUTH)
    assert status == 200 and headers["x-dewey-truncated-inputs"] == "1"
    assert int(headers["x-dewey-truncated-tokens"]) > 0
    assert answer["usage"]["prompt_tokens"] == MAX_INPUT_TOKENS + 3  # one full row, and "short" with 2 specials
    with pytest.warns(TruncationWarning):
        expected = mini_torch.encode([text, "short"], max_length=MAX_INPUT_TOKENS)
    np.testing.assert_allclose(np.asarray([d["embedding"] for d in answer["data"]]), expected, rtol=0,
                               atol=PARITY_ATOL)
    assert torch_server.metric("dewey_serve_truncated_inputs_total") == before + 1


def test_api_keys(torch_server):
    import openai

    with openai.OpenAI(base_url=torch_server.url + "/v1", api_key="sk-wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.embeddings.create(model="dewey-mini", input="x")
    assert caught.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic " + API_KEYS[0]}, {"Authorization": "Bearer " + API_KEYS[0][:-1]}):
        status, _, answer = http("POST", torch_server.url + "/v1/embeddings", {"model": "dewey-mini", "input": "x"},
                                 headers)
        assert status == 401 and is_openai_error(answer)
    assert http("GET", torch_server.url + "/info")[0] == 401
    assert http("GET", torch_server.url + "/health")[0] == 200
    assert http("GET", torch_server.url + "/ready")[0] == 200
    assert http("GET", torch_server.url + "/metrics", raw=True)[0] == 200
    for key in API_KEYS:  # every listed key works
        assert http("GET", torch_server.url + "/info", headers={"Authorization": f"Bearer {key}"})[0] == 200
    log = torch_server.log_path.read_text()
    assert all(key[5:] not in log for key in API_KEYS) and "sk-wrong" not in log


def test_payload_over_the_limit_is_413(torch_server):
    body = {"model": "dewey-mini", "input": ["word " * 2000] * 30}  # ~300 kB, over the 200 kB limit
    status, _, answer = http("POST", torch_server.url + "/v1/embeddings", body, AUTH)
    assert status == 413 and answer["error"]["code"] == "payload_too_large" and is_openai_error(answer)


def test_log_lines_hold_no_text(torch_server):
    secret = "a very recognisable sentence about marmalade"
    status, _, _ = http("POST", torch_server.url + "/v1/embeddings", {"model": "dewey-mini", "input": secret}, AUTH)
    assert status == 200
    assert "marmalade" not in torch_server.log_path.read_text()
    last = [r for r in torch_server.events("request") if r["path"] == "/v1/embeddings"][-1]
    assert last["status"] == 200 and last["inputs"] == 1 and last["tokens"] > 2


def test_flood_over_a_tiny_queue_gets_429_then_the_server_still_answers(tmp_path_factory, mini, mini_torch):
    server = start(tmp_path_factory, "tiny-queue", mini, "--max-queue-tokens", 1200, "--max-input-tokens", 600)
    try:
        server.wait_ready()
        texts = ["word " * 250 + f"number {i}" for i in range(4)]  # 4 x 256 tokens: one request nearly fills the queue
        results = []

        def one():
            results.append(http("POST", server.url + "/v1/embeddings", {"model": "dewey-mini", "input": texts}))

        threads = [threading.Thread(target=one) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        statuses = sorted(status for status, _, _ in results)
        assert len(statuses) == 24 and set(statuses) == {200, 429}, statuses
        refused = [(headers, body) for status, headers, body in results if status == 429]
        assert all(is_openai_error(body) and body["error"]["code"] == "queue_full" for _, body in refused)
        assert all(int(headers["retry-after"]) >= 1 for headers, _ in refused)
        assert server.metric("dewey_serve_rejected_total", reason="queue_full") == len(refused)
        expected = mini_torch.encode(texts)
        for status, _, body in results:
            if status == 200:
                np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, rtol=0, atol=PARITY_ATOL)
        # a request larger than the whole queue can never fit: 413
        status, _, body = http("POST", server.url + "/v1/embeddings", {"model": "dewey-mini", "input": texts * 2})
        assert status == 413 and body["error"]["code"] == "request_too_large"
        status, _, body = http("POST", server.url + "/v1/embeddings", {"model": "dewey-mini", "input": texts[:1]})
        assert status == 200
        np.testing.assert_allclose(body["data"][0]["embedding"], expected[0], rtol=0, atol=PARITY_ATOL)
        assert server.metric("dewey_serve_queue_tokens") == 0
    finally:
        assert server.stop() == 0
