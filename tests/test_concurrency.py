"""One Encoder shared by many threads: every result is what the same call gives with no other threads.

Eight threads start together (a barrier) and each runs ``encode`` and ``encode_chunks`` on its own
texts for several iterations, while the others do the same; the texts span both attention paths of
the PyTorch backend (masked below 512 tokens, block-local above) and both malloc settings
(``runtimes.memory``: rows over 2048 tokens), and the threads use all three splitters with
different chunk sizes. Every result must be bitwise equal to the same call made before the threads
started (same backend, same shapes: the kernels are deterministic, with PyTorch, ONNX Runtime and
OpenVINO, one inference request per thread),
and each text equal, up to fp32 rounding, to that text encoded alone (other rows, other padding).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import FP32_ATOL
from runtimes.attention import SHORT_MASKED_MAX
from runtimes.chunking import SPLITTERS
from runtimes.memory import LONG_ROW_TOKENS

THREADS = 8
ITERATIONS = 3
# Characters per text of a thread: short, across the 512-token masked/linear switch, past the
# 2048-token long-row malloc threshold (the test tokenizer takes about 3 characters per token).
TEXT_CHARS = (300, 1800, 7000)
CHUNK_OVERLAP = 8
BASE_CHUNK_SIZE = 32


def thread_texts(k: int) -> list[str]:
    """Texts of thread k, cut from the stdlib's documentation: different places for every text."""
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[name] for name in sorted(topics))
    starts = [(k * len(TEXT_CHARS) + i) * max(TEXT_CHARS) for i in range(len(TEXT_CHARS))]
    return [corpus[start:start + n] for start, n in zip(starts, TEXT_CHARS)]


def thread_calls(k: int):
    """The two calls of thread k: plain encode (with or without a prompt) and encode_chunks with a
    splitter and chunk size of its own."""
    chunking = dict(splitter=SPLITTERS[k % len(SPLITTERS)], chunk_size=BASE_CHUNK_SIZE + k, chunk_overlap=CHUNK_OVERLAP)
    prompt = "query" if k % 2 else None
    return (
        lambda encoder, texts: encoder.encode(texts, prompt=prompt),
        lambda encoder, texts: encoder.encode_chunks(texts, prompt=prompt, **chunking),
    )


@pytest.fixture(params=["torch", "onnx", "openvino"])
def shared_encoder(request, checkpoint, tmp_path_factory):
    if request.param == "torch":
        return request.getfixturevalue("encoder")
    from runtimes import load

    if request.param == "onnx":
        return load(request.getfixturevalue("onnx_export"), backend="onnx")
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from dewey_export.openvino_export import OpenVINOTarget
    from dewey_export.pipeline import export

    # fp32: each text must also match its own call alone to fp32 rounding, whatever else shares its batch.
    folder = tmp_path_factory.mktemp("concurrency") / "openvino"
    export(checkpoint, folder, OpenVINOTarget(precision="fp32"), verify=False, log=lambda message: None)
    return load(folder, backend="openvino")


def test_threads_sharing_one_encoder_match_serial_results(shared_encoder):
    encoder = shared_encoder
    texts = [thread_texts(k) for k in range(THREADS)]
    calls = [thread_calls(k) for k in range(THREADS)]
    assert len({t for batch in texts for t in batch}) == THREADS * len(TEXT_CHARS)
    short, medium, long = zip(*([len(t.ids) for t in encoder.tokenizer.encode_texts(batch)] for batch in texts))
    assert max(short) < SHORT_MASKED_MAX < min(medium) and max(medium) < LONG_ROW_TOKENS < min(long)
    serial = [[call(encoder, texts[k]) for call in calls[k]] for k in range(THREADS)]
    alone = [[[call(encoder, [text])[0] for text in texts[k]] for call in calls[k]] for k in range(THREADS)]

    start = threading.Barrier(THREADS)

    def work(k: int) -> list:
        start.wait()
        return [[call(encoder, texts[k]) for call in calls[k]] for _ in range(ITERATIONS)]

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(work, range(THREADS)))

    for k in range(THREADS):
        encoded_alone, chunked_alone = alone[k]
        for encoded, chunked in results[k]:
            np.testing.assert_array_equal(encoded, serial[k][0])
            np.testing.assert_allclose(encoded, np.stack(encoded_alone), atol=FP32_ATOL)
            for doc, reference, single in zip(chunked, serial[k][1], chunked_alone):
                assert (doc.token_spans, doc.char_spans) == (reference.token_spans, reference.char_spans)
                assert doc.token_spans == single.token_spans
                np.testing.assert_array_equal(doc.vectors, reference.vectors)
                np.testing.assert_allclose(doc.vectors, single.vectors, atol=FP32_ATOL)
