"""One batcher across requests: 32 concurrent clients x several requests of mixed lengths all get the
in-process vectors, and the metrics show batches that carried rows of more than one request; a client
that disconnects leaves the queue."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .conftest import API_KEYS, PARITY_ATOL, http

CLIENTS = 32
REQUESTS_PER_CLIENT = 3
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


def corpus_texts(n: int) -> list[str]:
    """n texts of about 8 to 250 tokens, each from a different place of the stdlib's documentation."""
    from pydoc_data.topics import topics

    corpus = " ".join(topics[name] for name in sorted(topics))
    lengths = [30 + (i * 397) % 900 for i in range(n)]  # characters: ~8..250 tokens
    return [corpus[i * 2000: i * 2000 + length].strip() or "x" for i, length in enumerate(lengths)]


def test_concurrent_clients_get_their_own_vectors_in_order(torch_server, mini_torch):
    from openai import OpenAI

    texts = corpus_texts(CLIENTS * REQUESTS_PER_CLIENT * 2)
    reference = mini_torch.encode(texts)
    batches_before = torch_server.metric("dewey_serve_batch_requests_count")

    def client_work(k: int):
        answers = []
        with OpenAI(base_url=torch_server.url + "/v1", api_key=API_KEYS[k % 2], max_retries=0, timeout=300) as client:
            for r in range(REQUESTS_PER_CLIENT):
                first = (k * REQUESTS_PER_CLIENT + r) * 2
                batch = texts[first:first + 1 + (k + r) % 2]  # one or two texts per request
                response = client.embeddings.create(model="dewey-mini", input=batch)
                answers.append((first, np.asarray([d.embedding for d in response.data], dtype=np.float32)))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [a for answers in pool.map(client_work, range(CLIENTS)) for a in answers]
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    for first, got in results:
        np.testing.assert_allclose(got, reference[first:first + len(got)], rtol=0, atol=PARITY_ATOL)
    batches = torch_server.metric("dewey_serve_batch_requests_count") - batches_before
    single = torch_server.metric("dewey_serve_batch_requests_bucket", le="1.0")
    total = torch_server.metric("dewey_serve_batch_requests_count")
    assert 0 < batches < CLIENTS * REQUESTS_PER_CLIENT  # fewer forwards than requests
    assert total - single > 0, "no batch carried rows of more than one request"


def test_a_client_that_disconnects_leaves_the_queue(torch_server):
    """A request of two full batches keeps the short lane busy; a second one, queued behind its second
    batch, disconnects: its rows leave the queue and never run (the forward passes carry exactly the
    first request's rows), and the first still gets its answer."""
    from runtimes.batching import DEFAULT_BATCH_SIZE

    first_rows, second_rows = 2 * DEFAULT_BATCH_SIZE, 8
    cancelled = torch_server.metric("dewey_serve_cancelled_total")
    rows_run = torch_server.metric("dewey_serve_batch_rows_sum")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(http, "POST", torch_server.url + "/v1/embeddings",
                            {"model": "dewey-mini", "input": ["word " * 300] * first_rows}, AUTH)
        deadline = time.monotonic() + 120
        while torch_server.metric("dewey_serve_queue_rows") != DEFAULT_BATCH_SIZE and time.monotonic() < deadline:
            time.sleep(0.02)  # the first batch runs, the second waits
        payload = json.dumps({"model": "dewey-mini", "input": ["word " * 300] * second_rows}).encode()
        with socket.create_connection(("127.0.0.1", torch_server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEYS[0]}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                         + payload)
            while (torch_server.metric("dewey_serve_queue_rows") != DEFAULT_BATCH_SIZE + second_rows
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            assert torch_server.metric("dewey_serve_queue_rows") == DEFAULT_BATCH_SIZE + second_rows
        while torch_server.metric("dewey_serve_cancelled_total") == cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert torch_server.metric("dewey_serve_cancelled_total") == cancelled + 1
        status, _, body = first.result(120)
    assert status == 200 and len(body["data"]) == first_rows
    assert torch_server.metric("dewey_serve_queue_rows") == 0
    assert torch_server.metric("dewey_serve_batch_rows_sum") - rows_run == first_rows
    gone = [r for r in torch_server.events("request") if r["status"] == 499]
    assert gone and gone[-1]["path"] == "/v1/embeddings"


def test_a_request_split_across_batches_is_answered_in_order(torch_server, mini_torch):
    from runtimes.batching import DEFAULT_BATCH_SIZE

    texts = corpus_texts(DEFAULT_BATCH_SIZE + 16)[::-1]  # more rows than one batch holds, lengths mixed
    status, _, body = http("POST", torch_server.url + "/v1/embeddings",
                           {"model": "dewey-mini", "input": texts, "encoding_format": "float"}, AUTH)
    assert status == 200 and [d["index"] for d in body["data"]] == list(range(len(texts)))
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], mini_torch.encode(texts), rtol=0,
                               atol=PARITY_ATOL)
    assert [r for r in torch_server.events("request") if r["path"] == "/v1/embeddings"][-1]["batches"] >= 2
